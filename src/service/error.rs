//! The one D-Bus error enum: every domain error is mapped here, once, to a
//! precise `org.example.VmManager1.Error.*` name with a message fit to show
//! a user. The enum itself is the client crate's, so the service and its
//! clients agree on the names by construction.

use crate::auth::AuthError;
use crate::devices::passthrough::PassthroughError;
use crate::devices::vfio::VfioError;
use crate::disk::checker::{CheckError, CheckErrorKind, ScanError};
use crate::disk::image::ImageError;
use crate::disk::qemu_img::{QemuImgError, UserLookupError};
use crate::service::manager::TooManyLookups;

/// The client crate's [`Error`](vmmanager_client::Error): its
/// `#[derive(zbus::DBusError)]` gives every variant its
/// `org.example.VmManager1.Error.*` name, for the service's replies and for
/// the clients that decode them. The `From` impls below are the one place a
/// domain error becomes one of them.
pub use vmmanager_client::Error as VmError;

/// The service's own trouble while handling a call: nothing the caller did
/// or could see, so it is `CheckFailed` with what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ServiceFault {
    /// A task the call waited for (a lookup off the async threads, the
    /// job) panicked or was cancelled.
    #[error("internal error: a task of the service failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The passwd/group database could not give a user's credentials.
    #[error("cannot look up the user qemu-img would run as: {0}")]
    UserLookup(#[from] UserLookupError),
}

impl From<ServiceFault> for VmError {
    fn from(fault: ServiceFault) -> Self {
        VmError::CheckFailed(fault.to_string())
    }
}

/// A call on a job that has ended: its object may outlive the answer to the
/// call that started it for a moment, but to a caller it is gone.
#[derive(Debug, thiserror::Error)]
#[error("job {target} has ended")]
pub struct JobEnded {
    /// The job's image, as its `Target` property shows it.
    pub target: String,
}

impl From<JobEnded> for VmError {
    fn from(e: JobEnded) -> Self {
        // The standard error of a call to an object that does not exist, as
        // the bus gives once the object is removed.
        let gone = zbus::fdo::Error::UnknownObject(e.to_string());
        VmError::ZBus(zbus::Error::FDO(Box::new(gone)))
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
            ImageError::Io { .. } | ImageError::View(_) | ImageError::Unreadable { .. } => {
                VmError::CheckFailed(format!("the service cannot open the image: {e}"))
            }
            // What is wrong with the path the caller gave.
            ImageError::Empty
            | ImageError::Relative(_)
            | ImageError::TooLong(_)
            | ImageError::NameTooLong(_)
            | ImageError::ContainsNul
            | ImageError::NotRegular { .. } => VmError::InvalidArgument(e.to_string()),
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
            VfioError::Read { .. }
            | VfioError::Write { .. }
            | VfioError::WrongDriver { .. }
            | VfioError::NotInGroup { .. }
            | VfioError::GroupChanged { .. }
            | VfioError::Group(_) => VmError::Failed(e.to_string()),
            // Asking for a group the device does not have, or to give back
            // a device nobody told us where from.
            VfioError::NoGroup(_) | VfioError::NotDetachedByUs(_) => {
                VmError::NotSupported(e.to_string())
            }
        }
    }
}

impl From<PassthroughError> for VmError {
    fn from(e: PassthroughError) -> Self {
        match e {
            PassthroughError::InUse { .. } => VmError::InUse(e.to_string()),
            PassthroughError::HostInUse { .. } => VmError::HostInUse(e.to_string()),
            // Fail closed: refused, and not the caller's fault.
            PassthroughError::UsersUnknown { .. } | PassthroughError::Panicked { .. } => {
                VmError::Failed(e.to_string())
            }
            // Another driver's boot-time override (never replaced), a file
            // that is not one, or a write or removal that failed: the
            // message names the file and what happened to the devices.
            PassthroughError::BootClaimRefused { .. }
            | PassthroughError::BootClaimAfterMove { .. } => VmError::Failed(e.to_string()),
            PassthroughError::NoBootClaims => VmError::NotSupported(e.to_string()),
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

impl From<TooManyLookups> for VmError {
    fn from(e: TooManyLookups) -> Self {
        // Not a refusal: nothing was looked at, and asking later may work.
        VmError::Busy(e.to_string())
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
            QemuImgError::Spawn { .. }
            | QemuImgError::Failed { .. }
            | QemuImgError::Garbage { .. }
            | QemuImgError::Killed { .. } => VmError::CheckFailed(e.to_string()),
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
            // Where the host's units do not let the service write, a repair
            // is not something this host does; a failure of the moment
            // (the opener timed out) is the check's.
            CheckErrorKind::NotWritable { ref reason, .. } if reason.is_configuration() => {
                VmError::NotSupported(kind.to_string())
            }
            CheckErrorKind::NotWritable { .. } => VmError::CheckFailed(kind.to_string()),
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
    #[tokio::test]
    async fn a_failed_task_is_the_services_fault_never_a_refusal() {
        let panicked = tokio::spawn(async { panic!("boom") }).await.unwrap_err();
        let error = VmError::from(ServiceFault::Task(panicked));
        assert!(
            matches!(&error, VmError::CheckFailed(m) if m.starts_with("internal error: a task")),
            "{error:?}"
        );
    }

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
    fn an_ended_job_is_an_unknown_object() {
        let e = VmError::from(JobEnded {
            target: "/var/lib/vms/a.qcow2".into(),
        });
        assert_eq!(
            e.reply_name().as_deref(),
            Some("org.freedesktop.DBus.Error.UnknownObject")
        );
        assert!(
            matches!(&e, VmError::ZBus(zbus::Error::FDO(fdo))
                if matches!(&**fdo, zbus::fdo::Error::UnknownObject(m)
                    if m == "job /var/lib/vms/a.qcow2 has ended")),
            "{e:?}"
        );
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
