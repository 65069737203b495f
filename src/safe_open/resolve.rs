//! A caller's lookup: never through a `/proc` magic link.
//!
//! `openat2(RESOLVE_NO_MAGICLINKS)` does it in the kernel. Where that call
//! is missing (before Linux 5.6) or refused by a seccomp filter — systemd's
//! `RestrictSUIDSGID=yes` answers ENOSYS, as it cannot look into `struct
//! open_how`; a `SystemCallFilter=` without it answers EPERM — the same
//! lookup is done here, one component at a time (the walk).
//!
//! The walk never enters procfs: magic links live only there, so a lookup
//! that touches no procfs inode follows none. That is stricter than the
//! kernel (which lets `/proc/self/status` through), and costs nothing here:
//! no image or PID file lives in `/proc`. Every step is an `openat` in the
//! calling thread, so search permission is checked as for the caller.
//! Symlinks are read from the handle that found them (never by name again)
//! and followed as the kernel would: at most 40 in one lookup, and in a
//! sticky world-writable directory only if the follower or the directory's
//! owner owns them (`fs.protected_symlinks`, whatever that sysctl says: the
//! service cannot read it under `ProcSubset=pid`, and failing closed is the
//! safe side).

use std::ffi::{CStr, CString};
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::Symlinks;

/// The kernel's own limit on symlinks followed in one lookup (MAXSYMLINKS).
const MAX_SYMLINKS: u32 = 40;

/// How a caller's lookup is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resolver {
    /// `openat2`; the walk where that call is unavailable.
    Openat2,
    /// The walk alone, for tests on a kernel that has `openat2`.
    #[cfg(test)]
    Walk,
}

/// An `O_PATH` handle on `path`, found without following any `/proc` magic
/// link on the way (ELOOP instead). With [`Symlinks::RefuseLast`], a
/// symlink as the last component is the handle itself.
pub(super) fn open_path(path: &Path, symlinks: Symlinks, resolver: Resolver) -> io::Result<File> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| errno(libc::EINVAL))?;
    match resolver {
        Resolver::Openat2 => {
            or_walk_where_unavailable(openat2(&path, symlinks), || walk(&path, symlinks))
        }
        #[cfg(test)]
        Resolver::Walk => walk(&path, symlinks),
    }
}

/// `openat2`'s answer, unless it says the call itself is unavailable: then
/// the walk's. Deciding per call costs one refused system call where there
/// is no `openat2`, and needs no state.
fn or_walk_where_unavailable(
    openat2: io::Result<File>,
    walk: impl FnOnce() -> io::Result<File>,
) -> io::Result<File> {
    match openat2 {
        // ENOSYS: an old kernel, or systemd's RestrictSUIDSGID= filter;
        // EPERM: a SystemCallFilter= that leaves openat2 out. Any other
        // refusal is about the path. (An EPERM that is about the path
        // comes back from the walk too.)
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => walk(),
        answer => answer,
    }
}

fn openat2(path: &CStr, symlinks: Symlinks) -> io::Result<File> {
    let mut flags = libc::O_PATH | libc::O_CLOEXEC;
    if symlinks == Symlinks::RefuseLast {
        flags |= libc::O_NOFOLLOW;
    }
    // SAFETY: open_how is plain integers; all-zero is its "nothing asked" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = u64::try_from(flags).unwrap_or(0);
    how.resolve = libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `path` is NUL-terminated and `how` is a valid open_how of the
    // size passed; the kernel writes nothing back.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| errno(libc::EBADF))?;
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The lookup `openat2(RESOLVE_NO_MAGICLINKS)` does, done in user space
/// (see the module's documentation), with the kernel's errors.
fn walk(path: &CStr, symlinks: Symlinks) -> io::Result<File> {
    let path = path.to_bytes();
    if path.is_empty() {
        return Err(errno(libc::ENOENT));
    }
    // The components still to look up, the next one last.
    let mut pending = Vec::new();
    push_components(&mut pending, path)?;
    let mut at = if path.starts_with(b"/") {
        step(libc::AT_FDCWD, c"/", 0)?
    } else {
        step(libc::AT_FDCWD, c".", 0)?
    };
    let mut followed = 0;
    while let Some(name) = pending.pop() {
        let last = pending.is_empty();
        let (entry, is_dir) = if last {
            (step(at.as_raw_fd(), &name, 0)?, false)
        } else {
            step_towards_directory(at.as_raw_fd(), &name)?
        };
        if is_dir || (last && symlinks == Symlinks::RefuseLast) {
            at = entry;
            continue;
        }
        let metadata = entry.metadata()?;
        if !metadata.file_type().is_symlink() {
            // Not a directory in the middle of the path: the next step says
            // ENOTDIR, as the kernel does.
            at = entry;
            continue;
        }
        followed += 1;
        if followed > MAX_SYMLINKS {
            return Err(errno(libc::ELOOP));
        }
        may_follow(&at, &metadata)?;
        let target = read_link(&entry)?;
        if target.is_empty() {
            return Err(errno(libc::ENOENT));
        }
        push_components(&mut pending, &target)?;
        if target.starts_with(b"/") {
            at = step(libc::AT_FDCWD, c"/", 0)?;
        }
    }
    Ok(at)
}

/// Puts `path`'s components on top of `pending`, its first one last. A
/// trailing slash becomes a trailing `.`: the name before it must then be
/// a directory, reached through any symlink, as the kernel has it.
fn push_components(pending: &mut Vec<CString>, path: &[u8]) -> io::Result<()> {
    if path.ends_with(b"/") {
        pending.push(c".".to_owned());
    }
    for name in path.rsplit(|&b| b == b'/').filter(|name| !name.is_empty()) {
        pending.push(CString::new(name).map_err(|_| errno(libc::EINVAL))?);
    }
    Ok(())
}

/// `name` in `at`, where a directory is expected: `O_DIRECTORY` first, so
/// an automount point is mounted as when the kernel walks through it; a
/// symlink (or what is no directory) is found again without it. Says
/// whether the handle is known to be a directory.
fn step_towards_directory(at: RawFd, name: &CStr) -> io::Result<(File, bool)> {
    match step(at, name, libc::O_DIRECTORY) {
        Ok(dir) => Ok((dir, true)),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok((step(at, name, 0)?, false)),
        Err(e) => Err(e),
    }
}

/// One component: `name` in `at`, never following a symlink, refused
/// (ELOOP, as `RESOLVE_NO_MAGICLINKS` says) if it lies on procfs.
fn step(at: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<File> {
    let flags = flags | libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated; `at` is an open descriptor or AT_FDCWD.
    let fd = unsafe { libc::openat(at, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let entry = unsafe { File::from_raw_fd(fd) };
    if on_procfs(&entry)? {
        return Err(errno(libc::ELOOP));
    }
    Ok(entry)
}

fn on_procfs(file: &File) -> io::Result<bool> {
    // SAFETY: statfs is plain integers; fstatfs fills it in.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a writable statfs.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fs.f_type == libc::PROC_SUPER_MAGIC)
}

/// The kernel's `fs.protected_symlinks` rule: in a sticky world-writable
/// directory (/tmp), follow only a symlink owned by the follower or by the
/// directory's owner, so no user can lay a trap there for another.
fn may_follow(dir: &File, link: &Metadata) -> io::Result<()> {
    if fsuid() == Some(link.uid()) {
        return Ok(());
    }
    let dir = dir.metadata()?;
    let open_to_all = libc::S_ISVTX | libc::S_IWOTH;
    if dir.mode() & open_to_all != open_to_all || dir.uid() == link.uid() {
        return Ok(());
    }
    Err(errno(libc::EACCES))
}

/// This thread's file-system uid, which the kernel compares a symlink's
/// owner with: `setfsuid` with an invalid id changes nothing and tells the
/// current one (the raw call: glibc's wrapper could act for every thread).
/// None, so no symlink counts as the follower's, if it cannot be told.
fn fsuid() -> Option<u32> {
    const INVALID: libc::c_long = -1;
    // SAFETY: setfsuid(-1) only reads this thread's credentials.
    let current = unsafe { libc::syscall(libc::SYS_setfsuid, INVALID) };
    u32::try_from(current).ok()
}

/// The target of the symlink `link` is a handle on (`O_PATH|O_NOFOLLOW`):
/// read from that very inode, not looked up again.
fn read_link(link: &File) -> io::Result<Vec<u8>> {
    // A target is shorter than PATH_MAX (symlink(2) refuses longer ones).
    let mut target = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: an empty path reads the link `link` refers to; `target` is
    // writable for its length.
    let len = unsafe {
        libc::readlinkat(
            link.as_raw_fd(),
            c"".as_ptr(),
            target.as_mut_ptr().cast(),
            target.len(),
        )
    };
    let len = usize::try_from(len).map_err(|_| io::Error::last_os_error())?;
    if len == target.len() {
        return Err(errno(libc::ENAMETOOLONG));
    }
    target.truncate(len);
    Ok(target)
}

fn errno(code: libc::c_int) -> io::Error {
    io::Error::from_raw_os_error(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::qemu_img::RunAs;
    use crate::disk::view::View;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::path::PathBuf;

    /// What a lookup found, comparable: the inode, or the errno.
    fn found(handle: io::Result<File>) -> Result<(u64, u64), i32> {
        match handle {
            Ok(handle) => {
                let m = handle.metadata().unwrap();
                Ok((m.dev(), m.ino()))
            }
            Err(e) => Err(e.raw_os_error().expect("an errno")),
        }
    }

    fn walked(path: &Path, symlinks: Symlinks) -> Result<(u64, u64), i32> {
        found(open_path(path, symlinks, Resolver::Walk))
    }

    /// The kernel's own lookup, as `open` does it.
    fn kernels(path: &Path, symlinks: Symlinks) -> Result<(u64, u64), i32> {
        found(super::super::open_path_following_magic_links(
            path, symlinks,
        ))
    }

    fn user(uid: u32) -> View {
        View::User(RunAs {
            uid,
            gid: uid,
            groups: vec![uid],
        })
    }

    fn lchown(path: &Path, uid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn only_an_unavailable_openat2_hands_the_lookup_to_the_walk() {
        let walk_answer = || File::open("/dev/null");
        for unavailable in [libc::ENOSYS, libc::EPERM] {
            let answer = or_walk_where_unavailable(Err(errno(unavailable)), walk_answer);
            assert!(answer.is_ok(), "errno {unavailable}: {answer:?}");
        }
        for about_the_path in [libc::ENOENT, libc::EACCES, libc::ELOOP, libc::ENOTDIR] {
            let answer = or_walk_where_unavailable(Err(errno(about_the_path)), || {
                panic!("walked after errno {about_the_path}")
            });
            assert_eq!(answer.unwrap_err().raw_os_error(), Some(about_the_path));
        }
        let opened = or_walk_where_unavailable(File::open("/"), || panic!("walked after success"));
        assert!(opened.is_ok());
    }

    #[test]
    fn the_walk_finds_what_the_kernel_finds() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let at = |name: &str| root.join(name);
        std::fs::create_dir_all(at("a/b/c")).unwrap();
        std::fs::write(at("a/f"), b"f").unwrap();
        std::fs::write(at("a/b/c/g"), b"g").unwrap();
        symlink("a/b", at("rel")).unwrap();
        symlink(at("a/b/c"), at("abs")).unwrap();
        symlink("rel/c/g", at("chain")).unwrap();
        symlink("../../f", at("a/b/up")).unwrap();
        symlink("a/f", at("to-file")).unwrap();
        symlink("nothing", at("dangling")).unwrap();
        symlink("a/b/", at("slash")).unwrap();
        symlink("self-loop", at("self-loop")).unwrap();
        let paths = [
            "a/f",
            "a//b/./c/g",
            "a/b/../f",
            "rel",
            "rel/c/g",
            "rel/../f",
            "abs/g",
            "abs/../../f",
            "chain",
            "a/b/up",
            "to-file",
            "to-file/",
            "to-file/x",
            "a/f/",
            "a/f/..",
            "dangling",
            "dangling/x",
            "slash",
            "slash/c",
            "rel/",
            "missing/x",
            "self-loop",
            "self-loop/x",
            ".",
            "a/b/c/../../..",
        ];
        for name in paths {
            let path = root.join(name);
            for symlinks in [Symlinks::Follow, Symlinks::RefuseLast] {
                assert_eq!(
                    walked(&path, symlinks),
                    kernels(&path, symlinks),
                    "{name} ({symlinks:?})"
                );
            }
        }
        // Relative to the working directory, and the root itself.
        for path in ["Cargo.toml", "src/../Cargo.toml", "/", "/..", ""] {
            let path = Path::new(path);
            assert_eq!(
                walked(path, Symlinks::Follow),
                kernels(path, Symlinks::Follow),
                "{path:?}"
            );
        }
    }

    #[test]
    fn dot_dot_after_a_symlinked_directory_leaves_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("x/y/z")).unwrap();
        std::fs::write(root.join("x/y/f"), b"f").unwrap();
        std::fs::write(root.join("f"), b"not this one").unwrap();
        symlink("x/y/z", root.join("deep")).unwrap();
        for name in ["deep/../f", "deep/..", "deep/../../y/f"] {
            let path = root.join(name);
            let canonical = std::fs::canonicalize(&path).unwrap();
            assert_eq!(
                walked(&path, Symlinks::Follow),
                kernels(&canonical, Symlinks::Follow),
                "{name}"
            );
        }
    }

    #[test]
    fn the_walk_never_enters_procfs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let held = File::open(&file).unwrap();
        let via_fd = format!("/proc/self/fd/{}", held.as_raw_fd());
        let via_root = format!("/proc/self/root{}", file.display());
        let mut magic = vec![PathBuf::from(&via_fd), PathBuf::from(&via_root)];
        // The same, through a caller's own symlinks: absolute, relative, and
        // by /dev/fd (itself an ordinary symlink to /proc/self/fd).
        let ups = "../".repeat(dir.path().components().count());
        for (name, target) in [
            ("to-fd", via_fd.clone()),
            ("to-root", via_root.clone()),
            ("relative", format!("{ups}{}", &via_fd[1..])),
            ("dev-fd", format!("/dev/fd/{}", held.as_raw_fd())),
        ] {
            symlink(&target, dir.path().join(name)).unwrap();
            magic.push(dir.path().join(name));
        }
        for path in &magic {
            assert!(kernels(path, Symlinks::Follow).is_ok(), "{path:?}");
            for resolver in [Resolver::Openat2, Resolver::Walk] {
                let refused = open_path(path, Symlinks::Follow, resolver);
                assert_eq!(
                    refused.unwrap_err().raw_os_error(),
                    Some(libc::ELOOP),
                    "{path:?} ({resolver:?})"
                );
            }
        }
        // Stricter than openat2: nothing in /proc, magic link or not.
        for path in ["/proc/self/status", "/proc", "/proc/.."] {
            let refused = open_path(Path::new(path), Symlinks::Follow, Resolver::Walk);
            assert_eq!(
                refused.unwrap_err().raw_os_error(),
                Some(libc::ELOOP),
                "{path}"
            );
        }
    }

    #[test]
    fn symlinks_are_followed_forty_times_in_one_lookup_as_by_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::write(root.join("0"), b"end").unwrap();
        for n in 1..=MAX_SYMLINKS + 1 {
            symlink((n - 1).to_string(), root.join(n.to_string())).unwrap();
        }
        let forty = root.join(MAX_SYMLINKS.to_string());
        let forty_one = root.join((MAX_SYMLINKS + 1).to_string());
        assert!(walked(&forty, Symlinks::Follow).is_ok());
        assert_eq!(walked(&forty_one, Symlinks::Follow), Err(libc::ELOOP));
        assert_eq!(kernels(&forty_one, Symlinks::Follow), Err(libc::ELOOP));
        // A loop too, through a directory.
        symlink("b/x", root.join("a")).unwrap();
        symlink(".", root.join("b")).unwrap();
        symlink("a", root.join("x")).unwrap();
        assert_eq!(walked(&root.join("a"), Symlinks::Follow), Err(libc::ELOOP));
    }

    /// `fs.protected_symlinks`, whatever the host's sysctl says: in a
    /// sticky world-writable directory, a symlink is followed only by its
    /// owner, or if the directory's owner owns it.
    #[test]
    fn a_symlink_in_a_sticky_world_writable_directory_is_followed_as_the_kernel_protects_it() {
        let (owner, other) = (65534, 65533);
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let shared = root.join("shared");
        let plain = root.join("plain");
        for d in [&shared, &plain] {
            std::fs::create_dir(d).unwrap();
        }
        chmod(&root, 0o755);
        chmod(&shared, 0o1777);
        chmod(&plain, 0o777);
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/target"), b"x").unwrap();
        let target = root.join("d/target");
        for d in [&shared, &plain] {
            symlink(&target, d.join("users")).unwrap();
            lchown(&d.join("users"), owner);
            symlink(root.join("d"), d.join("users-dir")).unwrap();
            lchown(&d.join("users-dir"), owner);
            symlink(&target, d.join("roots")).unwrap();
        }
        let lookup = |uid, path: PathBuf| {
            user(uid)
                .run(move || walked(&path, Symlinks::Follow).map(|_| ()))
                .unwrap()
        };
        let refused = Err(libc::EACCES);
        assert_eq!(lookup(owner, shared.join("users")), Ok(()));
        assert_eq!(lookup(other, shared.join("users")), refused);
        assert_eq!(lookup(other, shared.join("users-dir/target")), refused);
        assert_eq!(
            lookup(other, shared.join("roots")),
            Ok(()),
            "the directory's owner's"
        );
        assert_eq!(lookup(other, plain.join("users")), Ok(()), "not sticky");
        // Not following it is no refusal.
        let unfollowed =
            user(other).run(|| walked(&shared.join("users"), Symlinks::RefuseLast).map(|_| ()));
        assert_eq!(unfollowed.unwrap(), Ok(()));
    }

    #[test]
    fn a_callers_lookup_is_refused_where_the_caller_may_not_search() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(root.join("closed")).unwrap();
        std::fs::write(root.join("closed/f"), b"x").unwrap();
        chmod(&root, 0o755);
        chmod(&root.join("closed"), 0o700);
        symlink("closed/f", root.join("link")).unwrap();
        for name in ["closed/f", "link"] {
            let path = root.join(name);
            let (walk, kernel) = user(65534)
                .run(|| {
                    (
                        walked(&path, Symlinks::Follow),
                        kernels(&path, Symlinks::Follow),
                    )
                })
                .unwrap();
            assert_eq!(walk, Err(libc::EACCES), "{name}");
            assert_eq!(walk, kernel, "{name}");
        }
    }
}
