//! Work counted per caller uid, for limits that bound threads rather than
//! answers still awaited: a [`Counted`] goes with the work into its
//! blocking thread ([`spawn_holding`], [`spawn_stoppable`]) and counts until
//! that thread has ended, so work stuck in the kernel (a lookup on a FUSE
//! mount whose server never answers, a /proc read of a process stuck there:
//! neither can be stopped) keeps counting, and a caller who abandons such
//! calls cannot pile up threads. [`StoppableJob::finish`] is the one way to
//! wait for such work's answer: bounded in time, cancellable, and telling the
//! work to stop when its answer is abandoned.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::{CancellationToken, DropGuard};

/// Counts per uid (an entry lives while that uid has some), each entry with
/// a `P` made when the entry is (see [`UidCounts::admit_with`]). Cheap to
/// clone; clones share the counts.
#[derive(Debug)]
pub struct UidCounts<P = ()>(Arc<Shared<P>>);

#[derive(Debug)]
struct Shared<P> {
    state: Mutex<State<P>>,
    /// Told whenever a count goes down, for [`UidCounts::within`].
    freed: Notify,
}

#[derive(Debug)]
struct State<P> {
    by_uid: HashMap<u32, Entry<P>>,
    /// The counts admitted under an `all` bound (not those admitted
    /// without one, such as root's), which that bound limits.
    bounded: usize,
    /// Those of them admitted under a share of that bound as well.
    in_share: usize,
}

#[derive(Debug)]
struct Entry<P> {
    count: usize,
    payload: P,
}

/// Which limit an admission was refused by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// The caller's own.
    Caller,
    /// All bounded callers' together.
    All,
}

/// Which limit [`UidCounts::admit_in_share`] refused by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverShare {
    /// One [`UidCounts::admit`] has as well.
    Limit(OverLimit),
    /// The share itself.
    Share,
}

/// Where one admission counts, besides its uid's own count.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    per_uid: usize,
    all: Option<usize>,
    share: Option<usize>,
}

/// One piece of work of one uid: counts until dropped. `payload` is its
/// uid's entry's (see [`UidCounts::admit_with`]).
#[derive(Debug)]
pub struct Counted<P = ()> {
    counts: UidCounts<P>,
    uid: u32,
    in_all: bool,
    in_share: bool,
    payload: P,
}

impl<P> Counted<P> {
    /// What the uid's entry carries.
    pub fn payload(&self) -> &P {
        &self.payload
    }
}

impl<P> Clone for UidCounts<P> {
    fn clone(&self) -> Self {
        UidCounts(self.0.clone())
    }
}

impl<P> Default for UidCounts<P> {
    fn default() -> Self {
        UidCounts(Arc::new(Shared {
            state: Mutex::new(State {
                by_uid: HashMap::new(),
                bounded: 0,
                in_share: 0,
            }),
            freed: Notify::new(),
        }))
    }
}

impl<P: Clone + Default> UidCounts<P> {
    /// Counts one more for `uid`, unless `uid` already has `per_uid`, or
    /// (when `all` is given) everyone admitted under `all` has `all`
    /// together. Work admitted without `all` (root's, say) counts for its
    /// uid only, and never takes room from the others.
    pub fn admit(
        &self,
        uid: u32,
        per_uid: usize,
        all: Option<usize>,
    ) -> Result<Counted<P>, OverLimit> {
        let bounds = Bounds {
            per_uid,
            all,
            share: None,
        };
        self.try_admit(uid, bounds, P::default).map_err(over_limit)
    }

    /// [`UidCounts::admit`] under `all`, and also within `share` of it: work
    /// admitted this way together stays below `share`, so the rest of `all`
    /// stays free for the other work (polkit checks that need no human).
    pub fn admit_in_share(
        &self,
        uid: u32,
        per_uid: usize,
        all: usize,
        share: usize,
    ) -> Result<Counted<P>, OverShare> {
        let bounds = Bounds {
            per_uid,
            all: Some(all),
            share: Some(share),
        };
        self.try_admit(uid, bounds, P::default)
    }

    /// [`UidCounts::admit`], waiting up to `wait` for a count to go down
    /// when it is refused (see [`UidCounts::within`]).
    pub async fn admit_within(
        &self,
        uid: u32,
        per_uid: usize,
        all: Option<usize>,
        wait: Duration,
    ) -> Result<Counted<P>, OverLimit> {
        self.within(wait, || self.admit(uid, per_uid, all)).await
    }
}

impl<P: Clone> UidCounts<P> {
    /// Counts one more for `uid` unless it already has `per_uid`. A new
    /// entry's payload is `make()`; every count of that uid, while it has
    /// any, carries the same (a uid's own semaphore, say).
    pub fn admit_with(
        &self,
        uid: u32,
        per_uid: usize,
        make: impl FnOnce() -> P,
    ) -> Result<Counted<P>, OverLimit> {
        let bounds = Bounds {
            per_uid,
            all: None,
            share: None,
        };
        self.try_admit(uid, bounds, make).map_err(over_limit)
    }

    fn try_admit(
        &self,
        uid: u32,
        bounds: Bounds,
        make: impl FnOnce() -> P,
    ) -> Result<Counted<P>, OverShare> {
        let mut state = self.lock();
        let own = state.by_uid.get(&uid).map_or(0, |e| e.count);
        if own >= bounds.per_uid {
            return Err(OverShare::Limit(OverLimit::Caller));
        }
        if bounds.all.is_some_and(|all| state.bounded >= all) {
            return Err(OverShare::Limit(OverLimit::All));
        }
        if bounds.share.is_some_and(|share| state.in_share >= share) {
            return Err(OverShare::Share);
        }
        let (in_all, in_share) = (bounds.all.is_some(), bounds.share.is_some());
        state.bounded += usize::from(in_all);
        state.in_share += usize::from(in_share);
        let entry = state.by_uid.entry(uid).or_insert_with(|| Entry {
            count: 0,
            payload: make(),
        });
        entry.count += 1;
        let payload = entry.payload.clone();
        Ok(Counted {
            counts: self.clone(),
            uid,
            in_all,
            in_share,
            payload,
        })
    }
}

/// A refusal of an admission without a share: never [`OverShare::Share`].
fn over_limit(refused: OverShare) -> OverLimit {
    match refused {
        OverShare::Limit(over) => over,
        OverShare::Share => unreachable!("admitted without a share"),
    }
}

impl<P> UidCounts<P> {
    /// `attempt`, tried again whenever one of these counts goes down, for up
    /// to `wait`: a burst of short work gets through, while work that never
    /// ends makes the next caller wait only that long. The last refusal when
    /// the wait is over.
    pub async fn within<T, E>(
        &self,
        wait: Duration,
        mut attempt: impl FnMut() -> Result<T, E>,
    ) -> Result<T, E> {
        let deadline = Instant::now() + wait;
        loop {
            // Listening before trying, so a count freed in between is seen.
            let freed = self.0.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            match attempt() {
                Ok(admitted) => return Ok(admitted),
                Err(refused) => {
                    if tokio::time::timeout_at(deadline.into(), freed)
                        .await
                        .is_err()
                    {
                        return Err(refused);
                    }
                }
            }
        }
    }

    /// How many `uid` has.
    pub fn of(&self, uid: u32) -> usize {
        self.lock().by_uid.get(&uid).map_or(0, |e| e.count)
    }

    /// How many all uids have together.
    pub fn total(&self) -> usize {
        self.lock().by_uid.values().map(|e| e.count).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<P>> {
        // Every update finishes before anything can panic: a poisoned lock
        // still holds consistent counts.
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<P> Drop for Counted<P> {
    fn drop(&mut self) {
        let mut state = self.counts.lock();
        state.bounded -= usize::from(self.in_all);
        state.in_share -= usize::from(self.in_share);
        if let Some(entry) = state.by_uid.get_mut(&self.uid) {
            entry.count -= 1;
            if entry.count == 0 {
                state.by_uid.remove(&self.uid);
            }
        }
        drop(state);
        self.counts.0.freed.notify_waiters();
    }
}

/// Runs `work` in a blocking thread, with `held` (a [`Counted`], a check's
/// slots) going along: it is dropped when the thread ends, not when the
/// answer is abandoned, so it keeps counting work stuck in the kernel.
pub fn spawn_holding<T: Send + 'static>(
    held: impl Send + 'static,
    work: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    tokio::task::spawn_blocking(move || {
        let _held_until_done = held;
        work()
    })
}

/// Blocking work that is told to stop when its answer is abandoned: see
/// [`spawn_stoppable`].
#[derive(Debug)]
pub struct StoppableJob<T> {
    handle: JoinHandle<T>,
    _stop_when_abandoned: DropGuard,
}

/// Why [`StoppableJob::finish`] has no answer.
#[derive(Debug, thiserror::Error)]
pub enum Unfinished {
    #[error("did not finish in time")]
    TimedOut,
    #[error("cancelled")]
    Cancelled,
    #[error("stopped unexpectedly: {0}")]
    Panicked(#[from] JoinError),
}

/// [`spawn_holding`] for work that can be told to stop: `work` gets a token
/// that is cancelled when `cancel` is, or when the returned job is dropped
/// (its answer abandoned). A read stuck in the kernel does not see that, so
/// `held` still counts until the thread has really ended.
pub fn spawn_stoppable<T: Send + 'static>(
    held: impl Send + 'static,
    cancel: &CancellationToken,
    work: impl FnOnce(&CancellationToken) -> T + Send + 'static,
) -> StoppableJob<T> {
    let stop = cancel.child_token();
    let thread_stop = stop.clone();
    StoppableJob {
        handle: spawn_holding(held, move || work(&thread_stop)),
        _stop_when_abandoned: stop.drop_guard(),
    }
}

impl<T> StoppableJob<T> {
    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// The work's answer, within `limit` and unless `cancel` fires first.
    /// Without an answer (or when this future is dropped) the work is told
    /// to stop.
    pub async fn finish(
        self,
        limit: Duration,
        cancel: &CancellationToken,
    ) -> Result<T, Unfinished> {
        let StoppableJob {
            handle,
            _stop_when_abandoned,
        } = self;
        tokio::select! {
            result = tokio::time::timeout(limit, handle) => match result {
                Ok(answer) => Ok(answer?),
                Err(_) => Err(Unfinished::TimedOut),
            },
            () = cancel.cancelled() => Err(Unfinished::Cancelled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_uid_and_in_all_until_dropped() {
        let counts = UidCounts::<()>::default();
        let mine: Vec<Counted> = (0..2)
            .map(|_| counts.admit(1000, 2, Some(3)).unwrap())
            .collect();
        assert_eq!(
            counts.admit(1000, 2, Some(3)).unwrap_err(),
            OverLimit::Caller
        );
        let other = counts.admit(2000, 2, Some(3)).unwrap();
        // Without the bound for all, only the caller's own counts, and it
        // takes no room from the others.
        let exempt = counts.admit(0, 2, None).unwrap();
        assert_eq!(counts.admit(3000, 2, Some(3)).unwrap_err(), OverLimit::All);
        assert_eq!((counts.of(1000), counts.total()), (2, 4));
        drop(exempt);
        assert_eq!(counts.admit(3000, 2, Some(3)).unwrap_err(), OverLimit::All);
        drop((mine, other));
        assert_eq!(counts.total(), 0);
        let state = counts.lock();
        assert!(state.by_uid.is_empty(), "no entry stays behind");
        assert_eq!((state.bounded, state.in_share), (0, 0));
    }

    #[test]
    fn a_share_of_all_leaves_the_rest_to_other_work() {
        let counts = UidCounts::<()>::default();
        let shared: Vec<Counted> = (0..2)
            .map(|uid| counts.admit_in_share(uid + 1000, 2, 3, 2).unwrap())
            .collect();
        let refused = counts.admit_in_share(2000, 2, 3, 2).unwrap_err();
        assert_eq!(refused, OverShare::Share);
        let other = counts.admit(2000, 2, Some(3)).unwrap();
        assert_eq!(counts.admit(3000, 2, Some(3)).unwrap_err(), OverLimit::All);
        drop((shared, other));
        assert!(counts.admit_in_share(2000, 2, 3, 2).is_ok());
    }

    #[test]
    fn a_uids_counts_share_its_payload_while_it_has_any() {
        let counts = UidCounts::<Arc<u32>>::default();
        let first = counts.admit_with(1000, 2, || Arc::new(1)).unwrap();
        let second = counts.admit_with(1000, 2, || Arc::new(2)).unwrap();
        assert!(Arc::ptr_eq(first.payload(), second.payload()));
        drop((first, second));
        let fresh = counts.admit_with(1000, 2, || Arc::new(3)).unwrap();
        assert_eq!(**fresh.payload(), 3);
    }

    #[tokio::test]
    async fn a_refused_admission_waits_for_a_count_to_be_freed() {
        let counts = UidCounts::<()>::default();
        let held = counts.admit(1000, 1, None).unwrap();
        let briefly = counts.admit_within(1000, 1, None, Duration::from_millis(50));
        assert_eq!(briefly.await.unwrap_err(), OverLimit::Caller);
        let free_it = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(held);
        };
        let wait = Duration::from_secs(10);
        let (admitted, ()) = tokio::join!(counts.admit_within(1000, 1, None, wait), free_it);
        assert!(admitted.is_ok());
    }

    #[tokio::test]
    async fn a_job_holds_its_count_until_its_thread_ends_and_is_told_to_stop() {
        let counts = UidCounts::<()>::default();
        let counted = counts.admit(1000, 1, None).unwrap();
        let (release, wait_for_it) = std::sync::mpsc::channel::<()>();
        let never = CancellationToken::new();
        let told_to_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = told_to_stop.clone();
        let job = spawn_stoppable(counted, &never, move |stop: &CancellationToken| {
            let _ = wait_for_it.recv();
            seen.store(stop.is_cancelled(), std::sync::atomic::Ordering::SeqCst);
        });
        let answer = job.finish(Duration::from_millis(50), &never).await;
        assert!(matches!(answer, Err(Unfinished::TimedOut)));
        assert_eq!(counts.of(1000), 1, "the thread still runs");
        let told = counts.admit(1000, 1, None);
        assert_eq!(told.unwrap_err(), OverLimit::Caller);
        release.send(()).unwrap();
        crate::test_support::eventually("the thread ends", || counts.total() == 0).await;
        assert!(told_to_stop.load(std::sync::atomic::Ordering::SeqCst));
    }
}
