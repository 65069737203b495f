//! A [`SysfsWriter`] that records every write and plays the kernel's part in
//! a prepared sysfs tree: it moves the `driver` link on unbind, bind and
//! drivers_probe (and keeps the driver directory's `<addr>` back-link in
//! step), and binds only the driver a `driver_override` names when one is
//! set, so the binder's own checks and the inventory see what they would
//! on a real host. Never point it at the real /sys.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vmmanager::devices::vfio::{SysfsWriter, VfioBinder};

#[derive(Default)]
pub struct KernelState {
    /// Every successful write: (path relative to the root, value).
    pub log: Vec<(String, String)>,
    /// Writes to this path (relative to the root) fail with EACCES.
    pub fail: Option<String>,
    /// More paths whose writes fail so (e.g. a rollback's own write).
    pub fail_also: Vec<String>,
    /// (path, value): only that value's writes to the path fail so (one
    /// device's unbind from a driver several are bound to).
    pub fail_at: Vec<(String, String)>,
    /// (path, value, device): after that write succeeds, the device is
    /// hot-unplugged (its directory, bus link, group entry and driver link
    /// go, as in the kernel).
    pub unplug_after: Option<(String, String, String)>,
    /// drivers_probe binds nothing (e.g. vfio-pci refuses the device).
    pub probe_binds_nothing: bool,
    /// What drivers_probe picks for a device without an override.
    pub natural: HashMap<String, String>,
}

/// Records writes (paths relative to the root) and applies their effect.
#[derive(Clone)]
pub struct FakeKernel {
    pub root: PathBuf,
    state: Arc<Mutex<KernelState>>,
}

impl FakeKernel {
    /// A kernel for the sysfs tree at `root`.
    pub fn new(root: &Path) -> FakeKernel {
        FakeKernel {
            root: root.to_owned(),
            state: Arc::default(),
        }
    }

    /// A binder on the same root whose writes go through this kernel.
    pub fn binder(&self) -> VfioBinder {
        VfioBinder::with_writer(self.root.clone(), None, Box::new(self.clone()))
    }

    /// The writes so far, clearing the log.
    pub fn take_log(&self) -> Vec<(String, String)> {
        std::mem::take(&mut self.state.lock().unwrap().log)
    }

    pub fn set(&self, f: impl FnOnce(&mut KernelState)) {
        f(&mut self.state.lock().unwrap());
    }

    /// Hot-unplug, as `FakeSysfs::remove` does it, from the kernel's side.
    fn unplug(&self, device: &str) {
        let link = self.root.join("bus/pci/devices").join(device);
        let dir = fs::canonicalize(&link).unwrap();
        let name_of = |attr: &str| {
            let target = fs::read_link(dir.join(attr)).ok()?;
            Some(target.file_name()?.to_owned())
        };
        if let Some(driver) = name_of("driver") {
            let back_link = self.root.join("bus/pci/drivers").join(driver);
            let _ = fs::remove_file(back_link.join(device));
        }
        if let Some(group) = name_of("iommu_group") {
            let groups = self.root.join("kernel/iommu_groups");
            let _ = fs::remove_file(groups.join(group).join("devices").join(device));
        }
        fs::remove_dir_all(dir).unwrap();
        fs::remove_file(link).unwrap();
    }

    fn apply(&self, rel: &str, value: &str) -> io::Result<()> {
        let err = |code| Err(io::Error::from_raw_os_error(code));
        let state = self.state.lock().unwrap();
        let at = |a: &str| self.root.join("bus/pci/devices").join(a);
        let back_link = |a: &str, d: &str| self.root.join("bus/pci/drivers").join(d).join(a);
        let link = |a: &str, d: &str| {
            symlink(
                format!("../../../bus/pci/drivers/{d}"),
                at(a).join("driver"),
            )?;
            // Best effort, as the device side is what the code reads.
            let _ = symlink(format!("../../../../bus/pci/devices/{a}"), back_link(a, d));
            Ok(())
        };
        let unlink = |a: &str| -> io::Result<()> {
            if let Ok(target) = fs::read_link(at(a).join("driver"))
                && let Some(d) = target.file_name().and_then(|d| d.to_str())
            {
                let _ = fs::remove_file(back_link(a, d));
            }
            fs::remove_file(at(a).join("driver"))
        };
        let bound = |a: &str| fs::read_link(at(a).join("driver")).is_ok();
        let parts: Vec<&str> = rel.split('/').collect();
        match parts.as_slice() {
            ["bus", "pci", "devices", a, "driver_override"] => {
                let v = value.trim();
                let shown = if v.is_empty() { "(null)" } else { v };
                fs::write(at(a).join("driver_override"), format!("{shown}\n"))
            }
            // A device with a reset method has the file; resetting changes
            // nothing the tests look at.
            ["bus", "pci", "devices", a, "reset"] if at(a).join("reset").exists() => Ok(()),
            ["bus", "pci", "devices", a, "driver", "unbind"] => {
                if *a != value || !bound(a) {
                    return err(libc::ENODEV);
                }
                unlink(a)
            }
            ["bus", "pci", "drivers", d, op @ ("bind" | "unbind")] => {
                let current = fs::read_link(at(value).join("driver")).ok();
                let on_d = current.is_some_and(|t| t.ends_with(d));
                // With an override set, only the driver it names matches,
                // an explicit bind included (pci_match_device).
                let over = fs::read_to_string(at(value).join("driver_override")).unwrap();
                let allowed = matches!(over.trim(), "(null)" | "") || over.trim() == *d;
                match *op {
                    "unbind" if on_d => unlink(value),
                    "bind" if !allowed => err(libc::ENODEV),
                    "bind" if !bound(value) => link(value, d),
                    "bind" => err(libc::EBUSY),
                    _ => err(libc::ENODEV),
                }
            }
            ["bus", "pci", "drivers_probe"] => {
                if bound(value) || state.probe_binds_nothing {
                    return Ok(());
                }
                let over = fs::read_to_string(at(value).join("driver_override")).unwrap();
                let over = over.trim();
                let pick = if over != "(null)" {
                    Some(over.to_owned())
                } else {
                    state.natural.get(value).cloned()
                };
                match pick {
                    Some(d) if self.root.join("bus/pci/drivers").join(&d).is_dir() => {
                        link(value, &d)
                    }
                    _ => Ok(()),
                }
            }
            _ => err(libc::ENOENT),
        }
    }
}

impl SysfsWriter for FakeKernel {
    fn write(&self, path: &Path, value: &[u8]) -> io::Result<()> {
        let rel = path
            .strip_prefix(&self.root)
            .expect("every write stays under the sysfs root")
            .to_str()
            .unwrap()
            .to_owned();
        let value = String::from_utf8(value.to_vec()).unwrap();
        let fails = {
            let state = self.state.lock().unwrap();
            state.fail.as_deref() == Some(rel.as_str())
                || state.fail_also.contains(&rel)
                || state.fail_at.iter().any(|(p, v)| *p == rel && *v == value)
        };
        if fails {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        self.apply(&rel, &value)?;
        let mut state = self.state.lock().unwrap();
        let unplug = match &state.unplug_after {
            Some((p, v, device)) if *p == rel && *v == value => Some(device.clone()),
            _ => None,
        };
        state.log.push((rel, value));
        drop(state);
        if let Some(device) = unplug {
            self.unplug(&device);
        }
        Ok(())
    }
}
