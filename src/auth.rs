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
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmmanager_client::names::action;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zbus::Connection;
use zbus::message::Header;
use zbus_polkit::policykit1::{
    AuthorityProxy, AuthorizationResult, CheckAuthorizationFlags, Subject,
};

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
            Action::CheckDisk => action::CHECK_DISK,
            Action::CheckDiskOtherUser => action::CHECK_DISK_OTHER_USER,
            Action::RepairDisk => action::REPAIR_DISK,
            Action::ManageDevices => action::MANAGE_DEVICES,
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
struct InFlight {
    by_uid: HashMap<u32, usize>,
    non_root: usize,
    interactive_non_root: usize,
    waiting_by_uid: HashMap<u32, usize>,
}

impl InFlight {
    /// Counts a new check of `uid`, or says which limit it would exceed.
    fn admit(&mut self, uid: u32, interactive: bool) -> Result<(), TooManyPending> {
        let root = uid == 0;
        let own_limit = if root {
            MAX_PENDING_ROOT
        } else {
            MAX_PENDING_PER_UID
        };
        let own = self.by_uid.get(&uid).copied().unwrap_or(0);
        if own >= own_limit {
            return Err(TooManyPending::Caller {
                uid,
                limit: own_limit,
            });
        }
        if !root {
            if self.non_root >= MAX_PENDING_NON_ROOT {
                return Err(TooManyPending::NonRoot {
                    limit: MAX_PENDING_NON_ROOT,
                });
            }
            if interactive && self.interactive_non_root >= MAX_PENDING_INTERACTIVE_NON_ROOT {
                return Err(TooManyPending::Interactive {
                    limit: MAX_PENDING_INTERACTIVE_NON_ROOT,
                });
            }
            self.non_root += 1;
            self.interactive_non_root += usize::from(interactive);
        }
        *self.by_uid.entry(uid).or_default() += 1;
        Ok(())
    }

    fn release(&mut self, uid: u32, interactive: bool) {
        decrement(&mut self.by_uid, uid);
        if uid != 0 {
            self.non_root -= 1;
            self.interactive_non_root -= usize::from(interactive);
        }
    }

    /// Counts a call of `uid` that waits for a slot, unless too many do.
    fn enqueue(&mut self, uid: u32) -> bool {
        let waiting = self.waiting_by_uid.entry(uid).or_default();
        *waiting += 1;
        if *waiting > MAX_WAITING_PER_UID {
            decrement(&mut self.waiting_by_uid, uid);
            return false;
        }
        true
    }
}

/// `map[key] -= 1`, forgetting keys that reach 0.
fn decrement(map: &mut HashMap<u32, usize>, key: u32) {
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

/// The counts, and a wake-up for calls waiting for a slot.
#[derive(Debug, Default)]
struct Limits {
    in_flight: Mutex<InFlight>,
    freed: Notify,
}

impl Limits {
    fn lock(&self) -> std::sync::MutexGuard<'_, InFlight> {
        // Every critical section leaves the counts consistent.
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A call's place among those waiting for a slot, given back on drop (the
/// caller may leave while it waits).
struct Waiting<'a> {
    limits: &'a Limits,
    uid: u32,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        decrement(&mut self.limits.lock().waiting_by_uid, self.uid);
    }
}

/// One admitted check's place in [`InFlight`], given back on drop.
struct Slot {
    limits: Arc<Limits>,
    uid: u32,
    interactive: bool,
}

impl Slot {
    /// A slot for a check of `uid` if one is free now.
    fn try_take(limits: &Arc<Limits>, uid: u32, interactive: bool) -> Result<Slot, TooManyPending> {
        limits.lock().admit(uid, interactive)?;
        Ok(Slot {
            limits: limits.clone(),
            uid,
            interactive,
        })
    }

    /// A slot for a check of `uid`, waiting up to `wait` for one to be
    /// freed (unless too many calls of `uid` wait already).
    async fn take(
        limits: &Arc<Limits>,
        uid: u32,
        interactive: bool,
        wait: Duration,
    ) -> Result<Slot, TooManyPending> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut waiting = None;
        loop {
            // Listening before trying, so a slot freed in between is seen.
            let freed = limits.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let refused = match Slot::try_take(limits, uid, interactive) {
                Ok(slot) => return Ok(slot),
                Err(refused) => refused,
            };
            if waiting.is_none() {
                if !limits.lock().enqueue(uid) {
                    return Err(refused);
                }
                waiting = Some(Waiting { limits, uid });
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(refused);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limits.lock().release(self.uid, self.interactive);
        self.limits.freed.notify_waiters();
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
    limits: Arc<Limits>,
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
            limits: Arc::default(),
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
        let slot = Slot::take(&self.limits, caller.uid, interactive, SLOT_WAIT).await?;
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

    fn take(limits: &Arc<Limits>, uid: u32, interactive: bool) -> Slot {
        Slot::try_take(limits, uid, interactive).expect("within the limits")
    }

    #[test]
    fn one_uid_gets_its_share_and_a_slot_comes_back_on_drop() {
        let limits = Arc::default();
        let mine: Vec<Slot> = (0..MAX_PENDING_PER_UID)
            .map(|_| take(&limits, 1000, true))
            .collect();
        let refused = Slot::try_take(&limits, 1000, false).err();
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
        assert_eq!(limits.lock().by_uid.get(&1000), Some(&1));
    }

    #[test]
    fn many_uids_leave_room_for_non_interactive_checks_and_root() {
        let limits = Arc::default();
        let uids = (MAX_PENDING_INTERACTIVE_NON_ROOT / MAX_PENDING_PER_UID) as u32;
        let _stalled: Vec<Slot> = (0..uids)
            .flat_map(|uid| (0..MAX_PENDING_PER_UID).map(move |_| 1000 + uid))
            .map(|uid| take(&limits, uid, true))
            .collect();
        assert_eq!(
            Slot::try_take(&limits, 5000, true).err(),
            Some(TooManyPending::Interactive {
                limit: MAX_PENDING_INTERACTIVE_NON_ROOT
            })
        );
        let quiet = MAX_PENDING_NON_ROOT - MAX_PENDING_INTERACTIVE_NON_ROOT;
        let _quick: Vec<Slot> = (0..quiet as u32)
            .map(|i| take(&limits, 6000 + i, false))
            .collect();
        assert_eq!(
            Slot::try_take(&limits, 7000, false).err(),
            Some(TooManyPending::NonRoot {
                limit: MAX_PENDING_NON_ROOT
            })
        );
        // root's reserve is untouched by all of that, and bounded itself.
        let _root: Vec<Slot> = (0..MAX_PENDING_ROOT)
            .map(|_| take(&limits, 0, true))
            .collect();
        assert_eq!(
            Slot::try_take(&limits, 0, false).err(),
            Some(TooManyPending::Caller {
                uid: 0,
                limit: MAX_PENDING_ROOT
            })
        );
    }

    #[tokio::test]
    async fn a_call_waits_briefly_for_a_freed_slot_and_few_wait() {
        let limits: Arc<Limits> = Arc::default();
        let wait = Duration::from_millis(200);
        let mut held: Vec<Slot> = (0..MAX_PENDING_PER_UID)
            .map(|_| take(&limits, 1000, true))
            .collect();
        // Nothing freed: Busy once the wait is over.
        let started = std::time::Instant::now();
        assert!(Slot::take(&limits, 1000, true, wait).await.is_err());
        assert!(started.elapsed() >= wait);
        // Freed while it waits: it gets the slot at once.
        let waiter = tokio::spawn({
            let limits = limits.clone();
            async move { Slot::take(&limits, 1000, true, Duration::from_secs(30)).await }
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
                    Slot::take(&limits, 1000, true, Duration::from_secs(30))
                        .await
                        .is_ok()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            limits.lock().waiting_by_uid.get(&1000),
            Some(&MAX_WAITING_PER_UID)
        );
        let started = std::time::Instant::now();
        assert!(
            Slot::take(&limits, 1000, true, Duration::from_secs(30))
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
        assert!(limits.lock().waiting_by_uid.is_empty());
        drop((slot, held));
        assert!(limits.lock().by_uid.is_empty());
    }

    #[test]
    fn the_limits_stay_well_below_the_buses_128_pending_replies() {
        const { assert!(MAX_PENDING_NON_ROOT + MAX_PENDING_ROOT <= 128 - 32) };
        const { assert!(MAX_PENDING_INTERACTIVE_NON_ROOT < MAX_PENDING_NON_ROOT) };
    }
}
