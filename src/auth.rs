//! polkit authorization of D-Bus callers.
//!
//! The subject is always the caller's unique bus name (`system-bus-name`),
//! never a PID (racy) and never the daemon's own process (always root).
//! Everything that is not a clear "yes" from polkit is a refusal: polkit
//! missing, erroring or not answering in time all fail closed.
//!
//! Every check is one method call on the service's single bus connection,
//! and dbus-daemon lets a connection wait for at most 128 replies
//! (`max_replies_per_connection`): beyond that, *every* check fails with
//! `LimitsExceeded`, root's included. An interactive check waits for a
//! human (or for an agent that never answers), so a caller could park
//! enough of them at polkit to lock everyone out. Hence checks waiting for
//! polkit are bounded per uid and in all, with a reserve for root (see
//! [`MAX_PENDING_PER_UID`] and below), and a check counts until polkit has
//! answered it — not until its caller stops waiting — because that is when
//! the bus stops counting it.
//!
//! Abandoned checks are not cancelled with `CancelCheckAuthorization`: with
//! polkit 122 and GLib 2.74 (Debian 12) a cancellation that meets the
//! agent's reply to the same check deadlocks polkitd for good (its main
//! thread emits "cancelled" and waits for the connection lock, which GDBus's
//! worker holds while it waits for that emission to end), and the agent's
//! owner chooses when that reply comes. A cancelled check also leaves
//! polkitd's own call to an agent that never answers pending at the bus,
//! uncounted. polkitd cancels the agent's dialog itself when the subject
//! (the caller's bus name) leaves, and an agent that answers then frees the
//! check at once; one that never answers keeps only its own user's checks.

use std::collections::HashMap;
use std::time::Duration;
use vmmanager_client::names::action;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zbus::Connection;
use zbus::message::Header;
use zbus_polkit::policykit1::{
    AuthorityProxy, AuthorizationResult, CheckAuthorizationFlags, Subject,
};

use crate::uid_counts::{Counted, OverLimit, OverShare, UidCounts};

/// The polkit actions of `polkit/org.example.vmmanager.policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    CheckDisk,
    CheckDiskOtherUser,
    RepairDisk,
    ManageDevices,
    ForceDetach,
}

impl Action {
    pub fn id(self) -> &'static str {
        match self {
            Action::CheckDisk => action::CHECK_DISK,
            Action::CheckDiskOtherUser => action::CHECK_DISK_OTHER_USER,
            Action::RepairDisk => action::REPAIR_DISK,
            Action::ManageDevices => action::MANAGE_DEVICES,
            Action::ForceDetach => action::FORCE_DETACH,
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
    /// Refused before polkit was asked: a limit of [`TooManyPending`].
    #[error(transparent)]
    TooManyPending(#[from] TooManyPending),
}

/// Which limit on checks waiting for polkit a new check would exceed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooManyPending {
    #[error(
        "uid {uid} has {limit} authorization requests waiting for polkit; answer or cancel \
         them first"
    )]
    Caller { uid: u32, limit: usize },
    #[error(
        "{limit} authorization requests of users other than root are waiting for polkit; try \
         again when some are answered"
    )]
    NonRoot { limit: usize },
    #[error(
        "{limit} interactive authorization requests of users other than root are waiting for \
         polkit; try again when some are answered, or without user interaction"
    )]
    Interactive { limit: usize },
}

/// Checks one non-root uid may have waiting for polkit at once. A person
/// answers one password dialog at a time; a few more cover a client asking
/// in parallel. More are `Busy`, so one user's stalled checks (an agent
/// that never answers) take only this much of the service's connection.
pub const MAX_PENDING_PER_UID: usize = 4;
/// Checks of all non-root callers together. With [`MAX_PENDING_ROOT`] this
/// stays well below dbus-daemon's 128 pending replies per connection, which
/// leaves the service's other calls room, however many uids an attacker
/// has.
pub const MAX_PENDING_NON_ROOT: usize = 64;
/// Interactive checks of non-root callers, within [`MAX_PENDING_NON_ROOT`]:
/// the rest is kept for non-interactive checks, which polkit answers at
/// once from its rules, so they still get through when stalled interactive
/// checks fill up.
pub const MAX_PENDING_INTERACTIVE_NON_ROOT: usize = 48;
/// root's own reserve, outside the non-root limits: polkit always answers
/// root at once, so non-root callers can never crowd root out; the bound
/// only keeps a root flood from filling the connection too.
pub const MAX_PENDING_ROOT: usize = 16;
/// How long a call that finds no free slot waits for one before it is
/// `Busy`. polkit answers a check that needs no password in milliseconds,
/// so a burst of parallel calls (vmctl in a shell loop) gets through; a slot
/// held by a password dialog is not freed that soon, so a flood's excess
/// is refused after this.
const SLOT_WAIT: Duration = Duration::from_secs(2);
/// Calls of one uid that may wait for a slot at once; more are `Busy` at
/// once, so a flood keeps no more than this waiting in the service. Room
/// for a client that starts dozens of checks at once (the attack tests
/// start 40 of one user).
const MAX_WAITING_PER_UID: usize = 64;

/// The checks waiting for polkit now, by whom, and the calls waiting for
/// a slot to ask.
#[derive(Debug, Default)]
struct Limits {
    /// Checks waiting for polkit, per uid: non-root ones within
    /// [`MAX_PENDING_NON_ROOT`], their interactive ones within the share
    /// [`MAX_PENDING_INTERACTIVE_NON_ROOT`] of it; root's outside both.
    pending: UidCounts,
    /// Calls waiting for a slot, per uid.
    waiting: UidCounts,
}

/// One admitted check's place among the pending ones, given back on drop.
type Slot = Counted;

impl Limits {
    /// A slot for a check of `uid` if one is free now.
    fn try_take(&self, uid: u32, interactive: bool) -> Result<Slot, TooManyPending> {
        let root = uid == 0;
        let own = match root {
            true => MAX_PENDING_ROOT,
            false => MAX_PENDING_PER_UID,
        };
        let admitted = match (root, interactive) {
            (true, _) => self.pending.admit(uid, own, None).map_err(OverShare::Limit),
            (false, false) => (self.pending)
                .admit(uid, own, Some(MAX_PENDING_NON_ROOT))
                .map_err(OverShare::Limit),
            (false, true) => self.pending.admit_in_share(
                uid,
                own,
                MAX_PENDING_NON_ROOT,
                MAX_PENDING_INTERACTIVE_NON_ROOT,
            ),
        };
        admitted.map_err(|refused| match refused {
            OverShare::Limit(OverLimit::Caller) => TooManyPending::Caller { uid, limit: own },
            OverShare::Limit(OverLimit::All) => TooManyPending::NonRoot {
                limit: MAX_PENDING_NON_ROOT,
            },
            OverShare::Share => TooManyPending::Interactive {
                limit: MAX_PENDING_INTERACTIVE_NON_ROOT,
            },
        })
    }

    /// A slot for a check of `uid`, waiting up to `wait` for one to be
    /// freed (unless too many calls of `uid` wait already).
    async fn take(
        &self,
        uid: u32,
        interactive: bool,
        wait: Duration,
    ) -> Result<Slot, TooManyPending> {
        let refused = match self.try_take(uid, interactive) {
            Ok(slot) => return Ok(slot),
            Err(refused) => refused,
        };
        // The caller may leave while it waits: this count goes with it.
        let Ok(_waiting) = self.waiting.admit(uid, MAX_WAITING_PER_UID, None) else {
            return Err(refused);
        };
        (self.pending)
            .within(wait, || self.try_take(uid, interactive))
            .await
    }
}

/// One CheckAuthorization, run to polkit's answer even when nobody waits
/// for it any more (the caller left, the timeout fired): until then the bus
/// counts it against the service's connection, so `slot` stays taken.
async fn ask_polkit(
    connection: Connection,
    subject: Subject,
    action: Action,
    details: HashMap<String, String>,
    flags: CheckAuthorizationFlags,
    stop: CancellationToken,
    slot: Slot,
) -> zbus::Result<AuthorizationResult> {
    let call = async {
        let proxy = AuthorityProxy::builder(&connection)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let details: HashMap<&str, &str> = details
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        proxy
            .check_authorization(&subject, action.id(), &details, flags, "")
            .await
    };
    let result = tokio::select! {
        result = call => result,
        () = stop.cancelled() => Err(zbus::Error::Failure("the service is stopping".into())),
    };
    drop(slot);
    result
}

/// A D-Bus caller's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// Supplementary groups of the calling process, if the bus knows them.
    pub groups: Option<Vec<u32>>,
}

/// Asks polkit on the bus the service is connected to, within the limits
/// above. Owned by the manager state, shared behind an `Arc`.
#[derive(Debug)]
pub struct Authority {
    connection: Connection,
    limits: Limits,
    /// The CheckAuthorization calls polkit has not answered yet, whether or
    /// not their callers still wait.
    calls: TaskTracker,
    /// Ends those calls when the service stops.
    stop: CancellationToken,
}

/// A non-interactive answer should come back at once.
const NON_INTERACTIVE_TIMEOUT: Duration = Duration::from_secs(25);
/// An interactive one waits for a human typing a password. Not shortened:
/// a check keeps its slot until polkit answers, however long the caller
/// waits, so a shorter wait would free nothing and only leave more
/// password dialogs whose answer nobody reads.
const INTERACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

impl Authority {
    pub fn new(connection: Connection) -> Self {
        Authority {
            connection,
            limits: Limits::default(),
            calls: TaskTracker::new(),
            stop: CancellationToken::new(),
        }
    }

    /// Stops waiting for polkit's answers (the service is stopping, and its
    /// connection with it) and returns when no call is left.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.calls.close();
        self.calls.wait().await;
    }

    /// Checks `action` for the sender of the message with `header`, who is
    /// `caller` (see [`Authority::caller`]). `details` are shown to polkit
    /// rules (`action.lookup(key)`). Refused as [`AuthError::TooManyPending`]
    /// without asking polkit when the caller (or everyone) has as many
    /// checks waiting as the limits allow and none is freed within
    /// `SLOT_WAIT`. The check counts until polkit answers it, even when this
    /// future is dropped or times out first.
    pub async fn check(
        &self,
        header: &Header<'_>,
        caller: &Caller,
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
        let slot = self.limits.take(caller.uid, interactive, SLOT_WAIT).await?;
        let details = details
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let call = self.calls.spawn(ask_polkit(
            self.connection.clone(),
            subject,
            action,
            details,
            flags,
            self.stop.clone(),
            slot,
        ));
        let result = tokio::time::timeout(limit, call)
            .await
            .map_err(|_| unavailable("polkit did not answer in time".into()))?
            .map_err(|e| unavailable(format!("the task asking polkit failed: {e}")))?
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(limits: &Limits, uid: u32, interactive: bool) -> Slot {
        limits
            .try_take(uid, interactive)
            .expect("within the limits")
    }

    #[test]
    fn one_uid_gets_its_share_and_a_slot_comes_back_on_drop() {
        let limits = Limits::default();
        let mine: Vec<Slot> = (0..MAX_PENDING_PER_UID)
            .map(|_| take(&limits, 1000, true))
            .collect();
        let refused = limits.try_take(1000, false).err();
        assert_eq!(
            refused,
            Some(TooManyPending::Caller {
                uid: 1000,
                limit: MAX_PENDING_PER_UID
            })
        );
        assert_eq!(
            refused.unwrap().to_string(),
            "uid 1000 has 4 authorization requests waiting for polkit; answer or cancel them \
             first"
        );
        let _other = take(&limits, 1001, true);
        drop(mine);
        let _again = take(&limits, 1000, true);
        assert_eq!(limits.pending.of(1000), 1);
    }

    #[test]
    fn many_uids_leave_room_for_non_interactive_checks_and_root() {
        let limits = Limits::default();
        let uids = (MAX_PENDING_INTERACTIVE_NON_ROOT / MAX_PENDING_PER_UID) as u32;
        let _stalled: Vec<Slot> = (0..uids)
            .flat_map(|uid| (0..MAX_PENDING_PER_UID).map(move |_| 1000 + uid))
            .map(|uid| take(&limits, uid, true))
            .collect();
        assert_eq!(
            limits.try_take(5000, true).err(),
            Some(TooManyPending::Interactive {
                limit: MAX_PENDING_INTERACTIVE_NON_ROOT
            })
        );
        let quiet = MAX_PENDING_NON_ROOT - MAX_PENDING_INTERACTIVE_NON_ROOT;
        let _quick: Vec<Slot> = (0..quiet as u32)
            .map(|i| take(&limits, 6000 + i, false))
            .collect();
        assert_eq!(
            limits.try_take(7000, false).err(),
            Some(TooManyPending::NonRoot {
                limit: MAX_PENDING_NON_ROOT
            })
        );
        // root's reserve is untouched by all of that, and bounded itself.
        let _root: Vec<Slot> = (0..MAX_PENDING_ROOT)
            .map(|_| take(&limits, 0, true))
            .collect();
        assert_eq!(
            limits.try_take(0, false).err(),
            Some(TooManyPending::Caller {
                uid: 0,
                limit: MAX_PENDING_ROOT
            })
        );
    }

    #[tokio::test]
    async fn a_call_waits_briefly_for_a_freed_slot_and_few_wait() {
        let limits = std::sync::Arc::new(Limits::default());
        let wait = Duration::from_millis(200);
        let mut held: Vec<Slot> = (0..MAX_PENDING_PER_UID)
            .map(|_| take(&limits, 1000, true))
            .collect();
        // Nothing freed: Busy once the wait is over.
        let started = std::time::Instant::now();
        assert!(limits.take(1000, true, wait).await.is_err());
        assert!(started.elapsed() >= wait);
        // Freed while it waits: it gets the slot at once.
        let waiter = tokio::spawn({
            let limits = limits.clone();
            async move { limits.take(1000, true, Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = std::time::Instant::now();
        held.pop();
        let slot = waiter.await.unwrap().expect("the freed slot");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Only so many wait; the next is Busy at once.
        let waiters: Vec<_> = (0..MAX_WAITING_PER_UID)
            .map(|_| {
                let limits = limits.clone();
                tokio::spawn(async move {
                    limits
                        .take(1000, true, Duration::from_secs(30))
                        .await
                        .is_ok()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(limits.waiting.of(1000), MAX_WAITING_PER_UID);
        let started = std::time::Instant::now();
        assert!(
            limits
                .take(1000, true, Duration::from_secs(30))
                .await
                .is_err()
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        for waiter in &waiters {
            waiter.abort();
        }
        for waiter in waiters {
            let _ = waiter.await;
        }
        assert_eq!(limits.waiting.total(), 0);
        drop((slot, held));
        assert_eq!(limits.pending.total(), 0);
    }

    #[test]
    fn the_limits_stay_well_below_the_buses_128_pending_replies() {
        const { assert!(MAX_PENDING_NON_ROOT + MAX_PENDING_ROOT <= 128 - 32) };
        const { assert!(MAX_PENDING_INTERACTIVE_NON_ROOT < MAX_PENDING_NON_ROOT) };
    }
}
