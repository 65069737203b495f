//! Process guards, bounded waits and small file helpers shared by the harness.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// uid/gid of `nobody`: the unprivileged caller in tests.
pub const NOBODY: u32 = 65534;

/// How often bounded waits poll.
const POLL: Duration = Duration::from_millis(20);

/// A child process that is killed and reaped when the guard drops, so a
/// panicking test leaves no dbus-daemon, polkitd, daemon or QEMU behind.
pub struct ChildGuard {
    child: Option<Child>,
    /// Set once reaped: from then on the PID may belong to someone else.
    status: Option<ExitStatus>,
    what: String,
}

impl ChildGuard {
    pub fn new(child: Child, what: impl Into<String>) -> ChildGuard {
        ChildGuard {
            child: Some(child),
            status: None,
            what: what.into(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child_ref().id()
    }

    /// The exit status if the child has exited (reaping it), else `None`.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let c = self.child.as_mut()?;
            self.status = c
                .try_wait()
                .unwrap_or_else(|e| panic!("try_wait on {}: {e}", self.what));
        }
        self.status
    }

    /// The piped stdout, if any, for the caller to read.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// Sends `sig` without waiting; harmless if the child already exited.
    pub fn signal(&self, sig: libc::c_int) {
        if let (Some(c), None) = (&self.child, self.status) {
            // Not reaped yet, so the PID cannot have been reused.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }

    /// SIGKILL and reap; returns the exit status.
    pub fn kill_and_wait(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_timeout(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{} survived SIGKILL", self.what))
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    fn child_ref(&self) -> &Child {
        self.child.as_ref().expect("child already released")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `cond` until it is true or `timeout` passes; on timeout panics with
/// `what` and whatever `diag` reports (e.g. a child's stderr).
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
    diag: impl FnOnce() -> String,
) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}\n{}", diag());
        }
        thread::sleep(POLL);
    }
}

/// Output of a finished helper command.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics with both streams unless the command succeeded; returns stdout.
    #[track_caller]
    pub fn expect_success(&self, what: &str) -> &str {
        assert!(self.success(), "{what} failed: {self:#?}");
        &self.stdout
    }
}

/// Runs `cmd` to completion with stdin closed and captures both streams.
pub fn run(cmd: &mut Command) -> CmdOutput {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    CmdOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `Command` for `program` run as `uid`/`gid` with no supplementary groups
/// (`setpriv` execs, so the PID stays that of `program`); root when `None`.
pub fn command_as(user: Option<(u32, u32)>, program: &str) -> Command {
    match user {
        None => Command::new(program),
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.args(setpriv_args(uid, gid)).arg(program);
            c
        }
    }
}

/// `sh -c SCRIPT` in a new private mount namespace (`unshare --mount
/// --propagation private`): what it mounts is gone with it and never
/// reaches the host. Arguments added to the `Command` are the script's `$1`…
pub fn in_private_mounts(script: &str) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ]);
    c
}

/// `Command` for `program` in the mount namespace `ns` (`/proc/PID/ns/mnt`),
/// or in this one when `None`. nsenter without --fork execs: the child's
/// PID is `program`'s.
pub fn command_in_namespace(ns: Option<&Path>, program: &str) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--mount={}", ns.display()))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// `setpriv`'s options for running as `uid`/`gid` with no supplementary
/// groups (for a command line that must put something before `setpriv`).
pub fn setpriv_args(uid: u32, gid: u32) -> [String; 3] {
    [
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".to_owned(),
    ]
}

pub fn write_file(path: &Path, contents: impl AsRef<[u8]>, mode: u32) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    set_mode(path, mode);
}

pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Whether process `pid` is alive (a zombie is not, once its last thread
/// is gone).
pub fn alive(pid: u32) -> bool {
    let running = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_owned()))
        .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X'));
    // A zombie leader whose other threads are still exiting still holds
    // its files (and QEMU's image locks): they close with the last thread.
    running || fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| tasks.count() > 1)
}

/// VmRSS of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

/// Creates directory `path` with `mode`, owned by `owner` (uid = gid) when given.
pub fn make_dir(path: &Path, mode: u32, owner: Option<u32>) {
    fs::create_dir(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    set_mode(path, mode);
    if let Some(uid) = owner {
        give(path, uid, mode);
    }
}

/// Hands `path` to `uid` (uid = gid) with `mode`.
pub fn give(path: &Path, uid: u32, mode: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    set_mode(path, mode);
}

/// A `busctl call` of `method` (`image`, no options) as `user`, left
/// running: for floods and for clients killed mid-call.
pub fn busctl_call_in_background(
    address: &str,
    user: Option<(u32, u32)>,
    method: &str,
    image: &Path,
    stderr: Stdio,
) -> ChildGuard {
    let mut cmd = command_as(user, "busctl");
    cmd.arg(format!("--address={address}"))
        .args([
            "--timeout=600",
            "call",
            "org.example.VmManager",
            "/org/example/VmManager",
            "org.example.VmManager1",
            method,
            "sa{sv}",
        ])
        .arg(image)
        .arg("0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    ChildGuard::new(
        cmd.spawn().expect("spawn busctl"),
        format!("busctl {method}"),
    )
}

/// A temp dir that `polkitd`, `nobody` and other users can traverse.
pub fn public_tempdir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temp dir");
    set_mode(dir.path(), 0o755);
    dir
}

/// Best-effort read for diagnostics.
pub fn read_lossy(path: &Path) -> String {
    match fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// A `sleep` holding `path` open on fd 3 (for writing when `writable`), like
/// a VM or a backup tool would; returns once the fd is open. Killed on drop.
pub fn hold_open(path: &Path, writable: bool) -> ChildGuard {
    let script = if writable {
        r#"exec 3<>"$1"; exec sleep 600"#
    } else {
        r#"exec 3<"$1"; exec sleep 600"#
    };
    let child = Command::new("sh")
        .args(["-c", script, "sh"])
        .arg(path)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sh");
    let mut guard = ChildGuard::new(child, "holder");
    let fd = format!("/proc/{}/fd/3", guard.pid());
    wait_until(
        Duration::from_secs(5),
        &format!("a process to open {}", path.display()),
        || {
            assert!(guard.is_running(), "the holder exited early");
            std::fs::read_link(&fd).is_ok()
        },
        String::new,
    );
    guard
}

/// How many threads of this process are named `name` (their `comm`).
pub fn threads_named(name: &str) -> usize {
    fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == name)
        .count()
}

/// Runs the ignored test `name` (its path in this binary, e.g.
/// `device_monitor::lifecycle_child`) alone in a fresh process of this test
/// binary, on one test thread, with the env var `flag` set (the test runs
/// only then): for tests that count the process's own threads or fds, which
/// the other tests of this binary would disturb. Panics, with the child's
/// output, unless it ran and passed.
pub fn run_test_alone(name: &str, flag: &str) {
    let out = Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--exact",
            name,
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(flag, "1")
        .output()
        .expect("run the test in a process of its own");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(out.status.success(), "{name} failed: {}", out.status);
    assert!(stdout.contains("1 passed"), "{name} did not run");
}

/// The first line a child prints on stdout, read on a thread so a wedged
/// child cannot hang the test ("" on timeout).
pub fn first_line(child: &mut ChildGuard, timeout: Duration) -> String {
    let stdout = child.take_stdout().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(timeout).unwrap_or_default()
}
