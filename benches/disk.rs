//! Disk benchmark: what the service costs on top of the tools it wraps.
//!
//! Every figure is printed beside a baseline measured in the same run on the
//! same image, so the numbers compare like with like on whatever machine runs
//! it. Nothing is asserted about time; the only assertions are that each
//! contender gave the right answer (a fast wrong answer is no result).
//!
//! Run as root: `cargo bench --bench disk` (env `BENCH_RUNS`, default 50).
//! It reuses the end-to-end harness: a private dbus-daemon, a real polkitd,
//! the real `vmmanagerd` and a real QEMU, all in guards that kill and reap
//! them on drop, with their temp dirs removed.

// The bench starts its worlds with a few of the integration tests' fixtures;
// the rest of the harness is unused here.
#[allow(dead_code, unused_imports)]
#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::util::public_tempdir;
use common::{DaemonConfig, Polkit, Stack, Vm};
use vmmanager::disk::image::ImageFile;
use vmmanager::disk::usage::UsageScanner;
use vmmanager_client::ManagerProxy;
use zbus::Variant;

const VMCTL: &str = env!("CARGO_BIN_EXE_vmctl");
/// Untimed runs before each measurement: page cache, polkitd's JS engine and
/// lazily initialised state in the daemon are warm afterwards.
const WARMUP: usize = 3;

fn main() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root: the harness starts dbus-daemon, polkitd and QEMU"
    );
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let stack = Stack::start(Polkit::builder(), &DaemonConfig::default());
    let daemon_pid = stack.daemon.pid();
    // Let it finish anything it does right after taking its name.
    std::thread::sleep(Duration::from_millis(500));
    let rss_start = rss_kib(daemon_pid);

    let dir = public_tempdir("vmm-bench-");
    let image = dir.path().join("disk.qcow2");
    make_image(&image);
    let image_str = image.to_str().unwrap();

    // One connection and proxy for all calls, as a long-lived client has.
    let connection = rt.block_on(stack.bus.connect());
    let manager = rt.block_on(ManagerProxy::new(&connection)).unwrap();
    let no_options = HashMap::<&str, Variant<'_>>::new;

    // 1. A clean image, nobody using it.
    let qemu_img = || {
        let out = run(Command::new("qemu-img")
            .args(["check", "--output=json", "-f", "qcow2", "--"])
            .arg(&image));
        assert!(out.status.success(), "qemu-img check: {out:?}");
    };
    let check_disk = || {
        let report = rt
            .block_on(manager.check_disk(image_str, no_options()))
            .expect("CheckDisk");
        let result = report.get("result").map(|v| format!("{:?}", &**v));
        assert!(
            result.as_deref().is_some_and(|r| r.contains("clean")),
            "CheckDisk result: {result:?}"
        );
    };
    let vmctl = || {
        let out = run(Command::new(VMCTL)
            .arg("--bus-address")
            .arg(stack.bus.address())
            .args(["--no-ask-password", "check-disk", image_str]));
        assert!(out.status.success(), "vmctl check-disk: {out:?}");
    };
    // Round robin, so drift (thermal, other load) hits all three alike.
    let check_times = measure(runs, &[&qemu_img, &check_disk, &vmctl]);

    // 2. The same image held by a running QEMU (writable, with a pidfile
    // beside the image, Quickemu's layout).
    let vm = Vm::start("bench", &image);
    let qemu_pid = vm.pid();
    let (procs, fds) = count_fds();
    let fuser = || {
        let out = run(Command::new("fuser").arg(&image));
        // fuser prints the PIDs on stdout (the file name goes to stderr).
        let pids = String::from_utf8_lossy(&out.stdout);
        assert!(
            pids.split_whitespace().any(|p| p == qemu_pid.to_string()),
            "fuser: {out:?}"
        );
    };
    let has_lsof = Command::new("lsof").arg("-v").output().is_ok();
    let lsof = || {
        let out = run(Command::new("lsof").args(["-w", "-t", "--"]).arg(&image));
        let pids = String::from_utf8_lossy(&out.stdout);
        assert!(
            pids.lines().any(|p| p == qemu_pid.to_string()),
            "lsof: {out:?}"
        );
    };
    let get_disk_users = || {
        let users = rt
            .block_on(manager.get_disk_users(image_str, no_options()))
            .expect("GetDiskUsers");
        let pid = users[0].get("pid").map(|v| format!("{:?}", &**v));
        assert_eq!(users.len(), 1, "GetDiskUsers: {users:?}");
        assert!(
            pid.as_deref()
                .is_some_and(|p| p.contains(&qemu_pid.to_string())),
            "GetDiskUsers: {users:?}"
        );
    };
    // The same configuration the daemon runs with; open + scan is what the
    // service does per call, minus D-Bus and polkit.
    let scanner = UsageScanner::new("/proc".into(), vec!["{image_dir}/*.pid".into()]);
    let library = || {
        let file = ImageFile::open(image_str).expect("open image");
        let never = tokio_util::sync::CancellationToken::new();
        let usage = scanner.scan(&file, None, &vmmanager::disk::view::View::Service, &never);
        let usage = usage.expect("scan");
        assert_eq!(usage.users.len(), 1, "scan: {usage:?}");
        assert_eq!(usage.users[0].pid, qemu_pid, "scan: {usage:?}");
    };
    let mut contenders: Vec<&dyn Fn()> = vec![&fuser];
    if has_lsof {
        contenders.push(&lsof);
    }
    contenders.extend([&get_disk_users as &dyn Fn(), &library]);
    let usage_times = measure(runs, &contenders);
    drop(vm);

    std::thread::sleep(Duration::from_millis(500));
    let rss_end = rss_kib(daemon_pid);

    // ---- report -------------------------------------------------------
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!("### Disk benchmark ({runs} runs each, median / p95, interleaved)\n");
    println!(
        "Machine: {} CPUs, KVM {}, {}, {}; vmmanagerd and vmctl built `{profile}`.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if kvm_usable() { "yes" } else { "no" },
        command_line(&["uname", "-sr"]),
        command_line(&["qemu-img", "--version"]),
    );

    println!("**Checking a clean 1 GiB qcow2 (64 MiB written), nobody using it**\n");
    table(
        &[
            "`qemu-img check --output=json -f qcow2` (process, baseline)",
            "`CheckDisk` over D-Bus (zbus, root; polkit, /proc scan, lock probe, qemu-img)",
            "`vmctl check-disk` (whole CLI process)",
        ],
        &check_times,
    );

    println!(
        "\n**Who uses the image: a running QEMU holds it** \
         ({procs} processes, {fds} open fds on the machine)\n"
    );
    let mut names = vec!["`fuser IMAGE` (process, baseline)"];
    if has_lsof {
        names.push("`lsof -t IMAGE` (process)");
    }
    names.extend([
        "`GetDiskUsers` over D-Bus (zbus, root; polkit, /proc scan, pidfile, lock probe)",
        "`UsageScanner::scan` in-process (library, open + scan)",
    ]);
    table(&names, &usage_times);

    println!("\n**vmmanagerd resident memory (VmRSS, `{profile}` build)**\n");
    println!("| when | VmRSS |\n|---|---:|");
    println!(
        "| idle after startup | {:.1} MiB |",
        rss_start as f64 / 1024.0
    );
    let calls = runs + WARMUP;
    println!(
        "| idle after {} CheckDisk + {calls} GetDiskUsers calls | {:.1} MiB |",
        2 * calls,
        rss_end as f64 / 1024.0
    );
    if !has_lsof {
        println!("\n(lsof is not installed: skipped)");
    }
}

/// `runs` timed rounds, each calling every contender once in turn.
fn measure(runs: usize, contenders: &[&dyn Fn()]) -> Vec<Vec<Duration>> {
    for _ in 0..WARMUP {
        contenders.iter().for_each(|f| f());
    }
    let mut times = vec![Vec::with_capacity(runs); contenders.len()];
    for _ in 0..runs {
        for (f, t) in contenders.iter().zip(&mut times) {
            let start = Instant::now();
            f();
            t.push(start.elapsed());
        }
    }
    times
}

/// A Markdown table; the first row is the baseline the others are compared to.
fn table(names: &[&str], times: &[Vec<Duration>]) {
    println!("| operation | median | p95 | min | median vs baseline |");
    println!("|---|---:|---:|---:|---:|");
    let base = percentile(&times[0], 50.0);
    for (i, (name, t)) in names.iter().zip(times).enumerate() {
        let median = percentile(t, 50.0);
        let versus = if i == 0 {
            "—".to_owned()
        } else {
            let diff = median.as_secs_f64() - base.as_secs_f64();
            format!(
                "{}{} ({:.2}×)",
                if diff < 0.0 { "−" } else { "+" },
                fmt(Duration::from_secs_f64(diff.abs())),
                median.as_secs_f64() / base.as_secs_f64()
            )
        };
        println!(
            "| {name} | {} | {} | {} | {versus} |",
            fmt(median),
            fmt(percentile(t, 95.0)),
            fmt(*t.iter().min().unwrap()),
        );
    }
}

/// Nearest-rank percentile.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1000.0)
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// 1 GiB virtual, 64 MiB of data at the start and 16 MiB in the middle, so
/// the check has real L2 tables and refcounts to walk.
fn make_image(path: &Path) {
    let ok = |out: Output| assert!(out.status.success(), "{out:?}");
    ok(run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("1G")));
    ok(run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xab 0 64M"])
        .args(["-c", "write -P 0xcd 512M 16M"])
        .arg(path)));
}

/// (processes, open fds) across /proc: the /proc scan reads every fd link.
fn count_fds() -> (usize, usize) {
    let mut procs = 0;
    let mut fds = 0;
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        procs += 1;
        if let Ok(dir) = fs::read_dir(entry.path().join("fd")) {
            fds += dir.count();
        }
    }
    (procs, fds)
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Whether QEMU could use KVM here (it falls back to TCG otherwise).
fn kvm_usable() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// First line of a command's stdout, for the machine facts.
fn command_line(argv: &[&str]) -> String {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default()
}
