//! Reading a /proc tree: which processes hold a file or device open, and what
//! they are. Used by [`crate::disk::usage`] (who holds an image) and
//! [`crate::devices::vfio`] (who holds a VFIO group).
//!
//! Every read tolerates processes that vanish mid-scan, unreadable entries and
//! garbage: such a process or fd is skipped, never a panic. What it does not
//! tolerate is being unable to look: an unreadable /proc root, or the service
//! itself out of descriptors or memory, makes [`holders`] (one target) and
//! [`holders_of_any`] (one pass for many) an error, never
//! "nobody holds it".

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::kernel_files::{self, AtLimit, KernelFileError, ProcStat};

/// How long the service waits for a scan of who holds a file or device (a
/// disk image, a VFIO group): a read of a stuck process's /proc files can
/// hang, and then the answer is "unknown" after this, never "nobody".
pub const SCAN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// QEMU command lines are a few KiB; this bounds memory for pathological ones.
const MAX_CMDLINE: u64 = 256 * 1024;
/// `fdinfo` has `pos`, `flags`, `mnt_id`, `ino` and maybe lock lines first.
const MAX_FDINFO: u64 = 4096;

mod scan;

pub use scan::{
    Holder, HoldersError, Scanned, Target, holders, holders_of_any, holders_of_any_and_unseen,
};

/// A decimal PID/fd directory name (no sign, no leading `+`, fits in u32).
fn parse_pid_name(name: &OsStr) -> Option<u32> {
    parse_decimal(name.as_bytes())
}

/// [`parse_pid_name`] of raw bytes.
fn parse_decimal(name: &[u8]) -> Option<u32> {
    if name.is_empty() {
        return None;
    }
    name.iter().try_fold(0u32, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u32::from(b - b'0'))
    })
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

/// `/proc/PID/stat` of process `pid` under `proc_root`; `None` when it does
/// not exist (any more) or the file is garbage.
pub fn process_stat(proc_root: &Path, pid: u32) -> Option<ProcStat> {
    kernel_files::parse_stat(&stat_text(proc_root, pid).ok()?)
}

/// The raw `/proc/PID/stat`; the error tells a vanished process apart.
fn stat_text(proc_root: &Path, pid: u32) -> Result<Vec<u8>, KernelFileError> {
    kernel_files::read_bounded(
        &pid_path(proc_root, pid, "stat"),
        kernel_files::MAX_STAT_BYTES,
        AtLimit::Refuse,
    )
}

/// The parent PID from `/proc/PID/stat`.
pub fn parent_pid(proc_root: &Path, pid: u32) -> Option<u32> {
    process_stat(proc_root, pid).map(|s| s.ppid)
}

/// Every process under `proc_root` with its stat, zombies included, in
/// directory order. Names that are not PIDs and processes gone before their
/// stat was read are skipped; an unreadable `proc_root` lists none.
pub fn processes(proc_root: &Path) -> impl Iterator<Item = (u32, ProcStat)> + '_ {
    std::fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(move |entry| {
            let pid = parse_pid_name(&entry.file_name())?;
            Some((pid, process_stat(proc_root, pid)?))
        })
}

/// Every process under `proc_root` whose parent is `parent`, zombies
/// included. (`/proc/PID/task/TID/children` would be cheaper, but kernels
/// without CONFIG_PROC_CHILDREN, like these hosts', lack it.)
pub fn children(proc_root: &Path, parent: u32) -> Vec<u32> {
    processes(proc_root)
        .filter(|(_, stat)| stat.ppid == parent)
        .map(|(pid, _)| pid)
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

    #[test]
    fn stat_of_this_process() {
        let me = process_stat(Path::new("/proc"), std::process::id()).expect("own stat");
        assert!(me.is_alive());
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
    }

    #[test]
    fn processes_are_pid_directories_with_a_stat() {
        let dir = tempfile::tempdir().unwrap();
        for (name, stat) in [
            ("10", "10 (a) S 1 10 10"),
            ("11", "11 (b) Z 10 10 10"),
            // Would read 10's stat again if taken for a PID.
            ("+10", "10 (a) S 1 10 10"),
            ("self", "13 (d) S 1 13 13"),
            ("14", "garbage"),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("stat"), stat).unwrap();
        }
        std::fs::create_dir(dir.path().join("15")).unwrap();
        let mut found: Vec<(u32, u32)> = processes(dir.path())
            .map(|(pid, stat)| (pid, stat.ppid))
            .collect();
        found.sort_unstable();
        assert_eq!(found, [(10, 1), (11, 10)]);
        assert_eq!(children(dir.path(), 10), [11]);
        assert_eq!(processes(&dir.path().join("none")).count(), 0);
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
