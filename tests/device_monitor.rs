//! The udev netlink monitor against real uevents of this machine's PCI
//! devices: kernel group, a real systemd-udevd (udev group with hwdb names),
//! lifecycle without leaks, overflow → Resync, and stop with a slow or
//! dropped receiver.
//!
//! Needs root. The only thing done to real devices is writing `change` to
//! their `uevent` file, which just makes the kernel announce them again;
//! nothing is unbound, removed or rescanned.
//!
//! Tests that start udevd (or flood it) hold an exclusive `flock` on
//! [`UDEVD_LOCK`], so they run one at a time across test binaries too.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use vmmanager::devices::monitor::{
    DeviceMonitor, EventGroup, MonitorError, MonitorOptions, THREAD_NAME, UDEVD_CONTROL_SOCKET,
};
use vmmanager::devices::{DeviceAction, DeviceEvent, MonitorMessage};
use vmmanager_client::PciAddress;

use crate::common;

use common::udevd::{FileLock, UDEVD_LOCK, Udevd, device, devices, sysfs, write_change};
use common::util::threads_named;

/// Env var that makes [`lifecycle_child`] run (in its own process).
const LIFECYCLE_CHILD: &str = "VMMANAGER_MONITOR_LIFECYCLE_CHILD";
const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- helpers

/// Waits for an event matching `want`, skipping others (other tests write
/// uevents too). Resyncs are skipped as well.
async fn wait_for_event(
    rx: &mut mpsc::Receiver<MonitorMessage>,
    want: impl Fn(&DeviceEvent) -> bool,
) -> DeviceEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => panic!("no matching device event within {WAIT:?}"),
            Ok(None) => panic!("monitor channel closed while waiting for an event"),
            Ok(Some(MonitorMessage::Event(e))) if want(&e) => return e,
            Ok(Some(_)) => {}
        }
    }
}

fn is_change_of(address: PciAddress) -> impl Fn(&DeviceEvent) -> bool {
    move |e| e.action == DeviceAction::Change && e.address == address
}

fn kernel_options() -> MonitorOptions {
    MonitorOptions::new(EventGroup::Kernel)
}

/// Number of threads and open fds of this process.
fn counts() -> (usize, usize) {
    let n = |dir: &str| std::fs::read_dir(dir).unwrap().count();
    (n("/proc/self/task"), n("/proc/self/fd"))
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn kernel_group_delivers_real_change_events() {
    let address = device();
    let (tx, mut rx) = mpsc::channel(64);
    let monitor = DeviceMonitor::start(kernel_options(), tx).expect("start monitor");
    assert_eq!(monitor.group(), EventGroup::Kernel);
    // Subscribed before start returned: an event right now is not missed.
    write_change(&address);
    let event = wait_for_event(&mut rx, is_change_of(address)).await;
    // The kernel's own events carry no hwdb names.
    assert_eq!(event.vendor_name, None);
    assert_eq!(event.device_name, None);
    monitor.stop().await;
    assert!(rx.is_closed());
}

#[test]
fn udev_group_without_udevd_is_refused() {
    // A control socket that surely does not exist, so the refusal is tested
    // whether or not a udevd runs on this host (ours or its own).
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("udev/control");
    let options = MonitorOptions {
        control_socket: control.clone(),
        ..MonitorOptions::new(EventGroup::Udev)
    };
    let (tx, _rx) = mpsc::channel(1);
    let err = DeviceMonitor::start(options, tx).unwrap_err();
    assert!(
        matches!(&err, MonitorError::UdevdNotRunning { control: c } if *c == control),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("udevd does not seem to run"),
        "{err}"
    );
}

/// `key=value` lines of `systemd-hwdb query` for the device's modalias.
fn hwdb_names(address: &PciAddress) -> (Option<String>, Option<String>) {
    let modalias = std::fs::read_to_string(sysfs(address).join("modalias")).unwrap();
    let out = Command::new("systemd-hwdb")
        .args(["query", modalias.trim()])
        .output()
        .expect("run systemd-hwdb query");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
    };
    (
        get("ID_VENDOR_FROM_DATABASE"),
        get("ID_MODEL_FROM_DATABASE"),
    )
}

#[tokio::test]
async fn udev_group_with_real_udevd_carries_hwdb_names() {
    // A device whose hwdb entry has both names (virtio devices here do).
    let address = devices()
        .into_iter()
        .rev()
        .find(|a| {
            let (v, m) = hwdb_names(a);
            v.is_some() && m.is_some()
        })
        .expect("a PCI device with vendor and model names in the hwdb");
    let (vendor, model) = hwdb_names(&address);

    let udevd = tokio::task::spawn_blocking(Udevd::start).await.unwrap();
    assert_eq!(
        vmmanager::devices::monitor::detect_group(),
        EventGroup::Udev
    );
    let (tx, mut rx) = mpsc::channel(64);
    let monitor = DeviceMonitor::start(MonitorOptions::detected(), tx).expect("start monitor");
    assert_eq!(monitor.group(), EventGroup::Udev);

    write_change(&address);
    let event = wait_for_event(&mut rx, is_change_of(address)).await;
    println!("udev event: {event:?}");
    assert_eq!(event.vendor_name, vendor);
    assert_eq!(event.device_name, model);

    // udevd's database agrees (what the inventory reads at enumeration).
    let info = Command::new("udevadm")
        .args(["info", sysfs(&address).to_str().unwrap()])
        .output()
        .expect("udevadm info");
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains(&format!("ID_VENDOR_FROM_DATABASE={}", vendor.unwrap())),
        "{info}"
    );

    monitor.stop().await;
    drop(udevd);
    assert!(!Path::new(UDEVD_CONTROL_SOCKET).exists());
    assert_eq!(
        vmmanager::devices::monitor::detect_group(),
        EventGroup::Kernel
    );
}

/// Runs [`lifecycle_child`] in a fresh process, so its thread and fd counts
/// are not disturbed by the other tests of this binary running in parallel.
#[test]
fn lifecycle_parallel_start_stop_leaks_nothing() {
    common::util::run_test_alone("device_monitor::lifecycle_child", LIFECYCLE_CHILD);
}

const WORKERS: usize = 8;
const CYCLES: usize = 300;

/// One start/stop cycle with checks; `async_stop` picks `stop().await` (in
/// the given runtime) or `stop_blocking`.
fn cycle(rt: &tokio::runtime::Handle, address: PciAddress, i: usize, async_stop: bool) {
    let (tx, mut rx) = mpsc::channel(16);
    let monitor = DeviceMonitor::start(kernel_options(), tx).expect("start monitor");
    if i.is_multiple_of(50) {
        // It really listens.
        write_change(&address);
        rt.block_on(wait_for_event(&mut rx, is_change_of(address)));
    }
    if async_stop {
        rt.block_on(monitor.stop());
    } else {
        monitor.stop_blocking();
    }
    // The thread dropped its sender when it exited: nothing can come any
    // more. Make sure with a real uevent.
    assert!(rx.is_closed(), "sender still alive after stop");
    let queued = rx.len();
    write_change(&address);
    if i.is_multiple_of(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(rx.len(), queued, "a message arrived after stop returned");
    for _ in 0..queued {
        rx.try_recv().expect("queued before stop");
    }
    assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Disconnected);
}

#[test]
#[ignore = "run by lifecycle_parallel_start_stop_leaks_nothing in its own process"]
fn lifecycle_child() {
    assert!(
        std::env::var_os(LIFECYCLE_CHILD).is_some(),
        "counts this process's own resources: run only by lifecycle_parallel_start_stop_leaks_nothing, in a process of its own"
    );
    let address = device();
    let before = counts();
    let started = Instant::now();
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            // Not `enable_all`: the IO driver's signal support creates a
            // process-wide socketpair once and never closes it, which
            // would show up as two "leaked" fds that are not ours.
            .enable_time()
            .build()
            .unwrap();
        // Half the workers stop with `stop().await`, half with
        // `stop_blocking`, all at the same time.
        std::thread::scope(|scope| {
            for w in 0..WORKERS {
                let handle = rt.handle().clone();
                scope.spawn(move || {
                    for i in 0..CYCLES {
                        cycle(&handle, address, i, w % 2 == 0);
                    }
                });
            }
        });
        // Dropping the monitor without stop also joins.
        let (tx, _rx) = mpsc::channel(1);
        drop(DeviceMonitor::start(kernel_options(), tx).unwrap());
        // Joined, but an exited thread can linger in /proc for a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while threads_named(THREAD_NAME) != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(threads_named(THREAD_NAME), 0);
        // Dropping the runtime joins its worker and blocking-pool threads.
    }
    // Exited threads can linger in /proc for a moment after join.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = counts();
    while after != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        after = counts();
    }
    println!(
        "lifecycle: {WORKERS} workers x {CYCLES} start/stop cycles = {} monitors in {:?}; \
         threads before={} after={}, fds before={} after={}",
        WORKERS * CYCLES + 1,
        started.elapsed(),
        before.0,
        after.0,
        before.1,
        after.1
    );
    assert_eq!(after, before, "(threads, fds) before and after");
}

#[tokio::test]
async fn overflow_yields_resync_and_monitor_keeps_running() {
    // Shows the monitor's "uevents were lost … (ENOBUFS)" warnings.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    // Keeps the burst from flooding a udevd another test is using.
    let _lock = tokio::task::spawn_blocking(|| FileLock::exclusive(UDEVD_LOCK))
        .await
        .unwrap();
    let list = devices();
    let address = *list.last().unwrap();
    let (tx, mut rx) = mpsc::channel(4);
    let options = MonitorOptions {
        receive_buffer: 1,
        ..MonitorOptions::new(EventGroup::Kernel)
    };
    let monitor = DeviceMonitor::start(options, tx).expect("start monitor");
    println!(
        "effective receive buffer: {} bytes",
        monitor.receive_buffer()
    );
    assert!(monitor.receive_buffer() < 64 * 1024);

    // The consumer sleeps while the burst runs: the channel (4) fills, the
    // thread waits, the tiny socket buffer overflows.
    const BURST: usize = 2000;
    let burst = std::thread::spawn(move || {
        for i in 0..BURST {
            write_change(&list[i % list.len()]);
        }
    });
    tokio::task::spawn_blocking(move || burst.join().unwrap())
        .await
        .unwrap();

    let mut events = 0;
    let mut resyncs = 0;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
    {
        match message {
            MonitorMessage::Event(_) => events += 1,
            MonitorMessage::Resync => resyncs += 1,
        }
    }
    println!("burst of {BURST} uevents: {events} events and {resyncs} resyncs received");
    assert!(resyncs >= 1, "no Resync after an overflow");

    // Still listening after the loss.
    write_change(&address);
    wait_for_event(&mut rx, is_change_of(address)).await;
    monitor.stop().await;
}

#[tokio::test]
async fn stop_with_a_full_channel_does_not_hang() {
    let address = device();
    let (tx, rx) = mpsc::channel(1);
    let monitor = DeviceMonitor::start(kernel_options(), tx).expect("start monitor");
    for _ in 0..20 {
        write_change(&address);
    }
    // Give the thread time to fill the channel and wait on it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rx.len(), 1);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), monitor.stop())
        .await
        .expect("stop returned");
    println!("stop with a full channel took {:?}", started.elapsed());
    assert!(rx.is_closed());
}

#[tokio::test]
async fn stop_with_a_dropped_receiver_does_not_hang() {
    let address = device();
    let (tx, rx) = mpsc::channel(1);
    let monitor = DeviceMonitor::start(kernel_options(), tx).expect("start monitor");
    drop(rx);
    for _ in 0..20 {
        write_change(&address);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Synchronous stop and plain drop, both bounded.
    let done = tokio::task::spawn_blocking(move || {
        monitor.stop_blocking();
        let (tx, rx) = mpsc::channel(1);
        let monitor = DeviceMonitor::start(kernel_options(), tx).unwrap();
        drop(rx);
        write_change(&address);
        std::thread::sleep(Duration::from_millis(50));
        drop(monitor);
    });
    tokio::time::timeout(Duration::from_secs(5), done)
        .await
        .expect("stop returned")
        .unwrap();
}
