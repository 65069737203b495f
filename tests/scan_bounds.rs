//! GetDiskUsers under load, against the real daemon, bus and polkitd: one
//! user's flood is `Busy` beyond its limit while others are still answered,
//! and scans whose callers are gone stop, so the daemon's threads,
//! descriptors and CPU return to idle.
//!
//! Scans are made slow the way a busy host makes them slow: processes that
//! hold thousands of descriptors, each of which a scan must `stat()`.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::fd_copies::{sleep_holding_copies, wait_for_exec};
use common::images::make_clean_qcow2;
use common::util::{
    ChildGuard, busctl_call_in_background, fd_count, give, make_dir, public_tempdir, wait_until,
};
use common::world::{World, split_error, str_of};
use common::{DaemonConfig, NOBODY, Polkit};
use futures_util::future::join_all;
use vmmanager::config::EventsSetting;
use vmmanager::disk::checker::SCANS_PER_USER;
use vmmanager_client::ManagerProxy;

use vmmanager_client::names::action::CHECK_DISK;
const NOBODY_USER: Option<(u32, u32)> = Some((NOBODY, NOBODY));

/// Processes holding many descriptors (dups of /dev/null), killed on drop.
struct FdHolders(Vec<ChildGuard>);

impl FdHolders {
    fn start(processes: usize, fds_each: i32) -> FdHolders {
        let holders = (0..processes)
            .map(|_| {
                let mut cmd = sleep_holding_copies(Stdio::null(), fds_each);
                let child = ChildGuard::new(cmd.spawn().expect("spawn sleep"), "fd holder");
                wait_for_exec(child.pid(), cmd.get_program());
                child
            })
            .collect();
        FdHolders(holders)
    }

    fn pids(&self) -> Vec<u32> {
        self.0.iter().map(ChildGuard::pid).collect()
    }
}

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

/// What each thread of `pid` is doing: name, state and kernel wait channel,
/// for a failure message.
fn threads_of(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    let read = |task: &std::path::Path, file: &str| {
        std::fs::read_to_string(task.join(file)).unwrap_or_default()
    };
    tasks
        .flatten()
        .map(|task| {
            let task = task.path();
            let stat = read(&task, "stat");
            let state = stat.rsplit_once(") ").map_or("?", |(_, rest)| &rest[..1]);
            format!(
                "{} {state} {}",
                read(&task, "comm").trim(),
                read(&task, "wchan")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15; the state (field 3) is fields[0].
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// `nobody`'s own image in a directory of its own.
fn nobodys_image(w: &World) -> PathBuf {
    let home = w.path("home");
    make_dir(&home, 0o755, Some(NOBODY));
    let image = home.join("own.qcow2");
    make_clean_qcow2(&image);
    give(&image, NOBODY, 0o644);
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_disk_users_flood_is_busy_per_user_while_roots_check_is_answered() {
    let polkit = Polkit::builder().allow_user(CHECK_DISK, "nobody");
    let w = World::with(polkit, DaemonConfig::default()).await;
    let holders = FdHolders::start(4, 2500);
    let own = nobodys_image(&w);
    let roots = w.path("roots.qcow2");
    make_clean_qcow2(&roots);

    let started = Instant::now();
    assert_eq!(w.users(&own, &[]).await.unwrap(), vec![]);
    let scan = started.elapsed();
    let started = Instant::now();
    w.check(&roots, &[]).await.unwrap();
    eprintln!(
        "with {} processes holding 2,500 fds each: GetDiskUsers {scan:?}, CheckDisk {:?}",
        holders.pids().len(),
        started.elapsed()
    );

    let nobody = w.stack.bus.connect_as(NOBODY, NOBODY).await;
    let proxy = ManagerProxy::new(&nobody).await.unwrap();
    let own_str = own.to_str().unwrap();
    let flood = async {
        let (mut answered, mut busy) = (0, 0);
        // Rounds until one is refused: whether calls overlap is up to the
        // scheduler, but 64 at once always do within a few rounds.
        for _ in 0..5 {
            let calls = (0..64).map(|_| proxy.get_disk_users(own_str, HashMap::new()));
            for result in join_all(calls).await {
                match result.map_err(split_error) {
                    Ok(users) => {
                        assert!(users.is_empty(), "{users:?}");
                        answered += 1;
                    }
                    Err((name, message)) => {
                        assert_eq!(name, "Busy", "{message}");
                        // Refused by the per-uid scan limit, or earlier, by
                        // the per-uid limit of calls waiting for polkit.
                        let limit = format!("{SCANS_PER_USER} GetDiskUsers calls");
                        if message.contains(&limit) {
                            busy += 1;
                        } else {
                            assert!(
                                message.contains("authorization requests waiting for polkit"),
                                "{message}"
                            );
                        }
                    }
                }
            }
            if busy > 0 {
                break;
            }
        }
        (answered, busy)
    };
    let roots_check = async {
        // Once nobody's calls are under way.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let report = tokio::time::timeout(Duration::from_secs(30), w.check(&roots, &[]))
            .await
            .expect("root's check was not answered during nobody's flood")
            .unwrap();
        (report, started.elapsed())
    };
    let ((answered, busy), (report, took)) = tokio::join!(flood, roots_check);
    eprintln!("nobody's flood: {answered} answered, {busy} Busy; root's check took {took:?}");
    assert!(
        busy > 0,
        "no call of nobody's flood was refused by the scan limit"
    );
    assert!(answered > 0, "nobody got no answer at all");
    assert_eq!(str_of(&report, "result"), "clean");
    // The limit is per uid and per call in flight: nobody is served again.
    assert_eq!(w.users(&own, &[]).await.unwrap(), vec![]);
    proxy.get_disk_users(own_str, HashMap::new()).await.unwrap();
}

/// A /proc stand-in whose entries are the real /proc directories of the
/// fd holders, each many times over: a host with that many processes.
struct ManyProcesses {
    dir: tempfile::TempDir,
    targets: Vec<u32>,
    entries: usize,
}

impl ManyProcesses {
    fn new(targets: Vec<u32>) -> ManyProcesses {
        ManyProcesses {
            dir: public_tempdir("vmm-proc-"),
            targets,
            entries: 0,
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Grows (or shrinks) the tree to `n` process entries.
    fn resize(&mut self, n: usize) {
        for i in self.entries..n {
            let target = self.targets[i % self.targets.len()];
            let entry = self.root().join((i + 1).to_string());
            std::os::unix::fs::symlink(format!("/proc/{target}"), entry).unwrap();
        }
        for i in n..self.entries {
            std::fs::remove_file(self.root().join((i + 1).to_string())).unwrap();
        }
        self.entries = n;
    }
}

/// `busctl call … GetDiskUsers IMAGE` as `user`, in the background, its
/// stderr to `stderr`.
fn get_disk_users_in_background(
    w: &World,
    user: Option<(u32, u32)>,
    image: &Path,
    stderr: &Path,
) -> ChildGuard {
    busctl_call_in_background(
        w.stack.bus.address(),
        user,
        "GetDiskUsers",
        image,
        std::fs::File::create(stderr).unwrap().into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_of_killed_callers_stop_and_the_daemon_returns_to_idle() {
    let holders = FdHolders::start(4, 2500);
    let mut proc_root = ManyProcesses::new(holders.pids());
    let polkit = Polkit::builder().allow_user(CHECK_DISK, "nobody");
    // No device events: other tests' uevents would wake the daemon's idle
    // blocking threads, and each wake keeps one alive for another 10 s.
    let config = DaemonConfig::default()
        .proc_root(proc_root.root())
        .events(EventsSetting::None);
    let w = World::with(polkit, config).await;
    let daemon = w.stack.daemon.pid();
    let own = nobodys_image(&w);
    let roots = w.path("roots.qcow2");
    make_clean_qcow2(&roots);

    // How long a scan of this tree takes, measured small.
    const SAMPLE: usize = 8;
    const ENTRIES: usize = 1000;
    proc_root.resize(SAMPLE);
    let started = Instant::now();
    assert_eq!(w.users(&roots, &[]).await.unwrap(), vec![]);
    let sample = started.elapsed();
    eprintln!(
        "GetDiskUsers over {SAMPLE} processes of 2,500 fds: {sample:?}; over {ENTRIES}: \
         about {:?} each",
        sample * (ENTRIES / SAMPLE) as u32
    );
    proc_root.resize(ENTRIES);
    let (fds_before, threads_before) = (fd_count(daemon), thread_count(daemon));

    // Each user: SCANS_PER_USER scanning, the rest refused.
    const EXTRA: usize = 4;
    let errors = public_tempdir("vmm-callers-");
    let mut callers = Vec::new();
    for (user, image) in [(NOBODY_USER, &own), (None, &roots)] {
        for _ in 0..SCANS_PER_USER + EXTRA {
            let stderr = errors.path().join(callers.len().to_string());
            callers.push(get_disk_users_in_background(&w, user, image, &stderr));
        }
    }
    let refused = || {
        (0..callers.len())
            .filter(|i| {
                let stderr = std::fs::read_to_string(errors.path().join(i.to_string()));
                stderr
                    .unwrap_or_default()
                    .contains("GetDiskUsers calls running")
            })
            .count()
    };
    wait_until(
        Duration::from_secs(30),
        "the calls beyond each user's limit to be refused",
        || refused() == 2 * EXTRA,
        || w.stack.daemon.output(),
    );
    // Each scanning call holds at least its image, and the /proc pass they
    // share (one at a time) a /proc directory.
    let scanning = 2 * SCANS_PER_USER;
    wait_until(
        Duration::from_secs(10),
        "the admitted calls to be scanning",
        || fd_count(daemon) > fds_before + scanning,
        || format!("{} fds, {fds_before} before", fd_count(daemon)),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fds_busy, threads_busy) = (fd_count(daemon), thread_count(daemon));
    for caller in &mut callers {
        // The refused ones have exited already: nothing to kill.
        caller.kill_and_wait();
    }
    let killed = Instant::now();

    wait_until(
        Duration::from_secs(5),
        "the daemon's descriptors to return to their count",
        || fd_count(daemon) <= fds_before,
        || format!("{} fds now, {fds_before} before", fd_count(daemon)),
    );
    let fds_back = killed.elapsed();
    let ticks = cpu_ticks(daemon);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy_ticks = cpu_ticks(daemon) - ticks;
    // tokio keeps idle blocking threads for 10 s before they exit.
    wait_until(
        Duration::from_secs(15),
        "the daemon's threads to return to their count",
        || thread_count(daemon) <= threads_before,
        || {
            format!(
                "{} threads now, {threads_before} before: {}",
                thread_count(daemon),
                threads_of(daemon)
            )
        },
    );
    eprintln!(
        "{scanning} scans in flight: {fds_busy} fds, {threads_busy} threads (before: \
         {fds_before}, {threads_before}); after the kill, fds back in {fds_back:?}, threads \
         in {:?}; CPU in the second after: {busy_ticks} ticks",
        killed.elapsed()
    );
    assert!(
        busy_ticks < 30,
        "the daemon still used {busy_ticks} ticks of CPU in the second after its callers left"
    );

    // Nothing is left counted against the users.
    proc_root.resize(SAMPLE);
    assert_eq!(w.users(&roots, &[]).await.unwrap(), vec![]);
    let nobody = w.stack.bus.connect_as(NOBODY, NOBODY).await;
    let proxy = ManagerProxy::new(&nobody).await.unwrap();
    let calls =
        (0..SCANS_PER_USER).map(|_| proxy.get_disk_users(own.to_str().unwrap(), HashMap::new()));
    for result in join_all(calls).await {
        assert_eq!(result.unwrap(), vec![]);
    }
}
