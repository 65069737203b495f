//! Who holds a file open: one pass over a /proc tree answers for any number
//! of targets, split across threads when the tree is big.
//!
//! Nearly all of a scan's time is the kernel's (perf: the statx of each fd
//! link, then listing and opening each fd directory), so per fd there is one
//! statx relative to the open fd directory and no allocation, per process
//! one `openat` and raw `getdents64` into a reused buffer (readdir(3)'s DIR
//! would allocate and `fstat` per directory), and a host with many
//! processes or fds is shared out among the CPUs.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io::{self, Write as _};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;

use super::{MAX_FDINFO, fdinfo_writable, parse_decimal, pid_path, same_exe_as_self, stat_text};
use crate::kernel_files::{self, AtLimit, KernelFileError};

/// What an open fd must refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// One inode: (st_dev, st_ino).
    Inode { dev: u64, ino: u64 },
    /// A character device by number (st_rdev), through whichever node it was
    /// opened: a QEMU in its own mount namespace (libvirt's default) opens a
    /// private copy of `/dev/vfio/N` with another inode.
    CharDevice { rdev: u64 },
    /// A block device by number (st_rdev), through whichever node it was
    /// opened (`/dev/vda`, `/dev/disk/by-…`, a container's own copy).
    BlockDevice { rdev: u64 },
}

impl Target {
    /// The identity of the file `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> Target {
        if meta.file_type().is_char_device() {
            Target::CharDevice { rdev: meta.rdev() }
        } else {
            Target::Inode {
                dev: meta.dev(),
                ino: meta.ino(),
            }
        }
    }
}

/// A process holding the target, as seen through its fds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Some fd referring to the target is open for writing.
    pub writable: bool,
}

/// Why a scan ([`holders`], [`holders_of_any`], or a pass shared by several
/// requesters) could not tell who holds a file.
#[derive(Debug, thiserror::Error)]
pub enum HoldersError {
    #[error("cannot read {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("cancelled")]
    Cancelled,
}

impl HoldersError {
    /// An equal error, for each requester of a shared pass that failed
    /// (`io::Error` is not `Clone`): the same errno, or else the same kind
    /// and message.
    pub fn duplicate(&self) -> HoldersError {
        match self {
            HoldersError::Cancelled => HoldersError::Cancelled,
            HoldersError::Unreadable { path, source } => HoldersError::Unreadable {
                path: path.clone(),
                source: match source.raw_os_error() {
                    Some(errno) => io::Error::from_raw_os_error(errno),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            },
        }
    }
}

/// Whether `e` says the service itself ran out of something (descriptors,
/// memory), rather than something about the one process or file it read.
///
/// Only these fail a scan. A process that vanished or is hidden (ENOENT,
/// ESRCH, EACCES), garbage in a prepared tree (ENOTDIR), or a dead FUSE or
/// NFS mount behind one fd (ENOTCONN, ESTALE, EIO) says nothing about the
/// target; failing on them would let any user with a dead FUSE mount stop
/// every check on the host. A refused look (EACCES, EPERM) is skipped too,
/// but said ([`Scanned::unseen`]) for callers who must not take it for
/// "no holder".
fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    )
}

fn unreadable(path: &Path, source: io::Error) -> HoldersError {
    HoldersError::Unreadable {
        path: path.to_owned(),
        source,
    }
}

/// Every process under `proc_root` (except `skip_pid`) with an fd on
/// `target`, sorted by PID: [`holders_of_any`] for one target.
pub fn holders(
    proc_root: &Path,
    target: Target,
    skip_pid: u32,
    cancel: &CancellationToken,
) -> Result<Vec<Holder>, HoldersError> {
    let mut each = holders_of_any(proc_root, &[target], skip_pid, cancel)?;
    Ok(each.pop().expect("one list per target"))
}

/// For each of `targets`, in order, every process under `proc_root` (except
/// `skip_pid`) with an fd on it, sorted by PID; from one pass over /proc, so
/// checks waiting at the same moment share its cost. Matched by `stat()` of
/// the fd link, never by the link's text.
///
/// An error when `proc_root` cannot be read or the service runs out of
/// descriptors or memory on the way (EMFILE, ENFILE, ENOMEM; a vanished,
/// hidden or dead-mount fd is skipped), and as soon as `cancel` is cancelled
/// (looked at before every process and fd): an unfinished scan never reads
/// as "nobody", for any target.
///
/// A child of `skip_pid` between fork and exec is no holder: until its exec
/// it runs our executable, with copies of our fds. Nor is a process gone
/// before the pass ends.
pub fn holders_of_any(
    proc_root: &Path,
    targets: &[Target],
    skip_pid: u32,
    cancel: &CancellationToken,
) -> Result<Vec<Vec<Holder>>, HoldersError> {
    scan(proc_root, targets, skip_pid, cancel, Split::HOST).map(|scanned| scanned.holders)
}

/// [`holders_of_any`], and the processes whose fds the service was not
/// allowed to look at (EACCES, EPERM: an LSM's or ptrace's refusal), for
/// a caller to whom such a process is "unknown", not "no holder".
pub fn holders_of_any_and_unseen(
    proc_root: &Path,
    targets: &[Target],
    skip_pid: u32,
    cancel: &CancellationToken,
) -> Result<Scanned, HoldersError> {
    scan(proc_root, targets, skip_pid, cancel, Split::HOST)
}

/// What one pass found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    /// For each target, in order, its holders sorted by PID.
    pub holders: Vec<Vec<Holder>>,
    /// Processes, sorted, with an fd directory or fd the service was
    /// refused (EACCES, EPERM), still there after the pass.
    pub unseen: Vec<u32>,
}

/// A refusal to look (ptrace's access check, an LSM), not a vanished
/// process or fd.
fn denied(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM))
}

/// How a scan is shared out among threads. A thread costs about as much to
/// start as scanning a couple of processes, so small scans stay on the
/// calling thread.
#[derive(Debug, Clone, Copy)]
struct Split {
    /// Threads at most, the calling one included; `None`: as many as the
    /// host runs at once (asked only when a scan is big enough to split).
    max_threads: Option<usize>,
    /// One thread per this many processes.
    pids_per_thread: usize,
    /// The fds of a process with more than this many are set aside by the
    /// first pass, and the second shares them out among threads,
    /// `fd_chunk` at a time: one process with 50,000 fds keeps every
    /// thread busy.
    shared_above: usize,
    fd_chunk: usize,
    /// One thread per this many set-aside fds.
    fds_per_thread: usize,
    /// Set-aside fds at most (4 bytes each); past that, fds are looked at
    /// as they are listed.
    set_aside_max: usize,
}

impl Split {
    const HOST: Split = Split {
        max_threads: None,
        pids_per_thread: 32,
        shared_above: 1024,
        fd_chunk: 256,
        fds_per_thread: 1024,
        set_aside_max: 256 * 1024,
    };
}

/// Process `pid` has an fd on `targets[target]`.
#[derive(Debug, Clone, Copy)]
struct Found {
    pid: u32,
    target: usize,
    writable: bool,
}

/// Fds of `pid` listed by the first pass, for the second.
type SetAside = (u32, Vec<u32>);

/// What every thread of one scan shares.
struct Scan<'a> {
    /// `proc_root` opened: the base of every lookup below it, so each
    /// process's fd directory is one short relative walk away.
    root: BorrowedFd<'a>,
    proc_root: &'a Path,
    index: &'a TargetIndex,
    cancel: &'a CancellationToken,
    /// Set when any thread failed: the others stop too.
    failed: AtomicBool,
    /// How many more fds may be set aside.
    set_aside_room: AtomicUsize,
}

fn scan(
    proc_root: &Path,
    targets: &[Target],
    skip_pid: u32,
    cancel: &CancellationToken,
    split: Split,
) -> Result<Scanned, HoldersError> {
    if targets.is_empty() {
        return Ok(Scanned {
            holders: Vec::new(),
            unseen: Vec::new(),
        });
    }
    let index = TargetIndex::new(targets);
    let root =
        open_dir(libc::AT_FDCWD, &c_path(proc_root)).map_err(|e| unreadable(proc_root, e))?;
    let mut pids = Vec::new();
    let mut dirents = DirentBuffer::new();
    loop {
        let names = dirents
            .read(root.as_fd())
            .map_err(|e| unreadable(proc_root, e))?;
        if names.is_empty() {
            break;
        }
        // Cheap filters first: no syscall for "self", "meminfo", ourselves.
        pids.extend(
            names
                .filter_map(parse_decimal)
                .filter(|&pid| pid != skip_pid),
        );
    }
    drop(dirents);

    let scan = Scan {
        root: root.as_fd(),
        proc_root,
        index: &index,
        cancel,
        failed: AtomicBool::new(false),
        set_aside_room: AtomicUsize::new(split.set_aside_max),
    };
    let mut host_threads = None;
    let mut max_threads = || {
        split.max_threads.unwrap_or_else(|| {
            *host_threads.get_or_insert_with(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
            })
        })
    };

    // First pass: the processes, taken one at a time by whichever thread is
    // free.
    let next = AtomicUsize::new(0);
    let threads = threads_for(pids.len(), split.pids_per_thread, &mut max_threads);
    let first = on_threads(threads, &scan.failed, || {
        let mut scanner = Scanner::new(&scan);
        while let Some(&pid) = pids.get(next.fetch_add(1, Ordering::Relaxed)) {
            scanner.process(pid, split.shared_above)?;
        }
        Ok((scanner.found, scanner.set_aside, scanner.unseen))
    })?;
    let mut found = Vec::with_capacity(first.len());
    let mut set_aside = Vec::new();
    let mut unseen = Vec::new();
    for (matched, aside, refused) in first {
        found.push(matched);
        set_aside.extend(aside);
        unseen.extend(refused);
    }

    // Second pass: the set-aside fds, in chunks.
    if !set_aside.is_empty() {
        let chunks = chunks(&set_aside, split.fd_chunk);
        let all_fds = set_aside.iter().map(|(_, fds)| fds.len()).sum();
        let next = AtomicUsize::new(0);
        let threads = threads_for(all_fds, split.fds_per_thread, &mut max_threads);
        let second = on_threads(threads, &scan.failed, || {
            let mut scanner = Scanner::new(&scan);
            // Consecutive chunks may be the same process's.
            let mut open: Option<(u32, OwnedFd)> = None;
            while let Some((i, range)) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                let (pid, fds) = &set_aside[*i];
                let dir = match open.take() {
                    Some((open_pid, dir)) if open_pid == *pid => dir,
                    _ => match scanner.open_fd_dir(*pid)? {
                        Some(dir) => dir,
                        // Gone since the first pass.
                        None => continue,
                    },
                };
                scanner.check_fds(dir.as_fd(), *pid, &fds[range.clone()])?;
                open = Some((*pid, dir));
            }
            Ok((scanner.found, scanner.unseen))
        })?;
        for (matched, refused) in second {
            found.push(matched);
            unseen.extend(refused);
        }
    }

    let found = merged(found.into_iter().flatten().collect());
    let mut holders = vec![Vec::new(); targets.len()];
    let mut recheck = None;
    for of_one in found.chunk_by(|a, b| a.pid == b.pid) {
        let pid = of_one[0].pid;
        let parent = match parent_after_pass(proc_root, pid) {
            // It holds nothing now. (It may have been a child of ours that
            // held copies of our fds, then exec'd, ran and was reaped.)
            ParentAfterPass::Gone => continue,
            ParentAfterPass::Of(parent) => Some(parent),
            ParentAfterPass::Unknown => None,
        };
        if parent == Some(skip_pid) {
            // A child of ours between fork and exec shares every fd we had at
            // the fork (the service spawning qemu-img for another check).
            // Until its exec it runs our executable and is no user. Its
            // close-on-exec copies vanish at the exec, so looking again
            // after reading its exe also covers an exec in between.
            if same_exe_as_self(proc_root, pid) {
                continue;
            }
            let recheck = recheck.get_or_insert_with(|| Scanner::new(&scan));
            recheck.forget();
            recheck.process(pid, usize::MAX)?;
            let still = merged(std::mem::take(&mut recheck.found));
            for first in of_one {
                if let Some(again) = still.iter().find(|s| s.target == first.target) {
                    holders[first.target].push(Holder {
                        pid,
                        writable: again.writable,
                    });
                }
            }
            continue;
        }
        for f in of_one {
            holders[f.target].push(Holder {
                pid,
                writable: f.writable,
            });
        }
    }
    unseen.sort_unstable();
    unseen.dedup();
    // Gone since: it holds nothing now.
    unseen.retain(|&pid| !matches!(parent_after_pass(proc_root, pid), ParentAfterPass::Gone));
    Ok(Scanned { holders, unseen })
}

/// The parent of a process the pass found, read after the pass.
enum ParentAfterPass {
    Of(u32),
    /// Exited (and reaped) since.
    Gone,
    /// Its stat cannot be read or parsed: it counts as no child of ours.
    Unknown,
}

fn parent_after_pass(proc_root: &Path, pid: u32) -> ParentAfterPass {
    match stat_text(proc_root, pid) {
        Ok(line) => kernel_files::parse_stat(&line).map_or(ParentAfterPass::Unknown, |stat| {
            ParentAfterPass::Of(stat.ppid)
        }),
        Err(e) if e.is_not_found() => ParentAfterPass::Gone,
        Err(KernelFileError::Io(e)) if e.raw_os_error() == Some(libc::ESRCH) => {
            ParentAfterPass::Gone
        }
        Err(_) => ParentAfterPass::Unknown,
    }
}

/// The set-aside fds as (index into `set_aside`, range of its fds), at most
/// `size` fds each, round robin over the processes: threads looking into
/// one process at once contend for its locks (perf: `fget_task`'s
/// `task_lock`).
fn chunks(set_aside: &[SetAside], size: usize) -> Vec<(usize, Range<usize>)> {
    let size = size.max(1);
    let mut chunks: Vec<(usize, Range<usize>)> = set_aside
        .iter()
        .enumerate()
        .flat_map(|(i, (_, fds))| {
            (0..fds.len())
                .step_by(size)
                .map(move |start| (i, start..(start + size).min(fds.len())))
        })
        .collect();
    chunks.sort_by_key(|(i, range)| (range.start, *i));
    chunks
}

/// One entry per (pid, target), writable if any of its fds was, sorted by
/// pid then target.
fn merged(mut found: Vec<Found>) -> Vec<Found> {
    found.sort_unstable_by_key(|f| (f.pid, f.target));
    found.dedup_by(|later, kept| {
        let same = (later.pid, later.target) == (kept.pid, kept.target);
        if same {
            kept.writable |= later.writable;
        }
        same
    });
    found
}

/// Threads worth starting for `work` items (1: just the calling thread).
fn threads_for(work: usize, per_thread: usize, max_threads: &mut impl FnMut() -> usize) -> usize {
    let wanted = work / per_thread.max(1);
    if wanted < 2 {
        return 1;
    }
    wanted.min(max_threads()).max(1)
}

/// Helpers only scan: their buffers are on the heap.
const HELPER_STACK: usize = 256 * 1024;

/// Runs `work` on `threads` threads, the calling one among them, and returns
/// every result. `work` takes items until none is left, so a helper that
/// cannot be started only leaves more to the others. When one fails,
/// `failed` stops the others, and its error is the answer (theirs are just
/// `Cancelled`).
fn on_threads<T: Send>(
    threads: usize,
    failed: &AtomicBool,
    work: impl Fn() -> Result<T, HoldersError> + Sync,
) -> Result<Vec<T>, HoldersError> {
    let work = || {
        let result = work();
        if result.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        result
    };
    let results = std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads)
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("procfs-scan".into())
                    .stack_size(HELPER_STACK)
                    .spawn_scoped(scope, work)
                    .ok()
            })
            .collect();
        let mut results = vec![work()];
        for helper in helpers {
            results.push(
                helper
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        results
    });
    let mut done = Vec::with_capacity(results.len());
    let mut error = None;
    for result in results {
        match result {
            Ok(value) => done.push(value),
            Err(HoldersError::Cancelled) => {
                error.get_or_insert(HoldersError::Cancelled);
            }
            Err(e) => {
                if !matches!(error, Some(HoldersError::Unreadable { .. })) {
                    error = Some(e);
                }
            }
        }
    }
    error.map_or(Ok(done), Err)
}

/// Read-only fds of one process on one target whose fdinfo a thread reads;
/// past this, that process counts as a writer without more reads (fail
/// closed). A pass serves every request waiting when it starts, so
/// without a bound one caller whose own file is held by a million fds
/// would make everyone's pass read a million fdinfo files.
const MAX_FDINFO_READS_PER_HOLDER: u32 = 64;

/// One thread's part of a scan, with its reused buffers.
struct Scanner<'a> {
    scan: &'a Scan<'a>,
    dirents: DirentBuffer,
    fds: Vec<u32>,
    /// One entry per (pid, target) this thread saw.
    found: Vec<Found>,
    /// How many fdinfo files were read for each entry of `found`.
    fdinfo_reads: Vec<u32>,
    /// Processes whose fd directory or an fd of it was refused.
    unseen: Vec<u32>,
    /// (pid, target) to its entry in `found`: allocates only on matches.
    holdings: HashMap<(u32, usize), usize>,
    /// The last of `holdings` used: a process's fds on one file come in a
    /// row, and each needs no hashing then.
    last_holding: Option<((u32, usize), usize)>,
    set_aside: Vec<SetAside>,
}

impl<'a> Scanner<'a> {
    fn new(scan: &'a Scan<'a>) -> Scanner<'a> {
        Scanner {
            scan,
            dirents: DirentBuffer::new(),
            fds: Vec::new(),
            found: Vec::new(),
            fdinfo_reads: Vec::new(),
            holdings: HashMap::new(),
            last_holding: None,
            set_aside: Vec::new(),
            unseen: Vec::new(),
        }
    }

    /// Drops what was found, to look at a process afresh.
    fn forget(&mut self) {
        self.found.clear();
        self.fdinfo_reads.clear();
        self.holdings.clear();
        self.last_holding = None;
    }

    fn stop_if_asked(&self) -> Result<(), HoldersError> {
        if self.scan.cancel.is_cancelled() || self.scan.failed.load(Ordering::Relaxed) {
            return Err(HoldersError::Cancelled);
        }
        Ok(())
    }

    fn fd_dir_path(&self, pid: u32) -> PathBuf {
        pid_path(self.scan.proc_root, pid, "fd")
    }

    /// `pid`'s fd directory, `None` when the process vanished or is hidden
    /// (or refused: then it is unseen).
    fn open_fd_dir(&mut self, pid: u32) -> Result<Option<OwnedFd>, HoldersError> {
        match with_c_name(pid, "/fd", |name| {
            open_dir(self.scan.root.as_raw_fd(), name)
        }) {
            Ok(dir) => Ok(Some(dir)),
            Err(e) if out_of_resources(&e) => Err(unreadable(&self.fd_dir_path(pid), e)),
            Err(e) => {
                if denied(&e) {
                    self.unseen.push(pid);
                }
                // Else a vanished process: nothing to see.
                Ok(None)
            }
        }
    }

    /// Looks at the fds of `pid` (recording matches in `found`) as they are
    /// listed, one buffer at a time; once more than `shared_above` are
    /// listed, sets them aside while there is room.
    fn process(&mut self, pid: u32, shared_above: usize) -> Result<(), HoldersError> {
        self.stop_if_asked()?;
        let Some(dir) = self.open_fd_dir(pid)? else {
            return Ok(());
        };
        let mut fds = std::mem::take(&mut self.fds);
        fds.clear();
        let result = self.list_and_check(dir.as_fd(), pid, shared_above, &mut fds);
        self.fds = fds;
        result
    }

    fn list_and_check(
        &mut self,
        dir: BorrowedFd,
        pid: u32,
        shared_above: usize,
        fds: &mut Vec<u32>,
    ) -> Result<(), HoldersError> {
        loop {
            match self.dirents.read(dir) {
                Ok(names) if names.is_empty() => break,
                Ok(names) => fds.extend(names.filter_map(parse_decimal)),
                Err(e) if out_of_resources(&e) => {
                    return Err(unreadable(&self.fd_dir_path(pid), e));
                }
                Err(e) => {
                    if denied(&e) {
                        self.unseen.push(pid);
                    }
                    // Else the process exited mid-listing: what was seen
                    // stands.
                    break;
                }
            }
            if fds.len() > shared_above {
                let room = self.scan.set_aside_room.fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    |room| room.checked_sub(fds.len()),
                );
                if room.is_ok() {
                    match self.set_aside.last_mut() {
                        Some((aside_pid, aside)) if *aside_pid == pid => aside.append(fds),
                        _ => self.set_aside.push((pid, std::mem::take(fds))),
                    }
                } else {
                    self.check_fds(dir, pid, fds)?;
                }
                fds.clear();
            }
        }
        self.check_fds(dir, pid, fds)
    }

    /// Records which targets the fds `fds` of `pid` (its fd directory `dir`)
    /// refer to.
    fn check_fds(&mut self, dir: BorrowedFd, pid: u32, fds: &[u32]) -> Result<(), HoldersError> {
        let index = self.scan.index;
        for &fd in fds {
            // A process can hold a million fds: stop within one of them.
            self.stop_if_asked()?;
            let file = match with_c_name(fd, "", |name| statx_identity(dir, name)) {
                Ok(file) => file,
                Err(e) if out_of_resources(&e) => {
                    return Err(unreadable(&self.fd_dir_path(pid).join(fd.to_string()), e));
                }
                Err(e) => {
                    // The link of an fd refused (ptrace's check is made
                    // per fd): it may be on a target.
                    if denied(&e) && self.unseen.last() != Some(&pid) {
                        self.unseen.push(pid);
                    }
                    // Else closed meanwhile, or a dead mount behind it.
                    continue;
                }
            };
            // This fd's flags, read at most once whatever it matches.
            let mut writable = None;
            for target in index.matches(&file) {
                let holding = self.holding(pid, target);
                if let Some(i) = holding {
                    if self.found[i].writable {
                        // A writer already: another fd adds nothing.
                        continue;
                    }
                    if self.fdinfo_reads[i] >= MAX_FDINFO_READS_PER_HOLDER {
                        self.found[i].writable = true;
                        continue;
                    }
                }
                let writable = match writable {
                    Some(known) => known,
                    None => match self.writable(pid, fd)? {
                        Some(now) => *writable.insert(now),
                        // The fd was closed in between: it no longer counts.
                        None => break,
                    },
                };
                match holding {
                    Some(i) => {
                        self.fdinfo_reads[i] += 1;
                        self.found[i].writable |= writable;
                    }
                    None => {
                        let i = self.found.len();
                        self.holdings.insert((pid, target), i);
                        self.last_holding = Some(((pid, target), i));
                        self.found.push(Found {
                            pid,
                            target,
                            writable,
                        });
                        self.fdinfo_reads.push(1);
                    }
                }
            }
        }
        Ok(())
    }

    /// The entry in `found` for (`pid`, `target`), if this thread has one.
    fn holding(&mut self, pid: u32, target: usize) -> Option<usize> {
        match self.last_holding {
            Some((key, i)) if key == (pid, target) => Some(i),
            _ => {
                let i = *self.holdings.get(&(pid, target))?;
                self.last_holding = Some(((pid, target), i));
                Some(i)
            }
        }
    }

    /// Whether fd `fd` of `pid` is open for writing, from its fdinfo; `None`
    /// when it was closed meanwhile.
    fn writable(&self, pid: u32, fd: u32) -> Result<Option<bool>, HoldersError> {
        let info = pid_path(self.scan.proc_root, pid, "fdinfo").join(fd.to_string());
        // The flags line comes first: a cut-off tail does not matter.
        match kernel_files::read_bounded(&info, MAX_FDINFO, AtLimit::Truncate) {
            Ok(text) => Ok(Some(fdinfo_writable(&text).unwrap_or(true))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(KernelFileError::Io(e)) if out_of_resources(&e) => Err(unreadable(&info, e)),
            // Cannot tell: fail closed and treat it as a writer.
            Err(_) => Ok(Some(true)),
        }
    }
}

/// The targets sorted by identity: an fd is matched by binary search,
/// however many checks share the pass.
struct TargetIndex {
    /// ((st_dev, st_ino), index into the caller's targets).
    inodes: Vec<((u64, u64), usize)>,
    /// (st_rdev, index into the caller's targets).
    char_devices: Vec<(u64, usize)>,
    block_devices: Vec<(u64, usize)>,
}

impl TargetIndex {
    fn new(targets: &[Target]) -> TargetIndex {
        let mut inodes = Vec::new();
        let mut char_devices = Vec::new();
        let mut block_devices = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            match *target {
                Target::Inode { dev, ino } => inodes.push(((dev, ino), i)),
                Target::CharDevice { rdev } => char_devices.push((rdev, i)),
                Target::BlockDevice { rdev } => block_devices.push((rdev, i)),
            }
        }
        inodes.sort_unstable();
        char_devices.sort_unstable();
        block_devices.sort_unstable();
        TargetIndex {
            inodes,
            char_devices,
            block_devices,
        }
    }

    /// The index of every target the file `stx` describes. The same
    /// encoding std's `Metadata::dev()`/`rdev()` use, which built the
    /// targets.
    fn matches<'s>(&'s self, stx: &libc::statx) -> impl Iterator<Item = usize> + 's {
        let inode = (
            libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
            stx.stx_ino,
        );
        let rdev = libc::makedev(stx.stx_rdev_major, stx.stx_rdev_minor);
        let devices: &[(u64, usize)] = match u32::from(stx.stx_mode) & libc::S_IFMT {
            libc::S_IFCHR => &self.char_devices,
            libc::S_IFBLK => &self.block_devices,
            _ => &[],
        };
        equal_range(&self.inodes, inode).chain(equal_range(devices, rdev))
    }
}

/// The values of `sorted`'s entries whose key is `key`.
fn equal_range<K: Ord + Copy>(sorted: &[(K, usize)], key: K) -> impl Iterator<Item = usize> + '_ {
    let start = sorted.partition_point(|&(k, _)| k < key);
    sorted[start..]
        .iter()
        .take_while(move |&&(k, _)| k == key)
        .map(|&(_, i)| i)
}

/// The identity of what the fd link `name` in the fd directory `dir` refers
/// to. statx follows the magic link to the open file itself (flags without
/// AT_SYMLINK_NOFOLLOW) and asks only for type and inode: dev and rdev
/// always come. AT_STATX_DONT_SYNC: identity never changes, so a network
/// file system need not be asked.
fn statx_identity(dir: BorrowedFd, name: &CStr) -> io::Result<libc::statx> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: a valid directory fd, a NUL-terminated name and a buffer the
    // size of `struct statx`.
    let rc = unsafe {
        libc::statx(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE | libc::STATX_INO,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised, then filled by the kernel.
    Ok(unsafe { stx.assume_init() })
}

/// `path` as a C string; a path with a NUL (impossible from a `Path` the
/// kernel gave) becomes one that cannot exist.
fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_else(|_| c"/nonexistent".to_owned())
}

/// `number` followed by `suffix`, as a C string on the stack: no allocation
/// per process or fd.
fn with_c_name<R>(number: u32, suffix: &str, f: impl FnOnce(&CStr) -> R) -> R {
    // u32::MAX has 10 digits; the suffixes here are short.
    let mut buf = [0u8; 24];
    let mut rest = &mut buf[..];
    write!(rest, "{number}{suffix}\0").expect("a number and a short suffix fit");
    f(CStr::from_bytes_until_nul(&buf).expect("NUL-terminated above"))
}

/// Opens the directory `path` relative to `parent` (or `AT_FDCWD`),
/// following symlinks as `read_dir` does.
fn open_dir(parent: RawFd, path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::openat(
            parent,
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A buffer for `getdents64`, reused for every directory a thread lists.
struct DirentBuffer(Box<[u8]>);

/// About 1,300 fd entries: most processes are listed in one call.
const DIRENT_BUFFER: usize = 32 * 1024;

/// `struct linux_dirent64`: u64 d_ino, i64 d_off, u16 d_reclen, u8 d_type,
/// then the NUL-terminated name.
const DIRENT_RECLEN_AT: usize = 16;
const DIRENT_NAME_AT: usize = 19;

impl DirentBuffer {
    fn new() -> DirentBuffer {
        DirentBuffer(vec![0; DIRENT_BUFFER].into_boxed_slice())
    }

    /// The next entries of `dir` (`.` and `..` included), as many as one
    /// `getdents64` returns; none at the end.
    fn read(&mut self, dir: BorrowedFd) -> io::Result<Dirents<'_>> {
        // SAFETY: a valid descriptor and a writable buffer of the length
        // passed.
        let filled = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                self.0.as_mut_ptr(),
                self.0.len(),
            )
        };
        let filled = usize::try_from(filled).map_err(|_| io::Error::last_os_error())?;
        let entries = &self.0[..filled.min(self.0.len())];
        // Checked once here, so the names can be handed out without errors.
        let mut rest = entries;
        while !rest.is_empty() {
            let len = record_len(rest)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "garbled dirent"))?;
            rest = &rest[len..];
        }
        Ok(Dirents(entries))
    }
}

/// The length of the record `entries` starts with, if it is well formed.
fn record_len(entries: &[u8]) -> Option<usize> {
    let len = entries.get(DIRENT_RECLEN_AT..DIRENT_RECLEN_AT + 2)?;
    let len = usize::from(u16::from_ne_bytes([len[0], len[1]]));
    (len > DIRENT_NAME_AT && len <= entries.len()).then_some(len)
}

/// Names from one [`DirentBuffer::read`].
struct Dirents<'b>(&'b [u8]);

impl Dirents<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'b> Iterator for Dirents<'b> {
    type Item = &'b [u8];

    fn next(&mut self) -> Option<&'b [u8]> {
        let len = record_len(self.0)?;
        let name = &self.0[DIRENT_NAME_AT..len];
        self.0 = &self.0[len..];
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        Some(&name[..end])
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::process::Command;

    use super::super::parse_pid_name;
    use super::*;
    use std::os::unix::process::CommandExt;

    use crate::test_support::{
        CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, Sleeper, sleep_holding_copies,
        without_capabilities,
    };

    /// Every thread, every process's fds set aside and shared out three at
    /// a time: the second pass and the merging of chunks on a small host.
    const SPLIT_EVERYTHING: Split = Split {
        max_threads: Some(4),
        pids_per_thread: 1,
        shared_above: 2,
        fd_chunk: 3,
        fds_per_thread: 1,
        set_aside_max: usize::MAX,
    };
    /// As [`SPLIT_EVERYTHING`], but with room to set aside five fds: the
    /// rest are looked at as listed.
    const LITTLE_ROOM: Split = Split {
        set_aside_max: 5,
        ..SPLIT_EVERYTHING
    };
    const ONE_THREAD: Split = Split {
        max_threads: Some(1),
        ..Split::HOST
    };

    fn target(path: &Path) -> Target {
        Target::of(&std::fs::metadata(path).unwrap())
    }

    #[test]
    fn one_pass_answers_for_each_target() {
        let dir = tempfile::tempdir().unwrap();
        let [a, b, nobodys] = ["a", "b", "nobodys"].map(|name| {
            let path = dir.path().join(name);
            std::fs::write(&path, b"x").unwrap();
            path
        });
        let reader = Sleeper::holding(File::open(&a).unwrap(), None);
        let writer = Sleeper::holding(
            File::open(&b).unwrap(),
            Some((File::options().append(true).open(&b).unwrap(), 3)),
        );
        let never = CancellationToken::new();
        let targets = [target(&a), target(&b), target(&nobodys), target(&a)];
        let me = std::process::id();
        let read_only = |pid| Holder {
            pid,
            writable: false,
        };
        let writing = |pid| Holder {
            pid,
            writable: true,
        };
        let want = vec![
            vec![read_only(reader.pid())],
            vec![writing(writer.pid())],
            vec![],
            vec![read_only(reader.pid())],
        ];
        // Skipping ourselves, the children are looked at twice (they are
        // ours, but exec'd): the answer is the same.
        for skip_pid in [0, me] {
            for split in [Split::HOST, ONE_THREAD, SPLIT_EVERYTHING, LITTLE_ROOM] {
                let found = scan(Path::new("/proc"), &targets, skip_pid, &never, split).unwrap();
                assert_eq!(found.holders, want, "{split:?}, skipping {skip_pid}");
            }
        }
        assert_eq!(
            holders(Path::new("/proc"), target(&b), me, &never).unwrap(),
            vec![writing(writer.pid())]
        );
        assert_eq!(
            holders_of_any(Path::new("/proc"), &[], me, &never).unwrap(),
            Vec::<Vec<Holder>>::new()
        );
    }

    #[test]
    fn split_scans_merge_the_fds_of_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        // Fds 0 to 14, read-only on the file at 0, writable at 14: the
        // answer needs the first and the last fd of five chunks of three.
        let child = Sleeper::holding(
            File::open(&path).unwrap(),
            Some((File::options().append(true).open(&path).unwrap(), 14)),
        );
        let never = CancellationToken::new();
        let want = vec![vec![Holder {
            pid: child.pid(),
            writable: true,
        }]];
        for skip_pid in [0, std::process::id()] {
            for split in [ONE_THREAD, SPLIT_EVERYTHING, LITTLE_ROOM] {
                let found = scan(
                    Path::new("/proc"),
                    &[target(&path)],
                    skip_pid,
                    &never,
                    split,
                );
                assert_eq!(
                    found.unwrap().holders,
                    want,
                    "{split:?}, skipping {skip_pid}"
                );
            }
        }
    }

    /// Set for the child process of `holders_fail_closed_without_descriptors`.
    const EXHAUSTED_CHILD: &str = "VMMANAGER_TEST_EXHAUSTED_CHILD";

    /// setrlimit is process-wide: only a child process of our own (this
    /// test binary, running just `exhausted_child`) lowers it.
    #[test]
    fn holders_fail_closed_without_descriptors() {
        let module = module_path!().split_once("::").expect("crate::module").1;
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &format!("{module}::exhausted_child")])
            .args(["--include-ignored", "--nocapture", "--test-threads=1"])
            .env(EXHAUSTED_CHILD, "1")
            .output()
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
        assert!(
            stdout.contains("1 passed"),
            "the child did not run: {stdout}"
        );
    }

    #[test]
    #[ignore = "run by holders_fail_closed_without_descriptors in its own process"]
    fn exhausted_child() {
        assert!(
            std::env::var_os(EXHAUSTED_CHILD).is_some(),
            "counts this process's own resources: run only by holders_fail_closed_without_descriptors, in a process of its own"
        );
        let null = File::open("/dev/null").unwrap();
        let target = Target::of(&null.metadata().unwrap());
        let never = CancellationToken::new();
        let me = std::process::id();
        let found = holders(Path::new("/proc"), target, 0, &never).unwrap();
        assert!(found.iter().any(|h| h.pid == me), "{found:?}");

        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain syscalls on a local struct.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        let highest = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| parse_pid_name(&e.ok()?.file_name()))
            .max()
            .unwrap();
        // 0 spare: /proc itself cannot be opened; 1 spare: /proc can, no
        // process's fd directory can (on any thread).
        for split in [ONE_THREAD, SPLIT_EVERYTHING] {
            for spare in [0, 1] {
                let lowered = libc::rlimit {
                    rlim_cur: libc::rlim_t::from(highest) + 1,
                    ..limit
                };
                // SAFETY: as above.
                assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
                // Every number below the limit taken (the gaps too).
                let mut filled = Vec::new();
                loop {
                    match null.try_clone() {
                        Ok(fd) => filled.push(fd),
                        Err(e) => {
                            assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                            break;
                        }
                    }
                }
                let with_spare = libc::rlimit {
                    rlim_cur: lowered.rlim_cur + spare,
                    ..limit
                };
                // SAFETY: as above.
                assert_eq!(
                    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &with_spare) },
                    0
                );
                let result = scan(Path::new("/proc"), &[target], 0, &never, split);
                // SAFETY: as above.
                assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
                drop(filled);
                match result {
                    Err(HoldersError::Unreadable { source, .. })
                        if source.raw_os_error() == Some(libc::EMFILE) => {}
                    other => panic!("{spare} spare descriptors, {split:?}: {other:?}"),
                }
            }
        }
    }

    /// A process seen holding the file during the pass but gone (reaped)
    /// before the holders are put together holds nothing: under load, a
    /// qemu-img child of ours seen between fork and exec with a copy of our
    /// fd on another check's image had exec'd, run and been reaped by then,
    /// and was reported as a reader with no name.
    #[test]
    fn a_holder_gone_after_the_pass_is_no_holder() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        std::fs::write(&image, b"x").unwrap();
        let proc_root = dir.path().join("proc");
        // 7 is still there (a child of PID 1), 8 has no stat any more.
        for pid in ["7", "8"] {
            let process = proc_root.join(pid);
            std::fs::create_dir_all(process.join("fd")).unwrap();
            std::fs::create_dir_all(process.join("fdinfo")).unwrap();
            std::os::unix::fs::symlink(&image, process.join("fd/3")).unwrap();
            std::fs::write(process.join("fdinfo/3"), "pos:\t0\nflags:\t02100000\n").unwrap();
        }
        std::fs::write(proc_root.join("7/stat"), "7 (qemu-img) S 1 7 7 0").unwrap();
        let never = CancellationToken::new();
        // With 7 a child of the scanner too, its fds looked at again.
        for skip_pid in [0, 1] {
            let found = holders(&proc_root, target(&image), skip_pid, &never).unwrap();
            let want = [Holder {
                pid: 7,
                writable: false,
            }];
            assert_eq!(found, want, "skipping {skip_pid}");
        }
    }

    #[test]
    fn holders_of_an_unreadable_root_or_when_cancelled_are_errors() {
        let target = Target::Inode { dev: 0, ino: 0 };
        let never = CancellationToken::new();
        let missing = holders(Path::new("/nonexistent/proc"), target, 0, &never);
        assert!(
            matches!(missing, Err(HoldersError::Unreadable { .. })),
            "{missing:?}"
        );
        let cancelled = CancellationToken::new();
        cancelled.cancel();
        for split in [Split::HOST, SPLIT_EVERYTHING] {
            let result = scan(Path::new("/proc"), &[target], 0, &cancelled, split);
            assert!(matches!(result, Err(HoldersError::Cancelled)), "{result:?}");
        }
        assert_eq!(
            holders(Path::new("/proc"), target, 0, &never).unwrap(),
            vec![]
        );
    }

    /// A process the service may not look into (ptrace's check refuses
    /// each fd link; without DAC override, its fd directory itself) is
    /// unseen, never taken for "holds nothing"; [`holders_of_any`] keeps
    /// skipping it.
    #[test]
    fn processes_refused_to_the_scan_are_unseen() {
        let nobody = Sleeper::spawn(Command::new("sleep").arg("60").uid(65534).gid(65534));
        let null = File::open("/dev/null").unwrap();
        let target = Target::of(&null.metadata().unwrap());
        let never = CancellationToken::new();
        let me = std::process::id();
        let scanned = scan(Path::new("/proc"), &[target], me, &never, ONE_THREAD).unwrap();
        assert!(!scanned.unseen.contains(&nobody.pid()), "{scanned:?}");
        let refused = [
            &[CAP_SYS_PTRACE][..],
            &[CAP_SYS_PTRACE, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH],
        ];
        for capabilities in refused {
            for split in [ONE_THREAD, SPLIT_EVERYTHING] {
                let scanned = without_capabilities(capabilities, || {
                    scan(Path::new("/proc"), &[target], me, &never, split).unwrap()
                });
                assert!(
                    scanned.unseen.contains(&nobody.pid()),
                    "without {capabilities:?}, {split:?}: {:?}",
                    scanned.unseen
                );
                assert!(!scanned.holders[0].iter().any(|h| h.pid == nobody.pid()));
            }
            let holders = without_capabilities(capabilities, || {
                holders_of_any(Path::new("/proc"), &[target], me, &never).unwrap()
            });
            assert_eq!(holders.len(), 1);
        }
    }

    #[test]
    fn names_on_the_stack() {
        assert_eq!(
            with_c_name(4_294_967_295, "/fd", CStr::to_owned),
            c"4294967295/fd".to_owned()
        );
        assert_eq!(with_c_name(0, "", CStr::to_owned), c"0".to_owned());
    }

    mod many_fds {
        use std::time::Instant;

        use super::*;

        /// A `sleep` holding `fds` read-only descriptors on `file`.
        fn holding_many(file: &Path, fds: i32) -> Sleeper {
            Sleeper::spawn(&mut sleep_holding_copies(File::open(file).unwrap(), fds))
        }

        #[test]
        fn a_holder_with_more_read_only_fds_than_are_read_counts_as_a_writer() {
            let dir = tempfile::tempdir().unwrap();
            let [few, many] = ["few", "many"].map(|name| {
                let path = dir.path().join(name);
                std::fs::write(&path, b"x").unwrap();
                path
            });
            let bound = i32::try_from(MAX_FDINFO_READS_PER_HOLDER).unwrap();
            // fd 0 plus `bound - 1` dups: every one read, none writable.
            let reader = holding_many(&few, bound - 1);
            // Twice as many: its fdinfo is read no further than the bound.
            let hoarder = holding_many(&many, 2 * bound);
            let never = CancellationToken::new();
            let want = vec![
                vec![Holder {
                    pid: reader.pid(),
                    writable: false,
                }],
                vec![Holder {
                    pid: hoarder.pid(),
                    writable: true,
                }],
            ];
            let targets = [target(&few), target(&many)];
            for split in [Split::HOST, ONE_THREAD] {
                let found = scan(Path::new("/proc"), &targets, 0, &never, split).unwrap();
                assert_eq!(found.holders, want, "{split:?}");
            }
            // Shared out a few fds at a time, each thread reads up to the
            // bound: the reader is still read in full, the hoarder may or may
            // not have been reached.
            for split in [SPLIT_EVERYTHING, LITTLE_ROOM] {
                let found = scan(Path::new("/proc"), &targets, 0, &never, split)
                    .unwrap()
                    .holders;
                assert_eq!(found[0], want[0], "{split:?}");
                assert_eq!(found[1].len(), 1, "{split:?}");
            }
        }

        /// How much one requester's file, held by many fds, costs the others
        /// in its pass. `PROCS` processes of 19,000 fds each (this host's hard
        /// limit is 20,000).
        #[test]
        #[ignore = "measurement: cargo test --lib -- --ignored --nocapture many_fds"]
        fn cost_of_a_target_with_many_holding_fds() {
            let dir = tempfile::tempdir().unwrap();
            let [victim, attacker] = ["victim", "attacker"].map(|name| {
                let path = dir.path().join(name);
                std::fs::write(&path, b"x").unwrap();
                path
            });
            let per = 19_000;
            let procs: i32 = std::env::var("PROCS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(10);
            let _holders: Vec<_> = (0..procs).map(|_| holding_many(&attacker, per)).collect();
            let never = CancellationToken::new();
            // Not skipping ourselves: the holders are our children, which
            // would be looked at twice, unlike the service's.
            let time = |targets: &[Target]| {
                let start = Instant::now();
                holders_of_any(Path::new("/proc"), targets, 0, &never).unwrap();
                start.elapsed()
            };
            for round in 0..3 {
                let alone = time(&[target(&victim)]);
                let shared = time(&[target(&victim), target(&attacker)]);
                println!(
                    "round {round}: {} fds on the attacker's file: victim alone {alone:?}, with the attacker's target {shared:?}",
                    per * procs
                );
            }
        }
    }
}
