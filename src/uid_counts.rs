//! Work counted per caller uid, for limits that bound threads rather than
//! answers still awaited: a [`Counted`] goes with the work into its
//! blocking thread and counts until dropped, so work stuck in the kernel
//! (a lookup on a FUSE mount whose server never answers cannot be stopped)
//! keeps counting, and a caller who abandons such calls cannot pile up
//! threads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Counts per uid (an entry lives while that uid has some). Cheap to clone;
/// clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct UidCounts(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    counts: Mutex<HashMap<u32, usize>>,
    /// Told whenever a count goes down, for [`UidCounts::admit_within`].
    freed: Notify,
}

/// Which limit [`UidCounts::admit`] refused by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// The caller's own.
    Caller,
    /// All callers' together.
    All,
}

/// One piece of work of one uid: counts until dropped.
#[derive(Debug)]
pub struct Counted {
    counts: UidCounts,
    uid: u32,
}

impl UidCounts {
    /// Counts one more for `uid`, unless `uid` already has `per_uid`, or
    /// (when `all` is given) everyone has `all` together.
    pub fn admit(
        &self,
        uid: u32,
        per_uid: usize,
        all: Option<usize>,
    ) -> Result<Counted, OverLimit> {
        let mut counts = self.lock();
        let own = counts.get(&uid).copied().unwrap_or(0);
        if own >= per_uid {
            return Err(OverLimit::Caller);
        }
        if all.is_some_and(|all| counts.values().sum::<usize>() >= all) {
            return Err(OverLimit::All);
        }
        counts.insert(uid, own + 1);
        Ok(Counted {
            counts: self.clone(),
            uid,
        })
    }

    /// [`UidCounts::admit`], waiting up to `wait` for a count to go down
    /// when it is refused: a burst of short work gets through, while work
    /// that never ends makes the next caller wait only that long.
    pub async fn admit_within(
        &self,
        uid: u32,
        per_uid: usize,
        all: Option<usize>,
        wait: Duration,
    ) -> Result<Counted, OverLimit> {
        let deadline = Instant::now() + wait;
        loop {
            // Listening before looking, so a count freed in between is seen.
            let freed = self.0.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            match self.admit(uid, per_uid, all) {
                Ok(counted) => return Ok(counted),
                Err(over) => {
                    if tokio::time::timeout_at(deadline.into(), freed)
                        .await
                        .is_err()
                    {
                        return Err(over);
                    }
                }
            }
        }
    }

    /// How many `uid` has.
    pub fn of(&self, uid: u32) -> usize {
        self.lock().get(&uid).copied().unwrap_or(0)
    }

    /// How many all uids have together.
    pub fn total(&self) -> usize {
        self.lock().values().sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, usize>> {
        // Every update is one insert or remove: a panic elsewhere while
        // holding the lock cannot leave it half-done.
        self.0.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.uid);
            }
        }
        drop(counts);
        self.counts.0.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_uid_and_in_all_until_dropped() {
        let counts = UidCounts::default();
        let mine: Vec<Counted> = (0..2)
            .map(|_| counts.admit(1000, 2, Some(3)).unwrap())
            .collect();
        assert_eq!(
            counts.admit(1000, 2, Some(3)).unwrap_err(),
            OverLimit::Caller
        );
        let other = counts.admit(2000, 2, Some(3)).unwrap();
        assert_eq!(counts.admit(3000, 2, Some(3)).unwrap_err(), OverLimit::All);
        // Without the bound for all, only the caller's own counts.
        let exempt = counts.admit(0, 2, None).unwrap();
        assert_eq!((counts.of(1000), counts.total()), (2, 4));
        drop((mine, other, exempt));
        assert_eq!(counts.total(), 0);
        assert!(counts.lock().is_empty(), "no entry stays behind");
    }

    #[tokio::test]
    async fn a_refused_admission_waits_for_a_count_to_be_freed() {
        let counts = UidCounts::default();
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
}
