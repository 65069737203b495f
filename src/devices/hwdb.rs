//! Vendor and device names from the udev hwdb (`hwdb.bin`), for devices
//! udevd's database has no names for: udevd not running (yet), a container,
//! no coldplug. The same lookup as udevd's `hwdb --subsystem=pci` builtin
//! (`50-udev-default.rules`): the device's modalias is the query, and
//! `ID_VENDOR_FROM_DATABASE` / `ID_MODEL_FROM_DATABASE` are the answer, so
//! the names are the ones udevd would have stored.
//!
//! libudev finds `hwdb.bin` itself (`/etc/udev`, `/usr/lib/udev`, …: read
//! only, and readable under the unit's `ProtectSystem=strict`). Each
//! modalias is looked up once and remembered, so a device's events cost no
//! lookups. The file is mapped only while a pass of the inventory needs it
//! ([`Hwdb::release`]): the pages a lookup touches (about 1 MiB for a
//! handful of devices) would otherwise stay in the service's resident
//! memory for good.

use std::collections::HashMap;

use super::sysfs::PciDeviceInfo;

/// What the hwdb says about one modalias; `None` when it has no entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HwdbNames {
    pub vendor: Option<String>,
    pub model: Option<String>,
}

/// The udev hwdb and the answers it gave, owned by one inventory.
#[derive(Debug, Default)]
pub struct Hwdb {
    handle: Handle,
    answers: HashMap<String, HwdbNames>,
    /// Queries made so far (each answer is remembered).
    queries: usize,
}

#[derive(Debug, Default)]
enum Handle {
    #[default]
    NotOpened,
    Open(OwnedHwdb),
    /// No hwdb.bin (or libudev could not map it): said once, then no names.
    Unavailable,
}

/// libudev's hwdb handle, owned by exactly one [`Hwdb`].
struct OwnedHwdb(udev::Hwdb);

// SAFETY: udev::Hwdb is a pointer to a libudev object with no thread
// affinity (a mapped file, a refcount and a scratch property list). It is
// never cloned here, so nothing else shares it; `OwnedHwdb` is not `Sync`,
// so only the thread that owns it at the moment (the inventory's, on the
// blocking pool) uses it.
unsafe impl Send for OwnedHwdb {}

impl std::fmt::Debug for OwnedHwdb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnedHwdb")
    }
}

impl Hwdb {
    /// The names of `device` (cached per modalias).
    pub fn names(&mut self, device: &PciDeviceInfo) -> HwdbNames {
        let modalias = modalias(device);
        if let Some(names) = self.answers.get(&modalias) {
            return names.clone();
        }
        // The kernel never writes a NUL, and the udev crate panics on one
        // (a C string): a tree that has one gets no names, not a crash.
        if modalias.contains('\0') {
            return HwdbNames::default();
        }
        self.open();
        let Handle::Open(hwdb) = &self.handle else {
            return HwdbNames::default();
        };
        let mut names = HwdbNames::default();
        self.queries += 1;
        for entry in hwdb.0.query(&modalias) {
            // Lossy, as udevd's database is read.
            let value =
                Some(entry.value().to_string_lossy().trim().to_owned()).filter(|v| !v.is_empty());
            match entry.name().to_str() {
                Some("ID_VENDOR_FROM_DATABASE") => names.vendor = value,
                Some("ID_MODEL_FROM_DATABASE") => names.model = value,
                _ => {}
            }
        }
        tracing::debug!(%modalias, ?names, "hwdb lookup");
        self.answers.insert(modalias, names.clone());
        names
    }

    /// Unmaps hwdb.bin until the next lookup of a new modalias; the
    /// answers so far are kept.
    pub fn release(&mut self) {
        if matches!(self.handle, Handle::Open(_)) {
            self.handle = Handle::NotOpened;
        }
    }

    /// How many times the hwdb itself was asked.
    pub fn queries(&self) -> usize {
        self.queries
    }

    fn open(&mut self) {
        if matches!(self.handle, Handle::NotOpened) {
            self.handle = match udev::Hwdb::new() {
                Ok(hwdb) => Handle::Open(OwnedHwdb(hwdb)),
                Err(e) => {
                    tracing::info!("no udev hwdb ({e}): devices get no names from it");
                    Handle::Unavailable
                }
            };
        }
    }
}

/// The device's modalias, as the kernel writes it to sysfs; built from its
/// ids the same way when sysfs had none.
pub fn modalias(device: &PciDeviceInfo) -> String {
    if !device.modalias.is_empty() {
        return device.modalias.clone();
    }
    let [_, base, sub, interface] = device.class.to_be_bytes();
    format!(
        "pci:v{:08X}d{:08X}sv{:08X}sd{:08X}bc{base:02X}sc{sub:02X}i{interface:02X}",
        device.vendor_id, device.device_id, device.subsystem_vendor_id, device.subsystem_device_id
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::sysfs;
    use std::path::Path;

    /// This machine's real devices: the modalias built from the ids is the
    /// kernel's, byte for byte.
    #[test]
    fn a_built_modalias_is_the_kernels() {
        let devices = sysfs::enumerate(Path::new("/sys")).unwrap();
        assert!(!devices.is_empty(), "no PCI devices in /sys");
        for device in devices {
            assert!(!device.modalias.is_empty(), "{device:?}");
            let built = modalias(&PciDeviceInfo {
                modalias: String::new(),
                ..device.clone()
            });
            assert_eq!(built, device.modalias);
        }
    }

    /// A modalias with a NUL is not asked (the udev crate would panic).
    #[test]
    fn a_modalias_with_a_nul_gets_no_names() {
        let mut hwdb = Hwdb::default();
        let mut device = sysfs::enumerate(Path::new("/sys")).unwrap().remove(0);
        device.modalias = "pci:v00008086\0d00001234".into();
        assert_eq!(hwdb.names(&device), HwdbNames::default());
        assert_eq!(hwdb.queries(), 0);
    }

    /// Each modalias is asked once, whatever the hwdb says (a device it
    /// has no model for is not asked again on every event).
    #[test]
    fn each_modalias_is_asked_once() {
        let devices = sysfs::enumerate(Path::new("/sys")).unwrap();
        let mut hwdb = Hwdb::default();
        let first: Vec<HwdbNames> = devices.iter().map(|d| hwdb.names(d)).collect();
        let distinct: std::collections::HashSet<&str> =
            devices.iter().map(|d| d.modalias.as_str()).collect();
        assert_eq!(hwdb.queries(), distinct.len());
        hwdb.release();
        let again: Vec<HwdbNames> = devices.iter().map(|d| hwdb.names(d)).collect();
        assert_eq!(again, first);
        assert_eq!(hwdb.queries(), distinct.len());
    }
}
