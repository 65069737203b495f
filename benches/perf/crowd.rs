//! Extra load for the scan figures: thousands of processes that only sleep,
//! or a few processes holding tens of thousands of fds, as a busy host has.
//!
//! Each [`Crowd`] is one helper process — this benchmark binary run again
//! in a helper mode ([`Helper`]) — which forks the sleepers itself (fork is
//! far cheaper than exec'ing `sleep` 10,000 times) or opens the fds. The
//! helper keeps them until its stdin closes: when the [`Crowd`] drops, or
//! when the benchmark dies, since the kernel closes the pipe then too. It
//! then kills and reaps every sleeper before it exits, so no zombie is left
//! for PID 1 (which need not reap here). Sleepers also die with the helper
//! (`PR_SET_PDEATHSIG`) should it be killed.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{ChildStdin, Command, ExitCode, Stdio};
use std::time::Duration;

use crate::common::util::ChildGuard;

/// Helper mode: fork N sleepers.
const SLEEPERS_FLAG: &str = "--crowd-sleepers";
/// Helper mode: hold N fds.
const FDS_FLAG: &str = "--crowd-fds";
/// What the helper prints once everything is in place.
const READY: &str = "ready";

/// What a helper process does.
#[derive(Debug, Clone, Copy)]
pub enum Helper {
    Sleepers(usize),
    Fds(usize),
}

impl Helper {
    /// The helper mode `flag value` selects, if `flag` is one.
    pub fn from_args(flag: &str, value: Option<&str>) -> Option<Helper> {
        let n = || {
            value
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a count"))
        };
        match flag {
            SLEEPERS_FLAG => Some(Helper::Sleepers(n())),
            FDS_FLAG => Some(Helper::Fds(n())),
            _ => None,
        }
    }

    fn args(self) -> [String; 2] {
        let (flag, n) = match self {
            Helper::Sleepers(n) => (SLEEPERS_FLAG, n),
            Helper::Fds(n) => (FDS_FLAG, n),
        };
        [flag.to_owned(), n.to_string()]
    }
}

/// A helper and what it holds; everything exits and is reaped on drop.
pub struct Crowd {
    /// Closing it tells the helper to clean up and exit.
    stdin: Option<ChildStdin>,
    helper: ChildGuard,
}

impl Crowd {
    /// `n` more processes that sleep with 3 fds each (/dev/null).
    pub fn sleepers(n: usize) -> Crowd {
        Crowd::start(Helper::Sleepers(n))
    }

    /// One more process holding `n` fds.
    pub fn fds(n: usize) -> Crowd {
        Crowd::start(Helper::Fds(n))
    }

    fn start(helper: Helper) -> Crowd {
        let exe = std::env::current_exe().expect("the benchmark's own path");
        let mut child = Command::new(exe)
            .args(helper.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start the {helper:?} helper: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let crowd = Crowd {
            stdin,
            helper: ChildGuard::new(child, format!("{helper:?} helper")),
        };
        // Blocks until the helper is ready or has exited (EOF).
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        assert_eq!(line.trim(), READY, "the {helper:?} helper failed");
        crowd
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        drop(self.stdin.take());
        // Killing and reaping 10,000 sleepers takes well under a second;
        // if the helper hangs, the guard's SIGKILL follows (and the
        // sleepers' death signal with it).
        if self.helper.wait_timeout(Duration::from_secs(60)).is_none() {
            eprintln!("a crowd helper did not exit within 60 s of its stdin closing");
        }
    }
}

/// Runs the helper mode: the whole process is the helper.
pub fn run_helper(helper: Helper) -> ExitCode {
    let outcome = match helper {
        Helper::Sleepers(n) => hold_sleepers(n),
        Helper::Fds(n) => hold_fds(n),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{helper:?} helper: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Says ready, then waits until stdin closes.
fn ready_then_wait() -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{READY}")?;
    out.flush()?;
    let mut buf = [0u8; 64];
    while std::io::stdin().read(&mut buf)? != 0 {}
    Ok(())
}

fn hold_sleepers(n: usize) -> std::io::Result<()> {
    // SAFETY: plain getpid.
    let me = unsafe { libc::getpid() };
    let mut pids = Vec::with_capacity(n);
    let mut failed = None;
    for _ in 0..n {
        // SAFETY: this process is single-threaded (the helper mode starts
        // no thread), so the child may go on; it only makes syscalls.
        match unsafe { libc::fork() } {
            0 => sleep_forever(me),
            -1 => {
                failed = Some(std::io::Error::last_os_error());
                break;
            }
            pid => pids.push(pid),
        }
    }
    let outcome = match failed {
        Some(e) => Err(e),
        None => ready_then_wait(),
    };
    for &pid in &pids {
        // SAFETY: our own unreaped children.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for &pid in &pids {
        // SAFETY: as above; a null status pointer is allowed.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
    outcome
}

/// A sleeper: fds 0–2 on /dev/null, nothing else, until killed.
fn sleep_forever(parent: libc::pid_t) -> ! {
    // SAFETY: syscalls only, in a freshly forked single-threaded child.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(0);
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        if null > 2 {
            libc::close(null);
        }
        loop {
            libc::pause();
        }
    }
}

fn hold_fds(n: usize) -> std::io::Result<()> {
    let limit = (n + 64) as libc::rlim_t;
    let rlimit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit with a valid struct (root may raise the hard limit).
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let null = std::fs::File::open("/dev/null")?;
    let held: Vec<std::os::fd::OwnedFd> = (0..n.saturating_sub(1))
        .map(|_| null.try_clone().map(Into::into))
        .collect::<std::io::Result<_>>()?;
    let outcome = ready_then_wait();
    drop(held);
    outcome
}
