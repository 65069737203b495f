//! A `sleep` holding many copies of one descriptor, for tests of scans over
//! processes with large fd tables. Also included by the integration tests
//! (`tests/common/mod.rs`).

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Waits until process `pid` runs `program` (its `/proc/PID/exe` has that
/// file name): only then are the fds a `pre_exec` set up all in place.
/// `Command::spawn` alone does not promise that when the `pre_exec`
/// dup2()s over a range of fds: std learns of the exec through a
/// close-on-exec pipe, and a dup2 onto that pipe's end closes it early, so
/// spawn returns while the child is still making its copies (seen under
/// parallel tests, where the pipe's number falls in the range).
pub fn wait_for_exec(pid: u32, program: &OsStr) {
    let program = Path::new(program).file_name().unwrap_or(program);
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(&exe)
        .ok()
        .as_deref()
        .and_then(Path::file_name)
        != Some(program)
    {
        assert!(
            Instant::now() < deadline,
            "{exe:?} never became {program:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
