//! A `sleep` child holding files open: a holder for the /proc scans
//! (`crate::procfs`) and the shared passes (`crate::disk::usage`) to find.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use super::fd_copies::wait_for_exec;

/// A `sleep 600` (or another command spawned through [`Sleeper::spawn`]);
/// killed and reaped on drop.
pub struct Sleeper(Child);

impl Sleeper {
    /// A `sleep` holding `stdin` (fd 0) and, when given, a `writer` on fd
    /// `at` (fds 1 to `at - 1` on /dev/null).
    pub fn holding(stdin: File, writer: Option<(File, i32)>) -> Sleeper {
        let mut cmd = Command::new("sleep");
        cmd.arg("600").stdin(stdin).stdout(Stdio::null());
        if let Some((file, at)) = writer {
            assert!(at > 2, "fds 0 to 2 are stdio");
            cmd.stderr(file);
            // SAFETY: only dup2 between fork and exec: async-signal-safe,
            // no allocation.
            unsafe {
                cmd.pre_exec(move || {
                    for (from, to) in (3..at).map(|fd| (1, fd)).chain([(2, at), (1, 2)]) {
                        if libc::dup2(from, to) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        } else {
            cmd.stderr(Stdio::null());
        }
        Sleeper::spawn(&mut cmd)
    }

    /// Spawns `cmd` (a long sleep the caller set up) and returns once the
    /// child runs it, so its fds are in place (see [`wait_for_exec`]).
    pub fn spawn(cmd: &mut Command) -> Sleeper {
        let sleeper = Sleeper(cmd.spawn().expect("spawn sleep"));
        wait_for_exec(sleeper.pid(), cmd.get_program());
        sleeper
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
