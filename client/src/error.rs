//! The service's errors, `org.example.VmManager1.Error.*`, as one enum.
//!
//! The service replies with these (its D-Bus boundary converts every domain
//! error into a variant), and a client turns a failed call back into one
//! with `Error::from(zbus::Error)`: both directions come from zbus's
//! `DBusError` derive, so the names exist only as the variants below.

/// An error of a call to the service: one of the service's own errors
/// `org.example.VmManager1.Error.<Name>`, by name, or [`Error::ZBus`] for
/// anything else.
///
/// Each service variant holds the message, written to be shown to a user as
/// it is; decide on the variant, show the message. The variants and which
/// calls answer them are those of `dbus/org.example.VmManager1.xml` (see
/// the [crate] documentation); every method of the proxies documents its
/// own under "Errors".
///
/// The proxies' methods return [`zbus::Result`]: turn a failed call into an
/// `Error` with `Error::from` or `?`. A DiskChecked signal carries the
/// error by name; [`ReportError::to_error`](crate::ReportError::to_error)
/// (or [`Error::from_name`]) turns it into the same variant.
///
/// # Examples
///
/// ```
/// use vmmanager_client::Error;
/// use zbus::DBusError;
///
/// let e = Error::InUse("used by VM \"win11\" (PID 4242)".into());
/// assert_eq!(e.name(), "org.example.VmManager1.Error.InUse");
/// assert_eq!(e.description(), Some("used by VM \"win11\" (PID 4242)"));
///
/// // What a client makes of an error reply.
/// let e = Error::from_name("org.example.VmManager1.Error.Busy", "a check is running");
/// assert!(matches!(e, Error::Busy(m) if m == "a check is running"));
/// ```
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.example.VmManager1.Error")]
pub enum Error {
    /// Anything that is not one of the service's own errors: the bus, the
    /// connection, or an error of the D-Bus daemon or of zbus (e.g.
    /// `org.freedesktop.DBus.Error.ServiceUnknown` when the service is not
    /// installed, `org.freedesktop.DBus.Error.UnknownObject` for a job that
    /// has ended or a device that is gone). [`Error::reply_name`] gives the
    /// name of the error reply, if there was one.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// `InUse`: a running VM or another process uses the image (CheckDisk,
    /// also for a repair), or a VM holds the device's VFIO group (Detach,
    /// Reattach). The message names the VM and its PID.
    InUse(String),
    /// `HostInUse`: the host itself uses the device or a member of its
    /// group (Detach): a mounted file system or swap on it, an interface
    /// that is up with addresses or carries the default route, the boot
    /// display, a connected output, a framebuffer, or processes holding
    /// its device nodes. The message names each use; the `force` option
    /// (with its own polkit action) detaches anyway.
    HostInUse(String),
    /// `NotFound`: the image does not exist (CheckDisk, GetDiskUsers), or
    /// the PCI device went away (Detach, Reattach).
    NotFound(String),
    /// `InvalidArgument`: an argument or option is malformed, unknown, or
    /// of the wrong type; a path is too long; the options dictionary is too
    /// large (every method).
    InvalidArgument(String),
    /// `NotAuthorized`: polkit said no to the call's action (see
    /// [`names::action`](crate::names::action)), or could not be asked
    /// (every method).
    NotAuthorized(String),
    /// `Busy`: a check of the same image is already running, the caller
    /// (uid) has as many checks, GetDiskUsers calls or image lookups in
    /// progress as it may, or too many of its authorization requests wait
    /// for polkit (every method). Trying again later may work.
    Busy(String),
    /// `CheckFailed`: qemu-img could not complete the check (its stderr is
    /// in the message), or the service could not look at the image or at
    /// who uses it (CheckDisk, GetDiskUsers).
    CheckFailed(String),
    /// `Timeout`: no check slot became free in time, or the in-use scan or
    /// qemu-img did not finish (CheckDisk, GetDiskUsers).
    Timeout(String),
    /// `Cancelled`: the check was cancelled by `Job.Cancel`, because the
    /// caller left the bus, or because the service is stopping (CheckDisk,
    /// GetDiskUsers).
    Cancelled(String),
    /// `NotSupported`: the host cannot do this (Detach: vfio-pci is not
    /// available), or the image keeps its data in other files (CheckDisk:
    /// a VMDK descriptor, qcow2 with an external data file), or a repair
    /// in a directory the service may not write in (CheckDisk: the message
    /// says how to allow it).
    NotSupported(String),
    /// `Failed`: an unexpected system failure, e.g. a sysfs write failed
    /// (Detach, Reattach); the message names the file and what was already
    /// written. Also when the service could not tell whether a VM holds the
    /// device, so it changed nothing.
    Failed(String),
}

impl Error {
    /// The error that an error `name` with `message` stands for, as the
    /// DiskChecked signal carries them (`"error"`, `"error-message"`): the
    /// same conversion as for a method reply. A name that is not the
    /// service's gives [`Error::ZBus`].
    pub fn from_name(name: &str, message: &str) -> Error {
        // Goes through a real error message, so the name → variant mapping
        // stays the derive's.
        let reply = zbus::message::Message::method_call("/", "Reply")
            .build(&())
            .and_then(|call| {
                zbus::message::Message::error(&call.header(), name).build(&(message,))
            });
        match reply {
            Ok(reply) => Error::from(zbus::Error::from(reply)),
            Err(e) => Error::ZBus(e),
        }
    }

    /// Whether this is the service's own error rather than one of the bus
    /// or of zbus.
    pub fn is_service_error(&self) -> bool {
        !matches!(self, Error::ZBus(_))
    }

    /// The D-Bus error name of the reply this error came from: the
    /// service's own name, or that of an error of the bus (e.g.
    /// `org.freedesktop.DBus.Error.UnknownObject`); `None` when there was
    /// no error reply (e.g. the connection failed).
    pub fn reply_name(&self) -> Option<String> {
        use zbus::DBusError;
        match self {
            Error::ZBus(zbus::Error::MethodError(name, _, _)) => Some(name.to_string()),
            Error::ZBus(zbus::Error::FDO(e)) => Some(e.name().to_string()),
            Error::ZBus(_) => None,
            service => Some(service.name().to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::DBusError;

    #[test]
    fn names_round_trip_through_a_reply() {
        let e = Error::from_name("org.example.VmManager1.Error.Busy", "wait");
        assert!(matches!(&e, Error::Busy(m) if m == "wait"), "{e:?}");
        assert_eq!(e.name(), "org.example.VmManager1.Error.Busy");
        let other = Error::from_name("org.freedesktop.DBus.Error.UnknownObject", "gone");
        assert!(!other.is_service_error(), "{other:?}");
        assert_eq!(
            other.reply_name().as_deref(),
            Some("org.freedesktop.DBus.Error.UnknownObject")
        );
        assert!(matches!(Error::from_name("not a name", ""), Error::ZBus(_)));
    }
}
