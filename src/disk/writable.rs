//! A repair needs the image on a writable mount; the service's own
//! descriptor may be on a read-only one.
//!
//! qemu-img reopens the service's descriptor through `/proc/self/fd`, and a
//! reopen keeps the descriptor's mount. The service's mounts were made
//! when it started ([`crate::opener`] says why that can be read-only for a
//! directory where repairs are allowed). Then, and only then, the service
//! asks `vmmanager-opener` for a handle of the same name on a mount made
//! now, and uses it only if it is the very inode it decided on (device and
//! inode of its own descriptor) and its mount is writable. Everything else
//! is a [`NotWritable`] that says how to allow repairs there.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::image::ImageFile;
use crate::opener::{self, OpenerError};

/// Upper bound for one exchange with the opener (a fresh instance, its
/// namespace built by systemd; milliseconds on a normal host).
pub const OPENER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a repair cannot write to the image.
#[derive(Debug, thiserror::Error)]
pub enum NotWritable {
    #[error("cannot look at the service's own descriptor: {0}")]
    Inspect(io::Error),
    #[error("{0}")]
    Opener(#[from] OpenerError),
    #[error(
        "the opener found another file under that name (the image was moved or replaced \
         meanwhile, or the two units do not see the same file systems)"
    )]
    OtherFile,
    #[error("the directory is read-only for the opener as well")]
    StillReadOnly,
}

impl NotWritable {
    /// Whether the host's configuration is what stops the repair (as
    /// opposed to a failure of the moment): one that changing the units
    /// allows.
    pub fn is_configuration(&self) -> bool {
        match self {
            NotWritable::OtherFile | NotWritable::StillReadOnly => true,
            NotWritable::Opener(e) => {
                matches!(e, OpenerError::Unavailable { .. } | OpenerError::Refused(_))
            }
            NotWritable::Inspect(_) => false,
        }
    }

    /// What an administrator can do about it, for a directory `dir`.
    pub fn remedy(&self, socket: &Path, dir: &Path) -> String {
        let allow = format!(
            "to allow repairs in {dir}, add ReadWritePaths=-{dir} in a drop-in for both \
             vmmanager-opener@.service and vmmanagerd.service (systemctl edit \
             vmmanager-opener@.service; systemctl edit vmmanagerd.service), which keep the \
             same list",
            dir = dir.display()
        );
        match self {
            NotWritable::Opener(OpenerError::Unavailable { .. }) => format!(
                "vmmanager-opener.socket, which opens images for repairs in directories \
                 made after the service started, does not listen at {} (systemctl enable \
                 --now vmmanager-opener.socket); if it does, {allow}",
                socket.display()
            ),
            _ => allow,
        }
    }
}

/// The handle qemu-img should reopen for a repair of `image`: `None` when
/// the service's own descriptor is on a writable mount (nothing changes),
/// else the opener's, checked by [`reopen_writable`]. Blocking.
pub fn handle_for_repair(
    image: &ImageFile,
    socket: &Path,
    timeout: Duration,
) -> Result<Option<OwnedFd>, NotWritable> {
    if !read_only_mount(image.file.as_fd()).map_err(NotWritable::Inspect)? {
        return Ok(None);
    }
    reopen_writable(image, socket, timeout).map(Some)
}

/// A handle of `image`'s inode on a writable mount, from the opener at
/// `socket`: asked for the kernel's current name of the service's
/// descriptor, accepted only if it is that inode and writable. Blocking.
pub fn reopen_writable(
    image: &ImageFile,
    socket: &Path,
    timeout: Duration,
) -> Result<OwnedFd, NotWritable> {
    let name = current_name(image.file.as_fd()).map_err(NotWritable::Inspect)?;
    // Unlinked since it was opened: its old name may lead anywhere now.
    if name.as_os_str().as_encoded_bytes().ends_with(b" (deleted)") {
        return Err(NotWritable::OtherFile);
    }
    let handle = opener::request(socket, &name, timeout)?;
    let found = std::fs::File::from(handle.try_clone().map_err(NotWritable::Inspect)?)
        .metadata()
        .map_err(NotWritable::Inspect)?;
    if (found.dev(), found.ino()) != (image.dev, image.ino) {
        return Err(NotWritable::OtherFile);
    }
    if read_only_mount(handle.as_fd()).map_err(NotWritable::Inspect)? {
        return Err(NotWritable::StillReadOnly);
    }
    Ok(handle)
}

/// What `/proc/self/fd/N` says of `fd` now (a rename since the image was
/// opened is followed).
fn current_name(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Whether `fd`'s mount is read-only (`ST_RDONLY`: a read-only bind mount
/// too, not only a read-only file system).
fn read_only_mount(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: statvfs is plain integers.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `stats` is writable; `fd` is open (fstatvfs works on O_PATH).
    if unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut stats) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stats.f_flag & libc::ST_RDONLY != 0)
}
