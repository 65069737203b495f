//! polkit authorization of D-Bus callers.
//!
//! The subject is always the caller's unique bus name (`system-bus-name`),
//! never a PID (racy) and never the daemon's own process (always root).
//! Everything that is not a clear "yes" from polkit is a refusal: polkit
//! missing, erroring or not answering in time all fail closed.

use std::collections::HashMap;
use std::time::Duration;

use zbus::Connection;
use zbus::message::Header;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

/// The polkit actions of `polkit/org.example.vmmanager.policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    CheckDisk,
    CheckDiskOtherUser,
    RepairDisk,
    ManageDevices,
}

impl Action {
    pub fn id(self) -> &'static str {
        match self {
            Action::CheckDisk => "org.example.vmmanager.check-disk",
            Action::CheckDiskOtherUser => "org.example.vmmanager.check-disk-other-user",
            Action::RepairDisk => "org.example.vmmanager.repair-disk",
            Action::ManageDevices => "org.example.vmmanager.manage-devices",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("not authorized for {action}")]
    Denied { action: &'static str },
    #[error("not authorized for {action}: polkit could not be asked ({reason})")]
    Unavailable {
        action: &'static str,
        reason: String,
    },
    #[error("cannot identify the caller: {0}")]
    UnknownCaller(String),
}

/// A D-Bus caller's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// Supplementary groups of the calling process, if the bus knows them.
    pub groups: Option<Vec<u32>>,
}

/// Asks polkit on the bus the service is connected to.
#[derive(Debug, Clone)]
pub struct Authority {
    connection: Connection,
}

/// A non-interactive answer should come back at once; an interactive one
/// waits for a human typing a password.
const NON_INTERACTIVE_TIMEOUT: Duration = Duration::from_secs(25);
const INTERACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

impl Authority {
    pub fn new(connection: Connection) -> Self {
        Authority { connection }
    }

    /// Checks `action` for the sender of the message with `header`.
    /// `details` are shown to polkit rules (`action.lookup(key)`).
    pub async fn check(
        &self,
        header: &Header<'_>,
        action: Action,
        interactive: bool,
        details: &HashMap<&str, &str>,
    ) -> Result<(), AuthError> {
        let unavailable = |reason: String| AuthError::Unavailable {
            action: action.id(),
            reason,
        };
        let subject = Subject::new_for_message_header(header)
            .map_err(|e| AuthError::UnknownCaller(e.to_string()))?;
        let flags = if interactive {
            CheckAuthorizationFlags::ALLOW_USER_INTERACTION
        } else {
            CheckAuthorizationFlags::empty()
        };
        let limit = if interactive {
            INTERACTIVE_TIMEOUT
        } else {
            NON_INTERACTIVE_TIMEOUT
        };
        let ask = async {
            let proxy = AuthorityProxy::builder(&self.connection)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await?;
            proxy
                .check_authorization(&subject, action.id(), details, flags, "")
                .await
        };
        let result = tokio::time::timeout(limit, ask)
            .await
            .map_err(|_| unavailable("polkit did not answer in time".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        tracing::debug!(
            action = action.id(),
            sender = ?header.sender().map(|s| s.to_string()),
            authorized = result.is_authorized,
            challenge = result.is_challenge,
            "polkit answered"
        );
        if result.is_authorized {
            Ok(())
        } else {
            Err(AuthError::Denied {
                action: action.id(),
            })
        }
    }

    /// Who sent the message, as the bus daemon knows it (nothing the caller
    /// can claim): uid, and the process's supplementary groups when the bus
    /// reports them (dbus-daemon ≥ 1.12 does).
    pub async fn caller(&self, header: &Header<'_>) -> Result<Caller, AuthError> {
        let unknown = |e: String| AuthError::UnknownCaller(e);
        let sender = header
            .sender()
            .ok_or_else(|| unknown("message has no sender".into()))?;
        let dbus = zbus::fdo::DBusProxy::new(&self.connection)
            .await
            .map_err(|e| unknown(e.to_string()))?;
        let credentials = dbus
            .get_connection_credentials(sender.clone().into())
            .await
            .map_err(|e| unknown(e.to_string()))?;
        let uid = credentials
            .unix_user_id()
            .ok_or_else(|| unknown("the bus does not know the caller's uid".into()))?;
        Ok(Caller {
            uid,
            groups: credentials.unix_group_ids().cloned(),
        })
    }

    /// The caller's uid (see [`Authority::caller`]).
    pub async fn caller_uid(&self, header: &Header<'_>) -> Result<u32, AuthError> {
        Ok(self.caller(header).await?.uid)
    }
}
