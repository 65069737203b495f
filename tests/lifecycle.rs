//! Lifecycle faults end to end, with the real `vmmanagerd` on a private bus
//! with a real polkitd and stand-in qemu-img scripts: the bus dies under a
//! running check, SIGHUP arrives during a check, and qemu-img leaves a
//! descendant outside its process group (`setsid`).

use crate::common;

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::images::make_clean_qcow2;
use common::inproc::{self, InProcService};
use common::sysfs::FakeSysfs;
use common::util::{alive, busctl_call_in_background, public_tempdir, wait_until, write_file};
use common::{DaemonConfig, DeadFuse, Polkit, Stack};
use tempfile::TempDir;
use tokio::task::{JoinHandle, block_in_place};
use vmmanager::devices::vfio::KernelSysfs;
use vmmanager_client::{JobProxy, ManagerProxy};
use zbus::{Connection, OwnedVariant, Variant};

type Report = HashMap<String, OwnedVariant>;

// Every hanging process of a stand-in runs `sleep 4242`, so the clean-up
// guard can tell it from a process that reused its PID.

/// Hangs in its own group: the shell leader and a `sleep` member.
const HANGS: &str = "echo $$ > @DIR@/qemu-img.pid
sleep 4242 &
echo $! > @DIR@/member.pid
wait
";

/// Sleeps a second, then is the real qemu-img with whatever arguments the
/// service passes.
const SLOW_REAL: &str = "echo $$ > @DIR@/qemu-img.pid
sleep 1
exec /usr/bin/qemu-img \"$@\"
";

/// Starts a grandchild in a session (and so a process group) of its own,
/// which keeps the service's pipes open; then hangs.
const ESCAPES_AND_HANGS: &str = "setsid sh -c 'echo $$ > @DIR@/grandchild.pid; exec sleep 4242' &
while [ ! -s @DIR@/grandchild.pid ]; do sleep 0.01; done
echo $$ > @DIR@/qemu-img.pid
exec sleep 4242
";

/// A grandchild in its own session that runs the service's own binary
/// (blocked reading a FIFO as its configuration): it looks like the
/// service's fork before exec, yet is a stray and must be swept.
const ESCAPES_AS_THE_SERVICE: &str = "mkfifo @DIR@/config.fifo
setsid sh -c 'echo $$ > @DIR@/grandchild.pid; exec @DAEMON@ --config @DIR@/config.fifo' &
while [ ! -s @DIR@/grandchild.pid ]; do sleep 0.01; done
echo $$ > @DIR@/qemu-img.pid
exec sleep 4242
";

/// The same grandchild, and a double-forked one that becomes the service's
/// child at once and exits on its own (a zombie until reaped); then the
/// real qemu-img, which ends normally.
const ESCAPES_THEN_CHECKS: &str = "setsid sh -c 'echo $$ > @DIR@/grandchild.pid; exec sleep 4242' &
(setsid sh -c 'echo $$ > @DIR@/quitter.pid' &)
while [ ! -s @DIR@/grandchild.pid ] || [ ! -s @DIR@/quitter.pid ]; do sleep 0.01; done
sleep 0.2
echo $$ > @DIR@/qemu-img.pid
exec /usr/bin/qemu-img \"$@\"
";

/// The first run hangs; every later one leaves a `setsid` grandchild and
/// then is the real qemu-img.
const FIRST_HANGS: &str = "if mkdir @DIR@/first.lock 2>/dev/null; then
    echo $$ > @DIR@/hanger.pid
    exec sleep 4242
fi
setsid sh -c 'echo $$ > @DIR@/grandchild.pid; exec sleep 4242' &
while [ ! -s @DIR@/grandchild.pid ]; do sleep 0.01; done
exec /usr/bin/qemu-img \"$@\"
";

/// Bus, polkitd and daemon running `stand_in` as qemu-img, a clean image,
/// and a root connection.
struct StandInWorld {
    stack: Stack,
    connection: Connection,
    // Before `dir`: it reads the PID files there.
    _leftovers: Leftovers,
    dir: TempDir,
}

impl StandInWorld {
    async fn start(stand_in: &str, config: DaemonConfig) -> StandInWorld {
        let dir = public_tempdir("vmm-lifecycle-");
        let config = config.qemu_img(write_stand_in(dir.path(), stand_in));
        let stack = tokio::task::spawn_blocking(move || Stack::start(Polkit::builder(), &config))
            .await
            .unwrap();
        let connection = stack.bus.connect().await;
        StandInWorld {
            stack,
            connection,
            _leftovers: Leftovers(dir.path().to_owned()),
            dir,
        }
    }

    fn image(&self) -> PathBuf {
        self.dir.path().join("disk.qcow2")
    }

    /// CheckDisk of `image` as root, in a task.
    async fn spawn_check_of(
        &self,
        image: PathBuf,
        options: &[(&'static str, Variant<'static>)],
    ) -> JoinHandle<zbus::Result<Report>> {
        let manager = ManagerProxy::new(&self.connection).await.unwrap();
        let options: HashMap<&str, Variant<'_>> = options.iter().cloned().collect();
        tokio::spawn(async move { manager.check_disk(image.to_str().unwrap(), options).await })
    }

    /// CheckDisk of the image as root, in a task.
    async fn spawn_check(
        &self,
        options: &[(&'static str, Variant<'static>)],
    ) -> JoinHandle<zbus::Result<Report>> {
        self.spawn_check_of(self.image(), options).await
    }

    async fn check_of(&self, image: PathBuf) -> zbus::Result<Report> {
        finished(self.spawn_check_of(image, &[]).await).await
    }

    async fn check(&self) -> zbus::Result<Report> {
        self.check_of(self.image()).await
    }

    /// The PID the stand-in wrote to `name`.
    fn pid(&self, name: &str) -> u32 {
        let path = self.dir.path().join(name);
        let read = || std::fs::read_to_string(&path).ok()?.trim().parse().ok();
        wait_until(
            Duration::from_secs(15),
            &format!("the stand-in to write {name}"),
            || read().is_some(),
            || self.stack.daemon.output(),
        );
        read().unwrap()
    }
}

/// Writes `stand_in` as `DIR/qemu-img` and a clean `DIR/disk.qcow2`;
/// returns the script's path.
fn write_stand_in(dir: &Path, stand_in: &str) -> PathBuf {
    let script = dir.join("qemu-img");
    let body = stand_in.replace("@DIR@", dir.to_str().unwrap());
    write_file(&script, format!("#!/bin/sh\n{body}"), 0o755);
    make_clean_qcow2(&dir.join("disk.qcow2"));
    script
}

/// Kills whatever the stand-ins left running (only processes that still
/// look like theirs), so a failing test leaves nothing behind.
struct Leftovers(PathBuf);

impl Drop for Leftovers {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.0) else {
            return;
        };
        let dir = self.0.as_os_str().as_bytes();
        for entry in entries.flatten() {
            if entry.path().extension().is_none_or(|e| e != "pid") {
                continue;
            }
            let Some(pid) = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = contains(&cmdline, b"sleep\x004242") || contains(&cmdline, dir);
            if ours {
                // SAFETY: kill(2) on a process that still runs the stand-in.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `(state, ppid, pgrp)` from /proc/PID/stat.
fn stat(pid: u32) -> Option<(char, u32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((
        state,
        fields.next()?.parse().ok()?,
        fields.next()?.parse().ok()?,
    ))
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Live processes in process group `pgid`.
fn live_group_members(pgid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&p| stat(p).is_some_and(|(s, _, g)| g == pgid && !matches!(s, 'Z' | 'X')))
        .collect()
}

/// Children of `parent`, zombies included.
fn children(parent: u32) -> Vec<(u32, char)> {
    all_pids()
        .into_iter()
        .filter_map(|p| {
            stat(p)
                .filter(|&(_, pp, _)| pp == parent)
                .map(|(s, _, _)| (p, s))
        })
        .collect()
}

/// The reply to a spawned CheckDisk; panics if none comes within a minute.
async fn finished(call: JoinHandle<zbus::Result<Report>>) -> zbus::Result<Report> {
    tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("CheckDisk hung")
        .unwrap()
}

/// The error name a spawned CheckDisk fails with.
async fn failure(call: JoinHandle<zbus::Result<Report>>) -> String {
    match finished(call).await {
        Ok(report) => panic!("the check cannot succeed: {report:?}"),
        Err(e) => method_error_name(&e),
    }
}

fn method_error_name(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        other => format!("<not a method error: {other}>"),
    }
}

fn result_of(report: &Report) -> String {
    match report.get("result").map(|v| &**v) {
        Some(Variant::Str(s)) => s.to_string(),
        other => panic!("no result in the report: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_bus_stops_the_daemon_and_its_qemu_img() {
    let mut w = StandInWorld::start(HANGS, DaemonConfig::default()).await;
    let call = w.spawn_check(&[]).await;
    let leader = w.pid("qemu-img.pid");
    let member = w.pid("member.pid");
    assert!(
        alive(leader) && alive(member),
        "the stand-in is not running"
    );

    let killed = Instant::now();
    block_in_place(|| w.stack.bus.kill());
    let status = block_in_place(|| w.stack.daemon.wait_exit(Duration::from_secs(10)));
    let took = killed.elapsed();
    let output = w.stack.daemon.output();
    let status = status.unwrap_or_else(|| {
        panic!("vmmanagerd still runs 10 s after its bus died; output:\n{output}")
    });
    eprintln!("bus SIGKILLed -> vmmanagerd exited after {took:?} with {status}");
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(took < Duration::from_secs(5), "took {took:?}:\n{output}");
    assert!(
        output.contains("lost the connection to the bus: ") && output.contains("; stopping"),
        "{output}"
    );
    // The daemon killed the check's whole group before it exited.
    assert!(!alive(leader) && !alive(member), "{output}");
    assert_eq!(live_group_members(leader), Vec::<u32>::new(), "{output}");
    // The client's call ends too (its bus is gone).
    failure(call).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_is_logged_and_changes_nothing() {
    let mut w = StandInWorld::start(SLOW_REAL, DaemonConfig::default()).await;
    let call = w.spawn_check(&[]).await;
    // qemu-img runs (sleeping its second) when the signal arrives.
    let leader = w.pid("qemu-img.pid");
    assert!(alive(leader));
    w.stack.daemon.signal(libc::SIGHUP);
    let line = "SIGHUP received: the configuration is read only at start; restart the service to \
                apply changes";
    wait_until(
        Duration::from_secs(10),
        "the SIGHUP log line",
        || w.stack.daemon.output().contains(line),
        || w.stack.daemon.output(),
    );

    let report = finished(call).await.unwrap_or_else(|e| {
        panic!(
            "the check across SIGHUP failed: {e}\n{}",
            w.stack.daemon.output()
        )
    });
    assert_eq!(result_of(&report), "clean");
    assert!(w.stack.daemon.is_running(), "{}", w.stack.daemon.output());
    let again = w.check().await.expect("a check after SIGHUP");
    assert_eq!(result_of(&again), "clean");
    assert!(w.stack.daemon.is_running());
}

/// A daemon that has run checks stops with no thread left behind (the
/// thread qemu-img is forked from included) and says "stopped" once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_after_checks_leaves_no_thread_behind() {
    let mut w = StandInWorld::start(SLOW_REAL, DaemonConfig::default()).await;
    let report = w.check().await.expect("a check");
    assert_eq!(result_of(&report), "clean");
    w.stack.daemon.signal(libc::SIGTERM);
    let status = block_in_place(|| w.stack.daemon.wait_exit(Duration::from_secs(10)));
    let output = w.stack.daemon.output();
    let status = status.unwrap_or_else(|| panic!("still running after SIGTERM:\n{output}"));
    assert!(status.success(), "{status}; output:\n{output}");
    assert!(!output.contains("still running"), "{output}");
    assert_eq!(output.matches("stopped\n").count(), 1, "{output}");
}

/// Threads of `pid` waiting for a FUSE server's answer, by their kernel
/// wait channel.
fn threads_waiting_on_fuse(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("wchan")).ok())
        .filter(|wchan| wchan.contains("fuse") || wchan.contains("request_wait_answer"))
        .count()
}

/// A lookup stuck for good in the kernel (the caller's image path on a FUSE
/// mount whose server never answers) cannot be stopped, and the runtime
/// would wait for its thread forever: SIGTERM must still end the daemon,
/// and promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_daemon_even_with_a_thread_stuck_in_a_dead_file_system() {
    let mut stack = block_in_place(|| Stack::start(Polkit::builder(), &DaemonConfig::default()));
    // Declared after the stack, so dropped (the connection aborted) first.
    let fuse = DeadFuse::mount();
    let image = fuse.path().join("disk.qcow2");
    let _call = busctl_call_in_background(
        stack.bus.address(),
        None,
        "CheckDisk",
        &image,
        Stdio::null(),
    );
    let daemon = stack.daemon.pid();
    block_in_place(|| {
        wait_until(
            Duration::from_secs(10),
            "a daemon thread stuck in the dead FUSE mount",
            || threads_waiting_on_fuse(daemon) > 0,
            || stack.daemon.output(),
        )
    });

    let sent = Instant::now();
    stack.daemon.signal(libc::SIGTERM);
    let status = block_in_place(|| stack.daemon.wait_exit(Duration::from_secs(10)));
    let took = sent.elapsed();
    let output = stack.daemon.output();
    let status = status.unwrap_or_else(|| {
        panic!("vmmanagerd still runs 10 s after SIGTERM with a stuck thread; output:\n{output}")
    });
    eprintln!("SIGTERM with a thread stuck in FUSE -> vmmanagerd exited after {took:?}");
    assert!(status.success(), "{status}; output:\n{output}");
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}; output:\n{output}"
    );
    assert!(
        output.contains("still running 2 s after stopping"),
        "{output}"
    );
}

/// After a check whose qemu-img left a `setsid` grandchild: it is killed,
/// and the daemon has no child left, not even a zombie.
fn assert_grandchild_gone(w: &StandInWorld, grandchild: u32) {
    let daemon = w.stack.daemon.pid();
    wait_until(
        Duration::from_secs(3),
        "the grandchild to be killed and no child of the daemon left",
        || !alive(grandchild) && children(daemon).is_empty(),
        || {
            format!(
                "grandchild {grandchild} alive: {}; children of the daemon: {:?}\n{}",
                alive(grandchild),
                children(daemon),
                w.stack.daemon.output()
            )
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grandchild_outside_the_group_dies_with_a_timed_out_check() {
    let w = StandInWorld::start(ESCAPES_AND_HANGS, DaemonConfig::default()).await;
    let call = w.spawn_check(&[("timeout-sec", Variant::from(1u32))]).await;
    let leader = w.pid("qemu-img.pid");
    let grandchild = w.pid("grandchild.pid");
    // What makes it a stray: the group kill cannot reach it.
    let (_, _, pgrp) = stat(grandchild).expect("grandchild running");
    assert_ne!(pgrp, leader, "the grandchild did not leave the group");

    let error = failure(call).await;
    assert!(error.ends_with(".Timeout"), "{error}");
    assert_grandchild_gone(&w, grandchild);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grandchild_running_the_services_own_binary_is_swept_too() {
    let stand_in = ESCAPES_AS_THE_SERVICE.replace("@DAEMON@", common::daemon::DAEMON_BIN);
    let w = StandInWorld::start(&stand_in, DaemonConfig::default()).await;
    let call = w.spawn_check(&[("timeout-sec", Variant::from(1u32))]).await;
    let grandchild = w.pid("grandchild.pid");
    let error = failure(call).await;
    assert!(error.ends_with(".Timeout"), "{error}");
    assert_grandchild_gone(&w, grandchild);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grandchild_outside_the_group_dies_when_the_check_ends_normally() {
    // It holds qemu-img's stdout open: without the sweep the check would
    // only end at this timeout.
    let config = DaemonConfig::default().timeout_sec(20);
    let w = StandInWorld::start(ESCAPES_THEN_CHECKS, config).await;
    let started = Instant::now();
    let report = w.check().await.unwrap_or_else(|e| {
        panic!(
            "the check failed after {:?}: {e}\n{}",
            started.elapsed(),
            w.stack.daemon.output()
        )
    });
    let took = started.elapsed();
    assert_eq!(result_of(&report), "clean");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let grandchild = w.pid("grandchild.pid");
    let quitter = w.pid("quitter.pid");
    assert!(!alive(quitter));
    assert_grandchild_gone(&w, grandchild);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_spares_the_qemu_img_of_a_check_still_running() {
    // Without a sweep the second check would end only at this timeout. Two
    // checks of one user (root) run side by side.
    let config = DaemonConfig::default()
        .timeout_sec(20)
        .max_concurrent_checks(2)
        .max_checks_per_user(2);
    let w = StandInWorld::start(FIRST_HANGS, config).await;
    let hanging = w.spawn_check(&[]).await;
    let hanger = w.pid("hanger.pid");
    let other = w.dir.path().join("other.qcow2");
    make_clean_qcow2(&other);

    // This check's end sweeps strays: its own grandchild goes, the first
    // check's qemu-img (a child of the daemon too) stays.
    let report = w.check_of(other).await.expect("the second check");
    assert_eq!(result_of(&report), "clean");
    let grandchild = w.pid("grandchild.pid");
    wait_until(
        Duration::from_secs(3),
        "the second check's grandchild to be killed",
        || !alive(grandchild),
        || w.stack.daemon.output(),
    );
    assert!(alive(hanger), "the running check's qemu-img was killed");
    assert!(!hanging.is_finished(), "{}", w.stack.daemon.output());

    let manager = ManagerProxy::new(&w.connection).await.unwrap();
    let job = manager.jobs().await.unwrap().pop().expect("the first job");
    JobProxy::builder(&w.connection)
        .path(job)
        .build()
        .await
        .unwrap()
        .cancel(HashMap::new())
        .await
        .expect("Cancel");
    let error = failure(hanging).await;
    assert!(error.ends_with(".Cancelled"), "{error}");
    assert_grandchild_gone(&w, hanger);
}

/// The composed daemon (`daemon::build` + `daemon::serve`, in this process)
/// with a check whose qemu-img hangs: `serve` returns only after that
/// check's whole process group is gone and the call has its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_returns_only_after_the_qemu_img_of_a_running_check_is_gone() {
    let dir = public_tempdir("vmm-serve-");
    let _leftovers = Leftovers(dir.path().to_owned());
    let (bus, _polkit) = Polkit::builder().start_with_bus().await;
    let fs = FakeSysfs::new();
    let dev_root = tempfile::tempdir().unwrap();
    let mut config = inproc::config(&fs, dev_root.path(), &[]);
    config.disk.qemu_img = write_stand_in(dir.path(), HANGS);
    config.disk.pidfile_patterns = vec!["{image_dir}/*.pid".into()];
    let mut service = InProcService::start_with(&bus, &config, KernelSysfs, dev_root).await;

    let client = bus.connect().await;
    let manager = ManagerProxy::new(&client).await.unwrap();
    let image = dir.path().join("disk.qcow2");
    let call = tokio::spawn(async move {
        let options = HashMap::<&str, Variant<'_>>::new();
        manager.check_disk(image.to_str().unwrap(), options).await
    });
    let read_pid = |name: &str| {
        let path = dir.path().join(name);
        wait_until(
            Duration::from_secs(15),
            &format!("the stand-in to write {name}"),
            || std::fs::read_to_string(&path).is_ok_and(|s| s.ends_with('\n')),
            String::new,
        );
        std::fs::read_to_string(&path)
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    let (leader, member) = (read_pid("qemu-img.pid"), read_pid("member.pid"));
    assert!(
        alive(leader) && alive(member),
        "the stand-in is not running"
    );

    // Fires the shutdown and waits for `serve` to return.
    tokio::time::timeout(Duration::from_secs(15), service.stop())
        .await
        .expect("serve did not return within 15 s of the shutdown");
    // No wait here: by the time `serve` returned, everything was gone.
    assert!(
        !alive(leader) && !alive(member),
        "qemu-img outlived serve: leader alive {}, member alive {}",
        alive(leader),
        alive(member)
    );
    assert_eq!(live_group_members(leader), Vec::<u32>::new());
    // Reaped as well: the leader was this process's child.
    assert_eq!(stat(leader), None, "qemu-img is left as a zombie");
    assert_eq!(
        failure(call).await,
        "org.example.VmManager1.Error.Cancelled"
    );
}
