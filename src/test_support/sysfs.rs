//! A prepared sysfs tree in a temp dir, in the kernel's shape, for driving
//! the real device code without touching the host's /sys. Also included by
//! the integration tests (`tests/common/mod.rs`).
//!
//! Layout under [`FakeSysfs::root`] (relative links, as the kernel makes
//! them):
//! - `devices/pci0000:00/<addr>/` with `vendor`, `device`, `class`,
//!   `subsystem_*`, `numa_node`, `modalias`, `driver_override`
//!   (`(null)`), `uevent`, `remove`, optional `sriov_*`;
//!   links `driver`, `iommu_group`, `physfn`, `virtfnN`;
//! - `bus/pci/devices/<addr>` → that directory;
//! - `bus/pci/drivers/<name>/{bind,unbind,new_id,remove_id}` and
//!   `<addr>` links for bound devices; `bus/pci/drivers_probe`;
//! - `kernel/iommu_groups/<N>/devices/<addr>` → the device.
//!
//! udevd's database lives beside it, in [`FakeSysfs::udev_data_dir`].
//! Writable kernel files (`bind`, `unbind`, `drivers_probe`,
//! `driver_override`, …) are plain empty files, so tests can read back what
//! was written.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

pub struct FakeSysfs {
    dir: TempDir,
}

/// Chained setters for one device; each call changes the tree at once.
pub struct FakeDevice<'a> {
    fs: &'a FakeSysfs,
    addr: String,
}

/// Removes `path` whatever it is (file, link, directory); absent is fine.
fn remove_any(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).unwrap(),
        Ok(_) => fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}

fn relink(target: impl AsRef<Path>, link: &Path) {
    remove_any(link);
    symlink(target, link).unwrap();
}

impl Default for FakeSysfs {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeSysfs {
    /// An empty PCI bus.
    pub fn new() -> FakeSysfs {
        let dir = tempfile::tempdir().unwrap();
        let fs = FakeSysfs { dir };
        for d in [
            "devices/pci0000:00",
            "bus/pci/devices",
            "bus/pci/drivers",
            "kernel/iommu_groups",
        ] {
            fs::create_dir_all(fs.root().join(d)).unwrap();
        }
        fs::write(fs.root().join("bus/pci/drivers_probe"), "").unwrap();
        fs::write(fs.root().join("bus/pci/rescan"), "").unwrap();
        fs::create_dir_all(fs.udev_data_dir()).unwrap();
        fs
    }

    /// The sysfs root (what the code gets instead of `/sys`).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("sys")
    }

    /// What the code gets instead of `/run/udev/data`.
    pub fn udev_data_dir(&self) -> PathBuf {
        self.dir.path().join("udev-data")
    }

    /// What the code gets instead of `/etc/driverctl.d` (boot-time claims);
    /// not created.
    pub fn driverctl_dir(&self) -> PathBuf {
        self.dir.path().join("driverctl.d")
    }

    /// What the code gets instead of `/var/lib/vmmanager/boot-claims`.
    pub fn boot_claims_record(&self) -> PathBuf {
        self.dir.path().join("state/boot-claims")
    }

    /// The real directory of a device (`devices/pci0000:00/<addr>`).
    pub fn device_dir(&self, addr: &str) -> PathBuf {
        self.root().join("devices/pci0000:00").join(addr)
    }

    /// `bus/pci/devices/<addr>`, the link the code reads through.
    pub fn bus_link(&self, addr: &str) -> PathBuf {
        self.root().join("bus/pci/devices").join(addr)
    }

    /// `bus/pci/drivers/<name>`, created with its `bind`/`unbind`/`new_id`/
    /// `remove_id` files when missing.
    pub fn driver_dir(&self, name: &str) -> PathBuf {
        let dir = self.root().join("bus/pci/drivers").join(name);
        if !dir.exists() {
            fs::create_dir_all(&dir).unwrap();
            for f in ["bind", "unbind", "new_id", "remove_id", "uevent"] {
                fs::write(dir.join(f), "").unwrap();
            }
        }
        dir
    }

    pub fn group_dir(&self, group: u32) -> PathBuf {
        self.root()
            .join("kernel/iommu_groups")
            .join(group.to_string())
    }

    /// Creates (or recreates) a device with the given ids, no driver, no
    /// IOMMU group, NUMA node -1 and subsystem ids 0.
    pub fn device(&self, addr: &str, vendor: u16, device: u16, class: u32) -> FakeDevice<'_> {
        if fs::symlink_metadata(self.bus_link(addr)).is_ok() || self.device_dir(addr).exists() {
            self.remove(addr);
        }
        let dir = self.device_dir(addr);
        fs::create_dir_all(&dir).unwrap();
        let w = |name: &str, value: String| fs::write(dir.join(name), value).unwrap();
        w("vendor", format!("0x{vendor:04x}\n"));
        w("device", format!("0x{device:04x}\n"));
        w("class", format!("0x{class:06x}\n"));
        w("subsystem_vendor", "0x0000\n".into());
        w("subsystem_device", "0x0000\n".into());
        w("numa_node", "-1\n".into());
        w("driver_override", "(null)\n".into());
        w("uevent", String::new());
        w("remove", String::new());
        w("enable", "1\n".into());
        let dev = FakeDevice {
            fs: self,
            addr: addr.to_owned(),
        };
        dev.write_modalias(vendor, device, 0, 0, class);
        relink(
            format!("../../../devices/pci0000:00/{addr}"),
            &self.bus_link(addr),
        );
        dev
    }

    /// Same as [`device`](Self::device): a hot-plugged device.
    pub fn add(&self, addr: &str, vendor: u16, device: u16, class: u32) -> FakeDevice<'_> {
        self.device(addr, vendor, device, class)
    }

    /// Chained setters for an existing device.
    pub fn at(&self, addr: &str) -> FakeDevice<'_> {
        assert!(self.device_dir(addr).is_dir(), "{addr} is not in the tree");
        FakeDevice {
            fs: self,
            addr: addr.to_owned(),
        }
    }

    /// Hot-unplug: the device's directory, its bus link, its group entry and
    /// its driver's link go, as they do in the kernel.
    pub fn remove(&self, addr: &str) {
        self.unbind(addr);
        if let Some(group) = self.group_of(addr) {
            remove_any(&self.group_dir(group).join("devices").join(addr));
        }
        remove_any(&self.bus_link(addr));
        remove_any(&self.device_dir(addr));
    }

    /// Binds to `driver`, unbinding from the current one first.
    pub fn rebind(&self, addr: &str, driver: &str) {
        self.unbind(addr);
        let driver_dir = self.driver_dir(driver);
        relink(
            format!("../../../bus/pci/drivers/{driver}"),
            &self.device_dir(addr).join("driver"),
        );
        relink(
            format!("../../../../devices/pci0000:00/{addr}"),
            &driver_dir.join(addr),
        );
    }

    /// Leaves the device without a driver.
    pub fn unbind(&self, addr: &str) {
        if let Some(driver) = self.driver_of(addr) {
            remove_any(&self.root().join("bus/pci/drivers").join(driver).join(addr));
        }
        remove_any(&self.device_dir(addr).join("driver"));
    }

    /// The basename of the `driver` link, if any.
    pub fn driver_of(&self, addr: &str) -> Option<String> {
        let target = fs::read_link(self.device_dir(addr).join("driver")).ok()?;
        Some(target.file_name()?.to_str()?.to_owned())
    }

    pub fn group_of(&self, addr: &str) -> Option<u32> {
        let target = fs::read_link(self.device_dir(addr).join("iommu_group")).ok()?;
        target.file_name()?.to_str()?.parse().ok()
    }

    /// Moves the device into `group` (or out of any).
    pub fn set_iommu_group(&self, addr: &str, group: Option<u32>) {
        if let Some(old) = self.group_of(addr) {
            remove_any(&self.group_dir(old).join("devices").join(addr));
        }
        let link = self.device_dir(addr).join("iommu_group");
        remove_any(&link);
        if let Some(group) = group {
            let devices = self.group_dir(group).join("devices");
            fs::create_dir_all(&devices).unwrap();
            relink(format!("../../../kernel/iommu_groups/{group}"), &link);
            relink(
                format!("../../../../devices/pci0000:00/{addr}"),
                &devices.join(addr),
            );
        }
    }

    /// Writes raw bytes to an attribute (hostile contents included).
    pub fn write_attr(&self, addr: &str, name: &str, contents: impl AsRef<[u8]>) {
        let path = self.device_dir(addr).join(name);
        remove_any(&path);
        fs::write(path, contents).unwrap();
    }

    pub fn remove_attr(&self, addr: &str, name: &str) {
        remove_any(&self.device_dir(addr).join(name));
    }

    /// An attribute's contents, e.g. what a test's code wrote to
    /// `driver_override`.
    pub fn read_attr(&self, addr: &str, name: &str) -> String {
        fs::read_to_string(self.device_dir(addr).join(name)).unwrap()
    }

    /// Writes udevd's database entry with hwdb names for the device.
    pub fn udev_names(&self, addr: &str, vendor: &str, model: &str) {
        let text = format!(
            "I:1234567\nE:ID_PCI_CLASS_FROM_DATABASE=Some class\n\
             E:ID_VENDOR_FROM_DATABASE={vendor}\nE:ID_MODEL_FROM_DATABASE={model}\nG:systemd\n"
        );
        fs::write(self.udev_data_dir().join(format!("+pci:{addr}")), text).unwrap();
    }
}

impl FakeDevice<'_> {
    fn dir(&self) -> PathBuf {
        self.fs.device_dir(&self.addr)
    }

    fn write(&self, name: &str, value: String) {
        fs::write(self.dir().join(name), value).unwrap();
    }

    fn read_hex(&self, name: &str) -> u32 {
        let text = fs::read_to_string(self.dir().join(name)).unwrap();
        u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap()
    }

    fn write_modalias(&self, vendor: u16, device: u16, sv: u16, sd: u16, class: u32) {
        self.write(
            "modalias",
            format!(
                "pci:v{:08X}d{:08X}sv{:08X}sd{:08X}bc{:02X}sc{:02X}i{:02X}\n",
                vendor,
                device,
                sv,
                sd,
                class >> 16,
                (class >> 8) & 0xff,
                class & 0xff
            ),
        );
    }

    pub fn driver(self, name: &str) -> Self {
        self.fs.rebind(&self.addr, name);
        self
    }

    pub fn iommu_group(self, group: u32) -> Self {
        self.fs.set_iommu_group(&self.addr, Some(group));
        self
    }

    pub fn numa(self, node: i32) -> Self {
        self.write("numa_node", format!("{node}\n"));
        self
    }

    pub fn subsystem(self, vendor: u16, device: u16) -> Self {
        self.write("subsystem_vendor", format!("0x{vendor:04x}\n"));
        self.write("subsystem_device", format!("0x{device:04x}\n"));
        let (v, d, c) = (
            self.read_hex("vendor") as u16,
            self.read_hex("device") as u16,
            self.read_hex("class"),
        );
        self.write_modalias(v, d, vendor, device, c);
        self
    }

    /// An SR-IOV physical function with `total` possible and `num` enabled
    /// VFs (the VFs themselves are separate devices with [`physfn`]).
    ///
    /// [`physfn`]: Self::physfn
    pub fn sriov(self, total: u32, num: u32) -> Self {
        self.write("sriov_totalvfs", format!("{total}\n"));
        self.write("sriov_numvfs", format!("{num}\n"));
        self
    }

    /// Makes this device a VF of `pf`: a `physfn` link here and the next
    /// free `virtfnN` link in the PF (when the PF exists).
    pub fn physfn(self, pf: &str) -> Self {
        relink(format!("../{pf}"), &self.dir().join("physfn"));
        let pf_dir = self.fs.device_dir(pf);
        if pf_dir.is_dir() {
            let n = (0..)
                .find(|n| fs::symlink_metadata(pf_dir.join(format!("virtfn{n}"))).is_err())
                .unwrap();
            relink(
                format!("../{}", self.addr),
                &pf_dir.join(format!("virtfn{n}")),
            );
        }
        self
    }

    pub fn driver_override(self, value: &str) -> Self {
        self.write("driver_override", format!("{value}\n"));
        self
    }

    /// hwdb names in udevd's database.
    pub fn names(self, vendor: &str, model: &str) -> Self {
        self.fs.udev_names(&self.addr, vendor, model);
        self
    }
}
