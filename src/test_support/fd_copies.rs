//! A `sleep` holding many copies of one descriptor, for tests of scans over
//! processes with large fd tables. Also included by the integration tests
//! (`tests/common/mod.rs`).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// `sleep 600` with `stdin` on fd 0 and `copies` more copies of it on fds
/// 3 and up (its fd limit raised to fit); stdout and stderr on /dev/null.
pub fn sleep_holding_copies(stdin: impl Into<Stdio>, copies: i32) -> Command {
    let mut cmd = Command::new("sleep");
    cmd.arg("600")
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only setrlimit and dup2 between fork and exec, both
    // async-signal-safe; no allocation.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: (copies + 16) as libc::rlim_t,
                rlim_max: (copies + 16) as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for fd in 3..3 + copies {
                if libc::dup2(0, fd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}
