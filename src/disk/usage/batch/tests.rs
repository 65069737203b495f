//! Shared passes over the real /proc, with real processes holding real files.
//! Each pass is held, after it has read /proc, until the test lets it end,
//! so which request lands in which pass is decided by the test, not by luck.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::Duration;

use super::*;
use crate::test_support::{Sleeper, eventually};

/// Lets the passes of a batcher end when the test says.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
    /// What the passes read; `None`: /proc.
    proc_root: Option<PathBuf>,
    /// Held passes ignore their cancellation, like a read stuck on a dead
    /// FUSE mount.
    deaf: bool,
    /// This pass (numbered from 1) panics once let go.
    panics: Option<usize>,
}

#[derive(Default)]
struct GateState {
    /// Each pass that has read /proc: the thread leading it, and its token.
    passes: Vec<(ThreadId, CancellationToken)>,
    /// Passes that may end (numbered from 1), or all.
    released: Vec<usize>,
    all_released: bool,
}

impl Gate {
    /// A batcher whose passes read /proc, then wait for the gate (or
    /// their cancellation).
    fn batcher(self: &Arc<Gate>) -> Arc<Batcher> {
        let gate = Arc::clone(self);
        Arc::new(Batcher::with_pass(Box::new(move |targets, cancel| {
            let proc_root = gate.proc_root.as_deref().unwrap_or(Path::new("/proc"));
            let result = procfs::holders_of_any(proc_root, targets, std::process::id(), cancel);
            let nth = gate.entered(cancel);
            gate.wait_released(nth, cancel)?;
            assert_ne!(Some(nth), gate.panics, "the test's panicking pass");
            result
        })))
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn entered(&self, cancel: &CancellationToken) -> usize {
        let mut state = self.lock();
        state.passes.push((thread::current().id(), cancel.clone()));
        state.passes.len()
    }

    fn wait_released(&self, nth: usize, cancel: &CancellationToken) -> Result<(), HoldersError> {
        let mut state = self.lock();
        while !state.all_released && !state.released.contains(&nth) {
            if cancel.is_cancelled() && !self.deaf {
                return Err(HoldersError::Cancelled);
            }
            let tick = Duration::from_millis(1);
            state = self.changed.wait_timeout(state, tick).unwrap().0;
        }
        Ok(())
    }

    fn release(&self, nth: usize) {
        self.lock().released.push(nth);
        self.changed.notify_all();
    }

    fn release_all(&self) {
        self.lock().all_released = true;
        self.changed.notify_all();
    }

    fn passes(&self) -> usize {
        self.lock().passes.len()
    }

    async fn wait_for_pass(&self, nth: usize) {
        eventually(&format!("pass {nth} has read /proc"), || {
            self.passes() >= nth
        })
        .await;
    }

    /// Pass `nth`'s leader and token.
    fn pass(&self, nth: usize) -> (ThreadId, CancellationToken) {
        self.lock().passes[nth - 1].clone()
    }
}

/// A process holding `path` open.
fn hold(path: &Path) -> Sleeper {
    Sleeper::holding(File::open(path).unwrap(), None)
}

/// A gated batcher, and `images` new files in a temp dir.
struct Setup {
    gate: Arc<Gate>,
    batcher: Arc<Batcher>,
    images: Vec<(PathBuf, Target)>,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn new(gate: Gate, images: usize) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(gate);
        let images = (0..images)
            .map(|i| {
                let path = dir.path().join(format!("{i}.img"));
                std::fs::write(&path, b"image").unwrap();
                let meta = std::fs::metadata(&path).unwrap();
                let target = Target::Inode {
                    dev: meta.dev(),
                    ino: meta.ino(),
                };
                (path, target)
            })
            .collect();
        Setup {
            batcher: gate.batcher(),
            gate,
            images,
            _dir: dir,
        }
    }

    /// Asks who holds image `image`, in a thread of its own.
    fn request(&self, image: usize, cancel: &CancellationToken) -> JoinHandle<Pids> {
        let (batcher, cancel) = (Arc::clone(&self.batcher), cancel.clone());
        let target = self.images[image].1;
        thread::spawn(move || {
            let holders = batcher.holders(target, &cancel)?;
            Ok(holders.into_iter().map(|h| h.pid).collect())
        })
    }

    /// A process holding each image open.
    fn hold_each(&self) -> Vec<Sleeper> {
        self.images.iter().map(|(path, _)| hold(path)).collect()
    }
}

type Pids = Result<Vec<u32>, HoldersError>;

async fn finish(request: JoinHandle<Pids>) -> Pids {
    eventually("a request returns", || request.is_finished()).await;
    request.join().expect("the request panicked")
}

fn is_cancelled(pids: &Pids) -> bool {
    matches!(pids, Err(HoldersError::Cancelled))
}

#[tokio::test]
async fn waiting_requests_share_one_pass() {
    let setup = Setup::new(Gate::default(), 6);
    let never = CancellationToken::new();
    // Image i is held by i % 3 processes.
    let holding: Vec<Vec<Sleeper>> = setup
        .images
        .iter()
        .enumerate()
        .map(|(i, (path, _))| (0..i % 3).map(|_| hold(path)).collect())
        .collect();
    let mut want: Vec<Vec<u32>> = holding
        .iter()
        .map(|sleepers| sleepers.iter().map(Sleeper::pid).collect())
        .collect();
    want.iter_mut().for_each(|pids| pids.sort_unstable());

    // The first request runs pass 1 alone; the other five queue behind it.
    let first = setup.request(0, &never);
    setup.gate.wait_for_pass(1).await;
    let rest: Vec<_> = (1..6).map(|i| setup.request(i, &never)).collect();
    eventually("five requests are queued", || setup.batcher.queued() == 5).await;
    setup.gate.release_all();

    assert_eq!(finish(first).await.unwrap(), want[0]);
    for (i, request) in rest.into_iter().enumerate() {
        assert_eq!(
            finish(request).await.unwrap(),
            want[i + 1],
            "image {}",
            i + 1
        );
    }
    assert_eq!(setup.gate.passes(), 2, "six requests, two passes");
}

#[tokio::test]
async fn a_request_made_during_a_pass_waits_for_the_next() {
    let setup = Setup::new(Gate::default(), 1);
    let never = CancellationToken::new();

    let early = setup.request(0, &never);
    setup.gate.wait_for_pass(1).await;
    // A VM opens the image after pass 1 has read /proc, then someone asks.
    let vm = hold(&setup.images[0].0);
    let late = setup.request(0, &never);
    eventually("the late request is queued", || setup.batcher.queued() == 1).await;
    setup.gate.release_all();

    assert_eq!(finish(early).await.unwrap(), Vec::<u32>::new());
    let late = finish(late).await.unwrap();
    assert_eq!(late, vec![vm.pid()], "a pass older than the request");
    assert_eq!(setup.gate.passes(), 2);
}

#[tokio::test]
async fn a_cancelled_requester_goes_alone() {
    let setup = Setup::new(Gate::default(), 5);
    let holding = setup.hold_each();
    let tokens: Vec<CancellationToken> = (0..5).map(|_| CancellationToken::new()).collect();

    // A runs pass 1 alone; B, C, D and E queue for pass 2.
    let a = setup.request(0, &tokens[0]);
    setup.gate.wait_for_pass(1).await;
    let mut queued: Vec<_> = (1..5).map(|i| Some(setup.request(i, &tokens[i]))).collect();
    eventually("four requests are queued", || setup.batcher.queued() == 4).await;

    // B leaves the queue at once, while pass 1 is still held.
    tokens[1].cancel();
    assert!(is_cancelled(&finish(queued[0].take().unwrap()).await));
    assert_eq!(setup.batcher.queued(), 3);

    // A, pass 1's only requester, leaves: pass 1 is cancelled, and pass 2
    // starts for C, D and E without waiting for it.
    tokens[0].cancel();
    assert!(is_cancelled(&finish(a).await));
    assert!(setup.gate.pass(1).1.is_cancelled());
    setup.gate.wait_for_pass(2).await;
    let (leader, pass_cancel) = setup.gate.pass(2);
    let is_leader = |i: &usize| queued[*i].as_ref().unwrap().thread().id() == leader;
    let led = (1..4).find(is_leader).expect("one of C, D, E leads pass 2");
    let mut waiters = (1..4).filter(|i| !is_leader(i));
    let (gone, stays) = (waiters.next().unwrap(), waiters.next().unwrap());

    // A waiter in the held pass leaves at once; the pass goes on.
    tokens[gone + 1].cancel();
    assert!(is_cancelled(&finish(queued[gone].take().unwrap()).await));
    // So does the leader's requester, the pass still serving the third.
    tokens[led + 1].cancel();
    assert!(!pass_cancel.is_cancelled(), "one requester is still there");
    setup.gate.release_all();
    assert!(is_cancelled(&finish(queued[led].take().unwrap()).await));
    let served = finish(queued[stays].take().unwrap()).await;
    assert_eq!(served.unwrap(), vec![holding[stays + 1].pid()]);
    assert_eq!(setup.gate.passes(), 2);
}

#[tokio::test]
async fn a_failing_pass_fails_every_requester_in_it() {
    let setup = Setup::new(
        Gate {
            proc_root: Some("/nonexistent-proc".into()),
            ..Gate::default()
        },
        3,
    );
    let never = CancellationToken::new();

    // Pass 2 serves two requests: both fail.
    let first = setup.request(0, &never);
    setup.gate.wait_for_pass(1).await;
    let rest: Vec<_> = (1..3).map(|i| setup.request(i, &never)).collect();
    eventually("two requests are queued", || setup.batcher.queued() == 2).await;
    setup.gate.release_all();

    for request in std::iter::once(first).chain(rest) {
        let result = finish(request).await;
        assert!(
            matches!(&result, Err(HoldersError::Unreadable { source, .. })
                if source.kind() == io::ErrorKind::NotFound),
            "{result:?}"
        );
    }
    assert_eq!(setup.gate.passes(), 2);
}

#[tokio::test]
async fn a_panicking_pass_leaves_its_requests_to_a_new_leader() {
    let setup = Setup::new(
        Gate {
            panics: Some(2),
            ..Gate::default()
        },
        3,
    );
    let holding = setup.hold_each();
    let never = CancellationToken::new();

    // Pass 2, for B and C, panics in its leader's thread.
    let a = setup.request(0, &never);
    setup.gate.wait_for_pass(1).await;
    let b = setup.request(1, &never);
    let c = setup.request(2, &never);
    eventually("B and C are queued", || setup.batcher.queued() == 2).await;
    setup.gate.release_all();
    assert_eq!(finish(a).await.unwrap(), vec![holding[0].pid()]);

    let mut answered = Vec::new();
    let mut panicked = 0;
    for (i, request) in [(1, b), (2, c)] {
        eventually("a request returns", || request.is_finished()).await;
        match request.join() {
            Ok(pids) => answered.push((i, pids.unwrap())),
            Err(_) => panicked += 1,
        }
    }
    assert_eq!(panicked, 1, "pass 2's leader");
    let [(i, pids)] = answered.try_into().unwrap();
    assert_eq!(pids, vec![holding[i].pid()], "served by pass 3");
    assert_eq!(setup.gate.passes(), 3);
}

#[tokio::test]
async fn a_stuck_pass_nobody_waits_for_blocks_no_new_request() {
    let setup = Setup::new(
        Gate {
            deaf: true,
            ..Gate::default()
        },
        1,
    );
    let vm = setup.hold_each();

    // Pass 1 hangs; its only requester gives up (its scan timed out).
    let gives_up = CancellationToken::new();
    let stuck = setup.request(0, &gives_up);
    setup.gate.wait_for_pass(1).await;
    gives_up.cancel();
    // A new request gets a pass of its own meanwhile.
    let next = setup.request(0, &CancellationToken::new());
    setup.gate.wait_for_pass(2).await;
    setup.gate.release(2);
    assert_eq!(finish(next).await.unwrap(), vec![vm[0].pid()]);

    // The stuck pass, when it ends at last, answers nobody.
    assert!(!stuck.is_finished(), "its thread runs the stuck pass");
    setup.gate.release(1);
    assert!(is_cancelled(&finish(stuck).await));
}

/// xorshift64: reproducible choices without a dependency.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Many requesters at random moments, some cancelled at random moments,
/// over passes that take random time and sometimes fail or panic: every
/// requester returns; each answer is its own target's, from a pass that
/// started after it asked; nothing is left behind.
#[tokio::test]
async fn random_requests_cancellations_failures_and_panics() {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    const REQUESTERS: u64 = 400;
    // A pass answers target (0, ino) with [ino, its start] as "pids".
    let clock = Arc::new(AtomicU64::new(1));
    let panics = Arc::new(AtomicUsize::new(0));
    let batcher = {
        let (clock, panics) = (Arc::clone(&clock), Arc::clone(&panics));
        Arc::new(Batcher::with_pass(Box::new(move |targets, cancel| {
            let started = clock.fetch_add(1, Ordering::SeqCst);
            let mut random = started.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            thread::sleep(Duration::from_micros(next_random(&mut random) % 2000));
            if cancel.is_cancelled() {
                return Err(HoldersError::Cancelled);
            }
            match next_random(&mut random) % 20 {
                0 => {
                    return Err(HoldersError::Unreadable {
                        path: "/proc".into(),
                        source: io::Error::from_raw_os_error(libc::EMFILE),
                    });
                }
                1 => {
                    panics.fetch_add(1, Ordering::SeqCst);
                    panic!("the test's panicking pass");
                }
                _ => {}
            }
            let answer = |target: &Target| match *target {
                Target::Inode { ino, .. } => vec![
                    Holder {
                        pid: u32::try_from(ino).unwrap(),
                        writable: false,
                    },
                    Holder {
                        pid: u32::try_from(started).unwrap(),
                        writable: true,
                    },
                ],
                Target::CharDevice { .. } | Target::BlockDevice { .. } => {
                    unreachable!("inodes only")
                }
            };
            Ok(targets.iter().map(answer).collect())
        })))
    };

    let requesters: Vec<_> = (1..=REQUESTERS)
        .map(|ino| {
            let (batcher, clock) = (Arc::clone(&batcher), Arc::clone(&clock));
            let cancel = CancellationToken::new();
            let mut random = ino.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
            let delay = Duration::from_micros(next_random(&mut random) % 20_000);
            let cancel_after = next_random(&mut random)
                .is_multiple_of(5)
                .then(|| Duration::from_micros(next_random(&mut random) % 3000));
            let canceller = cancel_after.map(|after| {
                let cancel = cancel.clone();
                thread::spawn(move || {
                    thread::sleep(delay + after);
                    cancel.cancel();
                })
            });
            let handle = thread::spawn(move || {
                thread::sleep(delay);
                let asked = clock.fetch_add(1, Ordering::SeqCst);
                let result = batcher.holders(Target::Inode { dev: 0, ino }, &cancel);
                (asked, result, cancel.is_cancelled())
            });
            (ino, handle, canceller)
        })
        .collect();

    let mut panicked = 0;
    for (ino, handle, canceller) in requesters {
        eventually("a requester returns", || handle.is_finished()).await;
        let Ok((asked, result, cancelled)) = handle.join() else {
            panicked += 1;
            continue;
        };
        match result {
            Ok(holders) => {
                assert_eq!(holders.len(), 2, "requester {ino}: {holders:?}");
                assert_eq!(u64::from(holders[0].pid), ino, "another's answer");
                let started = u64::from(holders[1].pid);
                assert!(started > asked, "requester {ino}: a pass older than it");
            }
            Err(HoldersError::Cancelled) => assert!(cancelled, "requester {ino}"),
            Err(HoldersError::Unreadable { .. }) => {}
        }
        if let Some(canceller) = canceller {
            canceller.join().unwrap();
        }
    }
    assert!(
        panicked <= panics.load(Ordering::SeqCst),
        "only leaders of panicking passes panic"
    );
    let state = batcher.lock();
    assert!(state.queue.is_empty(), "{} queued", state.queue.len());
    assert!(
        state.answers.is_empty(),
        "{} answers left",
        state.answers.len()
    );
    assert!(state.running.is_none());
}
