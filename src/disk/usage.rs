//! Who uses a disk image: PID files, /proc fds, QEMU's lock bytes.
//!
//! OWNER: helper A (disk inspection). Placeholder bodies until implemented.

use std::path::{Path, PathBuf};

use super::image::ImageFile;

/// How a user of the image was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FoundBy {
    Pidfile,
    Proc,
    Lock,
}

impl FoundBy {
    pub fn as_str(self) -> &'static str {
        match self {
            FoundBy::Pidfile => "pidfile",
            FoundBy::Proc => "proc",
            FoundBy::Lock => "lock",
        }
    }
}

/// One process (or, with `pid == 0`, an invisible lock holder) using the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskUser {
    pub pid: u32,
    /// Resolved `/proc/PID/exe` ("" when unknown).
    pub exe: String,
    /// QEMU `-name`, "" when none.
    pub vm_name: String,
    /// Holds the image open for writing (or, for pid 0, holds QEMU's write lock).
    pub writable: bool,
    pub found_by: Vec<FoundBy>,
    /// The PID file that named this process, if any.
    pub pidfile: Option<PathBuf>,
    /// `exe` is a QEMU system emulator.
    pub is_qemu: bool,
}

impl DiskUser {
    /// Whether this user stops a check: a live QEMU, a writer, or a lock writer.
    pub fn blocks_check(&self) -> bool {
        self.is_qemu || self.writable
    }
}

/// Everything found about who uses an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub users: Vec<DiskUser>,
    pub stale_pidfiles: Vec<PathBuf>,
}

impl DiskUsage {
    /// The first user that makes the image "in use", if any.
    pub fn blocking_user(&self) -> Option<&DiskUser> {
        self.users.iter().find(|u| u.blocks_check())
    }
}

/// Scans PID files, /proc and lock bytes. Cheap to clone into a blocking task.
#[derive(Debug, Clone)]
pub struct UsageScanner {
    proc_root: PathBuf,
    pidfile_patterns: Vec<String>,
}

impl UsageScanner {
    /// `pidfile_patterns` may contain `{image_dir}`; `*` is allowed in the last
    /// path component only.
    pub fn new(proc_root: PathBuf, pidfile_patterns: Vec<String>) -> Self {
        UsageScanner {
            proc_root,
            pidfile_patterns,
        }
    }

    /// Blocking: reads /proc. `explicit_pidfile` replaces the patterns.
    pub fn scan(&self, image: &ImageFile, explicit_pidfile: Option<&Path>) -> DiskUsage {
        let _ = (image, explicit_pidfile, &self.proc_root, &self.pidfile_patterns);
        DiskUsage::default()
    }
}
