//! A real QEMU guest holding disk images, as a child of the test.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::util::{self, ChildGuard, command_as, public_tempdir, read_lossy};

pub const QEMU: &str = "qemu-system-x86_64";

/// QEMU holds an image in ~50 ms; TCG under load can be much slower.
const START_TIMEOUT: Duration = Duration::from_secs(30);

struct Drive {
    path: PathBuf,
    readonly: bool,
}

pub struct VmBuilder {
    name: String,
    drives: Vec<Drive>,
    pidfile: Option<PathBuf>,
    user: Option<(u32, u32)>,
}

impl VmBuilder {
    /// Opens the first drive read-only (QEMU then takes only shared locks).
    pub fn readonly(mut self, readonly: bool) -> Self {
        self.drives[0].readonly = readonly;
        self
    }

    /// Another qcow2 drive.
    pub fn drive(mut self, image: impl Into<PathBuf>, readonly: bool) -> Self {
        self.drives.push(Drive {
            path: image.into(),
            readonly,
        });
        self
    }

    /// Where QEMU writes its PID; default `<first image's dir>/<name>.pid`
    /// (Quickemu's layout).
    pub fn pidfile(mut self, path: impl Into<PathBuf>) -> Self {
        self.pidfile = Some(path.into());
        self
    }

    /// Runs QEMU as `uid`/`gid` (no supplementary groups, so no KVM: TCG).
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// Starts QEMU and returns once its pidfile names it, it holds a lock on
    /// every drive and it has finished initialising (SIGTERM handler set).
    pub fn start(self) -> Vm {
        let pidfile = self.pidfile.unwrap_or_else(|| {
            let dir = self.drives[0].path.parent().expect("image has a parent");
            dir.join(format!("{}.pid", self.name))
        });
        let dir = public_tempdir("vmm-qemu-");
        let log_path = dir.path().join("qemu.log");
        let log = File::create(&log_path).expect("create qemu.log");
        let mut cmd = command_as(self.user, QEMU);
        cmd.args(["-accel", "kvm", "-accel", "tcg", "-m", "64", "-nodefaults"])
            .args(["-display", "none", "-name", &self.name, "-pidfile"])
            .arg(&pidfile);
        for d in &self.drives {
            // QEMU option values escape ',' by doubling it.
            let file = d
                .path
                .to_str()
                .expect("UTF-8 image path")
                .replace(',', ",,");
            let ro = if d.readonly { ",readonly=on" } else { "" };
            cmd.arg("-drive")
                .arg(format!("file={file},if=virtio,format=qcow2{ro}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {QEMU}: {e}"));
        let mut child = ChildGuard::new(child, format!("{QEMU} {}", self.name));
        let pid = child.pid();
        let images: Vec<PathBuf> = self.drives.iter().map(|d| d.path.clone()).collect();
        let mut exited = None;
        util::wait_until(
            START_TIMEOUT,
            &format!(
                "QEMU {} to write {} and lock its images",
                self.name,
                pidfile.display()
            ),
            || {
                if let Some(st) = child.try_wait() {
                    exited = Some(st);
                    return true;
                }
                pidfile_names(&pidfile, pid)
                    && images.iter().all(|i| is_locked(i))
                    && catches_sigterm(pid)
            },
            || read_lossy(&log_path),
        );
        if let Some(st) = exited {
            panic!(
                "QEMU {} exited during startup ({st}); output:\n{}",
                self.name,
                read_lossy(&log_path)
            );
        }
        Vm {
            child,
            pid,
            pidfile,
            name: self.name,
            _dir: dir,
        }
    }
}

/// `qemu-system-x86_64 … -name NAME -pidfile P -drive file=IMG,…`; killed on
/// drop.
pub struct Vm {
    child: ChildGuard,
    pid: u32,
    pidfile: PathBuf,
    name: String,
    _dir: TempDir,
}

impl Vm {
    pub fn builder(name: &str, image: impl Into<PathBuf>) -> VmBuilder {
        VmBuilder {
            name: name.to_owned(),
            drives: vec![Drive {
                path: image.into(),
                readonly: false,
            }],
            pidfile: None,
            user: None,
        }
    }

    /// A VM named `name` with `image` writable and the default pidfile.
    pub fn start(name: &str, image: impl Into<PathBuf>) -> Vm {
        Self::builder(name, image).start()
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn pidfile(&self) -> &Path {
        &self.pidfile
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// SIGKILL and reap: QEMU gets no chance to remove its pidfile, which
    /// is left stale.
    pub fn kill9(&mut self) -> ExitStatus {
        self.child.kill_and_wait()
    }

    /// SIGTERM and wait: QEMU shuts down cleanly and removes its pidfile.
    pub fn terminate(&mut self) -> ExitStatus {
        self.child.signal(libc::SIGTERM);
        self.child
            .wait_timeout(Duration::from_secs(15))
            .unwrap_or_else(|| panic!("QEMU {} ignored SIGTERM", self.name))
    }
}

fn pidfile_names(pidfile: &Path, pid: u32) -> bool {
    fs::read_to_string(pidfile).is_ok_and(|s| s.trim() == pid.to_string())
}

/// QEMU installs its SIGTERM handler late in init; before that a SIGTERM
/// kills it outright, without removing the pidfile.
fn catches_sigterm(pid: u32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
}

/// Whether any process holds a lock on `image` (QEMU's OFD locks), per
/// /proc/locks, whose entries read `… MAJ:MIN:INODE START END`.
pub fn is_locked(image: &Path) -> bool {
    let Ok(meta) = fs::metadata(image) else {
        return false;
    };
    let dev = meta.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let key = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    fs::read_to_string("/proc/locks")
        .expect("read /proc/locks")
        .lines()
        .any(|l| l.split_whitespace().any(|w| w == key))
}
