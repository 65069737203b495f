//! A [`SysfsWriter`] that records every write and plays the kernel's part in
//! a prepared sysfs tree: it moves the `driver` link on unbind, bind and
//! drivers_probe (and keeps the driver directory's `<addr>` back-link in
//! step), so the binder's own checks and the inventory see what they would
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
            ["bus", "pci", "devices", a, "driver", "unbind"] => {
                if *a != value || !bound(a) {
                    return err(libc::ENODEV);
                }
                unlink(a)
            }
            ["bus", "pci", "drivers", d, op @ ("bind" | "unbind")] => {
                let current = fs::read_link(at(value).join("driver")).ok();
                let on_d = current.is_some_and(|t| t.ends_with(d));
                match *op {
                    "unbind" if on_d => unlink(value),
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
            state.fail.as_deref() == Some(rel.as_str()) || state.fail_also.contains(&rel)
        };
        if fails {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        self.apply(&rel, &value)?;
        self.state.lock().unwrap().log.push((rel, value));
        Ok(())
    }
}
