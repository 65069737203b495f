//! The PCI device objects of the real `vmmanagerd` on this machine's real
//! /sys, driven by real kernel uevents (and a real systemd-udevd), seen by
//! real clients (zbus, `vmctl`). The only thing done to real devices is
//! writing `change` to their `uevent` file.

use crate::common;

use std::time::Duration;

use common::udevd::{FileLock, UDEVD_LOCK, Udevd, device, devices, write_change};
use common::{DaemonConfig, Polkit, Stack};
use futures_util::StreamExt;
use vmmanager::config::EventsSetting;
use vmmanager_client::PciAddress;
use vmmanager_client::PciDeviceProxy;
use zbus::{Connection, OwnedObjectPath};

const VMCTL: &str = env!("CARGO_BIN_EXE_vmctl");
const WAIT: Duration = Duration::from_secs(15);

async fn start(config: DaemonConfig) -> (Stack, Connection) {
    let stack = tokio::task::spawn_blocking(move || Stack::start(Polkit::builder(), &config))
        .await
        .unwrap();
    let connection = stack.bus.connect().await;
    (stack, connection)
}

fn path_of(address: &PciAddress) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!(
        "/org/example/VmManager/devices/{}",
        address.object_name()
    ))
    .unwrap()
}

async fn device_proxy<'a>(connection: &Connection, address: &PciAddress) -> PciDeviceProxy<'a> {
    PciDeviceProxy::builder(connection)
        .path(path_of(address))
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap()
}

/// Every real PCI device's address, sorted.
fn real_addresses() -> Vec<String> {
    let mut listed: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !listed.is_empty(),
        "this test needs a host with PCI devices: /sys/bus/pci/devices is empty"
    );
    listed.sort();
    listed
}

/// `vmctl devices` against the stack's service; must succeed.
fn vmctl_devices(stack: &Stack) -> common::CmdOutput {
    let out = common::util::run(
        std::process::Command::new(VMCTL)
            .arg("--bus-address")
            .arg(stack.bus.address())
            .arg("devices"),
    );
    assert!(out.success(), "{out:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_real_device_is_an_object_and_vmctl_lists_them() {
    let (stack, connection) = start(DaemonConfig::default()).await;
    let objects = common::bus::managed_objects(&connection).await;
    let listed = real_addresses();
    let mut exported: Vec<String> = objects
        .values()
        .filter_map(|ifaces| {
            let props = ifaces
                .iter()
                .find(|(n, _)| n.as_str() == "org.example.VmManager1.PciDevice")?
                .1;
            let zbus::Variant::Str(address) = &**props.get("Address")? else {
                return None;
            };
            Some(address.as_str().to_owned())
        })
        .collect();
    exported.sort();
    assert_eq!(exported, listed);

    // The driver property matches sysfs for every device.
    for address in &listed {
        let parsed: PciAddress = address.parse().unwrap();
        let proxy = device_proxy(&connection, &parsed).await;
        let driver = std::fs::read_link(format!("/sys/bus/pci/devices/{address}/driver"))
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .unwrap_or_default();
        assert_eq!(proxy.driver().await.unwrap(), driver, "{address}");
    }

    let out = vmctl_devices(&stack);
    assert!(out.stdout.starts_with("ADDRESS"), "{}", out.stdout);
    for address in &listed {
        assert!(
            out.stdout.contains(address.as_str()),
            "{address} missing:\n{}",
            out.stdout
        );
    }
    let out = common::util::run(
        std::process::Command::new(VMCTL)
            .arg("--bus-address")
            .arg(stack.bus.address())
            .args(["device", "--json", &listed[0]]),
    );
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["Address"], listed[0].as_str());
    let out = common::util::run(
        std::process::Command::new(VMCTL)
            .arg("--bus-address")
            .arg(stack.bus.address())
            .args(["device", "0000:zz:00.0"]),
    );
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let out = common::util::run(
        std::process::Command::new(VMCTL)
            .arg("--bus-address")
            .arg(stack.bus.address())
            .args(["device", "0000:7f:1f.7"]),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("no PCI device 0000:7f:1f.7"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_kernel_uevent_reaches_a_bus_client() {
    // No udevd of another test may see this event (it would learn the
    // device's names before that test's daemon starts).
    let _lock = tokio::task::spawn_blocking(|| FileLock::exclusive(UDEVD_LOCK))
        .await
        .unwrap();
    let (_stack, connection) = start(DaemonConfig::default().events(EventsSetting::Kernel)).await;
    let address = device();
    let proxy = device_proxy(&connection, &address).await;
    let mut events = proxy.receive_uevent().await.unwrap();
    write_change(&address);
    let signal = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("a Uevent signal for the real change event")
        .unwrap();
    assert_eq!(signal.args().unwrap().action(), "change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_real_udevd_names_come_from_the_hwdb() {
    let _udevd = tokio::task::spawn_blocking(Udevd::start).await.unwrap();
    // Without its own hwdb lookups, the service learns the names from
    // udevd's event alone.
    let config = DaemonConfig::default()
        .events(EventsSetting::Udev)
        .hwdb(false);
    let (_stack, connection) = start(config).await;
    let address = device();
    let proxy = device_proxy(&connection, &address).await;
    let properties = zbus::fdo::PropertiesProxy::builder(&connection)
        .destination("org.example.VmManager")
        .path(path_of(&address))
        .build()
        .await
        .unwrap();
    let mut changes = properties.receive_properties_changed().await.unwrap();
    let mut events = proxy.receive_uevent().await.unwrap();
    // udevd has not seen the device yet (nothing was triggered): a change
    // makes it run its rules, look up the hwdb and rebroadcast with names.
    write_change(&address);
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("the udev-group event")
        .unwrap();
    let expected = common::util::run(
        std::process::Command::new("udevadm")
            .args(["info", "--query=property"])
            .arg(format!("/sys/bus/pci/devices/{address}")),
    );
    let vendor = expected
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ID_VENDOR_FROM_DATABASE="))
        .expect("udevd knows the vendor from the hwdb")
        .to_owned();
    let got: String = zbus::fdo::PropertiesProxy::get(
        &properties,
        zbus::names::InterfaceName::from_static_str_unchecked("org.example.VmManager1.PciDevice"),
        "VendorName",
    )
    .await
    .unwrap()
    .try_into()
    .unwrap();
    assert_eq!(got, vendor);
    // …and the change was announced.
    let mut saw_vendor = false;
    while let Ok(Some(signal)) =
        tokio::time::timeout(Duration::from_millis(500), changes.next()).await
    {
        let args = signal.args().unwrap();
        if args.changed_properties().contains_key("VendorName") {
            saw_vendor = true;
        }
    }
    assert!(saw_vendor, "no PropertiesChanged with VendorName");
}

/// `(ID_VENDOR_FROM_DATABASE, ID_MODEL_FROM_DATABASE)` for the device's
/// modalias, as `udevadm hwdb --test` prints them ("" when none).
fn hwdb_names(address: &str) -> (String, String) {
    let modalias = std::fs::read_to_string(format!("/sys/bus/pci/devices/{address}/modalias"))
        .unwrap_or_else(|e| panic!("{address}: modalias: {e}"));
    let out = common::util::run(
        std::process::Command::new("udevadm")
            .arg("hwdb")
            .arg(format!("--test={}", modalias.trim())),
    );
    let text = out.expect_success("udevadm hwdb --test");
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_default()
            .to_owned()
    };
    (
        value("ID_VENDOR_FROM_DATABASE="),
        value("ID_MODEL_FROM_DATABASE="),
    )
}

/// No udevd and an empty udev database (a fresh boot, a container, no
/// coldplug): every real device's names are the hwdb's, as `udevadm hwdb
/// --test=MODALIAS` prints them, on the bus and in `vmctl devices`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_udev_database_names_come_from_the_hwdb() {
    let empty = common::util::public_tempdir("vmm-udev-data-");
    let config = DaemonConfig::default()
        .events(EventsSetting::Kernel)
        .udev_data_dir(empty.path());
    let (stack, connection) = start(config).await;
    let out = vmctl_devices(&stack);
    let mut named = 0;
    for address in real_addresses() {
        let (vendor, model) = hwdb_names(&address);
        let proxy = device_proxy(&connection, &address.parse().unwrap()).await;
        assert_eq!(proxy.vendor_name().await.unwrap(), vendor, "{address}");
        assert_eq!(proxy.device_name().await.unwrap(), model, "{address}");
        let name = [vendor.as_str(), model.as_str()]
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let row = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&address))
            .unwrap_or_else(|| panic!("{address} not listed:\n{}", out.stdout));
        assert!(
            row.trim_end().ends_with(&name),
            "{address}: {row:?}, want {name:?}"
        );
        named += usize::from(!name.is_empty());
    }
    assert!(
        named > 0,
        "the hwdb names none of this machine's devices:\n{}",
        out.stdout
    );
    // Looked up, and unmapped again: its pages are not kept resident.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", stack.daemon.pid())).unwrap();
    assert!(!maps.contains("hwdb.bin"), "{maps}");
    println!("{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_resync_and_the_monitor_keeps_going() {
    // The overflow must come from this test's burst: no udevd meanwhile.
    let _lock = tokio::task::spawn_blocking(|| FileLock::exclusive(UDEVD_LOCK))
        .await
        .unwrap();
    let (stack, connection) = start(
        DaemonConfig::default()
            .events(EventsSetting::Kernel)
            .receive_buffer_bytes(1),
    )
    .await;
    // Stall the daemon's monitor thread: SIGSTOP the whole daemon while the
    // kernel queues a burst far bigger than the 1-byte (kernel minimum)
    // receive buffer, then let it run again.
    let pid = stack.daemon.pid() as libc::pid_t;
    // SAFETY: signals to our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let targets = devices();
    for i in 0..400 {
        write_change(&targets[i % targets.len()]);
    }
    unsafe { libc::kill(pid, libc::SIGCONT) };
    common::util::wait_until(
        WAIT,
        "the daemon to log the lost events and resync",
        || stack.daemon.output().contains("re-reading all devices"),
        || stack.daemon.output(),
    );
    // Still listening: a new event after the overflow gets through.
    let address = device();
    let proxy = device_proxy(&connection, &address).await;
    let mut events = proxy.receive_uevent().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    write_change(&address);
    let signal = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("events still arrive after the overflow")
        .unwrap();
    assert_eq!(signal.args().unwrap().action(), "change");
    assert!(
        stack.daemon.output().contains("ENOBUFS"),
        "{}",
        stack.daemon.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmctl_monitor_prints_real_events_as_json_lines() {
    use std::io::{BufRead, BufReader};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // The burst of uevents below must not reach a udevd another test runs.
    let _lock = tokio::task::spawn_blocking(|| FileLock::exclusive(UDEVD_LOCK))
        .await
        .unwrap();
    let (stack, _connection) = start(DaemonConfig::default().events(EventsSetting::Kernel)).await;
    let mut monitor = common::util::ChildGuard::new(
        std::process::Command::new(VMCTL)
            .arg("--bus-address")
            .arg(stack.bus.address())
            .args(["monitor", "--json"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        "vmctl monitor",
    );
    let stdout = monitor.take_stdout().unwrap();
    let address = device();
    // Keep announcing until the monitor (subscribing asynchronously) sees one.
    let seen = Arc::new(AtomicBool::new(false));
    let writer = std::thread::spawn({
        let seen = seen.clone();
        move || {
            for _ in 0..50 {
                if seen.load(Ordering::Relaxed) {
                    break;
                }
                write_change(&address);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map(Result::unwrap)
            .find(|l| l.contains("Uevent"))
    })
    .await
    .unwrap()
    .expect("a Uevent line");
    seen.store(true, Ordering::Relaxed);
    let doc: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(doc["action"], "change", "{line}");
    assert_eq!(doc["signal"], "org.example.VmManager1.PciDevice.Uevent");
    assert_eq!(doc["path"], path_of(&address).as_str());
    monitor.kill_and_wait();
    writer.join().unwrap();
}
