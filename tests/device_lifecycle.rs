//! The KubeVirt lesson, at the level of the whole device component: many
//! tasks in parallel each start and stop their own `DeviceService` (real
//! udev monitor on the kernel group, real /sys, exporting on a real bus)
//! hundreds of times. After `stop().await` returns no signal is emitted, and
//! no thread or fd is left behind.
//!
//! One test in its own binary, so the thread and fd counts of this process
//! are not disturbed by other tests.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::TestBus;
use common::udevd::{FileLock, UDEVD_LOCK, device, write_change};
use common::util::threads_named;
use futures_util::StreamExt;
use vmmanager::auth::Authority;
use vmmanager::devices::host_use::Network;
use vmmanager::devices::monitor::{EventGroup, MonitorOptions, THREAD_NAME};
use vmmanager::devices::vfio::VfioBinder;
use vmmanager::service::callers::Callers;
use vmmanager::service::devices::{DeviceService, DeviceSettings, EventSource};
use zbus::{MatchRule, MessageStream};

const TASKS: usize = 4;
const CYCLES: usize = 100;

fn settings() -> DeviceSettings {
    DeviceSettings {
        sysfs_root: "/sys".into(),
        udev_data_dir: "/run/udev/data".into(),
        hwdb: false,
        proc_root: "/proc".into(),
        dev_root: "/dev".into(),
        network: Network::Kernel,
        allow_list: Vec::new(),
        boot_claims: None,
    }
}

async fn start(connection: &zbus::Connection) -> DeviceService {
    let authority = Arc::new(Authority::new(connection.clone()));
    let options = MonitorOptions {
        receive_buffer: 1 << 20,
        ..MonitorOptions::new(EventGroup::Kernel)
    };
    DeviceService::start(
        connection.clone(),
        settings(),
        authority,
        Callers::new(tokio_util::sync::CancellationToken::new()),
        VfioBinder::new("/sys".into(), None),
        EventSource::Udev(options),
    )
    .await
    .expect("start the device service")
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Signals from `sender` seen by `client` within `window`.
async fn signals_within(stream: &mut MessageStream, window: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, stream.next()).await {
        let header = message.header();
        seen.push(format!(
            "{:?} {:?}",
            header.path().map(|p| p.to_string()),
            header.member().map(|m| m.to_string())
        ));
    }
    seen
}

/// Skips everything up to and including the marker signal.
async fn drain_until_marker(stream: &mut MessageStream) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let message = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("the marker arrives")
            .unwrap()
            .unwrap();
        if message
            .header()
            .member()
            .is_some_and(|m| m.as_str() == "Marker")
        {
            return;
        }
    }
}

/// Env var that makes [`parallel_start_stop_cycles_child`] run.
const CYCLES_CHILD: &str = "VMMANAGER_DEVICE_CYCLES_CHILD";

/// Runs [`parallel_start_stop_cycles_child`] in a fresh process: it counts
/// the process's fds and monitor threads, which the other tests of this
/// binary would disturb.
#[test]
fn parallel_start_stop_cycles_leave_nothing_running() {
    common::util::run_test_alone(
        "device_lifecycle::parallel_start_stop_cycles_child",
        CYCLES_CHILD,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by parallel_start_stop_cycles_leave_nothing_running in its own process"]
async fn parallel_start_stop_cycles_child() {
    assert!(
        std::env::var_os(CYCLES_CHILD).is_some(),
        "counts this process's own resources: run only by parallel_start_stop_cycles_leave_nothing_running, in a process of its own"
    );
    // No udevd may come and go meanwhile (it does not matter for the kernel
    // group, but its rebroadcasts would add noise).
    let _lock = tokio::task::spawn_blocking(|| FileLock::exclusive(UDEVD_LOCK))
        .await
        .unwrap();
    let bus = tokio::task::spawn_blocking(TestBus::start).await.unwrap();
    let address = device();

    // Warm up the runtime's own threads and fds before taking the baseline.
    let connection = bus.connect().await;
    start(&connection).await.stop().await;
    drop(connection);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fds_before = fd_count();

    let mut workers = Vec::new();
    for worker in 0..TASKS {
        let address_bus = bus.address().to_owned();
        workers.push(tokio::spawn(async move {
            let service_conn = zbus::connection::Builder::address(address_bus.as_str())
                .build()
                .await
                .unwrap();
            let client = zbus::connection::Builder::address(address_bus.as_str())
                .build()
                .await
                .unwrap();
            let rule = MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .sender(service_conn.unique_name().unwrap().clone())
                .build()
                .unwrap();
            let mut stream = MessageStream::for_match_rule(rule, &client, None)
                .await
                .unwrap();
            for cycle in 0..CYCLES {
                let service = start(&service_conn).await;
                if cycle % 25 == 0 {
                    // Alive: a real event reaches the bus as a Uevent.
                    write_change(&address);
                    let seen = signals_within(&mut stream, Duration::from_millis(300)).await;
                    assert!(
                        seen.iter().any(|s| s.contains("Uevent")),
                        "worker {worker} cycle {cycle}: no Uevent while running: {seen:?}"
                    );
                }
                service.stop().await;
                // Messages of one connection arrive in order: a marker sent
                // now separates what was emitted before stop returned (still
                // in flight, fine) from anything emitted after (a bug).
                service_conn
                    .emit_signal(None::<()>, "/marker", "org.example.Test", "Marker", &())
                    .await
                    .unwrap();
                drain_until_marker(&mut stream).await;
                write_change(&address);
                let after = signals_within(&mut stream, Duration::from_millis(40)).await;
                assert!(
                    after.is_empty(),
                    "worker {worker} cycle {cycle}: signals after stop: {after:?}"
                );
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        threads_named(THREAD_NAME),
        0,
        "monitor threads left running"
    );
    let fds_after = fd_count();
    println!(
        "{} start/stop cycles: fds before {fds_before}, after {fds_after}; monitor threads after: 0",
        TASKS * CYCLES
    );
    // The bus connections of the workers are gone; every monitor socket and
    // wake fd must be closed too.
    assert!(
        fds_after <= fds_before,
        "fd leak: {fds_before} before, {fds_after} after"
    );
}
