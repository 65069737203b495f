//! Opening a file named by someone else (a D-Bus caller's image, a PID file
//! in a directory other users can write) without being tricked.
//!
//! The name is looked up exactly once, into an `O_PATH` handle: that opens
//! nothing (a FIFO cannot block, a device driver never sees an open), yet
//! pins the inode. The handle's own `fstat` decides whether it is a regular
//! file, and only then is exactly that inode opened for reading, through
//! `/proc/self/fd`. A name swapped at any moment changes nothing: every later
//! step works on the handle, never on the name.
//!
//! A lookup for a caller refuses `/proc` magic links (`/proc/PID/fd/N`,
//! `cwd`, `root`, `exe`): even in a thread with the caller's credentials,
//! `/proc/self` is the *service*, and its descriptors (other callers'
//! images among them) must never be reachable by name. How, with or
//! without `openat2`: see `resolve.rs`.

mod resolve;

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use resolve::Resolver;

#[derive(Debug, thiserror::Error)]
pub enum SafeOpenError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Not a regular file; `kind` says what it is.
    #[error("not a regular file (it is a {kind})")]
    NotRegular { kind: &'static str },
    /// A regular file the calling thread found but may not read: the
    /// pinned handle, for someone who may (see [`Pinned::open`]).
    #[error("{source}")]
    Unreadable {
        pinned: Box<Pinned>,
        #[source]
        source: io::Error,
    },
}

/// A regular file found by one lookup but not opened yet: the `O_PATH`
/// handle, its metadata and the kernel's name for it.
#[derive(Debug)]
pub struct Pinned {
    handle: File,
    metadata: Metadata,
    canonical: PathBuf,
}

impl Pinned {
    /// The kernel's name for the file (see [`Opened::canonical`]).
    pub fn canonical(&self) -> &Path {
        &self.canonical
    }

    /// Opens exactly the pinned inode for reading, with the calling
    /// thread's permissions — no name is looked up again.
    pub fn open(self) -> io::Result<Opened> {
        let file = reopen(&self.handle)?;
        Ok(Opened {
            file,
            metadata: self.metadata,
            canonical: self.canonical,
        })
    }
}

/// Whether the last path component may be a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symlinks {
    /// Follow symlinks everywhere (a caller's image path).
    Follow,
    /// A symlink as the last component is refused (PID files: a symlink
    /// there is never what QEMU wrote).
    RefuseLast,
}

/// Whether `/proc` magic links may be followed on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MagicLinks {
    /// The service's own lookups (configured paths, an administrator's).
    Follow,
    /// A caller's lookups: ELOOP at the first magic link.
    Refuse,
}

/// What a non-regular file is, in words.
pub fn kind_of(metadata: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = metadata.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_file() {
        "regular file"
    } else {
        "special file"
    }
}

/// A regular file opened read-only (non-blocking, close-on-exec), with its
/// metadata and the path the kernel knows it by.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub metadata: Metadata,
    /// Absolute, symlinks resolved: what `/proc/self/fd/N` says of the
    /// handle (a deleted file ends in " (deleted)").
    pub canonical: PathBuf,
}

/// Opens `path` read-only if, and only if, it is a regular file. Permission
/// checks are those of the calling *thread* (see [`crate::disk::view`]).
pub fn open_regular(
    path: &Path,
    symlinks: Symlinks,
    magic_links: MagicLinks,
) -> Result<Opened, SafeOpenError> {
    open_regular_by(path, symlinks, magic_links, Resolver::Openat2)
}

/// [`open_regular`], with the caller's lookups done by `resolver`.
fn open_regular_by(
    path: &Path,
    symlinks: Symlinks,
    magic_links: MagicLinks,
    resolver: Resolver,
) -> Result<Opened, SafeOpenError> {
    let handle = match magic_links {
        MagicLinks::Refuse => resolve::open_path(path, symlinks, resolver)?,
        MagicLinks::Follow => open_path_following_magic_links(path, symlinks)?,
    };
    let metadata = handle.metadata()?;
    if !metadata.file_type().is_file() {
        return Err(SafeOpenError::NotRegular {
            kind: kind_of(&metadata),
        });
    }
    // /proc/self, not /proc/thread-self: a thread running with a caller's
    // credentials may always reach its own process's fds, not its thread's.
    let handle_path = format!("/proc/self/fd/{}", handle.as_raw_fd());
    let canonical = canonical_name(path, &handle_path, &metadata)?;
    match reopen(&handle) {
        Ok(file) => Ok(Opened {
            file,
            metadata,
            canonical,
        }),
        Err(source) if source.kind() == io::ErrorKind::PermissionDenied => {
            Err(SafeOpenError::Unreadable {
                pinned: Box::new(Pinned {
                    handle,
                    metadata,
                    canonical,
                }),
                source,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// An `O_PATH` handle on `path`, looked up by the kernel as for `open`.
fn open_path_following_magic_links(path: &Path, symlinks: Symlinks) -> io::Result<File> {
    let mut flags = libc::O_PATH | libc::O_CLOEXEC;
    if symlinks == Symlinks::RefuseLast {
        // With O_PATH, O_NOFOLLOW opens the symlink itself rather than failing.
        flags |= libc::O_NOFOLLOW;
    }
    OpenOptions::new().read(true).custom_flags(flags).open(path)
}

/// The handle's inode, opened read-only (non-blocking, close-on-exec)
/// through `/proc/self/fd`.
fn reopen(handle: &File) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
}

/// The name the kernel knows the handle by — if that name, looked up here,
/// leads back to the same file. A file opened through another mount
/// namespace (a user namespace's bind mount over `/root`, reached through
/// `/proc/PID/root`) has a name that means something else here; then the
/// path as given is the honest name.
fn canonical_name(given: &Path, handle_path: &str, metadata: &Metadata) -> io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let name = std::fs::read_link(handle_path)?;
    let same = std::fs::metadata(&name)
        .is_ok_and(|m| (m.dev(), m.ino()) == (metadata.dev(), metadata.ino()));
    Ok(if same { name } else { given.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::qemu_img::RunAs;
    use crate::disk::view::View;
    use crate::test_support::with_failing_syscalls;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// Every way a lookup is done: the service's own, and a caller's by
    /// openat2 and by the walk that stands in where openat2 is missing.
    const LOOKUPS: [(MagicLinks, Resolver); 3] = [
        (MagicLinks::Follow, Resolver::Openat2),
        (MagicLinks::Refuse, Resolver::Openat2),
        (MagicLinks::Refuse, Resolver::Walk),
    ];
    const CALLERS_RESOLVERS: [Resolver; 2] = [Resolver::Openat2, Resolver::Walk];

    #[test]
    fn regular_files_open_everything_else_is_refused_without_opening() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"42\n").unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let fifo_link = dir.path().join("fifo-link");
        std::os::unix::fs::symlink(&fifo, &fifo_link).unwrap();

        for (magic_links, resolver) in LOOKUPS {
            let open =
                |path: &Path, symlinks| open_regular_by(path, symlinks, magic_links, resolver);
            let how = format!("{magic_links:?} {resolver:?}");
            let opened = open(&file, Symlinks::RefuseLast).unwrap();
            assert!(opened.metadata.is_file());
            assert_eq!(opened.canonical, std::fs::canonicalize(&file).unwrap());

            for symlinks in [Symlinks::Follow, Symlinks::RefuseLast] {
                assert!(
                    matches!(
                        open(&fifo, symlinks),
                        Err(SafeOpenError::NotRegular { kind: "FIFO" })
                    ),
                    "{how}"
                );
                assert!(
                    matches!(
                        open(Path::new("/dev/null"), symlinks),
                        Err(SafeOpenError::NotRegular {
                            kind: "character device"
                        })
                    ),
                    "{how}"
                );
                assert!(
                    matches!(
                        open(dir.path(), symlinks),
                        Err(SafeOpenError::NotRegular { kind: "directory" })
                    ),
                    "{how}"
                );
            }
            assert!(
                matches!(
                    open(&link, Symlinks::RefuseLast),
                    Err(SafeOpenError::NotRegular {
                        kind: "symbolic link"
                    })
                ),
                "{how}"
            );
            let followed = open(&link, Symlinks::Follow).unwrap();
            assert_eq!(followed.canonical, opened.canonical);
            assert_eq!(followed.metadata.ino(), opened.metadata.ino());
            // A symlink to a FIFO is still refused without opening the FIFO.
            assert!(
                matches!(
                    open(&fifo_link, Symlinks::Follow),
                    Err(SafeOpenError::NotRegular { kind: "FIFO" })
                ),
                "{how}"
            );
        }
    }

    #[test]
    fn a_callers_lookup_never_follows_proc_magic_links() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let held = File::open(&file).unwrap();
        let via_fd = PathBuf::from(format!("/proc/self/fd/{}", held.as_raw_fd()));
        let via_cwd = PathBuf::from(format!(
            "/proc/self/root{}",
            std::fs::canonicalize(&file).unwrap().display()
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for resolver in CALLERS_RESOLVERS {
            for path in [&via_fd, &via_cwd] {
                assert!(
                    open_regular_by(path, Symlinks::Follow, MagicLinks::Follow, resolver).is_ok()
                );
                match open_regular_by(path, Symlinks::Follow, MagicLinks::Refuse, resolver) {
                    Err(SafeOpenError::Io(e)) => {
                        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{path:?} {resolver:?}")
                    }
                    other => panic!("{path:?} {resolver:?}: {other:?}"),
                }
            }
            // Ordinary symlinks are still followed.
            assert!(open_regular_by(&link, Symlinks::Follow, MagicLinks::Refuse, resolver).is_ok());
        }
    }

    /// systemd's `RestrictSUIDSGID=yes` makes openat2 fail with ENOSYS (its
    /// filter cannot see the flags); a `SystemCallFilter=` without openat2
    /// makes it EPERM. A caller's lookup must work the same under both.
    #[test]
    fn a_callers_lookup_works_where_a_seccomp_filter_refuses_openat2() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let held = File::open(&file).unwrap();
        let via_fd = PathBuf::from(format!("/proc/self/fd/{}", held.as_raw_fd()));
        for errno in [libc::ENOSYS, libc::EPERM] {
            let (refused, found, via_link, magic) =
                with_failing_syscalls(&[libc::SYS_openat2], errno, || {
                    // SAFETY: openat2 with null arguments: only its errno counts.
                    let rc = unsafe { libc::syscall(libc::SYS_openat2, 0, 0, 0, 0) };
                    let refused = (rc, io::Error::last_os_error().raw_os_error());
                    let open = |path: &Path, symlinks| {
                        open_regular(path, symlinks, MagicLinks::Refuse).map(|o| o.metadata.ino())
                    };
                    (
                        refused,
                        open(&file, Symlinks::Follow),
                        open(&link, Symlinks::RefuseLast).map_err(|e| e.to_string()),
                        open(&via_fd, Symlinks::Follow).map_err(|e| e.to_string()),
                    )
                });
            assert_eq!(refused, (-1, Some(errno)), "the filter is in place");
            assert_eq!(found.unwrap(), std::fs::metadata(&file).unwrap().ino());
            assert_eq!(
                via_link.unwrap_err(),
                "not a regular file (it is a symbolic link)"
            );
            assert_eq!(
                magic.unwrap_err(),
                io::Error::from_raw_os_error(libc::ELOOP).to_string()
            );
        }
    }

    #[test]
    fn a_file_the_caller_finds_but_may_not_read_is_pinned_for_the_service() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let closed = dir.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        std::fs::write(closed.join("f"), b"inside").unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"secret").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let nobody = View::User(RunAs {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        });
        for resolver in CALLERS_RESOLVERS {
            let (pinned, hidden) = nobody
                .run(|| {
                    let open = |path: &Path| {
                        open_regular_by(path, Symlinks::Follow, MagicLinks::Refuse, resolver)
                    };
                    (open(&secret), open(&closed.join("f")))
                })
                .unwrap();
            let Err(SafeOpenError::Unreadable { pinned, source }) = pinned else {
                panic!("{resolver:?}: {pinned:?}");
            };
            assert_eq!(source.kind(), io::ErrorKind::PermissionDenied);
            let mut text = String::new();
            io::Read::read_to_string(&mut &pinned.open().unwrap().file, &mut text).unwrap();
            assert_eq!(text, "secret");
            let Err(SafeOpenError::Io(e)) = hidden else {
                panic!("{resolver:?}: {hidden:?}");
            };
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{resolver:?}");
        }
    }

    #[test]
    fn the_open_file_is_the_inode_that_was_looked_at() {
        for (magic_links, resolver) in LOOKUPS {
            let dir = tempfile::tempdir().unwrap();
            let a = dir.path().join("a");
            std::fs::write(&a, b"first").unwrap();
            let opened = open_regular_by(&a, Symlinks::Follow, magic_links, resolver).unwrap();
            // Replace the name: the opened file must still be the first inode.
            std::fs::rename(&a, dir.path().join("old")).unwrap();
            std::fs::write(&a, b"second").unwrap();
            let mut text = String::new();
            io::Read::read_to_string(&mut &opened.file, &mut text).unwrap();
            assert_eq!(text, "first");
        }
    }
}
