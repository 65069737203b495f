//! Work done for a caller stops when that caller leaves the bus.
//!
//! A client that is killed (or just disconnects) while its check runs must
//! not keep a check slot, nor a qemu-img, until the timeout. Every call
//! holds a [`CallerGuard`] for its sender's unique name; when the bus says
//! that name has gone (`NameOwnerChanged` with no new owner), the guard's
//! token is cancelled, and with it everything started for that caller.
//!
//! The signal may be handled before the call that it concerns has taken its
//! guard (both arrive in order, but are handled by different tasks), so the
//! names that left recently are remembered: unique names are never reused on
//! a bus, and a guard taken for a departed name starts cancelled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use zbus::Connection;
use zbus::fdo::DBusProxy;
use zbus::message::Header;

use super::error::VmError;

/// How many departed names are remembered for late guards. A guard is taken
/// right after the call arrives, so only disconnects in between count.
const REMEMBERED_DEPARTURES: usize = 4096;

/// The callers with work in progress. Owned by the manager state.
pub struct Callers {
    /// Parent of every caller's token: the daemon's shutdown.
    shutdown: CancellationToken,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    active: HashMap<String, Active>,
    departed: HashSet<String>,
    departed_order: VecDeque<String>,
}

struct Active {
    token: CancellationToken,
    guards: usize,
}

/// One call's hold on its caller's token. Dropping the last guard of a
/// caller forgets it.
pub struct CallerGuard {
    callers: Arc<Callers>,
    name: String,
    token: CancellationToken,
}

impl CallerGuard {
    /// Cancelled when the caller leaves the bus or the daemon shuts down.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Runs `work` unless the caller leaves the bus (or the daemon stops)
    /// first; then `work` is dropped (a polkit check in it is no longer
    /// waited for, though it counts until polkit answers it).
    pub async fn until_gone<T, E>(
        &self,
        work: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, VmError>
    where
        VmError: From<E>,
    {
        tokio::select! {
            result = work => Ok(result?),
            () = self.token.cancelled() => {
                Err(VmError::Cancelled("the caller left the bus, or the service is stopping".into()))
            }
        }
    }
}

impl Drop for CallerGuard {
    fn drop(&mut self) {
        let mut state = self.callers.lock();
        if let Some(active) = state.active.get_mut(&self.name) {
            active.guards -= 1;
            if active.guards == 0 {
                state.active.remove(&self.name);
            }
        }
    }
}

impl Callers {
    pub fn new(shutdown: CancellationToken) -> Arc<Callers> {
        Arc::new(Callers {
            shutdown,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section leaves the maps consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A guard for the sender of `header`: its token is cancelled when the
    /// sender leaves the bus (or the daemon stops).
    pub fn guard(self: &Arc<Self>, header: &Header<'_>) -> Result<CallerGuard, VmError> {
        let sender = header
            .sender()
            .ok_or_else(|| VmError::NotAuthorized("the call has no sender".into()))?;
        Ok(self.track(sender.as_str()))
    }

    /// A guard for the caller with unique name `name`.
    pub fn track(self: &Arc<Self>, name: &str) -> CallerGuard {
        let mut state = self.lock();
        let departed = state.departed.contains(name);
        let active = state
            .active
            .entry(name.to_owned())
            .or_insert_with(|| Active {
                token: self.shutdown.child_token(),
                guards: 0,
            });
        active.guards += 1;
        if departed {
            active.token.cancel();
        }
        CallerGuard {
            callers: self.clone(),
            name: name.to_owned(),
            token: active.token.clone(),
        }
    }

    /// `name` has left the bus: cancel its work.
    pub fn left(&self, name: &str) {
        let mut state = self.lock();
        if let Some(active) = state.active.get(name) {
            tracing::info!(caller = name, "caller left the bus: cancelling its work");
            active.token.cancel();
        }
        if state.departed.insert(name.to_owned()) {
            state.departed_order.push_back(name.to_owned());
            if state.departed_order.len() > REMEMBERED_DEPARTURES
                && let Some(oldest) = state.departed_order.pop_front()
            {
                state.departed.remove(&oldest);
            }
        }
    }

    /// Subscribes to departures, then returns the loop that applies them;
    /// the loop ends when the daemon shuts down. Subscribing first means no
    /// departure after this returns is missed.
    pub async fn watch(
        self: &Arc<Self>,
        connection: &Connection,
    ) -> zbus::Result<impl std::future::Future<Output = ()> + Send + 'static> {
        let dbus = DBusProxy::new(connection).await?;
        // arg2 (the new owner) empty: a name lost its owner.
        let mut changes = dbus
            .receive_name_owner_changed_with_args(&[(2, "")])
            .await?;
        let callers = self.clone();
        Ok(async move {
            loop {
                tokio::select! {
                    change = changes.next() => {
                        let Some(change) = change else { return };
                        let Ok(args) = change.args() else { continue };
                        let name = args.name().as_str();
                        if name.starts_with(':') && args.new_owner().is_none() {
                            callers.left(name);
                        }
                    }
                    () = callers.shutdown.cancelled() => return,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_departure_cancels_that_callers_guards_only() {
        let callers = Callers::new(CancellationToken::new());
        let a1 = callers.track(":1.10");
        let a2 = callers.track(":1.10");
        let b = callers.track(":1.11");
        callers.left(":1.10");
        assert!(a1.token().is_cancelled() && a2.token().is_cancelled());
        assert!(!b.token().is_cancelled());
    }

    #[test]
    fn a_guard_taken_after_the_departure_starts_cancelled() {
        let callers = Callers::new(CancellationToken::new());
        callers.left(":1.20");
        assert!(callers.track(":1.20").token().is_cancelled());
        assert!(!callers.track(":1.21").token().is_cancelled());
    }

    #[test]
    fn forgotten_when_the_last_guard_drops_and_departures_are_bounded() {
        let callers = Callers::new(CancellationToken::new());
        let g = callers.track(":1.30");
        drop(g);
        assert!(callers.lock().active.is_empty());
        for i in 0..REMEMBERED_DEPARTURES + 10 {
            callers.left(&format!(":2.{i}"));
        }
        let state = callers.lock();
        assert_eq!(state.departed.len(), REMEMBERED_DEPARTURES);
        assert!(!state.departed.contains(":2.0"));
    }

    #[test]
    fn shutdown_cancels_everyone() {
        let shutdown = CancellationToken::new();
        let callers = Callers::new(shutdown.clone());
        let g = callers.track(":1.40");
        shutdown.cancel();
        assert!(g.token().is_cancelled());
    }
}
