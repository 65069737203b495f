//! Reading PCI devices from a sysfs tree (root configurable so tests can use
//! a prepared tree), and their hwdb names from udevd's database.
//!
//! sysfs is treated as hostile input: every read is bounded, opened without
//! blocking (a FIFO planted in a test tree must not hang us) and only from
//! regular files; malformed or unreadable optional attributes fall back to
//! their "unknown" values with a log line. Only `vendor`, `device` and
//! `class` are required: without them a device is skipped.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::kernel_files::{self, AtLimit, KernelFileError};
use vmmanager_client::PciAddress;

/// Upper bound for one sysfs attribute; the kernel's own limit is a page.
pub const MAX_ATTRIBUTE_BYTES: u64 = 4096;
/// Upper bound for one udev database file (they hold all of a device's
/// properties, tags and links).
pub const MAX_UDEV_DB_BYTES: u64 = 64 * 1024;

/// One PCI device as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDeviceInfo {
    pub address: PciAddress,
    pub vendor_id: u16,
    pub device_id: u16,
    /// 0 when unknown.
    pub subsystem_vendor_id: u16,
    /// 0 when unknown.
    pub subsystem_device_id: u16,
    /// 24 bits: base class, subclass, programming interface (`0x030000`).
    pub class: u32,
    pub driver: Option<String>,
    pub driver_override: Option<String>,
    pub iommu_group: Option<u32>,
    /// `None` when unknown (the kernel says -1).
    pub numa_node: Option<u32>,
    /// 0 when the device is not SR-IOV capable.
    pub sriov_total_vfs: u32,
    pub sriov_num_vfs: u32,
    /// For a virtual function, its physical function.
    pub physical_function: Option<PciAddress>,
    /// "" when unknown.
    pub modalias: String,
}

impl PciDeviceInfo {
    /// A PCI-to-PCI bridge (class 06 04 and 06 09) or a CardBus bridge
    /// (06 07): the classes of the kernel's non-"normal" header types, which
    /// the kernel's VFIO group-viability check lets keep any driver
    /// (pcieport) and which vfio-pci refuses to bind. Host bridges (06 00)
    /// have a normal header and are not excepted (usually they are unbound,
    /// which does not block a group anyway).
    pub fn is_bridge(&self) -> bool {
        matches!(self.class >> 8, 0x0604 | 0x0607 | 0x0609)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// The device is not (or no longer) in the tree.
    #[error("PCI device {0} is gone")]
    Gone(PciAddress),
    /// A required attribute could not be read or parsed.
    #[error("PCI device {address}: attribute {attribute}: {reason}")]
    Attribute {
        address: PciAddress,
        attribute: &'static str,
        reason: String,
    },
    /// The device directory itself could not be listed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why one attribute could not be read; only logged or wrapped.
#[derive(Debug)]
pub(crate) enum AttrError {
    Missing,
    File(KernelFileError),
    NotUtf8,
    Malformed(String),
}

impl From<KernelFileError> for AttrError {
    fn from(e: KernelFileError) -> Self {
        if e.is_not_found() {
            AttrError::Missing
        } else {
            AttrError::File(e)
        }
    }
}

impl AttrError {
    /// As an `io::Error` for callers whose errors carry one.
    pub(crate) fn into_io(self) -> io::Error {
        match self {
            AttrError::Missing => io::ErrorKind::NotFound.into(),
            AttrError::File(e) => e.into_io(),
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

impl std::fmt::Display for AttrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttrError::Missing => write!(f, "missing"),
            AttrError::File(e) => write!(f, "{e}"),
            AttrError::NotUtf8 => write!(f, "not UTF-8"),
            AttrError::Malformed(v) => write!(f, "malformed value {v:?}"),
        }
    }
}

/// An attribute's text without the trailing newline. More than a page is
/// an error rather than a cut, so a truncated number is never misread.
fn read_text(dir: &Path, name: &str) -> Result<String, AttrError> {
    let bytes = kernel_files::read_bounded(&dir.join(name), MAX_ATTRIBUTE_BYTES, AtLimit::Refuse)?;
    let text = String::from_utf8(bytes).map_err(|_| AttrError::NotUtf8)?;
    Ok(text.trim_end_matches('\n').to_owned())
}

/// `0x10de` (the kernel's format); a bare hex number is accepted too.
fn parse_hex(text: &str, max: u32) -> Result<u32, AttrError> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AttrError::Malformed(text.to_owned()));
    }
    match u32::from_str_radix(digits, 16) {
        Ok(v) if v <= max => Ok(v),
        _ => Err(AttrError::Malformed(text.to_owned())),
    }
}

fn parse_decimal<T: std::str::FromStr>(text: &str) -> Result<T, AttrError> {
    // `str::parse` accepts a leading '+'; sysfs never writes one.
    if text.starts_with('+') {
        return Err(AttrError::Malformed(text.to_owned()));
    }
    text.parse()
        .map_err(|_| AttrError::Malformed(text.to_owned()))
}

/// The driver bound to the device in `dev` (its `driver` link); `None`
/// when unbound.
pub(crate) fn driver(dev: &Path) -> Result<Option<String>, AttrError> {
    match kernel_files::link_name(&dev.join("driver")) {
        Ok(name) => Ok(Some(name)),
        Err(e) => match AttrError::from(e) {
            AttrError::Missing => Ok(None),
            e => Err(e),
        },
    }
}

/// The device's `driver_override`; `None` when unset (`(null)`, empty or
/// missing).
pub(crate) fn driver_override(dev: &Path) -> Result<Option<String>, AttrError> {
    match read_text(dev, "driver_override") {
        Ok(v) => Ok(Some(v).filter(|v| !v.is_empty() && v != "(null)")),
        Err(AttrError::Missing) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The device's IOMMU group (the name of its `iommu_group` link); `None`
/// when it has none.
pub(crate) fn iommu_group(dev: &Path) -> Result<Option<u32>, AttrError> {
    match kernel_files::link_name(&dev.join("iommu_group")) {
        Ok(name) => parse_decimal(&name).map(Some),
        Err(e) => match AttrError::from(e) {
            AttrError::Missing => Ok(None),
            e => Err(e),
        },
    }
}

/// The directory of one device (`<root>/bus/pci/devices/<address>`, a
/// symlink into `<root>/devices/…`).
pub fn device_dir(sysfs_root: &Path, address: &PciAddress) -> PathBuf {
    sysfs_root.join("bus/pci/devices").join(address.to_string())
}

/// An optional attribute: its value, or `default` (logged when the
/// attribute exists but is bad).
fn optional<T>(address: &PciAddress, name: &str, value: Result<T, AttrError>, default: T) -> T {
    match value {
        Ok(v) => v,
        Err(AttrError::Missing) => default,
        Err(e) => {
            tracing::warn!("PCI device {address}: ignoring attribute {name}: {e}");
            default
        }
    }
}

/// Reads one device. `Gone` when it is not in the tree or vanished while
/// being read; `Attribute` when vendor, device or class is unusable.
pub fn read_device(sysfs_root: &Path, address: &PciAddress) -> Result<PciDeviceInfo, SysfsError> {
    let dir = device_dir(sysfs_root, address);
    if !dir.is_dir() {
        return Err(SysfsError::Gone(*address));
    }
    let required = |name: &'static str, max: u32| -> Result<u32, SysfsError> {
        read_text(&dir, name)
            .and_then(|t| parse_hex(&t, max))
            .map_err(|e| {
                if !dir.is_dir() {
                    SysfsError::Gone(*address)
                } else {
                    SysfsError::Attribute {
                        address: *address,
                        attribute: name,
                        reason: e.to_string(),
                    }
                }
            })
    };
    let vendor_id = required("vendor", 0xffff)? as u16;
    let device_id = required("device", 0xffff)? as u16;
    let class = required("class", 0xff_ffff)?;

    let hex16 = |name: &str| read_text(&dir, name).and_then(|t| parse_hex(&t, 0xffff));
    let subsystem_vendor_id =
        optional(address, "subsystem_vendor", hex16("subsystem_vendor"), 0) as u16;
    let subsystem_device_id =
        optional(address, "subsystem_device", hex16("subsystem_device"), 0) as u16;
    let numa_node = optional(
        address,
        "numa_node",
        read_text(&dir, "numa_node").and_then(|t| parse_decimal::<i32>(&t)),
        -1,
    );
    // -1 is the kernel's "no node"; other negative nodes do not exist.
    let numa_node = u32::try_from(numa_node).ok();
    let sriov_total_vfs = optional(
        address,
        "sriov_totalvfs",
        read_text(&dir, "sriov_totalvfs").and_then(|t| parse_decimal::<u32>(&t)),
        0,
    );
    let sriov_num_vfs = optional(
        address,
        "sriov_numvfs",
        read_text(&dir, "sriov_numvfs").and_then(|t| parse_decimal::<u32>(&t)),
        0,
    );
    let driver_override = optional(address, "driver_override", driver_override(&dir), None);
    let modalias = optional(
        address,
        "modalias",
        read_text(&dir, "modalias"),
        String::new(),
    );
    let driver = optional(address, "driver", driver(&dir), None);
    let iommu_group = optional(address, "iommu_group", iommu_group(&dir), None);
    let physical_function = optional(
        address,
        "physfn",
        kernel_files::link_name(&dir.join("physfn"))
            .map_err(AttrError::from)
            .and_then(|n| n.parse::<PciAddress>().map_err(|_| AttrError::Malformed(n)))
            .map(Some),
        None,
    );
    // Missing links above may mean the device went away half-way; do not
    // report a half-read device as current.
    if !dir.is_dir() {
        return Err(SysfsError::Gone(*address));
    }
    Ok(PciDeviceInfo {
        address: *address,
        vendor_id,
        device_id,
        subsystem_vendor_id,
        subsystem_device_id,
        class,
        driver,
        driver_override,
        iommu_group,
        numa_node,
        sriov_total_vfs,
        sriov_num_vfs,
        physical_function,
        modalias,
    })
}

/// A VFIO device cdev of a device: `vfio-dev/<name>` in sysfs, the node
/// `/dev/vfio/devices/<name>` an iommufd QEMU opens.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VfioCdev {
    /// `vfioN`.
    pub name: String,
    pub major: u32,
    pub minor: u32,
}

/// Each VFIO device cdev of the device (from `vfio-dev/vfioN/dev`), sorted
/// by name; empty when it has none. A `vfioN` without `dev` has no cdev:
/// kernels without `CONFIG_VFIO_DEVICE_CDEV` (Debian 12's 6.1) make the
/// directory for every vfio-pci device all the same. Any other `vfio*`
/// entry that cannot be read is an error: a holder of it must not go
/// unseen.
pub fn vfio_cdevs(sysfs_root: &Path, address: &PciAddress) -> Result<Vec<VfioCdev>, SysfsError> {
    let path = device_dir(sysfs_root, address).join("vfio-dev");
    let entries = match fs::read_dir(&path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(SysfsError::Io { path, source }),
    };
    let mut cdevs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| SysfsError::Io {
            path: path.clone(),
            source,
        })?;
        let name = entry.file_name();
        if !name.as_encoded_bytes().starts_with(b"vfio") {
            continue;
        }
        let number = read_text(&entry.path(), "dev").and_then(|text| {
            let malformed = || AttrError::Malformed(text.clone());
            let (major, minor) = text.split_once(':').ok_or_else(malformed)?;
            Ok((parse_decimal(major)?, parse_decimal(minor)?))
        });
        match number {
            Ok((major, minor)) => cdevs.push(VfioCdev {
                name: name.to_string_lossy().into_owned(),
                major,
                minor,
            }),
            Err(AttrError::Missing) => {}
            Err(e) => {
                return Err(SysfsError::Io {
                    path: entry.path().join("dev"),
                    source: e.into_io(),
                });
            }
        }
    }
    cdevs.sort();
    Ok(cdevs)
}

/// Every readable device under `<root>/bus/pci/devices`, sorted by address.
/// Entries that are not PCI addresses, that vanish, or that lack a required
/// attribute are skipped and logged. A tree without a PCI bus is empty; an
/// error only when the directory exists but cannot be listed (callers keep
/// what they had rather than dropping every device).
pub fn enumerate(sysfs_root: &Path) -> Result<Vec<PciDeviceInfo>, SysfsError> {
    let path = sysfs_root.join("bus/pci/devices");
    let entries = match fs::read_dir(&path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(SysfsError::Io { path, source }),
    };
    let mut devices = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(source) => return Err(SysfsError::Io { path, source }),
        };
        let name = entry.file_name();
        let Some(address) = name.to_str().and_then(|n| n.parse::<PciAddress>().ok()) else {
            tracing::debug!("{}: not a PCI address, skipped", entry.path().display());
            continue;
        };
        match read_device(sysfs_root, &address) {
            Ok(info) => devices.push(info),
            Err(SysfsError::Gone(_)) => {
                tracing::debug!("PCI device {address} vanished while enumerating")
            }
            Err(e) => tracing::warn!("skipping PCI device: {e}"),
        }
    }
    devices.sort_by_key(|d| d.address);
    Ok(devices)
}

/// The devices the kernel lists in IOMMU group `group`, sorted; empty when
/// the group does not exist or cannot be read.
pub fn iommu_group_members(sysfs_root: &Path, group: u32) -> Vec<PciAddress> {
    let path = sysfs_root
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let entries = match fs::read_dir(&path) {
        Ok(entries) => entries,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("cannot list {}: {e}", path.display());
            }
            return Vec::new();
        }
    };
    let mut members: Vec<PciAddress> = entries
        .filter_map(Result::ok)
        // Groups may hold non-PCI devices (e.g. platform devices on ARM);
        // those are not ours to report.
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    members.sort();
    members.dedup();
    members
}

/// `(vendor, model)` names from udevd's database file
/// `<udev_data_dir>/+pci:<address>` (`E:ID_VENDOR_FROM_DATABASE=…`,
/// `E:ID_MODEL_FROM_DATABASE=…`). Both `None` when udevd does not run or
/// has no names for the device.
pub fn udev_names(udev_data_dir: &Path, address: &PciAddress) -> (Option<String>, Option<String>) {
    let path = udev_data_dir.join(format!("+pci:{address}"));
    let bytes = match kernel_files::read_bounded(&path, MAX_UDEV_DB_BYTES, AtLimit::Refuse) {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return (None, None),
        Err(e) => {
            tracing::debug!("{}: {e}", path.display());
            return (None, None);
        }
    };
    // Lossy: one bad byte in another property must not hide the names.
    let text = String::from_utf8_lossy(&bytes);
    let mut vendor = None;
    let mut model = None;
    for line in text.lines() {
        let value = |prefix: &str| {
            line.strip_prefix(prefix)
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        if let Some(v) = value("E:ID_VENDOR_FROM_DATABASE=") {
            vendor = Some(v);
        } else if let Some(v) = value("E:ID_MODEL_FROM_DATABASE=") {
            model = Some(v);
        }
    }
    (vendor, model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfio_device_entries_without_a_char_device_are_no_cdevs() {
        let root = tempfile::tempdir().unwrap();
        let address: PciAddress = "0000:02:00.0".parse().unwrap();
        let vfio_dev = device_dir(root.path(), &address).join("vfio-dev");
        // As on Debian 12's kernel: the device, but no `dev`.
        fs::create_dir_all(vfio_dev.join("vfio0/power")).unwrap();
        assert_eq!(vfio_cdevs(root.path(), &address).unwrap(), vec![]);
        fs::create_dir_all(vfio_dev.join("vfio1")).unwrap();
        fs::write(vfio_dev.join("vfio1/dev"), "511:1\n").unwrap();
        let cdev = VfioCdev {
            name: "vfio1".into(),
            major: 511,
            minor: 1,
        };
        assert_eq!(vfio_cdevs(root.path(), &address).unwrap(), vec![cdev]);
        // A `dev` that is there but unreadable is still an error.
        fs::write(vfio_dev.join("vfio1/dev"), "garbage\n").unwrap();
        assert!(vfio_cdevs(root.path(), &address).is_err());
    }

    #[test]
    fn hex_parsing_is_strict() {
        assert_eq!(parse_hex("0x10de", 0xffff).unwrap(), 0x10de);
        assert_eq!(parse_hex("10DE", 0xffff).unwrap(), 0x10de);
        assert_eq!(parse_hex("0x030000", 0xff_ffff).unwrap(), 0x030000);
        for bad in [
            "",
            "0x",
            "0x1ffff",
            "0x+1",
            "zz",
            "0x10de ",
            "-1",
            "0x123456789",
        ] {
            assert!(parse_hex(bad, 0xffff).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn decimal_parsing_is_strict() {
        assert_eq!(parse_decimal::<i32>("-1").unwrap(), -1);
        assert_eq!(parse_decimal::<u32>("7").unwrap(), 7);
        assert!(parse_decimal::<u32>("+7").is_err());
        assert!(parse_decimal::<u32>("-1").is_err());
        assert!(parse_decimal::<u32>("7 ").is_err());
    }

    #[test]
    fn bridges() {
        let mut info = PciDeviceInfo {
            address: "0000:00:01.0".parse().unwrap(),
            vendor_id: 0x8086,
            device_id: 1,
            subsystem_vendor_id: 0,
            subsystem_device_id: 0,
            class: 0x060400,
            driver: None,
            driver_override: None,
            iommu_group: None,
            numa_node: None,
            sriov_total_vfs: 0,
            sriov_num_vfs: 0,
            physical_function: None,
            modalias: String::new(),
        };
        assert!(info.is_bridge());
        info.class = 0x060401; // subtractive decode
        assert!(info.is_bridge());
        info.class = 0x060000;
        assert!(!info.is_bridge());
        info.class = 0x030000;
        assert!(!info.is_bridge());
    }
}
