//! PCI addresses (`0000:03:00.0`) and the device object paths derived from
//! them (`/org/example/VmManager/devices/pci_0000_03_00_0`): the one codec,
//! used by the service to name its objects and by clients to find them.

use std::fmt;
use std::str::FromStr;

use zbus::OwnedObjectPath;

use crate::names::DEVICES_PATH;

/// A PCI address `DDDD:BB:SS.F`, e.g. `0000:03:00.0`, and the path of the
/// service's device object for it.
///
/// Parses strictly ([`FromStr`]) and displays canonically (lowercase hex,
/// the kernel's widths), as in sysfs and the `Address` property. Ordered
/// numerically by domain, bus, slot, function. The object path is how a
/// client finds a [`PciDeviceProxy`](crate::PciDeviceProxy) and how it
/// reads the device of an InterfacesAdded / InterfacesRemoved signal.
///
/// ```
/// use vmmanager_client::PciAddress;
///
/// let address: PciAddress = "0000:03:00.0".parse().unwrap();
/// let path = address.object_path();
/// assert_eq!(path.as_str(), "/org/example/VmManager/devices/pci_0000_03_00_0");
/// assert_eq!(PciAddress::from_object_path(&path).unwrap(), address);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// The PCI domain (segment): `0000` on most hosts, wider behind Intel
    /// VMD (e.g. `10000`).
    pub domain: u32,
    /// The bus number.
    pub bus: u8,
    /// The slot (device) number, `0x00..=0x1f`.
    pub slot: u8,
    /// The function number, `0..=7`.
    pub function: u8,
}

/// Not a PCI address, device object name or device object path; holds the
/// text that was refused (or, from [`PciAddress::new`], the address with
/// its out-of-range field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a PCI address (expected DDDD:BB:SS.F, e.g. 0000:03:00.0): {0:?}")]
pub struct AddressError(pub String);

/// Highest slot (device) number: 5 bits.
const MAX_SLOT: u8 = 0x1f;
/// Highest function number: 3 bits.
const MAX_FUNCTION: u8 = 7;

/// Parses exactly `min..=max` hex digits (no sign, no `0x`, no spaces:
/// `from_str_radix` alone would accept a leading `+`).
fn hex_field(s: &str, min: usize, max: usize) -> Option<u32> {
    if s.len() < min || s.len() > max || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

impl PciAddress {
    /// The address `domain:bus:slot.function`.
    ///
    /// # Errors
    ///
    /// [`AddressError`] when `slot` is over `0x1f` or `function` over 7,
    /// which a PCI address cannot hold.
    pub fn new(domain: u32, bus: u8, slot: u8, function: u8) -> Result<Self, AddressError> {
        let address = PciAddress {
            domain,
            bus,
            slot,
            function,
        };
        if slot > MAX_SLOT || function > MAX_FUNCTION {
            return Err(AddressError(address.to_string()));
        }
        Ok(address)
    }

    /// The last component of the D-Bus object path: `pci_0000_03_00_0`.
    pub fn object_name(&self) -> String {
        format!(
            "pci_{:04x}_{:02x}_{:02x}_{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }

    /// The inverse of [`object_name`](Self::object_name). Only the canonical
    /// (lowercase) spelling is accepted, so every object has one name.
    ///
    /// # Errors
    ///
    /// [`AddressError`] for anything [`object_name`](Self::object_name)
    /// would not have made.
    pub fn from_object_name(name: &str) -> Result<Self, AddressError> {
        let err = || AddressError(name.to_owned());
        let rest = name.strip_prefix("pci_").ok_or_else(err)?;
        let mut parts = rest.split('_');
        let (Some(domain), Some(bus), Some(slot), Some(function), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(err());
        };
        let address: PciAddress = format!("{domain}:{bus}:{slot}.{function}")
            .parse()
            .map_err(|_| err())?;
        if address.object_name() != name {
            return Err(err());
        }
        Ok(address)
    }

    /// The device object's path: `/org/example/VmManager/devices/pci_0000_03_00_0`.
    pub fn object_path(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(format!("{DEVICES_PATH}/{}", self.object_name()))
            .expect("an object name is made of [a-z0-9_]")
    }

    /// The inverse of [`object_path`](Self::object_path): only a canonical
    /// device path is accepted, so this also tells device objects from the
    /// manager, jobs and intermediate nodes (e.g. in InterfacesRemoved).
    ///
    /// # Errors
    ///
    /// [`AddressError`] for any path that is not a device object's.
    pub fn from_object_path(path: &str) -> Result<Self, AddressError> {
        path.strip_prefix(DEVICES_PATH)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| AddressError(path.to_owned()))
            .and_then(Self::from_object_name)
            .map_err(|_| AddressError(path.to_owned()))
    }
}

impl FromStr for PciAddress {
    type Err = AddressError;

    /// Strict: `DDDD:BB:SS.F` in hex, either case. The domain may have up to
    /// 8 digits because Intel VMD puts devices in domains such as `10000`;
    /// everything else has exactly the kernel's widths.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || AddressError(s.to_owned());
        let (domain, rest) = s.split_once(':').ok_or_else(err)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(err)?;
        let (slot, function) = rest.split_once('.').ok_or_else(err)?;
        let domain = hex_field(domain, 4, 8).ok_or_else(err)?;
        let bus = hex_field(bus, 2, 2).ok_or_else(err)?;
        let slot = hex_field(slot, 2, 2).ok_or_else(err)?;
        let function = hex_field(function, 1, 1).ok_or_else(err)?;
        // The widths above bound bus/slot/function to 0..=0xff.
        PciAddress::new(domain, bus as u8, slot as u8, function as u8).map_err(|_| err())
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_displays_canonically() {
        let a = addr("0000:03:00.0");
        assert_eq!(
            a,
            PciAddress {
                domain: 0,
                bus: 3,
                slot: 0,
                function: 0
            }
        );
        assert_eq!(a.to_string(), "0000:03:00.0");
        assert_eq!(addr("0000:AF:1F.7").to_string(), "0000:af:1f.7");
        assert_eq!(addr("10000:e0:06.0").to_string(), "10000:e0:06.0");
        assert_eq!(addr("ffffffff:ff:1f.7").domain, 0xffff_ffff);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "0000:03:00",
            "0000:03:00.",
            "0000:03:00.0 ",
            " 0000:03:00.0",
            "0000:03:00.0\n",
            "000:03:00.0",
            "000000000:03:00.0",
            "0000:3:00.0",
            "0000:003:00.0",
            "0000:03:0.0",
            "0000:03:00.00",
            "0000:03:20.0", // slot > 0x1f
            "0000:03:00.8", // function > 7
            "0000:03:00.f",
            "0000:g3:00.0",
            "0000:+3:00.0",
            "+000:03:00.0",
            "0000-03-00.0",
            "0000:03:00:0",
            "0000:03.00.0",
            "0000:03:00.0.0",
            "0000:03:00:00.0",
            "03:00.0",
            "pci_0000_03_00_0",
            "0x00:03:00.0",
            "０000:03:00.0",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn object_names_round_trip() {
        let a = addr("0000:03:1f.7");
        assert_eq!(a.object_name(), "pci_0000_03_1f_7");
        assert_eq!(PciAddress::from_object_name("pci_0000_03_1f_7").unwrap(), a);
        for bad in [
            "",
            "pci_",
            "pci_0000_03_1F_7",
            "pci_0000_03_1f",
            "pci_0000_03_1f_7_0",
            "pci_0000:03:1f.7",
            "0000_03_1f_7",
            "pci_0000_03_20_0",
            "pci_0000_03_00_8",
            "pci__0000_03_00_0",
        ] {
            assert!(
                PciAddress::from_object_name(bad).is_err(),
                "accepted {bad:?}"
            );
        }
    }

    #[test]
    fn object_paths_round_trip() {
        let a = addr("10000:e0:06.0");
        let path = a.object_path();
        assert_eq!(
            path.as_str(),
            "/org/example/VmManager/devices/pci_10000_e0_06_0"
        );
        assert_eq!(PciAddress::from_object_path(path.as_str()).unwrap(), a);
        for bad in [
            "/org/example/VmManager/devices/odd",
            "/org/example/VmManager/devices",
            "/org/example/VmManager/devicespci_0000_03_00_0",
            "/org/example/VmManager/jobs/pci_0000_03_00_0",
            "pci_0000_03_00_0",
        ] {
            assert!(
                PciAddress::from_object_path(bad).is_err(),
                "accepted {bad:?}"
            );
        }
    }

    #[test]
    fn orders_like_the_canonical_strings() {
        let mut v = [
            addr("0000:10:00.0"),
            addr("0000:02:00.1"),
            addr("0001:00:00.0"),
            addr("0000:02:00.0"),
        ];
        v.sort();
        let s: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(
            s,
            [
                "0000:02:00.0",
                "0000:02:00.1",
                "0000:10:00.0",
                "0001:00:00.0"
            ]
        );
    }

    #[test]
    fn new_checks_ranges() {
        assert!(PciAddress::new(0, 0, 0x1f, 7).is_ok());
        assert!(PciAddress::new(0, 0, 0x20, 0).is_err());
        assert!(PciAddress::new(0, 0, 0, 8).is_err());
    }
}
