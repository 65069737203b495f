//! Opening a file named by someone else (a D-Bus caller's image, a PID file
//! in a directory other users can write) without being tricked.
//!
//! `O_NOFOLLOW` guards only the last path component: a directory swapped
//! for a symlink between a `stat` and an `open` could still lead root to a
//! FIFO (which blocks) or a device node (which may react to being opened).
//! So: `lstat`, then an `O_PATH` handle (opens nothing), check it is the same
//! regular file, then reopen exactly that inode through `/proc/self/fd`.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SafeOpenError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Not a regular file; `kind` says what it is.
    #[error("not a regular file (it is a {kind})")]
    NotRegular { kind: &'static str },
    /// It changed between looking and opening (a symlink or another file
    /// was swapped in).
    #[error("the file changed while it was being opened")]
    Changed,
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

/// Opens `path` read-only (non-blocking, close-on-exec) if, and only if, it
/// is a regular file reached without a symlink in its last component, and
/// returns it with its metadata.
pub fn open_regular(path: &Path) -> Result<(File, Metadata), SafeOpenError> {
    let before = std::fs::symlink_metadata(path)?;
    if !before.file_type().is_file() {
        return Err(SafeOpenError::NotRegular {
            kind: kind_of(&before),
        });
    }
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => SafeOpenError::Changed,
            _ => SafeOpenError::Io(e),
        })?;
    let same = |m: &Metadata| {
        m.file_type().is_file() && (m.dev(), m.ino()) == (before.dev(), before.ino())
    };
    if !same(&handle.metadata()?) {
        return Err(SafeOpenError::Changed);
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))?;
    let metadata = file.metadata()?;
    if !same(&metadata) {
        return Err(SafeOpenError::Changed);
    }
    Ok((file, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_open_everything_else_is_refused_without_opening() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"42\n").unwrap();
        let (opened, meta) = open_regular(&file).unwrap();
        assert!(meta.is_file());
        drop(opened);

        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            open_regular(&fifo),
            Err(SafeOpenError::NotRegular { kind: "FIFO" })
        ));
        assert!(matches!(
            open_regular(Path::new("/dev/null")),
            Err(SafeOpenError::NotRegular {
                kind: "character device"
            })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(
            open_regular(&link),
            Err(SafeOpenError::NotRegular {
                kind: "symbolic link"
            })
        ));
        assert!(matches!(
            open_regular(dir.path()),
            Err(SafeOpenError::NotRegular { kind: "directory" })
        ));
    }
}
