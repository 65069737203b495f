//! Looking at the file system as a caller would.
//!
//! The service runs as root, but a caller must learn nothing about files it
//! could not see itself: not whether `/root/x` exists, not what a `/proc/PID/cwd`
//! link of another user's process points to. So the caller's path (and its
//! `pidfile`) is resolved in a short-lived thread that runs with the caller's
//! uid, gid and groups. Linux keeps credentials per thread (only glibc's
//! wrappers spread them to every thread), so the raw `setresuid` family
//! changes that one thread: its effective capabilities are gone, the kernel
//! checks directory search permission, `protected_symlinks` and `/proc`'s
//! ptrace rules exactly as for the caller. The thread ends when the work is
//! done, so no pooled thread ever keeps foreign credentials.

use std::io;

use super::qemu_img::RunAs;
use crate::safe_open::MagicLinks;

/// Whose permissions a file-system lookup uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// The service's own (root): for callers polkit authorized to act on
    /// other users' images, and for the service's configured paths.
    Service,
    /// A caller's: what that user could open with its own credentials.
    User(RunAs),
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("cannot take the caller's credentials (uid {uid}): {source}")]
    Switch {
        uid: u32,
        #[source]
        source: io::Error,
    },
    #[error("internal error: a lookup as the caller panicked")]
    Panicked,
}

impl View {
    /// How lookups in this view treat `/proc` magic links: a caller's never
    /// follow them (`/proc/self` would be the service itself).
    pub fn magic_links(&self) -> MagicLinks {
        match self {
            View::Service => MagicLinks::Follow,
            View::User(_) => MagicLinks::Refuse,
        }
    }

    /// Runs `work` with this view's permissions. Blocking: call it from
    /// `spawn_blocking` or a blocking context.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, ViewError> {
        let run_as = match self {
            View::User(run_as) if run_as.uid != current_euid() => run_as,
            // The service's view, or a caller who is the service's own user:
            // nothing to switch.
            _ => return Ok(work()),
        };
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("vmm-as-caller".into())
                .spawn_scoped(scope, || {
                    switch_this_thread(run_as).map_err(|source| ViewError::Switch {
                        uid: run_as.uid,
                        source,
                    })?;
                    Ok(work())
                })
                .map_err(|source| ViewError::Switch {
                    uid: run_as.uid,
                    source,
                })?;
            thread.join().map_err(|_| ViewError::Panicked)?
        })
    }
}

fn current_euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Gives the calling thread (only) `run_as`'s effective and file-system
/// credentials: groups and gid first, while still privileged, uid last. The
/// real and saved ids stay, but the thread ends right after its work.
fn switch_this_thread(run_as: &RunAs) -> io::Result<()> {
    const UNCHANGED: libc::c_long = -1;
    let check = |rc: libc::c_long| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY (all three): raw syscalls (not glibc's process-wide wrappers)
    // on this thread's own credentials; `groups` is valid for its length.
    check(unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            run_as.groups.len(),
            run_as.groups.as_ptr(),
        )
    })?;
    let gid = libc::c_long::from(run_as.gid);
    check(unsafe { libc::syscall(libc::SYS_setresgid, UNCHANGED, gid, UNCHANGED) })?;
    let uid = libc::c_long::from(run_as.uid);
    check(unsafe { libc::syscall(libc::SYS_setresuid, UNCHANGED, uid, UNCHANGED) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn nobody() -> RunAs {
        RunAs {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        }
    }

    #[test]
    fn the_service_view_runs_inline() {
        let here = std::thread::current().id();
        assert_eq!(
            View::Service.run(|| std::thread::current().id()).unwrap(),
            here
        );
    }

    #[test]
    fn a_user_view_has_the_users_permissions_and_leaves_this_thread_alone() {
        assert_eq!(current_euid(), 0, "the test suite runs as root");
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"x").unwrap();

        let seen = View::User(nobody())
            .run(|| {
                // SAFETY: plain getters.
                let ids = unsafe { (libc::geteuid(), libc::getegid()) };
                (ids, std::fs::metadata(&secret).map_err(|e| e.kind()))
            })
            .unwrap();
        assert_eq!(seen.0, (65534, 65534));
        assert_eq!(seen.1.unwrap_err(), io::ErrorKind::PermissionDenied);
        // This thread (and the process) is still root.
        assert_eq!(current_euid(), 0);
        assert!(std::fs::metadata(&secret).is_ok());
        // Another user's /proc magic links are closed to the caller's view,
        // though root (this process) could follow them.
        let init_cwd = View::User(nobody())
            .run(|| std::fs::read_link("/proc/1/cwd").map_err(|e| e.kind()))
            .unwrap();
        assert_eq!(init_cwd.unwrap_err(), io::ErrorKind::PermissionDenied);
    }
}
