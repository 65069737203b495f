//! qemu-img's process group: killed as a whole, and on drop.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::procfs;

/// How long to wait after SIGKILL for the rest of the group to die. Only a
/// process stuck in uninterruptible I/O takes longer.
const GONE_TIMEOUT: Duration = Duration::from_secs(2);
const GONE_POLL: Duration = Duration::from_millis(5);

/// The group led by the child (`process_group(0)`: pgid == child pid).
///
/// While armed, dropping it sends SIGKILL to the whole group, so a dropped
/// `run_check` future leaves nothing behind. Kill it before the leader is
/// reaped whenever possible: an unreaped leader (or any live member) keeps the
/// pgid from being reused. After the leader is reaped and the group is empty
/// the number could be reused only after the kernel cycled through every pid,
/// which cannot happen in the microseconds before the final kill.
#[derive(Debug)]
pub(super) struct ProcessGroup {
    pgid: libc::pid_t,
    armed: bool,
}

impl ProcessGroup {
    pub(super) fn new(leader_pid: u32) -> ProcessGroup {
        ProcessGroup {
            // Pids fit in pid_t; a value that did not would never be killed.
            pgid: libc::pid_t::try_from(leader_pid).unwrap_or(0),
            armed: true,
        }
    }

    /// SIGKILL to every member; whether a signal was sent. Missing group
    /// (ESRCH) is fine.
    pub(super) fn kill(&self) -> bool {
        if self.pgid <= 1 {
            return false;
        }
        // SAFETY: plain syscall; pgid > 1 so it never means "every process"
        // (-1) or our own group (0).
        unsafe { libc::killpg(self.pgid, libc::SIGKILL) == 0 }
    }

    /// Nothing left to kill: the drop becomes a no-op.
    pub(super) fn disarm(&mut self) {
        self.armed = false;
    }

    /// Waits (bounded) until no live process of the group is left. Zombies
    /// count as gone: their parent (possibly an init that never reaps) owns
    /// them, and they hold no files or locks.
    pub(super) async fn wait_gone(&self) {
        let pgid = self.pgid;
        let deadline = Instant::now() + GONE_TIMEOUT;
        loop {
            if !group_exists(pgid) {
                return;
            }
            let alive = tokio::task::spawn_blocking(move || live_members(Path::new("/proc"), pgid))
                .await
                .unwrap_or(true);
            if !alive {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(pgid, "qemu-img's process group still alive after SIGKILL");
                return;
            }
            tokio::time::sleep(GONE_POLL).await;
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.kill();
        }
    }
}

/// Whether any process (zombies included) is in the group.
fn group_exists(pgid: libc::pid_t) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: signal 0 only checks existence and permission.
    let rc = unsafe { libc::killpg(pgid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Whether `proc_root` shows a non-zombie process whose pgrp is `pgid`.
pub(super) fn live_members(proc_root: &Path, pgid: libc::pid_t) -> bool {
    let Ok(pgid) = u32::try_from(pgid) else {
        return false;
    };
    procfs::processes(proc_root).any(|(_, stat)| stat.pgrp == pgid && stat.is_alive())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_members_reads_a_proc_tree() {
        let dir = std::env::temp_dir().join(format!(
            "vmm-qemu-img-group-{}-live-members",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for (pid, stat) in [
            ("10", "10 (qemu-img) S 1 10 10"),
            ("11", "11 (sleep) Z 1 10 10"),
            ("12", "12 (sleep) R 1 12 12"),
        ] {
            std::fs::create_dir_all(dir.join(pid)).unwrap();
            std::fs::write(dir.join(pid).join("stat"), stat).unwrap();
        }
        std::fs::create_dir_all(dir.join("self")).unwrap();
        let result = (
            live_members(&dir, 10),
            live_members(&dir, 11),
            live_members(&dir, 12),
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(result, (true, false, true));
    }

    #[test]
    fn only_zombies_count_as_gone() {
        let dir =
            std::env::temp_dir().join(format!("vmm-qemu-img-group-{}-zombies", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("20")).unwrap();
        std::fs::write(dir.join("20/stat"), "20 (sh) Z 1 20 20").unwrap();
        let alive = live_members(&dir, 20);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!alive);
    }

    #[test]
    fn a_group_is_killed_whole_but_tiny_pgids_are_never_signalled() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        // 0 and 1 would mean "our own group" and "init's group".
        assert!(!group_exists(0));
        assert!(!group_exists(1));
        assert!(!ProcessGroup::new(0).kill());
        assert!(!ProcessGroup::new(1).kill());

        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let group = ProcessGroup::new(child.id());
        assert!(group_exists(group.pgid));
        assert!(group.kill());
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
