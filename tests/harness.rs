//! Smoke tests for the end-to-end harness in `tests/common`: each component
//! starts for real, is isolated from the host, and cleans up after itself.

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::util::{self, ChildGuard, command_as};
use common::{DaemonConfig, NOBODY, Polkit, SERVICE_NAME, Stack, TestBus, Vm};

use vmmanager_client::names::action::{CHECK_DISK, REPAIR_DISK};

/// A small qcow2 in a fresh temp dir (kept alive by the returned guard).
fn qcow2(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = util::public_tempdir("vmm-img-");
    let img = dir.path().join(name);
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M");
    util::run(&mut cmd).expect_success("qemu-img create");
    (dir, img)
}

/// A process running as nobody, to be a polkit `unix-process` subject.
fn nobody_process() -> ChildGuard {
    let child = command_as(Some((NOBODY, NOBODY)), "sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep as nobody");
    let mut guard = ChildGuard::new(child, "sleep as nobody");
    // setpriv execs sleep; wait until the uid switch has happened.
    util::wait_until(
        std::time::Duration::from_secs(5),
        "sleep to run as nobody",
        || {
            let _ = guard.try_wait();
            fs::read_to_string(format!("/proc/{}/status", guard.pid()))
                .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t65534")))
        },
        String::new,
    );
    guard
}

/// Whether `mountinfo` text shows something mounted at `point`.
fn has_mount(mountinfo: &str, point: &str) -> bool {
    mountinfo
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(point))
}

#[test]
fn bus_starts_and_nobody_can_reach_it() {
    let bus = TestBus::start();
    let mode = fs::metadata(bus.dir()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);

    let root = bus.busctl(&["list", "--no-legend"]);
    assert!(
        root.expect_success("busctl list")
            .contains("org.freedesktop.DBus"),
        "{root:#?}"
    );
    let nobody = bus.busctl_as_nobody(&["list", "--no-legend"]);
    nobody.expect_success("busctl list as nobody");

    // The system-bus default policy is in force: nobody may not own names.
    let own = bus.busctl_as_nobody(&[
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "RequestName",
        "su",
        SERVICE_NAME,
        "0",
    ]);
    assert!(!own.success(), "nobody could own {SERVICE_NAME}: {own:#?}");
    assert!(own.stderr.contains("Access denied"), "{own:#?}");
}

#[tokio::test]
async fn polkit_answers_for_root_and_denies_nobody_without_rule() {
    let bus = TestBus::start();
    let polkit = Polkit::start(&bus);

    // unix-process subjects.
    let me = std::process::id();
    assert!(polkit.check_process(me, 0, CHECK_DISK).authorized);
    let nobody = nobody_process();
    let denied = polkit.check_process(nobody.pid(), NOBODY, CHECK_DISK);
    assert!(!denied.authorized, "{denied:?}");
    assert!(denied.challenge, "auth_admin should ask for a password");

    // system-bus-name subjects, as the daemon will use.
    let conn = bus.connect().await;
    let root_name = conn.unique_name().expect("unique name").to_string();
    assert!(polkit.check_bus_name(&root_name, CHECK_DISK).authorized);
    let client = bus.idle_client_as(Some((NOBODY, NOBODY)));
    assert!(
        !polkit
            .check_bus_name(&client.unique_name, CHECK_DISK)
            .authorized
    );

    // The bind mounts live only in polkitd's mount namespace.
    let host = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let inside = fs::read_to_string(format!("/proc/{}/mountinfo", polkit.pid())).unwrap();
    for point in ["/usr/share/polkit-1/actions", "/etc/polkit-1/rules.d"] {
        assert!(has_mount(&inside, point), "{point} not bound for polkitd");
        assert!(!has_mount(&host, point), "{point} leaked to the host");
    }
}

#[test]
fn polkit_rule_grants_nobody() {
    let bus = TestBus::start();
    let polkit = Polkit::builder()
        .allow_user(CHECK_DISK, "nobody")
        .start(&bus);
    let nobody = nobody_process();
    assert!(
        polkit
            .check_process(nobody.pid(), NOBODY, CHECK_DISK)
            .authorized
    );
    let client = bus.idle_client_as(Some((NOBODY, NOBODY)));
    assert!(
        polkit
            .check_bus_name(&client.unique_name, CHECK_DISK)
            .authorized
    );
    // The rule is specific to its action.
    assert!(
        !polkit
            .check_bus_name(&client.unique_name, REPAIR_DISK)
            .authorized
    );
}

#[test]
fn polkit_stop_removes_it_from_the_bus() {
    let bus = TestBus::start();
    let mut polkit = Polkit::start(&bus);
    let pid = polkit.pid();
    polkit.stop();
    assert!(!bus.name_has_owner("org.freedesktop.PolicyKit1"));
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn vm_holds_its_image_until_killed() {
    let (_dir, img) = qcow2("disk.qcow2");
    let mut vm = Vm::start("harness-vm", &img);
    assert_eq!(vm.pidfile(), img.with_file_name("harness-vm.pid"));

    let pid: u32 = fs::read_to_string(vm.pidfile())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, vm.pid());
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with("qemu-system-x86_64"), "{exe:?}");

    // The lock is real: qemu-img cannot check the image while QEMU runs.
    let mut check = Command::new("qemu-img");
    check.args(["check", "-f", "qcow2"]).arg(&img);
    let busy = util::run(&mut check);
    assert!(!busy.success(), "{busy:#?}");
    assert!(busy.stderr.contains("lock"), "{busy:#?}");

    vm.kill9();
    assert!(
        vm.pidfile().exists(),
        "SIGKILL should leave a stale pidfile"
    );
    assert!(!common::vm::is_locked(&img));
    util::run(&mut check).expect_success("qemu-img check after kill");
}

#[test]
fn vm_with_readonly_drive_takes_shared_locks() {
    let (_dir, img) = qcow2("ro.qcow2");
    let mut vm = Vm::builder("harness-ro", &img).readonly(true).start();
    assert!(common::vm::is_locked(&img));
    let status = vm.terminate();
    assert!(status.success(), "{status}");
    assert!(!vm.pidfile().exists(), "a clean exit removes the pidfile");
}

#[tokio::test]
async fn daemon_owns_its_name_and_exits_0_on_sigterm() {
    let mut stack = Stack::start(Polkit::builder(), &DaemonConfig::default());
    let conn = stack.bus.connect().await;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
    let owner = dbus
        .get_name_owner(SERVICE_NAME.try_into().unwrap())
        .await
        .unwrap();
    let owner_pid = dbus
        .get_connection_unix_process_id(owner.as_ref().into())
        .await
        .unwrap();
    assert_eq!(owner_pid, stack.daemon.pid());

    let status = stack.daemon.sigterm_and_wait();
    assert!(
        status.success(),
        "{status}; output:\n{}",
        stack.daemon.output()
    );
    stack.bus.wait_for_name_gone(SERVICE_NAME);
}

#[test]
fn nobody_can_introspect_the_daemon() {
    // The project's bus policy lets anyone call in; polkit decides the rest.
    let stack = Stack::start(Polkit::builder(), &DaemonConfig::default());
    let out = stack
        .bus
        .busctl_as_nobody(&["introspect", SERVICE_NAME, common::MANAGER_PATH]);
    let text = out.expect_success("busctl introspect as nobody");
    assert!(text.contains(common::MANAGER_IFACE), "{text}");
}
