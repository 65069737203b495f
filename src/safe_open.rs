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
//! images among them) must never be reachable by name.

use std::ffi::CString;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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
    let mut flags = libc::O_PATH | libc::O_CLOEXEC;
    if symlinks == Symlinks::RefuseLast {
        // With O_PATH, O_NOFOLLOW opens the symlink itself rather than failing.
        flags |= libc::O_NOFOLLOW;
    }
    let handle = match magic_links {
        MagicLinks::Refuse => open_without_magic_links(path, flags)?,
        MagicLinks::Follow => OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)?,
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

/// `openat2(RESOLVE_NO_MAGICLINKS)`: like `open`, but ELOOP at any `/proc`
/// magic link on the way.
fn open_without_magic_links(path: &Path, flags: libc::c_int) -> io::Result<File> {
    openat2(path, flags, libc::RESOLVE_NO_MAGICLINKS)
}

/// `openat2(path, flags, resolve)` from the current directory: `open` with
/// `RESOLVE_*` restrictions on the way. Fails closed where there is no
/// openat2.
pub fn openat2(path: &Path, flags: libc::c_int, resolve: u64) -> io::Result<File> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain integers; all-zero is its "nothing asked" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = u64::try_from(flags).unwrap_or(0);
    how.resolve = resolve;
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
        // No openat2 (before Linux 5.6, or a seccomp filter): fail closed.
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn regular_files_open_everything_else_is_refused_without_opening() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"42\n").unwrap();
        let opened = open_regular(&file, Symlinks::RefuseLast, MagicLinks::Follow).unwrap();
        assert!(opened.metadata.is_file());
        assert_eq!(opened.canonical, std::fs::canonicalize(&file).unwrap());

        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for symlinks in [Symlinks::Follow, Symlinks::RefuseLast] {
            assert!(matches!(
                open_regular(&fifo, symlinks, MagicLinks::Follow),
                Err(SafeOpenError::NotRegular { kind: "FIFO" })
            ));
            assert!(matches!(
                open_regular(Path::new("/dev/null"), symlinks, MagicLinks::Follow),
                Err(SafeOpenError::NotRegular {
                    kind: "character device"
                })
            ));
            assert!(matches!(
                open_regular(dir.path(), symlinks, MagicLinks::Follow),
                Err(SafeOpenError::NotRegular { kind: "directory" })
            ));
        }
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            open_regular(&link, Symlinks::RefuseLast, MagicLinks::Follow),
            Err(SafeOpenError::NotRegular {
                kind: "symbolic link"
            })
        ));
        let followed = open_regular(&link, Symlinks::Follow, MagicLinks::Follow).unwrap();
        assert_eq!(followed.canonical, opened.canonical);
        assert_eq!(followed.metadata.ino(), opened.metadata.ino());
        // A symlink to a FIFO is still refused without opening the FIFO.
        let fifo_link = dir.path().join("fifo-link");
        std::os::unix::fs::symlink(&fifo, &fifo_link).unwrap();
        assert!(matches!(
            open_regular(&fifo_link, Symlinks::Follow, MagicLinks::Follow),
            Err(SafeOpenError::NotRegular { kind: "FIFO" })
        ));
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
        for path in [&via_fd, &via_cwd] {
            assert!(open_regular(path, Symlinks::Follow, MagicLinks::Follow).is_ok());
            match open_regular(path, Symlinks::Follow, MagicLinks::Refuse) {
                Err(SafeOpenError::Io(e)) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{path:?}")
                }
                other => panic!("{path:?}: {other:?}"),
            }
        }
        // Ordinary symlinks are still followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(open_regular(&link, Symlinks::Follow, MagicLinks::Refuse).is_ok());
    }

    #[test]
    fn the_open_file_is_the_inode_that_was_looked_at() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"first").unwrap();
        let opened = open_regular(&a, Symlinks::Follow, MagicLinks::Follow).unwrap();
        // Replace the name: the opened file must still be the first inode.
        std::fs::rename(&a, dir.path().join("old")).unwrap();
        std::fs::write(&a, b"second").unwrap();
        let mut text = String::new();
        io::Read::read_to_string(&mut &opened.file, &mut text).unwrap();
        assert_eq!(text, "first");
    }
}
