//! Descendants of qemu-img that left its process group (`setsid`, a double
//! fork): the group kill cannot reach them, and one of them could keep an
//! image locked. So the service makes itself a child subreaper
//! ([`become_subreaper`]): when their parent dies they become its children
//! instead of init's, and every time a check's qemu-img ends they are
//! killed and reaped.
//!
//! A stray is any child of the service that is neither the qemu-img leader
//! of a check still running (tokio waits for those by PID, so they must
//! never be reaped here) nor a fork of the service between fork and exec.
//! The service starts no other children; anything that ever does must go
//! through [`QemuImgChildren::spawn`] too.
//!
//! Only a subreaper sweeps: in any other process (tests running checks
//! in-process) strays go to init, and the other children belong to
//! someone else in that process. A subreaper without any child at all
//! (the common end of a check: its qemu-img was just reaped) has no
//! strays either, and skips the /proc pass.
//!
//! Every qemu-img is forked on one thread of its own (see
//! [`super::spawner`]), under the same registry lock a sweep takes.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::group::ProcessGroup;
use super::spawner::{Spawned, Spawner};
use crate::procfs;

/// Strays are real processes: always the real /proc, whatever the
/// configured root.
const PROC: &str = "/proc";
/// How long a sweep waits after SIGKILL for strays to die. Only a process
/// stuck in uninterruptible I/O takes longer.
const GONE_TIMEOUT: Duration = Duration::from_secs(2);
const GONE_POLL: Duration = Duration::from_millis(5);

/// Makes this process a child subreaper. Only the service calls it, at
/// start; from then on every child it has that is not a running qemu-img
/// is killed and reaped after each check.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: plain prctl without pointer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether this process has any child at all, running or a zombie (a
/// `waitid` that only looks: nothing is reaped). No child means no stray.
fn has_children() -> bool {
    // SAFETY: all-zero is a valid siginfo_t; the kernel only writes it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: plain syscall; `info` is valid for writes.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ECHILD)
}

/// Whether a sweep can find anything: only a subreaper with children can
/// have strays.
fn may_have_strays() -> bool {
    is_subreaper() && has_children()
}

fn is_subreaper() -> bool {
    let mut flag: libc::c_int = 0;
    // SAFETY: the kernel writes one int through the pointer, which is valid.
    let rc = unsafe {
        libc::prctl(
            libc::PR_GET_CHILD_SUBREAPER,
            &mut flag as *mut libc::c_int as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    rc == 0 && flag != 0
}

/// The service's qemu-img children: which of its children are the leaders
/// of checks (never strays), and the sweep that kills everything else.
/// Cheap to clone; the [`DiskChecker`](crate::disk::checker::DiskChecker)
/// owns one.
#[derive(Debug, Clone, Default)]
pub struct QemuImgChildren {
    /// Held while spawning and while choosing strays, so a sweep never sees
    /// a freshly exec'd qemu-img before it is registered.
    registry: Arc<Mutex<Registry>>,
    /// The thread every qemu-img is forked from.
    spawner: Arc<Spawner>,
}

#[derive(Debug, Default)]
struct Registry {
    /// Leaders of running checks, until tokio has reaped them.
    running: HashSet<u32>,
    /// Leaders whose run was dropped: tokio's orphan reaping owns them, so
    /// they stay exempt until they are no longer our children.
    abandoned: HashSet<u32>,
}

impl Registry {
    /// Children of `me` under `proc_root` that are not registered leaders.
    /// Forgets abandoned
    /// leaders that tokio has reaped meanwhile.
    fn strays(&mut self, proc_root: &Path, me: u32) -> Vec<u32> {
        let children = procfs::children(proc_root, me);
        self.abandoned.retain(|pid| children.contains(pid));
        children
            .into_iter()
            // No exemption for "our own fork before its exec" (same exe):
            // spawns hold the registry lock, which the sweep holds too, so
            // none is in flight now — and a stray that exec'd the service's
            // own binary must not survive by looking like one.
            .filter(|pid| !self.running.contains(pid) && !self.abandoned.contains(pid))
            .collect()
    }
}

impl QemuImgChildren {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns a qemu-img on the spawner thread and registers it, both under
    /// the registry lock. If this future is dropped before the answer
    /// arrives, the new process group is killed where it was started.
    pub(super) async fn spawn(&self, mut command: Command) -> io::Result<Spawned> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        // tokio's process driver (which reaps the child) is this runtime's.
        let runtime = tokio::runtime::Handle::current();
        let children = self.clone();
        self.spawner.submit(Box::new(move || {
            let _runtime = runtime.enter();
            let spawned = children.spawn_here(&mut command);
            // Nobody waits any more: dropping it (right here, still inside
            // the runtime) kills what was started.
            drop(answer.send(spawned));
        }))?;
        answered
            .await
            .map_err(|_| io::Error::other("qemu-img's spawner thread has stopped"))?
    }

    /// The fork and exec, on the calling thread.
    fn spawn_here(&self, command: &mut Command) -> io::Result<Spawned> {
        let mut registry = lock(&self.registry);
        let child = command.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("qemu-img vanished at start"))?;
        registry.running.insert(pid);
        Ok(Spawned {
            group: ProcessGroup::new(pid),
            child,
            leader: Leader {
                children: self.clone(),
                pid,
                registered: true,
                swept: false,
            },
        })
    }

    /// Kills every stray and waits (bounded) until each is reaped. Loops
    /// because a stray's own children become ours when it dies.
    async fn sweep(&self) {
        if !may_have_strays() {
            return;
        }
        let deadline = Instant::now() + GONE_TIMEOUT;
        loop {
            let this = self.clone();
            let (found, alive) = tokio::task::spawn_blocking(move || this.pass())
                .await
                .unwrap_or((0, 0));
            if found == 0 {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    alive,
                    "stray processes of qemu-img still alive after SIGKILL"
                );
                return;
            }
            if alive > 0 {
                tokio::time::sleep(GONE_POLL).await;
            }
        }
    }

    /// One round: SIGKILL every stray (zombies included), then reap those
    /// that are dead. Returns (strays found, strays still alive).
    fn pass(&self) -> (usize, usize) {
        if !may_have_strays() {
            return (0, 0);
        }
        let mut registry = lock(&self.registry);
        let strays = registry.strays(Path::new(PROC), std::process::id());
        for &pid in &strays {
            // SAFETY: plain syscall. `pid` is an unreaped child of ours that
            // nobody else waits for, so it cannot have been reused.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        // Reaping these pids needs no lock: no spawn can reuse them first.
        drop(registry);
        let alive = strays.iter().filter(|&&pid| !reap(pid)).count();
        (strays.len(), alive)
    }
}

/// `waitpid` on this one child, without blocking; true once it is gone.
fn reap(pid: u32) -> bool {
    let mut status = 0;
    // SAFETY: plain syscall on a child of ours; `status` is valid for writes.
    let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    rc != 0
}

fn lock(registry: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    // Updates only insert or remove whole PIDs: a poisoned lock is intact.
    registry.lock().unwrap_or_else(|p| p.into_inner())
}

/// A registered qemu-img leader. Call [`Leader::reaped`] once tokio has
/// reaped it; dropped before that (the run itself was dropped), it is left
/// to tokio and the strays get one sweep round without waiting.
pub(super) struct Leader {
    children: QemuImgChildren,
    pid: u32,
    registered: bool,
    swept: bool,
}

impl Leader {
    /// The leader is reaped (its PID may be reused from now on): unregister
    /// it, then kill and reap every stray.
    pub(super) async fn reaped(&mut self) {
        if self.registered {
            lock(&self.children.registry).running.remove(&self.pid);
            self.registered = false;
        }
        self.children.sweep().await;
        self.swept = true;
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if self.registered {
            let mut registry = lock(&self.children.registry);
            registry.running.remove(&self.pid);
            registry.abandoned.insert(self.pid);
        }
        if !self.swept {
            self.children.pass();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strays_are_children_that_are_not_leaders_whatever_they_run() {
        let dir = std::env::temp_dir().join(format!("vmm-strays-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let me = 7;
        let our_exe = std::env::current_exe().unwrap();
        for (pid, ppid, exe) in [
            (10, me, "/bin/sh"),      // a running check's qemu-img
            (11, me, "/bin/sh"),      // a dropped run's qemu-img
            (12, me, ""),             // runs our binary: still a stray
            (13, me, "/bin/sh"),      // a stray
            (14, me, "/nonexistent"), // a zombie stray: exe unreadable
            (15, 1, "/bin/sh"),       // someone else's child
        ] {
            let d = dir.join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("stat"), format!("{pid} (x y) S {ppid} {pid} {pid}")).unwrap();
            let exe = if exe.is_empty() {
                our_exe.as_path()
            } else {
                Path::new(exe)
            };
            std::os::unix::fs::symlink(exe, d.join("exe")).unwrap();
        }
        let mut registry = Registry::default();
        registry.running.insert(10);
        registry.abandoned.extend([11, 16]);
        let mut strays = registry.strays(&dir, me);
        std::fs::remove_dir_all(&dir).unwrap();
        strays.sort_unstable();
        assert_eq!(strays, [12, 13, 14]);
        // 16 is no longer a child of ours: tokio has reaped it.
        assert_eq!(registry.abandoned, HashSet::from([11]));
        assert_eq!(registry.running, HashSet::from([10]));
    }

    #[test]
    fn a_test_process_is_no_subreaper_and_never_sweeps() {
        // The sweep would otherwise kill other tests' children.
        assert!(!is_subreaper());
        assert_eq!(QemuImgChildren::new().pass(), (0, 0));
    }
}
