//! The one D-Bus error enum: every domain error is mapped here, once, to a
//! precise `org.example.VmManager1.Error.*` name with a message fit to show
//! a user.

use crate::auth::AuthError;
use crate::devices::passthrough::PassthroughError;
use crate::devices::vfio::VfioError;
use crate::disk::checker::{CheckError, CheckErrorKind, ScanError};
use crate::disk::image::ImageError;
use crate::disk::qemu_img::QemuImgError;

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.example.VmManager1.Error")]
pub enum VmError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The image (or device) is used by a VM or another process.
    InUse(String),
    /// The image or object does not exist.
    NotFound(String),
    /// An argument or option is malformed, unknown, or of the wrong type.
    InvalidArgument(String),
    /// polkit said no, or could not be asked.
    NotAuthorized(String),
    /// A check of the same image is already running, the caller (uid) has
    /// as many checks or GetDiskUsers calls in progress as it may, or too
    /// many of its authorizations wait for polkit.
    Busy(String),
    /// qemu-img could not complete the check.
    CheckFailed(String),
    /// The operation took longer than allowed.
    Timeout(String),
    /// The operation was cancelled.
    Cancelled(String),
    /// The host cannot do this (e.g. vfio-pci is not available).
    NotSupported(String),
    /// An unexpected system failure (e.g. a sysfs write failed); the message
    /// says which file and why.
    Failed(String),
}

impl VmError {
    /// The short error name (`InUse`, …) as it appears in reports.
    pub fn short_name(&self) -> &'static str {
        match self {
            VmError::ZBus(_) => "Failed",
            VmError::InUse(_) => "InUse",
            VmError::NotFound(_) => "NotFound",
            VmError::InvalidArgument(_) => "InvalidArgument",
            VmError::NotAuthorized(_) => "NotAuthorized",
            VmError::Busy(_) => "Busy",
            VmError::CheckFailed(_) => "CheckFailed",
            VmError::Timeout(_) => "Timeout",
            VmError::Cancelled(_) => "Cancelled",
            VmError::NotSupported(_) => "NotSupported",
            VmError::Failed(_) => "Failed",
        }
    }

    pub fn message(&self) -> String {
        match self {
            VmError::ZBus(e) => e.to_string(),
            VmError::InUse(m)
            | VmError::NotFound(m)
            | VmError::InvalidArgument(m)
            | VmError::NotAuthorized(m)
            | VmError::Busy(m)
            | VmError::CheckFailed(m)
            | VmError::Timeout(m)
            | VmError::Cancelled(m)
            | VmError::NotSupported(m)
            | VmError::Failed(m) => m.clone(),
        }
    }
}

impl From<ImageError> for VmError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::NotFound(_) => VmError::NotFound(e.to_string()),
            ImageError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                VmError::NotFound(e.to_string())
            }
            // A name or resolved path too long for the kernel is a bad
            // argument however it was reached (e.g. through a symlink).
            ImageError::Io { ref source, .. }
                if source.raw_os_error() == Some(libc::ENAMETOOLONG) =>
            {
                VmError::InvalidArgument(e.to_string())
            }
            // The service itself could not open it (a caller's own view never
            // gets here): a fault of the host, not a polkit refusal.
            ImageError::Io { .. } | ImageError::View(_) => {
                VmError::CheckFailed(format!("the service cannot open the image: {e}"))
            }
            _ => VmError::InvalidArgument(e.to_string()),
        }
    }
}

impl From<VfioError> for VmError {
    fn from(e: VfioError) -> Self {
        match e {
            VfioError::NotFound(_) => VmError::NotFound(e.to_string()),
            VfioError::VfioUnavailable(_) => VmError::NotSupported(e.to_string()),
            // A failed sysfs read or write (EACCES included: the service's
            // own, not polkit's refusal) or a device that would not move.
            VfioError::Read { .. } | VfioError::Write { .. } | VfioError::WrongDriver { .. } => {
                VmError::Failed(e.to_string())
            }
        }
    }
}

impl From<PassthroughError> for VmError {
    fn from(e: PassthroughError) -> Self {
        match e {
            PassthroughError::InUse { .. } => VmError::InUse(e.to_string()),
            // Fail closed: refused, and not the caller's fault.
            PassthroughError::UsersUnknown { .. } | PassthroughError::Panicked { .. } => {
                VmError::Failed(e.to_string())
            }
            PassthroughError::Vfio(e) => e.into(),
        }
    }
}

impl From<AuthError> for VmError {
    fn from(e: AuthError) -> Self {
        match e {
            // Not a refusal: polkit was not asked, and asking later may work.
            AuthError::TooManyPending(_) => VmError::Busy(e.to_string()),
            AuthError::Denied { .. }
            | AuthError::Unavailable { .. }
            | AuthError::UnknownCaller(_) => VmError::NotAuthorized(e.to_string()),
        }
    }
}

impl From<QemuImgError> for VmError {
    fn from(e: QemuImgError) -> Self {
        match e {
            QemuImgError::Timeout(_) => VmError::Timeout(e.to_string()),
            QemuImgError::Cancelled => {
                VmError::Cancelled("the check was cancelled; qemu-img was stopped".into())
            }
            QemuImgError::CancelledBeforeStart => {
                VmError::Cancelled("the check was cancelled before qemu-img started".into())
            }
            QemuImgError::LockConflict { .. } => VmError::InUse(e.to_string()),
            _ => VmError::CheckFailed(e.to_string()),
        }
    }
}

impl From<CheckErrorKind> for VmError {
    fn from(kind: CheckErrorKind) -> Self {
        match kind {
            CheckErrorKind::InUse { .. }
            | CheckErrorKind::RepairInUse(_)
            | CheckErrorKind::LockedMeanwhile { .. } => VmError::InUse(kind.to_string()),
            CheckErrorKind::Busy(_)
            | CheckErrorKind::TooManyChecks { .. }
            | CheckErrorKind::Scan(ScanError::TooMany { .. }) => VmError::Busy(kind.to_string()),
            CheckErrorKind::NoSlot { .. } | CheckErrorKind::Timeout(_) => {
                VmError::Timeout(kind.to_string())
            }
            CheckErrorKind::OtherFiles { .. } => VmError::NotSupported(kind.to_string()),
            CheckErrorKind::QemuImg(q) => q.into(),
            CheckErrorKind::CancelledBeforeStart | CheckErrorKind::Scan(ScanError::Cancelled) => {
                QemuImgError::CancelledBeforeStart.into()
            }
            CheckErrorKind::Scan(ScanError::TimedOut) => VmError::Timeout(kind.to_string()),
            CheckErrorKind::Scan(ScanError::Failed) => VmError::CheckFailed(kind.to_string()),
        }
    }
}

impl From<CheckError> for VmError {
    fn from(e: CheckError) -> Self {
        e.kind.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn io(errno: i32) -> ImageError {
        ImageError::Io {
            path: PathBuf::from("/x"),
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    #[test]
    fn a_denied_sysfs_write_is_a_failure_not_a_polkit_refusal() {
        let e = VfioError::Write {
            path: PathBuf::from("/sys/bus/pci/drivers_probe"),
            value: "0000:01:00.0".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
            done: Default::default(),
        };
        let e = VmError::from(PassthroughError::from(e));
        assert!(matches!(e, VmError::Failed(_)), "{e:?}");
    }

    #[test]
    fn names_too_long_are_invalid_arguments() {
        for e in [ImageError::NameTooLong(300), io(libc::ENAMETOOLONG)] {
            assert!(matches!(VmError::from(e), VmError::InvalidArgument(_)));
        }
        assert!(matches!(
            VmError::from(io(libc::EIO)),
            VmError::CheckFailed(_)
        ));
    }
}
