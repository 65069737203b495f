//! polkit's text authentication agent (`pkttyagent`) for the duration of
//! one call, so that polkit asks for the password on the terminal where
//! vmctl runs, as systemctl does (systemd's `polkit_agent_open`).
//!
//! # Whom the agent answers for
//! The service asks polkit about the caller's unique bus name. polkitd
//! (`get_authentication_agent_for_subject` in
//! `polkitbackendinteractiveauthority.c`) looks for an agent registered for
//! that bus name, then for the *process* behind it, then for the process's
//! logind session. So the agent is registered with `--process` for vmctl's
//! own PID and start time (pkttyagent's default, its parent, is the same
//! process, but named after a fork instead of before it): it then answers
//! vmctl's requests and no one else's, and works where polkit finds no
//! session (containers, no logind, `su`/`setpriv` from a service).
//!
//! Unlike systemctl, without `--fallback`: polkitd consults a fallback agent
//! only after it has found a session for the subject, and returns no agent at
//! all when it finds none — with `--fallback`, a terminal without a logind
//! session would never be asked. Without it, the terminal is asked even
//! when the user's desktop has a graphical agent, as pkexec's own text agent
//! does: the password is asked where the command was typed.

use std::io::{self, IsTerminal};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// An absolute path, as systemd's, never a `PATH` lookup: a `pkttyagent`
/// earlier on a user's `PATH` would be shown the password. Debian's
/// package polkitd (which the service needs anyway) puts it here; a distro
/// with another location sets `VMCTL_PKTTYAGENT` when building.
const PKTTYAGENT: &str = match option_env!("VMCTL_PKTTYAGENT") {
    Some(path) => path,
    None => "/usr/bin/pkttyagent",
};
/// pkttyagent registers in milliseconds; past this the call goes ahead
/// without waiting (the agent may still register in time, and is stopped
/// with the call either way), so a wedged bus cannot hang vmctl.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopped agent may take to restore the terminal and exit
/// before it is killed outright.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot start {PKTTYAGENT}: {0}")]
    Spawn(io::Error),
    #[error("cannot make the pipe {PKTTYAGENT} reports on: {0}")]
    Pipe(io::Error),
    #[error("waiting for {PKTTYAGENT} to register: {0}")]
    Wait(io::Error),
    #[error("{PKTTYAGENT} did not register ({0})")]
    NotRegistered(ExitStatus),
}

/// A running pkttyagent; stopped (SIGTERM, then SIGKILL) and reaped on drop.
pub struct TtyAgent {
    child: Child,
}

/// Whether a call of vmctl's should have an agent: it may ask (no
/// `--no-ask-password`), there is a terminal to ask on (stdin), and vmctl
/// is not root (polkit always says yes to root, without asking).
pub fn wanted(may_ask: bool) -> bool {
    // SAFETY: geteuid cannot fail.
    may_ask && io::stdin().is_terminal() && unsafe { libc::geteuid() } != 0
}

impl TtyAgent {
    /// Starts pkttyagent for this process and returns once it has
    /// registered with polkit, or [`REGISTER_TIMEOUT`] has passed. With
    /// `bus_address` (vmctl's `--bus-address`), the agent registers with
    /// the polkitd on that bus: the one the service there asks.
    ///
    /// Call it while the process has one thread: the child is forked then.
    pub fn start(bus_address: Option<&str>) -> Result<TtyAgent, AgentError> {
        // Both ends close-on-exec, so no other child can hold the write end
        // open; the agent's copy is made inheritable in the child only.
        let (reader, writer) = io::pipe().map_err(AgentError::Pipe)?;
        let notify_fd = writer.as_raw_fd();
        let vmctl = std::process::id();
        let process = match own_start_time() {
            Some(start_time) => format!("{vmctl},{start_time}"),
            None => vmctl.to_string(),
        };
        let mut command = Command::new(PKTTYAGENT);
        command
            .arg("--process")
            .arg(process)
            .arg("--notify-fd")
            .arg(notify_fd.to_string());
        if let Some(address) = bus_address {
            command.env("DBUS_SYSTEM_BUS_ADDRESS", address);
        }
        // stdin, stdout and stderr stay the terminal's: the agent asks on
        // /dev/tty, and its own errors are for the person at it.
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(notify_fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                // Die with vmctl even when vmctl dies of a signal (Ctrl-C
                // during detach) and cannot stop the agent itself.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() as u32 != vmctl {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(AgentError::Spawn)?;
        drop(writer);
        let mut agent = TtyAgent { child };
        // The agent closes its end once registered, or exits if it cannot
        // register: either way the pipe reports end of file.
        let reported = wait_readable(&reader, REGISTER_TIMEOUT).map_err(AgentError::Wait)?;
        if let Some(status) = agent.child.try_wait().map_err(AgentError::Wait)? {
            return Err(AgentError::NotRegistered(status));
        }
        if !reported {
            tracing::debug!("{PKTTYAGENT} has not registered after {REGISTER_TIMEOUT:?}");
        }
        Ok(agent)
    }
}

impl Drop for TtyAgent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SIGTERM first: pkttyagent then turns echo back on if it was
        // asking. Not reaped yet, so the PID is still the agent's.
        // SAFETY: plain kill(2).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                _ => return,
            }
        }
        tracing::debug!("{PKTTYAGENT} ignored SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Field 22 of /proc/self/stat: with the PID, how polkit tells a process
/// from a later one that reuses its PID.
fn own_start_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // comm may hold spaces and parentheses; the fields resume after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Waits until `fd` is readable or at end of file (`true`), or `timeout`
/// passes (`false`).
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut poll, 1, millis) } {
            -1 => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
            0 => return Ok(false),
            _ => return Ok(true),
        }
    }
}
