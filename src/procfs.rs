//! Reading a /proc tree: which processes hold a file or device open, and what
//! they are. Used by [`crate::disk::usage`] (who holds an image) and
//! [`crate::devices::vfio`] (who holds a VFIO group).
//!
//! Every read tolerates processes that vanish mid-scan, unreadable entries and
//! garbage: such a process or fd is skipped, never a panic. What it does not
//! tolerate is being unable to look: an unreadable /proc root, or the service
//! itself out of descriptors or memory, makes [`holders`] an error, never
//! "nobody holds it".

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use crate::kernel_files::{self, AtLimit, KernelFileError};

/// QEMU command lines are a few KiB; this bounds memory for pathological ones.
const MAX_CMDLINE: u64 = 256 * 1024;
/// `fdinfo` has `pos`, `flags`, `mnt_id`, `ino` and maybe lock lines first.
const MAX_FDINFO: u64 = 4096;

/// What an open fd must refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// One inode: (st_dev, st_ino).
    Inode { dev: u64, ino: u64 },
    /// A character device by number (st_rdev), through whichever node it was
    /// opened: a QEMU in its own mount namespace (libvirt's default) opens a
    /// private copy of `/dev/vfio/N` with another inode.
    CharDevice { rdev: u64 },
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

/// Why [`holders`] could not tell who holds a file.
#[derive(Debug, thiserror::Error)]
pub enum HoldersError {
    #[error("cannot read {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("cancelled")]
    Cancelled,
}

/// Whether `e` says the service itself ran out of something (descriptors,
/// memory), rather than something about the one process or file it read.
///
/// Only these fail a scan. A process that vanished or is hidden (ENOENT,
/// ESRCH, EACCES), garbage in a prepared tree (ENOTDIR), or a dead FUSE or
/// NFS mount behind one fd (ENOTCONN, ESTALE, EIO) says nothing about the
/// target; failing on them would let any user with a dead FUSE mount stop
/// every check on the host.
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
/// `target`, sorted by PID. Matched by `stat()` of the fd link, never by the
/// link's text.
///
/// An error when `proc_root` cannot be read or the service runs out of
/// descriptors or memory on the way (EMFILE, ENFILE, ENOMEM; a vanished,
/// hidden or dead-mount fd is skipped), and as soon as `cancel` is cancelled (looked at before every process and fd): an
/// unfinished scan never reads as "nobody".
pub fn holders(
    proc_root: &Path,
    target: Target,
    skip_pid: u32,
    cancel: &CancellationToken,
) -> Result<Vec<Holder>, HoldersError> {
    // One descriptor for the root serves both its listing and every lookup
    // below it, so each process's fd directory is reached by one short
    // relative walk instead of a full path walk per fd.
    let mut root = Dir::open_at(libc::AT_FDCWD, &c_path(proc_root.as_os_str().as_bytes()))
        .map_err(|e| unreadable(proc_root, e))?;
    let mut found = Vec::new();
    loop {
        if cancel.is_cancelled() {
            return Err(HoldersError::Cancelled);
        }
        let pid = match root.next_name() {
            None => break,
            Some(Ok(name)) => parse_pid_name(OsStr::from_bytes(name)),
            Some(Err(e)) => return Err(unreadable(proc_root, e)),
        };
        // Cheap filters first: no syscall for "self", "meminfo", ourselves.
        let Some(pid) = pid.filter(|&pid| pid != skip_pid) else {
            continue;
        };
        let Some(mut writable) = holds(root.fd(), proc_root, pid, target, cancel)? else {
            continue;
        };
        if parent_pid(proc_root, pid) == Some(skip_pid) {
            // A child of ours between fork and exec shares every fd we had at
            // the fork (the service spawning qemu-img for another check).
            // Until its exec it runs our executable and is no user. Its
            // close-on-exec copies vanish at the exec, so looking again
            // after reading its exe also covers an exec in between.
            if same_exe_as_self(proc_root, pid) {
                continue;
            }
            match holds(root.fd(), proc_root, pid, target, cancel)? {
                Some(still) => writable = still,
                None => continue,
            }
        }
        found.push(Holder { pid, writable });
    }
    found.sort_by_key(|h| h.pid);
    Ok(found)
}

/// Whether process `pid` has `target` open: `None` when not, else whether
/// any such fd is writable. `root` is `proc_root` opened. Errors only as
/// [`holders`] does.
fn holds(
    root: libc::c_int,
    proc_root: &Path,
    pid: u32,
    target: Target,
    cancel: &CancellationToken,
) -> Result<Option<bool>, HoldersError> {
    let fd_path = || pid_path(proc_root, pid, "fd");
    let mut fds = match Dir::open_at(root, &c_path(format!("{pid}/fd").as_bytes())) {
        Ok(fds) => fds,
        Err(e) if out_of_resources(&e) => return Err(unreadable(&fd_path(), e)),
        // EACCES or a vanished process: nothing to see.
        Err(_) => return Ok(None),
    };
    let mut result = None;
    loop {
        // A process can hold a million fds: stop within one of them.
        if cancel.is_cancelled() {
            return Err(HoldersError::Cancelled);
        }
        let name = match fds.next_name() {
            None => break,
            Some(Ok(name)) => name,
            Some(Err(e)) if out_of_resources(&e) => return Err(unreadable(&fd_path(), e)),
            // The process exited mid-listing: what was seen stands.
            Some(Err(_)) => break,
        };
        if parse_pid_name(OsStr::from_bytes(name)).is_none() {
            continue;
        }
        // Owned: the entry is only valid until the next readdir.
        let c_name = c_path(name);
        let name = OsStr::from_bytes(c_name.to_bytes());
        let matched = match stat_matches(fds.fd(), &c_name, target) {
            Ok(matched) => matched,
            Err(e) if out_of_resources(&e) => return Err(unreadable(&fd_path().join(name), e)),
            Err(_) => continue,
        };
        if !matched {
            continue;
        }
        let info = pid_path(proc_root, pid, "fdinfo").join(name);
        // The flags line comes first: a cut-off tail does not matter.
        let writable = match kernel_files::read_bounded(&info, MAX_FDINFO, AtLimit::Truncate) {
            Ok(info) => fdinfo_writable(&info).unwrap_or(true),
            // The fd was closed in between: it no longer counts.
            Err(e) if e.is_not_found() => continue,
            Err(KernelFileError::Io(e)) if out_of_resources(&e) => {
                return Err(unreadable(&info, e));
            }
            // Cannot tell: fail closed and treat it as a writer.
            Err(_) => true,
        };
        result = Some(result.unwrap_or(false) || writable);
    }
    Ok(result)
}

/// Whether the fd link `name` in the fd directory `dir` refers to `target`.
/// statx follows the magic link to the open file itself (flags without
/// AT_SYMLINK_NOFOLLOW) and asks only for type and inode: dev and rdev
/// always come. AT_STATX_DONT_SYNC: identity never changes, so a network
/// file system need not be asked.
fn stat_matches(dir: libc::c_int, name: &CStr, target: Target) -> io::Result<bool> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: a valid directory fd, a NUL-terminated name and a buffer the
    // size of `struct statx`.
    let rc = unsafe {
        libc::statx(
            dir,
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
    let stx = unsafe { stx.assume_init() };
    // The same encoding std's `Metadata::dev()`/`rdev()` use, which built
    // the target.
    Ok(match target {
        Target::Inode { dev, ino } => {
            libc::makedev(stx.stx_dev_major, stx.stx_dev_minor) == dev && stx.stx_ino == ino
        }
        Target::CharDevice { rdev } => {
            u32::from(stx.stx_mode) & libc::S_IFMT == libc::S_IFCHR
                && libc::makedev(stx.stx_rdev_major, stx.stx_rdev_minor) == rdev
        }
    })
}

/// `bytes` as a C string; a name with a NUL (impossible from the kernel)
/// becomes one that cannot exist.
fn c_path(bytes: &[u8]) -> CString {
    CString::new(bytes).unwrap_or_else(|_| c"/nonexistent".to_owned())
}

/// An open directory, listed with readdir and usable as the base of
/// `*at()` lookups through the same descriptor.
struct Dir(std::ptr::NonNull<libc::DIR>);

impl Dir {
    /// Opens `path` relative to `parent` (or `AT_FDCWD`), following symlinks
    /// as `read_dir` does.
    fn open_at(parent: libc::c_int, path: &CStr) -> io::Result<Dir> {
        // SAFETY: a NUL-terminated path; the fd is ours and checked.
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
        // SAFETY: `fd` is an open directory we own; on success DIR owns it.
        match std::ptr::NonNull::new(unsafe { libc::fdopendir(fd) }) {
            Some(dir) => Ok(Dir(dir)),
            None => {
                let e = io::Error::last_os_error();
                // SAFETY: still ours: fdopendir failed.
                unsafe { libc::close(fd) };
                Err(e)
            }
        }
    }

    fn fd(&self) -> libc::c_int {
        // SAFETY: an open DIR.
        unsafe { libc::dirfd(self.0.as_ptr()) }
    }

    /// The next entry's name (`.` and `..` included), `None` at the end.
    fn next_name(&mut self) -> Option<io::Result<&[u8]>> {
        // SAFETY: errno is thread-local; readdir tells end from error only
        // through it. The entry lives until the next readdir on this DIR,
        // which needs `&mut self`.
        unsafe {
            *libc::__errno_location() = 0;
            let entry = libc::readdir(self.0.as_ptr());
            if entry.is_null() {
                let e = io::Error::last_os_error();
                return (e.raw_os_error() != Some(0)).then_some(Err(e));
            }
            Some(Ok(CStr::from_ptr((*entry).d_name.as_ptr()).to_bytes()))
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // SAFETY: an open DIR, closed once.
        unsafe { libc::closedir(self.0.as_ptr()) };
    }
}

/// A decimal PID/fd directory name (no sign, no leading `+`, fits in u32).
fn parse_pid_name(name: &OsStr) -> Option<u32> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Whether the `flags:` line of an fdinfo file says O_WRONLY or O_RDWR;
/// `None` when there is no parsable flags line.
pub fn fdinfo_writable(info: &[u8]) -> Option<bool> {
    let text = String::from_utf8_lossy(info);
    let flags = text
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())?;
    let mode = flags & libc::O_ACCMODE as u32;
    Some(mode == libc::O_WRONLY as u32 || mode == libc::O_RDWR as u32)
}

/// The process's executable with " (deleted)" stripped; `None` if unreadable
/// (kernel threads, vanished processes).
pub fn exe(proc_root: &Path, pid: u32) -> Option<String> {
    let target = std::fs::read_link(pid_path(proc_root, pid, "exe")).ok()?;
    let text = String::from_utf8_lossy(target.as_os_str().as_bytes()).into_owned();
    Some(match text.strip_suffix(" (deleted)") {
        Some(s) => s.to_owned(),
        None => text,
    })
}

/// The raw NUL-separated command line (bounded), `None` if unreadable.
pub fn cmdline(proc_root: &Path, pid: u32) -> Option<Vec<u8>> {
    // Options past the bound are lost; a shorter read is still a command line.
    kernel_files::read_bounded(
        &pid_path(proc_root, pid, "cmdline"),
        MAX_CMDLINE,
        AtLimit::Truncate,
    )
    .ok()
}

/// The QEMU `-name` of process `pid` (see [`vm_name`]), "" when unreadable.
pub fn vm_name_of(proc_root: &Path, pid: u32) -> String {
    cmdline(proc_root, pid)
        .map(|c| vm_name(&c))
        .unwrap_or_default()
}

/// The parent PID from `/proc/PID/stat`.
pub fn parent_pid(proc_root: &Path, pid: u32) -> Option<u32> {
    kernel_files::read_stat(proc_root, pid).map(|s| s.ppid)
}

/// Every process under `proc_root` whose parent is `parent`, zombies
/// included. (`/proc/PID/task/TID/children` would be cheaper, but kernels
/// without CONFIG_PROC_CHILDREN, like these hosts', lack it.)
pub fn children(proc_root: &Path, parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| parse_pid_name(&entry.file_name()))
        .filter(|&pid| parent_pid(proc_root, pid) == Some(parent))
        .collect()
}

/// Whether `pid` runs the very executable (same inode) this process runs:
/// for a child of ours, that it is between fork and exec.
pub fn same_exe_as_self(proc_root: &Path, pid: u32) -> bool {
    let theirs = std::fs::metadata(pid_path(proc_root, pid, "exe"));
    let ours = std::fs::metadata("/proc/self/exe");
    match (theirs, ours) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// A QEMU system emulator: `qemu-system-*`, `qemu-kvm` or `kvm`.
pub fn is_qemu_exe(exe: &str) -> bool {
    let base = basename(exe);
    (base.starts_with("qemu-system-") && base.len() > "qemu-system-".len())
        || base == "qemu-kvm"
        || base == "kvm"
}

/// Any QEMU tool that takes QEMU's image locks (emulators, qemu-img,
/// qemu-nbd, qemu-storage-daemon).
pub fn is_qemu_family_exe(exe: &str) -> bool {
    is_qemu_exe(exe) || basename(exe).starts_with("qemu-")
}

fn basename(exe: &str) -> &str {
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(exe);
    exe.rsplit('/').next().unwrap_or(exe)
}

fn args(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    // A trailing NUL ends the last argument rather than starting an empty one.
    let trimmed = cmdline.strip_suffix(b"\0").unwrap_or(cmdline);
    trimmed.split(|&b| b == 0).skip(1)
}

/// The value of the last `-OPT X`, `--OPT X`, `-OPT=X` or `--OPT=X`.
fn option_value<'a>(cmdline: &'a [u8], opt: &str) -> Option<&'a [u8]> {
    let mut value = None;
    let mut it = args(cmdline);
    while let Some(arg) = it.next() {
        let Some(rest) = arg.strip_prefix(b"--").or_else(|| arg.strip_prefix(b"-")) else {
            continue;
        };
        let Some(after) = rest.strip_prefix(opt.as_bytes()) else {
            continue;
        };
        if after.is_empty() {
            if let Some(v) = it.next() {
                value = Some(v);
            }
        } else if let Some(v) = after.strip_prefix(b"=") {
            value = Some(v);
        }
    }
    value
}

/// The VM name from QEMU's `-name`: `foo`, `guest=foo,debug-threads=on`,
/// `foo,process=bar` (`,,` is an escaped comma). "" when absent.
pub fn vm_name(cmdline: &[u8]) -> String {
    let Some(value) = option_value(cmdline, "name") else {
        return String::new();
    };
    let mut name = None;
    for (i, part) in split_qemu_opts(value).into_iter().enumerate() {
        if let Some(v) = part.strip_prefix(b"guest=") {
            name = Some(v.to_vec());
        } else if i == 0 && !part.contains(&b'=') {
            // QemuOpts' implied first key for -name is "guest".
            name = Some(part);
        }
    }
    String::from_utf8_lossy(&name.unwrap_or_default()).into_owned()
}

/// Splits a QemuOpts string on single commas, turning `,,` into `,`.
fn split_qemu_opts(value: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = vec![Vec::new()];
    let mut i = 0;
    while i < value.len() {
        if value[i] == b',' {
            if value.get(i + 1) == Some(&b',') {
                parts.last_mut().expect("never empty").push(b',');
                i += 2;
                continue;
            }
            parts.push(Vec::new());
        } else {
            parts.last_mut().expect("never empty").push(value[i]);
        }
        i += 1;
    }
    parts
}

/// QEMU's `-pidfile` argument, if given.
pub fn pidfile_arg(cmdline: &[u8]) -> Option<PathBuf> {
    option_value(cmdline, "pidfile")
        .filter(|v| !v.is_empty())
        .map(|v| PathBuf::from(OsStr::from_bytes(v)))
}

/// `path` as the process `pid` sees it: through its root (absolute) or cwd
/// (relative), so mount namespaces and relative paths resolve correctly.
pub fn path_seen_by(proc_root: &Path, pid: u32, path: &Path) -> PathBuf {
    match path.strip_prefix("/") {
        Ok(rel) => pid_path(proc_root, pid, "root").join(rel),
        Err(_) => pid_path(proc_root, pid, "cwd").join(path),
    }
}

fn pid_path(proc_root: &Path, pid: u32, leaf: &str) -> PathBuf {
    let mut p = proc_root.join(pid.to_string());
    p.push(leaf);
    p
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    fn cmd(args: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        for a in args {
            v.extend_from_slice(a.as_bytes());
            v.push(0);
        }
        v
    }

    #[test]
    fn vm_names() {
        let q = "/usr/bin/qemu-system-x86_64";
        let cases: &[(&[&str], &str)] = &[
            (&[q, "-name", "win11"], "win11"),
            (&[q, "-name", "guest=win11,debug-threads=on"], "win11"),
            (&[q, "-name", "debug-threads=on,guest=deb"], "deb"),
            (&[q, "-name", "foo,process=bar"], "foo"),
            (&[q, "--name", "foo"], "foo"),
            (&[q, "-name=foo"], "foo"),
            (&[q, "--name=guest=foo,debug-threads=on"], "foo"),
            (&[q, "-name", "a,,b,process=c"], "a,b"),
            (&[q, "-m", "64"], ""),
            (&[q, "-name"], ""),
            (&[q, "-name", "process=only"], ""),
            (&[q, "-name", "first", "-name", "second"], "second"),
            (&[q, "-names", "x"], ""),
            (&[], ""),
            // argv[0] is never an option.
            (&["-name", "x"], ""),
        ];
        for (args, want) in cases {
            assert_eq!(vm_name(&cmd(args)), *want, "{args:?}");
        }
        // Garbage and non-UTF-8 are lossy, never a panic.
        assert_eq!(vm_name(b"q\0-name\0caf\xe9\0"), "caf\u{fffd}");
        assert_eq!(vm_name(b"q\0-name\0x"), "x", "no trailing NUL");
        assert_eq!(vm_name(b""), "");
        assert_eq!(vm_name(b"\0\0\0"), "");
        assert_eq!(vm_name(&[0xff; 100]), "");
    }

    #[test]
    fn pidfile_args() {
        let q = "qemu-system-x86_64";
        assert_eq!(
            pidfile_arg(&cmd(&[q, "-pidfile", "/run/vm.pid"])),
            Some(PathBuf::from("/run/vm.pid"))
        );
        assert_eq!(
            pidfile_arg(&cmd(&[q, "--pidfile", "vm.pid"])),
            Some(PathBuf::from("vm.pid"))
        );
        assert_eq!(
            pidfile_arg(&cmd(&[q, "-pidfile=/a"])),
            Some(PathBuf::from("/a"))
        );
        assert_eq!(pidfile_arg(&cmd(&[q, "-pidfile"])), None);
        assert_eq!(pidfile_arg(&cmd(&[q, "-pidfile="])), None);
        assert_eq!(pidfile_arg(&cmd(&[q, "-name", "x"])), None);
    }

    #[test]
    fn fdinfo_flags() {
        assert_eq!(
            fdinfo_writable(b"pos:\t0\nflags:\t0100000\nmnt_id:\t1\n"),
            Some(false)
        );
        assert_eq!(fdinfo_writable(b"pos:\t0\nflags:\t02100002\n"), Some(true));
        assert_eq!(fdinfo_writable(b"flags:\t01\n"), Some(true));
        assert_eq!(fdinfo_writable(b"flags:\t0104000\n"), Some(false));
        assert_eq!(fdinfo_writable(b"pos:\t0\n"), None);
        assert_eq!(fdinfo_writable(b"flags:\tzz\n"), None);
        assert_eq!(fdinfo_writable(b"\xff\xfe"), None);
    }

    #[test]
    fn qemu_exes() {
        for exe in [
            "/usr/bin/qemu-system-x86_64",
            "/usr/bin/qemu-system-aarch64 (deleted)",
            "/usr/libexec/qemu-kvm",
            "/usr/bin/kvm",
            "qemu-system-x86_64",
        ] {
            assert!(is_qemu_exe(exe), "{exe}");
            assert!(is_qemu_family_exe(exe), "{exe}");
        }
        for exe in [
            "/usr/bin/qemu-img",
            "/usr/bin/qemu-system-",
            "/usr/bin/sleep",
            "/opt/qemu-system-x86_64/bin/sh",
            "/usr/bin/kvmtool",
            "",
        ] {
            assert!(!is_qemu_exe(exe), "{exe}");
        }
        assert!(is_qemu_family_exe("/usr/bin/qemu-img"));
        assert!(is_qemu_family_exe("/usr/bin/qemu-storage-daemon"));
        assert!(!is_qemu_family_exe("/usr/bin/sleep"));
    }

    #[test]
    fn pid_names() {
        assert_eq!(parse_pid_name(OsStr::new("1")), Some(1));
        assert_eq!(parse_pid_name(OsStr::new("4194304")), Some(4_194_304));
        assert_eq!(parse_pid_name(OsStr::new("self")), None);
        assert_eq!(parse_pid_name(OsStr::new("+1")), None);
        assert_eq!(parse_pid_name(OsStr::new("")), None);
        assert_eq!(parse_pid_name(OsStr::new("99999999999")), None);
    }

    /// Set for the child process of `holders_fail_closed_without_descriptors`.
    const EXHAUSTED_CHILD: &str = "VMMANAGER_TEST_EXHAUSTED_CHILD";

    /// setrlimit is process-wide: only a child process of our own (this
    /// test binary, running just `exhausted_child`) lowers it.
    #[test]
    fn holders_fail_closed_without_descriptors() {
        let module = module_path!().split_once("::").expect("crate::module").1;
        let out = std::process::Command::new(std::env::current_exe().unwrap())
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
        // process's fd directory can.
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
            let result = holders(Path::new("/proc"), target, 0, &never);
            // SAFETY: as above.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
            drop(filled);
            match result {
                Err(HoldersError::Unreadable { source, .. })
                    if source.raw_os_error() == Some(libc::EMFILE) => {}
                other => panic!("{spare} spare descriptors: {other:?}"),
            }
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
        let result = holders(Path::new("/proc"), target, 0, &cancelled);
        assert!(matches!(result, Err(HoldersError::Cancelled)), "{result:?}");
        assert_eq!(
            holders(Path::new("/proc"), target, 0, &never).unwrap(),
            vec![]
        );
    }

    #[test]
    fn seen_by_paths() {
        let root = Path::new("/proc");
        assert_eq!(
            path_seen_by(root, 7, Path::new("/run/a.pid")),
            PathBuf::from("/proc/7/root/run/a.pid")
        );
        assert_eq!(
            path_seen_by(root, 7, Path::new("a.pid")),
            PathBuf::from("/proc/7/cwd/a.pid")
        );
    }
}
