//! What the service costs the host while it waits: time from start to its
//! bus name, resident memory idle and after many mixed calls, open fds, and
//! memory with 1,000 devices from a prepared sysfs tree.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::runtime::Runtime;
use vmmanager_client::names::{DEVICE_INTERFACE, MANAGER_INTERFACE, MANAGER_PATH};
use vmmanager_client::{CheckReport, CheckResult, ManagerProxy, PciDeviceProxy};
use zbus::fdo::{DBusProxy, PropertiesProxy};
use zbus::names::InterfaceName;
use zbus::proxy::CacheProperties;
use zbus::{Connection, Variant};

use crate::Mode;
use crate::common::bus::managed_objects;
use crate::common::images::make_clean_qcow2;
use crate::common::inproc;
use crate::common::sysfs::FakeSysfs;
use crate::common::util::{fd_count, public_tempdir};
use crate::common::{Daemon, DaemonConfig, Polkit, SERVICE_NAME, TestBus};
use crate::measure::rss_mib;
use crate::report::{Condition, Figure, Group, Unit, millis};

/// How long the daemon is left alone before its memory is read: what it
/// does right after taking its name is over by then.
const SETTLE: Duration = Duration::from_millis(500);
/// Devices in the prepared sysfs tree.
const TREE_DEVICES: usize = 1_000;

pub fn group(mode: Mode, rt: &Runtime) -> Group {
    let bus = TestBus::start();
    let _polkit = Polkit::start(&bus);
    let connection = rt.block_on(bus.connect());
    let owner_changes = watch_name(rt, &connection);
    let config = DaemonConfig::default();

    // Start after start; the last daemon stays for the calls.
    let starts = mode.pick(20, 3);
    let (mut start_ms, mut idle_rss) = (Vec::new(), Vec::new());
    let mut daemon = None;
    for _ in 0..starts {
        if let Some(previous) = daemon.take() {
            drop(previous);
            bus.wait_for_name_gone(SERVICE_NAME);
        }
        while owner_changes.try_recv().is_ok() {}
        let (started, took) = start_timed(&bus, &config, &owner_changes);
        start_ms.push(took);
        std::thread::sleep(SETTLE);
        idle_rss.push(rss_mib(started.pid()));
        daemon = Some(started);
    }
    let daemon = daemon.expect("at least one start");
    let pid = daemon.pid();
    let (rss_before, fds_before) = (rss_mib(pid), fd_count(pid));

    let dir = public_tempdir("vmm-bench-footprint-");
    let image = dir.path().join("disk.qcow2");
    make_clean_qcow2(&image);
    let calls = mode.pick(10_000, 1_000);
    let calling = Instant::now();
    rt.block_on(mixed_calls(
        &connection,
        image.to_str().expect("UTF-8 path"),
        calls,
    ));
    let calling = calling.elapsed();
    std::thread::sleep(SETTLE);
    let (rss_after, fds_after) = (rss_mib(pid), fd_count(pid));
    drop(daemon);
    bus.wait_for_name_gone(SERVICE_NAME);

    // 1,000 devices: the daemon on a prepared tree, no events.
    let tree = prepared_tree(TREE_DEVICES);
    let dev_root = tempfile::tempdir().expect("dev root");
    let tree_config = DaemonConfig {
        config: inproc::config(&tree, dev_root.path(), &[]),
        mount_namespace: None,
    };
    while owner_changes.try_recv().is_ok() {}
    let (tree_daemon, tree_start) = start_timed(&bus, &tree_config, &owner_changes);
    std::thread::sleep(SETTLE);
    let tree_rss = rss_mib(tree_daemon.pid());
    let objects = rt.block_on(managed_objects(&connection));
    let devices = objects
        .values()
        .filter(|i| i.keys().any(|i| i.as_str() == DEVICE_INTERFACE))
        .count();
    assert_eq!(devices, TREE_DEVICES, "device objects of the prepared tree");
    drop(tree_daemon);

    let fds = |n: usize| vec![n as f64];
    Group {
        name: "service",
        title: "The service's own footprint (release build)",
        figures: vec![
            Figure::new("start → bus name", Unit::Millis, start_ms)
                .target(Condition::MedianAtMost(50.0))
                .note("spawn of `vmmanagerd` to NameOwnerChanged on the bus (this machine's /sys)"),
            Figure::new("idle RSS after start", Unit::MiB, idle_rss.clone())
                .target(Condition::MedianAtMost(8.0)),
            Figure::new(
                format!("RSS after {calls} mixed calls"),
                Unit::MiB,
                vec![rss_after],
            )
            .against("RSS before them", vec![rss_before])
            .target(Condition::MedianAtMost(12.0))
            .note(format!(
                "each 10 calls: CheckDisk, 2 GetDiskUsers, 2 GetManagedObjects, GetAll, \
                     Introspect, Jobs, a device's Driver and InUseBy; {:.1} s in all",
                calling.as_secs_f64()
            )),
            Figure::new(
                format!("open fds after {calls} mixed calls"),
                Unit::Count,
                fds(fds_after),
            )
            .against("open fds before them", fds(fds_before))
            .target(Condition::DiffAtMost(0.0)),
            Figure::new(
                format!("idle RSS with {TREE_DEVICES} devices from a prepared sysfs tree"),
                Unit::MiB,
                vec![tree_rss],
            )
            .against("idle RSS with this machine's devices", idle_rss)
            .target(Condition::MedianAtMost(16.0))
            .note(format!("started in {tree_start:.1} ms")),
        ],
    }
}

/// Reports when someone takes the service's name.
fn watch_name(rt: &Runtime, connection: &Connection) -> mpsc::Receiver<Instant> {
    let mut changes = rt.block_on(async {
        let dbus = DBusProxy::new(connection).await.expect("DBus proxy");
        dbus.receive_name_owner_changed_with_args(&[(0, SERVICE_NAME)])
            .await
            .expect("subscribe to NameOwnerChanged")
    });
    let (tx, rx) = mpsc::channel();
    rt.spawn(async move {
        while let Some(change) = changes.next().await {
            let at = Instant::now();
            let taken = change.args().is_ok_and(|a| a.new_owner().is_some());
            if taken && tx.send(at).is_err() {
                break;
            }
        }
    });
    rx
}

/// Starts the daemon; also ms from just before its spawn to the bus
/// announcing its name.
fn start_timed(
    bus: &TestBus,
    config: &DaemonConfig,
    owner_changes: &mpsc::Receiver<Instant>,
) -> (Daemon, f64) {
    let start = Instant::now();
    let daemon = Daemon::start(bus, config);
    let owned = owner_changes
        .recv_timeout(Duration::from_secs(10))
        .expect("NameOwnerChanged for the service");
    (daemon, millis(owned - start))
}

/// `calls` calls, ten kinds in turn, each answer checked.
async fn mixed_calls(connection: &Connection, image: &str, calls: usize) {
    let manager = ManagerProxy::builder(connection)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("manager proxy");
    let properties = PropertiesProxy::builder(connection)
        .destination(SERVICE_NAME)
        .path(MANAGER_PATH)
        .build()
        .await
        .expect("properties proxy");
    let objects = managed_objects(connection).await;
    let device_path = objects
        .iter()
        .find(|(_, interfaces)| interfaces.keys().any(|i| i.as_str() == DEVICE_INTERFACE))
        .map(|(path, _)| path.clone())
        .expect("a device object for this machine's PCI devices");
    let device = PciDeviceProxy::builder(connection)
        .path(device_path)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("device proxy");
    let interface = InterfaceName::from_static_str(MANAGER_INTERFACE).expect("interface name");
    let no_options = HashMap::<&str, Variant<'_>>::new;
    for i in 0..calls {
        match i % 10 {
            0 => {
                let report = manager
                    .check_disk(image, no_options())
                    .await
                    .expect("CheckDisk");
                let report = CheckReport::from_dict(&report);
                assert_eq!(
                    report.result,
                    Some(CheckResult::Clean),
                    "CheckDisk: {report:?}"
                );
            }
            1 | 2 => {
                let users = manager
                    .get_disk_users(image, no_options())
                    .await
                    .expect("GetDiskUsers");
                assert!(users.is_empty(), "GetDiskUsers: {users:?}");
            }
            3 | 4 => assert!(!managed_objects(connection).await.is_empty()),
            5 => {
                let all = properties.get_all(interface.clone()).await.expect("GetAll");
                assert!(all.contains_key("Version"), "GetAll: {all:?}");
            }
            6 => {
                let xml = manager.inner().introspect().await.expect("Introspect");
                assert!(xml.contains(MANAGER_INTERFACE), "Introspect: {xml}");
            }
            7 => {
                let jobs = manager.jobs().await.expect("Jobs");
                assert!(jobs.is_empty(), "Jobs: {jobs:?}");
            }
            8 => {
                device.driver().await.expect("Driver");
            }
            _ => {
                device.in_use_by().await.expect("InUseBy");
            }
        }
    }
}

/// `n` devices in a prepared tree, in a few shapes: bound to a driver or
/// not, alone or sharing an IOMMU group, a quarter with hwdb names.
fn prepared_tree(n: usize) -> FakeSysfs {
    let tree = FakeSysfs::new();
    for i in 0..n {
        // 32 slots × 8 functions per bus, from bus 1 on.
        let addr = format!("0000:{:02x}:{:02x}.{}", 1 + i / 256, (i / 8) % 32, i % 8);
        let device = tree
            .device(&addr, 0x1af4, 0x1000 + (i % 64) as u16, 0x020000)
            .iommu_group(1 + (i / 2) as u32);
        let device = if i % 3 == 0 {
            device
        } else {
            device.driver("virtio-pci")
        };
        if i % 4 == 0 {
            device.names("Red Hat, Inc.", "Virtio device");
        }
    }
    tree
}
