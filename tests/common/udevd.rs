//! This machine's real PCI devices, used read-only plus `change` uevents
//! (never unbind, remove or rescan them), and a real systemd-udevd.
//!
//! Tests that start udevd, or that must not see one, hold the exclusive lock
//! [`UDEVD_LOCK`]: while udevd runs, "auto" event sources pick the udev group.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmmanager::devices::monitor::UDEVD_CONTROL_SOCKET;
use vmmanager_client::PciAddress;

pub const UDEVD_LOCK: &str = "/tmp/vmmanager-udevd.lock";
pub const PCI_DEVICES: &str = "/sys/bus/pci/devices";
const WAIT: Duration = Duration::from_secs(15);

/// Real PCI devices to send `change` to: endpoints with a driver or not,
/// but never the host bridge (00:00.0) nor anything whose uevent file is
/// not writable.
pub fn devices() -> Vec<PciAddress> {
    let mut list: Vec<PciAddress> = std::fs::read_dir(PCI_DEVICES)
        .expect("read /sys/bus/pci/devices")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|a: &PciAddress| !(a.bus == 0 && a.slot == 0))
        .collect();
    list.sort();
    assert!(!list.is_empty(), "no PCI devices to send uevents to");
    list
}

/// The device most tests use: the last one (here a virtio RNG or balloon).
pub fn device() -> PciAddress {
    *devices().last().unwrap()
}

pub fn sysfs(address: &PciAddress) -> PathBuf {
    Path::new(PCI_DEVICES).join(address.to_string())
}

/// Makes the kernel emit a `change` uevent for the device.
pub fn write_change(address: &PciAddress) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(sysfs(address).join("uevent"))
        .expect("open uevent");
    f.write_all(b"change").expect("write change to uevent");
}

/// Holds an exclusive `flock` until dropped.
pub struct FileLock {
    _held: File,
}

impl FileLock {
    pub fn exclusive(path: &str) -> FileLock {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .expect("open lock file");
        // SAFETY: flock on an fd this File owns; blocks until granted.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {path}: {}", std::io::Error::last_os_error());
        FileLock { _held: file }
    }
}

/// A systemd-udevd run in the foreground as our child; stopped (and
/// `/run/udev` removed if it was not there before) on drop, panics included.
pub struct Udevd {
    child: Option<Child>,
    created_run_udev: bool,
    _lock: FileLock,
}

impl Udevd {
    pub fn start() -> Udevd {
        let lock = FileLock::exclusive(UDEVD_LOCK);
        let control = Path::new(UDEVD_CONTROL_SOCKET);
        assert!(
            !control.exists(),
            "{UDEVD_CONTROL_SOCKET} exists: a udevd not started by this test runs \
             (or a stale socket was left behind); stop it / remove /run/udev first"
        );
        let created_run_udev = !Path::new("/run/udev").exists();
        let child = Command::new("/lib/systemd/systemd-udevd")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start /lib/systemd/systemd-udevd");
        let mut udevd = Udevd {
            child: Some(child),
            created_run_udev,
            _lock: lock,
        };
        let deadline = Instant::now() + WAIT;
        while !control.exists() {
            if let Some(status) = udevd.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("systemd-udevd exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "udevd did not create its control socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        udevd
    }
}

impl Drop for Udevd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM lets udevd stop its workers; SIGKILL if it hangs.
            // SAFETY: kill(2) on our own child's PID, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if self.created_run_udev {
            let _ = std::fs::remove_dir_all("/run/udev");
        } else {
            let _ = std::fs::remove_file(UDEVD_CONTROL_SOCKET);
        }
    }
}
