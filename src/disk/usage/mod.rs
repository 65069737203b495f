//! Who uses a disk image: PID files, /proc fds, QEMU's lock bytes.
//!
//! Three independent sources, merged per PID:
//! - `pidfile`: a PID file counts only when it names a live QEMU that holds
//!   the image (and, if QEMU was given `-pidfile`, that very file); a dead
//!   VM's leftover file or a recycled PID never blocks a check.
//! - [`procfs`]: every process with an fd on the image's (dev, ino).
//! - `lock`: QEMU's OFD lock bytes, which also reveal a QEMU in another PID
//!   namespace that /proc does not show.

mod batch;
mod lock;
mod pidfile;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::image::ImageFile;
use super::view::View;
use crate::procfs::{self, HoldersError, Target};
use crate::safe_open::MagicLinks;

pub use pidfile::{IMAGE_DIR, OWNER_UID, PatternError, validate_pattern};

/// Most stale PID files one scan reports; the rest are left out. A directory
/// anyone can fill must not turn every report and `DiskChecked` signal into
/// thousands of paths.
pub const MAX_STALE_PIDFILES: usize = 32;

/// How a user of the image was found. A closed set, in the order reports
/// list it; the contract's [`vmmanager_client::FoundBy`] spells it (the
/// InUse message uses that spelling too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FoundBy {
    Pidfile,
    Proc,
    Lock,
}

/// The one mapping to the contract's value.
impl From<FoundBy> for vmmanager_client::FoundBy {
    fn from(found_by: FoundBy) -> Self {
        match found_by {
            FoundBy::Pidfile => Self::Pidfile,
            FoundBy::Proc => Self::Proc,
            FoundBy::Lock => Self::Lock,
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
    /// Sorted, without duplicates.
    pub found_by: Vec<FoundBy>,
    /// The PID file that named this process, if any.
    pub pidfile: Option<PathBuf>,
    /// `exe` is a QEMU system emulator.
    pub is_qemu: bool,
}

impl DiskUser {
    /// Whether this user stops a check: a live QEMU, a writer, or a lock writer.
    /// A read-only non-QEMU user (a backup reader) is reported but harmless.
    pub fn blocks_check(&self) -> bool {
        self.is_qemu || self.writable
    }
}

/// Everything found about who uses an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Blocking users first (QEMU before other writers), then by PID.
    pub users: Vec<DiskUser>,
    /// PID files that should name this image's VM but whose process is gone
    /// or is not that VM: the explicit one, or matches of `{image_dir}`
    /// patterns. Never files from global directories.
    pub stale_pidfiles: Vec<PathBuf>,
}

impl DiskUsage {
    /// The first user that makes the image "in use", if any.
    pub fn blocking_user(&self) -> Option<&DiskUser> {
        self.users.iter().find(|u| u.blocks_check())
    }

    /// The users that make the image "in use" (QEMU first), if any.
    pub fn blocking_users(&self) -> Vec<DiskUser> {
        self.users
            .iter()
            .filter(|u| u.blocks_check())
            .cloned()
            .collect()
    }
}

/// Scans PID files, /proc and lock bytes. Cheap to clone into a blocking
/// task; clones share their /proc passes with each other.
#[derive(Debug, Clone)]
pub struct UsageScanner {
    proc_root: PathBuf,
    pidfile_patterns: Vec<String>,
    passes: Arc<batch::Batcher>,
}

/// What one PID file turned out to be.
enum Verdict {
    /// Names a live QEMU that holds the image.
    Valid(u32),
    /// Leftover, garbage, or names something that is not this image's VM.
    Stale,
    /// Missing, or another VM's valid PID file: not our business.
    Ignore,
}

impl UsageScanner {
    /// `pidfile_patterns` may contain `{image_dir}`; `*` is allowed in the last
    /// path component only (see [`validate_pattern`]).
    pub fn new(proc_root: PathBuf, pidfile_patterns: Vec<String>) -> Self {
        UsageScanner {
            passes: Arc::new(batch::Batcher::new(proc_root.clone())),
            proc_root,
            pidfile_patterns,
        }
    }

    /// Blocking: reads /proc. `explicit_pidfile` replaces the patterns.
    /// The caller's own PID files (the explicit one, and those next to the
    /// image) are found and read in `view`; the configured global ones
    /// (libvirt's, Proxmox's) as the service, and they are never reported
    /// as stale.
    ///
    /// The calling process itself is never reported: its only fds on the
    /// image are the service's own read-only probe descriptors. Nor are its
    /// children between fork and exec, which share those descriptors.
    ///
    /// /proc is read by passes shared with the scans of other clones waiting
    /// at the same moment, each started after its scan asked.
    ///
    /// Fails when /proc cannot be read (see [`procfs::holders`]), and stops
    /// with [`HoldersError::Cancelled`] soon after `cancel` is cancelled: it
    /// is looked at between processes, fds and PID files, and wakes a scan
    /// waiting for a pass.
    pub fn scan(
        &self,
        image: &ImageFile,
        explicit_pidfile: Option<&Path>,
        view: &View,
        cancel: &CancellationToken,
    ) -> Result<DiskUsage, HoldersError> {
        let target = Target::Inode {
            dev: image.dev,
            ino: image.ino,
        };
        let mut users: BTreeMap<u32, DiskUser> = self
            .passes
            .holders(target, cancel)?
            .into_iter()
            .map(|h| (h.pid, self.describe(h.pid, h.writable)))
            .collect();

        let mut stale_pidfiles = Vec::new();
        let image_dir = image.path.parent().unwrap_or(Path::new("/"));
        let (local, global): (Vec<String>, Vec<String>) = self
            .pidfile_patterns
            .iter()
            .map(|p| p.replace(pidfile::OWNER_UID, &image.uid.to_string()))
            .partition(|p| p.contains(pidfile::IMAGE_DIR));
        let read_all = |patterns: &[String], explicit: Option<&Path>, magic_links| {
            pidfile::candidates(patterns, image_dir, explicit)
                .into_iter()
                .take_while(|_| !cancel.is_cancelled())
                .map(|cand| {
                    let content = pidfile::read(&cand.path, magic_links);
                    (cand, content)
                })
                .collect::<Vec<_>>()
        };
        // `{image_dir}` is a name, looked up again here: it counts only if it
        // still holds the image, before and after its files are read, so a
        // directory swapped meanwhile (to list another one's PID files in a
        // public report) yields nothing.
        let image_is_in_its_dir = || {
            use std::os::unix::fs::MetadataExt;
            image.path.file_name().is_some_and(|name| {
                std::fs::symlink_metadata(image_dir.join(name))
                    .is_ok_and(|m| (m.dev(), m.ino()) == (image.dev, image.ino))
            })
        };
        let read_local = || {
            let uses_image_dir = explicit_pidfile.is_none() && !local.is_empty();
            if uses_image_dir && !image_is_in_its_dir() {
                return Vec::new();
            }
            let found = read_all(&local, explicit_pidfile, view.magic_links());
            if uses_image_dir && !image_is_in_its_dir() {
                tracing::warn!(dir = %image_dir.display(), "the image's directory changed during the scan");
                return Vec::new();
            }
            found
        };
        let mut found = view.run(read_local).unwrap_or_else(|e| {
            // /proc and the lock probe still find every VM.
            tracing::error!("cannot read PID files as the caller: {e}");
            Vec::new()
        });
        if explicit_pidfile.is_none() {
            found.extend(read_all(&global, None, MagicLinks::Follow));
        }
        if cancel.is_cancelled() {
            return Err(HoldersError::Cancelled);
        }
        for (cand, content) in found {
            // Global files are never reported stale; past the cap neither is
            // any other. Every file is still judged: a valid one may come last.
            let report_stale =
                cand.origin != pidfile::Origin::Global && stale_pidfiles.len() < MAX_STALE_PIDFILES;
            match self.judge_pidfile(content, &users, report_stale) {
                Verdict::Valid(pid) => {
                    let user = users.get_mut(&pid).expect("valid only for holders");
                    user.found_by.push(FoundBy::Pidfile);
                    user.pidfile.get_or_insert(cand.path);
                }
                Verdict::Stale if report_stale => stale_pidfiles.push(cand.path),
                Verdict::Stale | Verdict::Ignore => {}
            }
        }

        let mut lock = lock::probe(&image.file);
        // A QEMU that opened the image after /proc was read (a VM starting
        // now) holds a lock nobody seen explains; while it starts it may
        // also move the lock to a new descriptor as a scan passes. Look a
        // few more times before calling the holder invisible.
        for _ in 0..LOOKS_AGAIN {
            if !lock.locked || explains(&users, lock) {
                break;
            }
            for h in self.passes.holders(target, cancel)? {
                // A starting QEMU first opens the image read-only, then
                // again for writing: what a later look sees counts too.
                users
                    .entry(h.pid)
                    .or_insert_with(|| self.describe(h.pid, h.writable))
                    .writable |= h.writable;
            }
            lock = lock::probe(&image.file);
        }
        let mut users: Vec<DiskUser> = users.into_values().collect();
        if lock.locked {
            let mut attributed = false;
            let mut writer_explained = false;
            for user in users.iter_mut() {
                if procfs::is_qemu_family_exe(&user.exe) {
                    user.found_by.push(FoundBy::Lock);
                    attributed = true;
                    writer_explained |= user.writable;
                }
            }
            // Nobody visible explains the lock, or only read-only holders are
            // visible while someone holds the write lock (e.g. a read-only
            // VM on a backing file next to a container's VM writing it).
            if !attributed || (lock.writer && !writer_explained) {
                // A QEMU in another PID namespace: only its lock is visible.
                users.push(DiskUser {
                    pid: 0,
                    exe: String::new(),
                    vm_name: String::new(),
                    writable: lock.writer,
                    found_by: vec![FoundBy::Lock],
                    pidfile: None,
                    is_qemu: true,
                });
            }
        }

        for user in users.iter_mut() {
            user.found_by.sort();
            user.found_by.dedup();
        }
        users.sort_by_key(|u| (!u.blocks_check(), !u.is_qemu, u.pidfile.is_none(), u.pid));
        Ok(DiskUsage {
            users,
            stale_pidfiles,
        })
    }

    /// A /proc holder with its exe, VM name and QEMU-ness.
    fn describe(&self, pid: u32, writable: bool) -> DiskUser {
        let exe = procfs::exe(&self.proc_root, pid).unwrap_or_default();
        let is_qemu = procfs::is_qemu_exe(&exe);
        let vm_name = procfs::vm_name_of(&self.proc_root, pid);
        DiskUser {
            pid,
            exe,
            vm_name,
            writable,
            found_by: vec![FoundBy::Proc],
            pidfile: None,
            is_qemu,
        }
    }

    /// A PID file is the image's VM's when the live process holding its
    /// lock (QEMU locks its `-pidfile` for life) is a QEMU using the image;
    /// someone else's while anyone else holds it; and stale only when no
    /// live process holds it — unless its number names a QEMU using the
    /// image that was started without `-pidfile` (a launcher wrote the file).
    ///
    /// With `report_stale` false, Stale and Ignore mean the same, so a file
    /// whose PID holds nothing is not looked up in /proc at all.
    fn judge_pidfile(
        &self,
        content: pidfile::PidfileContent,
        holders: &BTreeMap<u32, DiskUser>,
        report_stale: bool,
    ) -> Verdict {
        use pidfile::{LockHolder, PidfileContent};
        let (pid, dev, ino) = match content {
            PidfileContent::Missing => return Verdict::Ignore,
            PidfileContent::Invalid => return Verdict::Stale,
            PidfileContent::File {
                holder: LockHolder::Pid(holder),
                ..
            } => {
                return match holders.get(&holder) {
                    Some(user) if user.is_qemu => Verdict::Valid(holder),
                    // A live VM's (or program's) own file: not ours, not stale.
                    _ => Verdict::Ignore,
                };
            }
            PidfileContent::File {
                holder: LockHolder::Unnamed,
                ..
            } => return Verdict::Ignore,
            PidfileContent::File { pid: None, .. } => return Verdict::Stale,
            PidfileContent::File {
                pid: Some(pid),
                dev,
                ino,
                ..
            } => (pid, dev, ino),
        };
        // Nobody holds it: stale, unless a launcher wrote it for a QEMU that
        // uses the image (QEMU's own -pidfile would be locked).
        if !report_stale && !holders.contains_key(&pid) {
            return Verdict::Ignore;
        }
        let Some(user) = holders.get(&pid).filter(|u| u.is_qemu) else {
            return Verdict::Stale;
        };
        let cmdline = procfs::cmdline(&self.proc_root, pid).unwrap_or_default();
        match procfs::pidfile_arg(&cmdline) {
            None => Verdict::Valid(user.pid),
            // Proxmox's rule, for a QEMU whose lock could not be seen (a
            // file system without POSIX locks): it must name this very file.
            Some(arg) if self.same_file(pid, &arg, dev, ino) => Verdict::Valid(user.pid),
            Some(_) => Verdict::Stale,
        }
    }

    /// Whether `arg` (QEMU's `-pidfile`, as QEMU sees it) is the file (dev, ino).
    fn same_file(&self, pid: u32, arg: &Path, dev: u64, ino: u64) -> bool {
        use std::os::unix::fs::MetadataExt;
        let seen = procfs::path_seen_by(&self.proc_root, pid, arg);
        // Fall back to our own view for absolute paths, e.g. when the proc
        // tree has no usable root link.
        let direct = arg.is_absolute().then(|| arg.to_owned());
        [Some(seen), direct]
            .into_iter()
            .flatten()
            .filter_map(|p| std::fs::metadata(p).ok())
            .any(|m| (m.dev(), m.ino()) == (dev, ino))
    }
}

/// How many more /proc scans an unexplained lock gets (see `scan`).
const LOOKS_AGAIN: usize = 3;

/// Whether the visible holders account for `lock`: some QEMU-family
/// process holds the image, and a writer among them if the lock says one.
fn explains(users: &BTreeMap<u32, DiskUser>, lock: lock::LockState) -> bool {
    let qemus = || {
        users
            .values()
            .filter(|u| procfs::is_qemu_family_exe(&u.exe))
    };
    qemus().next().is_some() && (!lock.writer || qemus().any(|u| u.writable))
}

#[cfg(test)]
mod tests;
