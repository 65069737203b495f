//! The service's errors, `org.example.VmManager1.Error.*`, as one enum.
//!
//! The service replies with these (its D-Bus boundary converts every domain
//! error into a variant), and a client turns a failed call back into one
//! with `Error::from(zbus::Error)`: both directions come from zbus's
//! `DBusError` derive, so the names exist only as the variants below.

/// An error the service sends, by name; each variant holds the message,
/// written to be shown to a user.
///
/// ```
/// use vmmanager_client::Error;
/// use zbus::DBusError;
///
/// let e = Error::InUse("used by VM \"win11\" (PID 4242)".into());
/// assert_eq!(e.name(), "org.example.VmManager1.Error.InUse");
/// assert_eq!(e.description(), Some("used by VM \"win11\" (PID 4242)"));
/// ```
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.example.VmManager1.Error")]
pub enum Error {
    /// Anything that is not one of the service's own errors: the bus, the
    /// connection, or an error of the D-Bus daemon or of zbus (e.g.
    /// `org.freedesktop.DBus.Error.UnknownObject` for a device that is
    /// not there).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The image (or device) is used by a VM or another process; the
    /// message names it.
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
    /// qemu-img could not complete the check, or the service could not look
    /// at the image.
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

impl Error {
    /// The error that an error `name` with `message` stands for, as the
    /// DiskChecked signal carries them (`"error"`, `"error-message"`): the
    /// same conversion as for a method reply.
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
