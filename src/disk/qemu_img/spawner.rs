//! The one thread every qemu-img is forked from, and what a fork hands
//! back ([`Spawned`]).
//!
//! qemu-img gets a parent-death signal (`PR_SET_PDEATHSIG`, so it dies
//! with the service), and the kernel sends that signal when the *thread*
//! that forked it exits, not the process. A tokio blocking-pool thread
//! ends after a few idle seconds, which would kill qemu-img in the middle
//! of a long check; an async worker must not block in the fork either (a
//! fork with a `pre_exec` hook waits until the child has exec'd). So the
//! forks happen on a long-lived thread of their own, which outlives every
//! qemu-img it forked.

use std::io;
use std::sync::{Mutex, mpsc};

use tokio::process::Child;

use super::group::ProcessGroup;
use super::strays::Leader;

/// A qemu-img just started, with everything that ends it. The fields drop
/// in order: the group is killed while the leader is still unreaped (its
/// pgid cannot have been reused), then the child (killed too, and left to
/// tokio to reap), then the leader's registration.
pub(super) struct Spawned {
    pub(super) group: ProcessGroup,
    pub(super) child: Child,
    pub(super) leader: Leader,
}

/// Work for the spawner thread.
pub(super) type SpawnJob = Box<dyn FnOnce() + Send>;

/// The thread that forks every qemu-img (see the module docs), started on
/// first use and ended when the last
/// [`QemuImgChildren`](super::QemuImgChildren) clone (and so every
/// [`Leader`]) is gone.
#[derive(Debug, Default)]
pub(super) struct Spawner {
    running: Mutex<Option<SpawnerThread>>,
}

#[derive(Debug)]
struct SpawnerThread {
    jobs: mpsc::Sender<SpawnJob>,
    thread: std::thread::JoinHandle<()>,
}

impl Spawner {
    /// Runs `job` on the spawner thread, starting the thread if needed.
    pub(super) fn submit(&self, job: SpawnJob) -> io::Result<()> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let thread = match &mut *running {
            Some(thread) => thread,
            None => running.insert(SpawnerThread::start()?),
        };
        thread
            .jobs
            .send(job)
            .map_err(|_| io::Error::other("qemu-img's spawner thread has stopped"))
    }
}

impl SpawnerThread {
    fn start() -> io::Result<SpawnerThread> {
        let (jobs, queue) = mpsc::channel::<SpawnJob>();
        let thread = std::thread::Builder::new()
            .name("vmm-qemu-img".into())
            .spawn(move || {
                for job in queue {
                    // A panicking job must not end the thread: that would
                    // kill every qemu-img it forked.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        Ok(SpawnerThread { jobs, thread })
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        let running = self.running.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(SpawnerThread { jobs, thread }) = running.take() {
            // Closing the queue ends the thread after its current job.
            drop(jobs);
            // The last clone may go away in a job on that very thread.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}
