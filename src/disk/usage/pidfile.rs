//! Finding and reading PID files.
//!
//! PID files come from places other users can write to, so they are opened
//! without following symlinks, without blocking, and read with a small bound.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::kernel_files::{self, AtLimit};
use crate::safe_open::{MagicLinks, SafeOpenError, Symlinks, open_regular};

/// The placeholder replaced by the image's directory.
pub const IMAGE_DIR: &str = "{image_dir}";
/// The placeholder replaced by the image owner's uid: libvirt's session mode
/// (GNOME Boxes, `qemu:///session`) keeps PID files in the owner's
/// `$XDG_RUNTIME_DIR`, `/run/user/UID/libvirt/qemu/run/`.
pub const OWNER_UID: &str = "{owner_uid}";
/// A PID file longer than this is garbage.
const MAX_PIDFILE: u64 = 64;
/// Linux's PID_MAX_LIMIT: no PID is larger.
const PID_MAX_LIMIT: u32 = 4_194_304;
/// Bound on directory entries read for one pattern, so a huge directory
/// cannot make a scan slow. The pass is linear, so this is also about its
/// cost: twice the 4,096 PID files a crowded directory was seen with, so
/// that a VM's own file among those is still read.
const MAX_DIR_ENTRIES: usize = 8192;

/// Where a candidate PID file came from; decides whether a non-matching one
/// is reported as stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// The caller named it.
    Explicit,
    /// Matched by a pattern in the image's own directory (`{image_dir}`).
    ImageDir,
    /// Matched by a global pattern (libvirt, Proxmox): other VMs' files.
    Global,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Candidate {
    pub path: PathBuf,
    pub origin: Origin,
}

/// The explicit PID file, or every file the patterns match, deduplicated.
pub(super) fn candidates(
    patterns: &[String],
    image_dir: &Path,
    explicit: Option<&Path>,
) -> Vec<Candidate> {
    if let Some(path) = explicit {
        return vec![Candidate {
            path: path.to_owned(),
            origin: Origin::Explicit,
        }];
    }
    let mut out: Vec<Candidate> = Vec::new();
    // A set, not a search of `out`: a directory of thousands of files must
    // not cost thousands squared comparisons.
    let mut seen: HashSet<PathBuf> = HashSet::new();
    for pattern in patterns {
        let origin = if pattern.contains(IMAGE_DIR) {
            Origin::ImageDir
        } else {
            Origin::Global
        };
        for path in expand(pattern, image_dir) {
            if seen.insert(path.clone()) {
                out.push(Candidate { path, origin });
            }
        }
    }
    out
}

/// Why a pattern is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("PID file pattern {0:?} must be an absolute path")]
    Relative(String),
    #[error("PID file pattern {0:?}: '*' is only allowed in the last path component")]
    WildcardInDirectory(String),
    #[error("PID file pattern {0:?} has no file name")]
    NoFileName(String),
}

/// Checks a configured pattern the way `expand` will use it (with a
/// stand-in image directory).
pub fn validate_pattern(pattern: &str) -> Result<(), PatternError> {
    split_pattern(pattern, Path::new("/image-dir")).map(|_| ())
}

/// `(directory, last component)` of a pattern with `{image_dir}` substituted.
fn split_pattern(pattern: &str, image_dir: &Path) -> Result<(PathBuf, OsString), PatternError> {
    let expanded = substitute(pattern, image_dir);
    let bytes = expanded.as_bytes();
    if !bytes.starts_with(b"/") {
        return Err(PatternError::Relative(pattern.to_owned()));
    }
    let slash = bytes
        .iter()
        .rposition(|&b| b == b'/')
        .expect("starts with '/'");
    let (dir, name) = (&bytes[..slash], &bytes[slash + 1..]);
    // The image directory itself may legitimately contain '*'; only the
    // pattern's own text is restricted.
    let pattern_dir = pattern.rsplit_once('/').map_or("", |(d, _)| d);
    if pattern_dir.contains('*') {
        return Err(PatternError::WildcardInDirectory(pattern.to_owned()));
    }
    if name.is_empty() || name == b"." || name == b".." {
        return Err(PatternError::NoFileName(pattern.to_owned()));
    }
    let dir = if dir.is_empty() { b"/".as_slice() } else { dir };
    Ok((
        PathBuf::from(OsStr::from_bytes(dir)),
        OsString::from_vec(name.to_vec()),
    ))
}

fn substitute(pattern: &str, image_dir: &Path) -> OsString {
    let mut out = Vec::new();
    let mut parts = pattern.split(IMAGE_DIR);
    out.extend_from_slice(parts.next().unwrap_or("").as_bytes());
    for part in parts {
        out.extend_from_slice(image_dir.as_os_str().as_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    OsString::from_vec(out)
}

/// Paths a pattern matches now, sorted. Invalid patterns match nothing.
pub(super) fn expand(pattern: &str, image_dir: &Path) -> Vec<PathBuf> {
    let (dir, name) = match split_pattern(pattern, image_dir) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("ignoring {e}");
            return Vec::new();
        }
    };
    // Only the pattern's own last component may hold wildcards; a '*' that
    // came from the image directory's name is literal.
    let literal_name = !pattern.rsplit('/').next().unwrap_or("").contains('*')
        || pattern.rsplit('/').next().unwrap_or("").contains(IMAGE_DIR);
    if literal_name {
        return vec![dir.join(name)];
    }
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .take(MAX_DIR_ENTRIES)
        .flatten()
        .filter(|e| glob_match(name.as_bytes(), e.file_name().as_bytes()))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Shell-style match where `*` is the only metacharacter; like the shell, a
/// leading `.` must be matched literally.
pub(super) fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    if name.starts_with(b".") && !pattern.starts_with(b".") {
        return false;
    }
    // Iterative matcher with backtracking to the last '*': O(n·m) worst case.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// The outcome of reading one PID file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PidfileContent {
    /// Does not exist: nothing to report.
    Missing,
    /// Exists but is not a regular file (or cannot be read).
    Invalid,
    /// A regular file: its PID (None unless it holds exactly one), who holds
    /// a lock on it, and its identity (to compare with QEMU's `-pidfile`).
    File {
        pid: Option<u32>,
        holder: LockHolder,
        dev: u64,
        ino: u64,
    },
}

/// Who holds a lock on a PID file. QEMU locks its `-pidfile` for its whole
/// life (libvirt relies on it), so the holder *is* the VM — whatever the
/// file says, wherever its relative name pointed, and in whatever PID
/// namespace it wrote its number: the kernel reports the holder's PID as
/// this service sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LockHolder {
    /// Nobody holds a lock: whoever wrote the file may be gone.
    Nobody,
    /// A process this service can see.
    Pid(u32),
    /// Locked, but not by a process that can be named (an OFD lock, or a
    /// holder in a PID namespace this service cannot see).
    Unnamed,
}

/// Asks the kernel who holds a lock on `file` (`F_GETLK`; takes none).
fn lock_holder(file: &std::fs::File) -> LockHolder {
    use std::os::fd::AsRawFd;
    // SAFETY: all-zero is a valid `flock`; fields are set below.
    let mut query: libc::flock = unsafe { std::mem::zeroed() };
    query.l_type = libc::F_WRLCK as libc::c_short;
    query.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_GETLK reads and writes exactly one `flock`.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut query) } != 0 {
        return LockHolder::Nobody;
    }
    if query.l_type == libc::F_UNLCK as libc::c_short {
        return LockHolder::Nobody;
    }
    match u32::try_from(query.l_pid) {
        Ok(pid) if pid > 0 => LockHolder::Pid(pid),
        _ => LockHolder::Unnamed,
    }
}

/// Reads a PID file safely: never a FIFO, a device or a symlink, nor
/// anything swapped in while it is opened (see [`crate::safe_open`]).
pub(super) fn read(path: &Path, magic_links: MagicLinks) -> PidfileContent {
    let (file, meta) = match open_regular(path, Symlinks::RefuseLast, magic_links) {
        Ok(opened) => (opened.file, opened.metadata),
        // Missing, or not readable by whoever looks (the caller's view), or
        // reached through a /proc magic link a caller may not follow: the
        // same answer, so the answer tells nothing about the file.
        Err(SafeOpenError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) || matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) =>
        {
            return PidfileContent::Missing;
        }
        Err(SafeOpenError::Unreadable { .. }) => return PidfileContent::Missing,
        Err(_) => return PidfileContent::Invalid,
    };
    let holder = lock_holder(&file);
    let pid = kernel_files::read_open_bounded(&file, MAX_PIDFILE, AtLimit::Refuse)
        .ok()
        .and_then(|buf| parse_pid(&buf));
    PidfileContent::File {
        pid,
        holder,
        dev: meta.dev(),
        ino: meta.ino(),
    }
}

/// Exactly one decimal PID, surrounding whitespace allowed, in 1..=PID_MAX_LIMIT.
pub(super) fn parse_pid(content: &[u8]) -> Option<u32> {
    let digits = content.trim_ascii();
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let pid: u32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    (1..=PID_MAX_LIMIT).contains(&pid).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids() {
        assert_eq!(parse_pid(b"4242"), Some(4242));
        assert_eq!(parse_pid(b"4242\n"), Some(4242));
        assert_eq!(parse_pid(b"  \t4242 \n\n"), Some(4242));
        assert_eq!(parse_pid(b"0004242\n"), Some(4242));
        assert_eq!(parse_pid(b"4194304"), Some(4_194_304));
        for bad in [
            &b""[..],
            b"\n",
            b"0",
            b"-1",
            b"+5",
            b"4194305",
            b"99999999999999999999",
            b"12 34",
            b"12\n34\n",
            b"abc",
            b"12abc",
            b"0x10",
            b"\xff\xfe1",
            b"1\0",
        ] {
            assert_eq!(parse_pid(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn globs() {
        let m = |p: &str, n: &str| glob_match(p.as_bytes(), n.as_bytes());
        assert!(m("*.pid", "vm.pid"));
        assert!(!m("*.pid", ".pid"));
        assert!(!m("*.pid", ".hidden.pid"));
        assert!(m(".*.pid", ".hidden.pid"));
        assert!(m("*.pid", "a.b.pid"));
        assert!(!m("*.pid", "vm.pid.bak"));
        assert!(!m("*.pid", "vm.pi"));
        assert!(m("*", "anything"));
        assert!(m("qemu-*-*.pid", "qemu-100-x.pid"));
        assert!(!m("qemu-*-*.pid", "qemu-100.pid"));
        assert!(m("vm.pid", "vm.pid"));
        assert!(!m("vm.pid", "vm.pidx"));
        assert!(m("**a", "aaa"));
        assert!(!m("a*b*c", "acb"));
        // Pathological input stays fast (no exponential backtracking).
        let name = "a".repeat(200);
        assert!(!m(&format!("{}b", "*a".repeat(50)), &name));
    }

    #[test]
    fn pattern_validation() {
        assert!(validate_pattern("{image_dir}/*.pid").is_ok());
        assert!(validate_pattern("/run/libvirt/qemu/*.pid").is_ok());
        assert!(validate_pattern("/run/x.pid").is_ok());
        assert_eq!(
            validate_pattern("relative/*.pid"),
            Err(PatternError::Relative("relative/*.pid".into()))
        );
        assert!(matches!(
            validate_pattern("/run/*/x.pid"),
            Err(PatternError::WildcardInDirectory(_))
        ));
        assert!(matches!(
            validate_pattern("{image_dir}/"),
            Err(PatternError::NoFileName(_))
        ));
    }

    #[test]
    fn expansion() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["b.pid", "a.pid", "c.txt", ".h.pid"] {
            std::fs::write(d.join(f), b"1").unwrap();
        }
        assert_eq!(
            expand("{image_dir}/*.pid", d),
            vec![d.join("a.pid"), d.join("b.pid")]
        );
        assert_eq!(expand("{image_dir}/c.txt", d), vec![d.join("c.txt")]);
        // A literal path is a candidate even if missing (read() says Missing).
        assert_eq!(expand("{image_dir}/none.pid", d), vec![d.join("none.pid")]);
        assert!(expand("/nonexistent-dir-for-test/*.pid", d).is_empty());
        assert!(expand("{image_dir}/*/x.pid", d).is_empty());

        // A '*' in the image directory's name is literal, not a wildcard.
        let star = d.join("we*rd");
        std::fs::create_dir(&star).unwrap();
        std::fs::write(star.join("v.pid"), b"1").unwrap();
        assert_eq!(expand("{image_dir}/*.pid", &star), vec![star.join("v.pid")]);
        assert_eq!(expand("{image_dir}.pid", &star), vec![d.join("we*rd.pid")]);

        let c = candidates(
            &["{image_dir}/*.pid".into(), format!("{}/a.pid", d.display())],
            d,
            None,
        );
        assert_eq!(
            c,
            vec![
                Candidate {
                    path: d.join("a.pid"),
                    origin: Origin::ImageDir
                },
                Candidate {
                    path: d.join("b.pid"),
                    origin: Origin::ImageDir
                },
            ]
        );
        let explicit = d.join("x.pid");
        assert_eq!(
            candidates(&["{image_dir}/*.pid".into()], d, Some(&explicit)),
            vec![Candidate {
                path: explicit.clone(),
                origin: Origin::Explicit
            }]
        );
    }

    #[test]
    fn many_files_are_candidates_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for i in 0..300 {
            std::fs::write(d.join(format!("{i:03}.pid")), b"1").unwrap();
        }
        // Two patterns over the same files: each once, with the first origin.
        let c = candidates(
            &["{image_dir}/*.pid".into(), format!("{}/*.pid", d.display())],
            d,
            None,
        );
        assert_eq!(c.len(), 300);
        assert!(c.iter().all(|c| c.origin == Origin::ImageDir));
        assert!(c.windows(2).all(|w| w[0].path < w[1].path));
    }

    fn read_here(path: &Path) -> PidfileContent {
        read(path, MagicLinks::Follow)
    }

    #[test]
    fn reading() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("ok"), b"123\n").unwrap();
        assert!(matches!(
            read_here(&d.join("ok")),
            PidfileContent::File {
                pid: Some(123),
                holder: LockHolder::Nobody,
                ..
            }
        ));
        assert_eq!(read_here(&d.join("missing")), PidfileContent::Missing);
        std::fs::write(d.join("huge"), format!("123{}", " ".repeat(100))).unwrap();
        let garbage = |path: &Path| {
            matches!(
                read_here(path),
                PidfileContent::File {
                    pid: None,
                    holder: LockHolder::Nobody,
                    ..
                }
            )
        };
        assert!(garbage(&d.join("huge")));
        std::fs::write(d.join("bytes"), b"\xff\xfe\xfd").unwrap();
        assert!(garbage(&d.join("bytes")));
        std::os::unix::fs::symlink(d.join("ok"), d.join("link")).unwrap();
        assert_eq!(read_here(&d.join("link")), PidfileContent::Invalid);
        let status = std::process::Command::new("mkfifo")
            .arg(d.join("fifo"))
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(read_here(&d.join("fifo")), PidfileContent::Invalid);
        assert_eq!(read_here(d), PidfileContent::Invalid);
        assert_eq!(read_here(Path::new("/dev/null")), PidfileContent::Invalid);
    }
}
