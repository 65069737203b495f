//! One /proc pass for every scan waiting at that moment.
//!
//! A pass costs about as much as a `qemu-img check` and hardly more for many
//! targets than for one ([`procfs::holders_of_any`]), so concurrent checks
//! share passes: a request joins the queue, and the next pass to start
//! serves the whole queue. One of the requesters' threads runs it (the
//! leader); the others sleep until their answer is in.
//!
//! - Fresh: a request is answered only by a pass that started after it was
//!   made, so whatever held the file before the request is seen, as with a
//!   private pass. Requests made while a pass runs wait for the next one.
//! - Cancellation is per requester: a cancelled one leaves at once (its
//!   token wakes it) and the others keep their pass. The pass itself is
//!   cancelled, and forgotten so that new requests need not wait for it,
//!   only when every requester in it has gone; a leader whose own
//!   requester went while others remain finishes the pass for them.
//! - Fail closed: a failed pass fails every requester in it; a panicking
//!   one puts the other requests back in the queue for a new leader.

use std::collections::HashMap;
use std::fmt;
use std::future::Future as _;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Wake, Waker};

use tokio_util::sync::CancellationToken;

use crate::procfs::{self, Holder, HoldersError, Target};

/// One pass over /proc for `targets`: for each, its holders.
pub(super) type Pass =
    dyn Fn(&[Target], &CancellationToken) -> Result<Vec<Vec<Holder>>, HoldersError> + Send + Sync;

/// Shares /proc passes among the requests waiting when each starts.
pub(super) struct Batcher {
    pass: Box<Pass>,
    state: Mutex<State>,
    /// A pass ended, or a requester was cancelled.
    changed: Condvar,
}

type RequestId = u64;

#[derive(Default)]
struct State {
    next_request: RequestId,
    next_pass: u64,
    /// Requests no pass has taken yet: the next pass serves them all.
    queue: Vec<(RequestId, Target)>,
    running: Option<Running>,
    /// Answers of ended passes, until their requesters pick them up.
    answers: HashMap<RequestId, Result<Vec<Holder>, HoldersError>>,
}

/// The pass under way.
struct Running {
    id: u64,
    /// Its requesters that have not gone.
    present: Vec<RequestId>,
    /// Cancelled when the last of them goes.
    cancel: CancellationToken,
}

impl fmt::Debug for Batcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl Batcher {
    /// Passes over `proc_root` that never report this process (see
    /// [`procfs::holders_of_any`]).
    pub(super) fn new(proc_root: PathBuf) -> Batcher {
        let own_pid = std::process::id();
        Batcher::with_pass(Box::new(move |targets, cancel| {
            procfs::holders_of_any(&proc_root, targets, own_pid, cancel)
        }))
    }

    pub(super) fn with_pass(pass: Box<Pass>) -> Batcher {
        Batcher {
            pass,
            state: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    /// Blocking: the holders of `target`, from a pass that starts after this
    /// call, shared with every request waiting when it starts. The errors of
    /// [`procfs::holders`]; [`HoldersError::Cancelled`] as soon as `cancel`
    /// is cancelled while waiting, or when a pass this thread leads for
    /// others ends.
    pub(super) fn holders(
        self: &Arc<Self>,
        target: Target,
        cancel: &CancellationToken,
    ) -> Result<Vec<Holder>, HoldersError> {
        if cancel.is_cancelled() {
            return Err(HoldersError::Cancelled);
        }
        let request = {
            let mut state = self.lock();
            let request = state.next_request;
            state.next_request += 1;
            state.queue.push((request, target));
            request
        };
        // Wakes this thread (and withdraws the request, even while this
        // thread runs a pass) the moment `cancel` is cancelled.
        let waker = Waker::from(Arc::new(WithdrawOnCancel {
            batcher: Arc::downgrade(self),
            request,
        }));
        let mut cancelled = pin!(cancel.cancelled());
        let _ = cancelled.as_mut().poll(&mut Context::from_waker(&waker));

        let mut state = self.lock();
        loop {
            if cancel.is_cancelled() {
                self.withdraw(state, request);
                return Err(HoldersError::Cancelled);
            }
            if let Some(answer) = state.answers.remove(&request) {
                return answer;
            }
            if state.running.is_none() {
                // Not answered and no pass under way: still queued.
                return self.lead(state, request, cancel);
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Runs a pass for every queued request, `request` among them, and hands
    /// out the answers.
    fn lead(
        &self,
        mut state: MutexGuard<'_, State>,
        request: RequestId,
        cancel: &CancellationToken,
    ) -> Result<Vec<Holder>, HoldersError> {
        let batch = std::mem::take(&mut state.queue);
        debug_assert!(
            batch.iter().any(|&(id, _)| id == request),
            "led but not queued"
        );
        let pass = state.next_pass;
        state.next_pass += 1;
        let pass_cancel = CancellationToken::new();
        state.running = Some(Running {
            id: pass,
            present: batch.iter().map(|&(id, _)| id).collect(),
            cancel: pass_cancel.clone(),
        });
        drop(state);

        let targets: Vec<Target> = batch.iter().map(|&(_, target)| target).collect();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (self.pass)(&targets, &pass_cancel)
        }));

        let mut state = self.lock();
        // Gone when every requester left (they withdrew it).
        let running = match &state.running {
            Some(running) if running.id == pass => state.running.take(),
            _ => None,
        };
        let present = running.map(|r| r.present).unwrap_or_default();
        let result = match outcome {
            Ok(result) => result,
            Err(panic) => {
                // The others retry under a new leader; this thread panics.
                let retry = batch
                    .iter()
                    .filter(|&&(id, _)| id != request && present.contains(&id));
                let rest = std::mem::take(&mut state.queue);
                state.queue = retry.copied().chain(rest).collect();
                drop(state);
                self.changed.notify_all();
                std::panic::resume_unwind(panic);
            }
        };
        match result {
            Ok(lists) => {
                for (&(id, _), holders) in batch.iter().zip(lists) {
                    if present.contains(&id) {
                        state.answers.insert(id, Ok(holders));
                    }
                }
            }
            Err(e) => {
                for &id in &present {
                    state.answers.insert(id, Err(e.duplicate()));
                }
            }
        }
        let mine = state.answers.remove(&request);
        drop(state);
        self.changed.notify_all();
        match mine {
            Some(answer) if !cancel.is_cancelled() => answer,
            _ => Err(HoldersError::Cancelled),
        }
    }

    /// `request`'s requester has gone: forget the request, and cancel its
    /// pass if nobody else waits for it.
    fn withdraw(&self, mut state: MutexGuard<'_, State>, request: RequestId) {
        state.queue.retain(|&(id, _)| id != request);
        state.answers.remove(&request);
        let mut abandoned = None;
        if let Some(running) = &mut state.running {
            running.present.retain(|&id| id != request);
            if running.present.is_empty() {
                abandoned = state.running.take();
            }
        }
        drop(state);
        // Cancelled outside the lock: cancelling runs wakers, which lock.
        if let Some(pass) = abandoned {
            pass.cancel.cancel();
        }
        // Queued requests may now lead a pass of their own.
        self.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned state is still whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Requests waiting for the next pass.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.lock().queue.len()
    }
}

/// The waker a requester registers on its cancellation token.
struct WithdrawOnCancel {
    batcher: Weak<Batcher>,
    request: RequestId,
}

impl Wake for WithdrawOnCancel {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Also called for a request already answered (a token cancelled
        // after its scan): withdrawing an unknown request does nothing.
        if let Some(batcher) = self.batcher.upgrade() {
            batcher.withdraw(batcher.lock(), self.request);
        }
    }
}

#[cfg(test)]
mod tests;
