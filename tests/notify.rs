//! `vmmanager-notify` against a real notification server: `dunst` on an
//! `Xvfb` display and a private session bus, with the real `vmmanagerd`
//! (and polkitd) on a private system-like bus. What dunst displayed is read
//! back with `dunstctl history` and checked: summary, body, urgency, app
//! name, category.
//!
//! Set `VMM_NOTIFY_SCREENSHOT=path.png` to save a screenshot of the "leaked
//! clusters" notification (with its button) as dunst draws it.

use crate::common;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::bus::SessionBus;
use common::images::{make_clean_qcow2, make_corrupt_qcow2, make_leaky_qcow2, qemu_img_check};
use common::inproc::InProcService;
use common::sysfs::FakeSysfs;
use common::util::{self, ChildGuard, CmdOutput, public_tempdir, read_lossy, write_file};
use common::world::{check_disk_as_root, check_own_disk_as_nobody};
use common::{Daemon, DaemonConfig, Polkit, Stack, TestBus, Vm};
use tempfile::TempDir;
use vmmanager::config::EventsSetting;
use vmmanager::devices::DeviceAction;
use vmmanager::devices::vfio::KernelSysfs;

const NOTIFY_BIN: &str = env!("CARGO_BIN_EXE_vmmanager-notify");

/// How long a notification may take to show up (retries back off from 1 s).
const SHOW_TIMEOUT: Duration = Duration::from_secs(30);

/// dunst settings: no idle detection (Xvfb has no input), and a layout that
/// makes a readable screenshot. dunst 1.9's history has no urgency field,
/// so each urgency gets its own timeout (1001/1002/1003 s), which the
/// history does show: that is how the test reads back the urgency dunst
/// applied.
const DUNSTRC: &str = r##"[global]
    idle_threshold = 0
    width = 420
    origin = top-right
    offset = 12x12
    font = DejaVu Sans 11
    padding = 12
    horizontal_padding = 12
    frame_width = 2
    gap_size = 6
    icon_position = left
    min_icon_size = 32
    max_icon_size = 48
    icon_theme = "Adwaita, hicolor"
    enable_recursive_icon_lookup = true
    format = "<b>%s</b>\n%b"
    show_indicators = true
    mouse_left_click = do_action, close_current

[urgency_low]
    background = "#2e3440"
    foreground = "#d8dee9"
    frame_color = "#4c566a"
    timeout = 1001

[urgency_normal]
    background = "#2e3440"
    foreground = "#eceff4"
    frame_color = "#ebcb8b"
    timeout = 1002

[urgency_critical]
    background = "#3b2430"
    foreground = "#eceff4"
    frame_color = "#bf616a"
    timeout = 1003
"##;

/// One notification as dunst shows it in its history.
#[derive(Debug, Clone)]
struct Shown {
    appname: String,
    summary: String,
    body: String,
    urgency: String,
    category: String,
}

/// Xvfb + session bus + (optionally) dunst, in guards.
struct Desktop {
    // Field order: dunst goes before the bus and the X server.
    dunst: Option<ChildGuard>,
    _session_bus: SessionBus,
    _xvfb: ChildGuard,
    display: String,
    session_address: String,
    dir: TempDir,
}

impl Desktop {
    fn start(with_dunst: bool) -> Desktop {
        let dir = public_tempdir("vmm-desktop-");
        // -displayfd: Xvfb picks a free display itself and prints its
        // number once it accepts connections (no races between tests).
        let child = Command::new("Xvfb")
            .args([
                "-displayfd",
                "1",
                "-screen",
                "0",
                "1024x768x24",
                "-nolisten",
                "tcp",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(dir.path().join("xvfb.log")).unwrap())
            .spawn()
            .expect("spawn Xvfb (apt install xvfb)");
        let mut xvfb = ChildGuard::new(child, "Xvfb");
        let number = util::first_line(&mut xvfb, Duration::from_secs(20));
        assert!(
            !number.is_empty(),
            "Xvfb did not start: {}",
            read_lossy(&dir.path().join("xvfb.log"))
        );
        let display = format!(":{}", number.trim());

        let session_bus = SessionBus::start(dir.path());
        let mut desktop = Desktop {
            dunst: None,
            _xvfb: xvfb,
            display,
            session_address: session_bus.address().to_owned(),
            _session_bus: session_bus,
            dir,
        };
        if with_dunst {
            desktop.start_dunst();
        }
        desktop
    }

    fn start_dunst(&mut self) {
        let rc = self.dir.path().join("dunstrc");
        write_file(&rc, DUNSTRC, 0o644);
        let child = Command::new("dunst")
            .arg("-config")
            .arg(&rc)
            .env("DISPLAY", &self.display)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.session_address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(self.dir.path().join("dunst.log")).unwrap())
            .spawn()
            .expect("spawn dunst (apt install dunst)");
        let mut dunst = ChildGuard::new(child, "dunst");
        util::wait_until(
            Duration::from_secs(15),
            "dunst to own org.freedesktop.Notifications",
            || {
                assert!(dunst.is_running(), "dunst exited: {}", self.dunst_log());
                self.dunstctl(&["is-paused"]).success()
            },
            || self.dunst_log(),
        );
        self.dunst = Some(dunst);
    }

    fn dunst_log(&self) -> String {
        read_lossy(&self.dir.path().join("dunst.log"))
    }

    fn dunstctl(&self, args: &[&str]) -> CmdOutput {
        util::run(
            Command::new("dunstctl")
                .args(args)
                .env("DBUS_SESSION_BUS_ADDRESS", &self.session_address),
        )
    }

    fn displayed(&self) -> usize {
        self.dunstctl(&["count", "displayed"])
            .stdout
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// Closes whatever is displayed (dunst then keeps it in its history)
    /// and returns the history, newest first.
    fn history(&self) -> Vec<Shown> {
        self.dunstctl(&["close-all"]);
        let out = self.dunstctl(&["history"]);
        let json: serde_json::Value =
            serde_json::from_str(out.expect_success("dunstctl history")).unwrap();
        let field = |n: &serde_json::Value, key: &str| -> serde_json::Value {
            n.get(key)
                .and_then(|f| f.get("data"))
                .cloned()
                .unwrap_or_default()
        };
        let text = |n: &serde_json::Value, key: &str| {
            field(n, key).as_str().unwrap_or_default().to_owned()
        };
        json["data"][0]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|n| Shown {
                appname: text(n, "appname"),
                summary: text(n, "summary"),
                body: text(n, "body"),
                urgency: match field(n, "timeout").as_i64() {
                    Some(1_001_000_000) => "LOW",
                    Some(1_002_000_000) => "NORMAL",
                    Some(1_003_000_000) => "CRITICAL",
                    _ => "?",
                }
                .to_owned(),
                category: text(n, "category"),
            })
            .collect()
    }

    /// Waits until dunst has shown a notification with `summary`; returns
    /// it (the newest such).
    fn wait_for(&self, summary: &str, companion: &mut Companion) -> Shown {
        let start = Instant::now();
        loop {
            if let Some(n) = self.history().into_iter().find(|n| n.summary == summary) {
                return n;
            }
            assert!(
                companion.is_running(),
                "vmmanager-notify exited:\n{}",
                companion.output()
            );
            if start.elapsed() > SHOW_TIMEOUT {
                panic!(
                    "no notification {summary:?} within {SHOW_TIMEOUT:?}; shown: {:#?}\n\
                     companion log:\n{}\ndunst log:\n{}",
                    self.history(),
                    companion.output(),
                    self.dunst_log()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Summaries shown so far (closing what is displayed).
    fn summaries(&self) -> Vec<String> {
        self.history().into_iter().map(|n| n.summary).collect()
    }

    /// Saves the notification area (top right of the X screen, trimmed to
    /// what dunst drew) as PNG.
    fn screenshot(&self, to: &Path) {
        util::run(
            Command::new("import")
                .args(["-window", "root", "-crop", "480x400+544+0", "+repage"])
                .arg(to)
                .env("DISPLAY", &self.display),
        )
        .expect_success("import (imagemagick) screenshot");
        util::run(
            Command::new("convert")
                .arg(to)
                .args(["-trim", "+repage", "-bordercolor", "black", "-border", "8"])
                .arg(to),
        )
        .expect_success("convert -trim");
    }
}

/// `vmmanager-notify --system-bus-address …` with the session bus in its
/// environment; killed on drop.
struct Companion {
    child: ChildGuard,
    dir: TempDir,
}

impl Companion {
    fn start(system_bus: &str, desktop: &Desktop) -> Companion {
        let dir = public_tempdir("vmm-notify-");
        let log = File::create(dir.path().join("notify.log")).unwrap();
        let child = Command::new(NOTIFY_BIN)
            .arg("--system-bus-address")
            .arg(system_bus)
            .env("DBUS_SESSION_BUS_ADDRESS", &desktop.session_address)
            .env("DISPLAY", &desktop.display)
            .env("RUST_LOG", "debug,zbus=info")
            .env("NO_COLOR", "1")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn vmmanager-notify");
        Companion {
            child: ChildGuard::new(child, "vmmanager-notify"),
            dir,
        }
    }

    fn output(&self) -> String {
        read_lossy(&self.dir.path().join("notify.log"))
    }

    fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Waits until its log contains `text`.
    fn wait_for_log(&mut self, text: &str) {
        util::wait_until(
            Duration::from_secs(20),
            &format!("vmmanager-notify to log {text:?}"),
            || self.output().contains(text),
            || self.output(),
        );
    }

    fn sigterm_and_wait(&mut self) -> std::process::ExitStatus {
        self.child.signal(libc::SIGTERM);
        self.child
            .wait_timeout(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("vmmanager-notify ignored SIGTERM:\n{}", self.output()))
    }
}

async fn start_stack(config: DaemonConfig) -> Stack {
    // nobody may check their own images: another local user's checks.
    let polkit = Polkit::builder().allow_user("org.example.vmmanager.check-disk", "nobody");
    tokio::task::spawn_blocking(move || Stack::start(polkit, &config))
        .await
        .unwrap()
}

fn assert_common(n: &Shown) {
    assert_eq!(n.appname, "VM Manager", "{n:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_checks_notify_and_the_companion_follows_a_restart() {
    let desktop = Desktop::start(true);
    let config = DaemonConfig::default();
    let mut stack = start_stack(config.clone()).await;
    let mut companion = Companion::start(stack.bus.address(), &desktop);
    companion.wait_for_log("following org.example.VmManager");

    let images = public_tempdir("vmm-notify-images-");
    let path = |name: &str| images.path().join(name);

    // Another user's check of their own corrupt image is theirs alone: no
    // notification (DiskChecked reaches everyone). Signals come in order,
    // so once the next check shows, this one was seen and passed over.
    make_corrupt_qcow2(&path("others.qcow2"));
    check_own_disk_as_nobody(&stack.bus, &path("others.qcow2")).await;

    // Clean: low urgency.
    make_clean_qcow2(&path("clean.qcow2"));
    check_disk_as_root(&stack.bus, &path("clean.qcow2")).await;
    let n = desktop.wait_for("Disk check passed: clean.qcow2", &mut companion);
    let summaries = desktop.summaries();
    assert!(
        !summaries.iter().any(|s| s.contains("others.qcow2")),
        "{summaries:?}"
    );
    assert_common(&n);
    assert_eq!(n.urgency, "LOW");
    assert_eq!(
        n.body,
        format!("{} (qcow2) has no errors.", path("clean.qcow2").display())
    );
    assert_eq!(n.category, "x-vmmanager.disk.clean");

    // Corrupt: critical.
    make_corrupt_qcow2(&path("corrupt.qcow2"));
    check_disk_as_root(&stack.bus, &path("corrupt.qcow2")).await;
    let n = desktop.wait_for("Disk is corrupt: corrupt.qcow2", &mut companion);
    assert_common(&n);
    assert_eq!(n.urgency, "CRITICAL");
    assert!(
        n.body.starts_with(&format!(
            "1 corruption in {} (qcow2).",
            path("corrupt.qcow2").display()
        )),
        "{n:#?}"
    );

    // In use by a real QEMU: normal, naming the VM.
    make_clean_qcow2(&path("busy.qcow2"));
    let vm = Vm::start("notify-vm", path("busy.qcow2"));
    check_disk_as_root(&stack.bus, &path("busy.qcow2")).await;
    let n = desktop.wait_for("Disk in use: busy.qcow2", &mut companion);
    assert_common(&n);
    assert_eq!(n.urgency, "NORMAL");
    assert!(
        n.body
            .starts_with("Not checked: busy.qcow2 is in use by VM \"notify-vm\" (PID "),
        "{n:#?}"
    );
    assert!(n.body.contains(&vm.pid().to_string()), "{n:#?}");
    drop(vm);

    // Leaks: normal, with a button that repairs.
    make_leaky_qcow2(&path("leaky.qcow2"));
    check_disk_as_root(&stack.bus, &path("leaky.qcow2")).await;
    let n = desktop.wait_for("Disk has leaked clusters: leaky.qcow2", &mut companion);
    assert_common(&n);
    assert_eq!(n.urgency, "NORMAL");
    assert!(
        n.body.starts_with(&format!(
            "3 leaked clusters in {} (qcow2).",
            path("leaky.qcow2").display()
        )),
        "{n:#?}"
    );
    // Again, and this time press "Repair leaks" (dunst's do_action on the
    // only action), as a user would.
    check_disk_as_root(&stack.bus, &path("leaky.qcow2")).await;
    util::wait_until(
        SHOW_TIMEOUT,
        "the leaks notification to be displayed",
        || desktop.displayed() == 1,
        || companion.output(),
    );
    if let Some(to) = std::env::var_os("VMM_NOTIFY_SCREENSHOT") {
        // Let dunst finish drawing.
        thread::sleep(Duration::from_millis(500));
        desktop.screenshot(Path::new(&to));
    }
    desktop
        .dunstctl(&["action", "0"])
        .expect_success("dunstctl action 0");
    let n = desktop.wait_for("Disk repaired: leaky.qcow2", &mut companion);
    assert_eq!(
        n.body,
        format!(
            "3 leaked clusters freed; {} (qcow2) has no errors now.",
            path("leaky.qcow2").display()
        )
    );
    assert_eq!(
        qemu_img_check(&path("leaky.qcow2")).0,
        0,
        "repaired for real"
    );

    // Restart the service under the companion: it follows the new owner.
    let status = stack.daemon.sigterm_and_wait();
    assert!(status.success(), "vmmanagerd: {status}");
    companion.wait_for_log("went away; waiting for it to return");
    stack.daemon = tokio::task::block_in_place(|| Daemon::start(&stack.bus, &config));
    companion.wait_for_log("appeared");
    make_clean_qcow2(&path("after-restart.qcow2"));
    check_disk_as_root(&stack.bus, &path("after-restart.qcow2")).await;
    desktop.wait_for("Disk check passed: after-restart.qcow2", &mut companion);
    // A restart is not hardware leaving and coming back.
    let summaries = desktop.summaries();
    assert!(
        !summaries.iter().any(|s| s.contains("PCI device")),
        "{summaries:?}"
    );

    let status = companion.sigterm_and_wait();
    assert!(
        status.success(),
        "vmmanager-notify: {status}\n{}",
        companion.output()
    );
}

/// A PF plus `n` VFs on bus 0x3b, as an SR-IOV NIC shows them.
fn add_vfs(fs: &FakeSysfs, n: u32) {
    for i in 0..n {
        let addr = format!("0000:3b:{:02x}.{}", 2 + i / 8, i % 8);
        fs.add(&addr, 0x8086, 0x154c, 0x020000)
            .physfn("0000:3b:00.0");
    }
}

fn remove_vfs(fs: &FakeSysfs, n: u32) {
    for i in 0..n {
        fs.remove(&format!("0000:3b:{:02x}.{}", 2 + i / 8, i % 8));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_that_change_while_the_service_restarts_are_one_notification() {
    let desktop = Desktop::start(true);
    let fs = FakeSysfs::new();
    fs.device("0000:3b:00.0", 0x8086, 0x1572, 0x020000)
        .sriov(64, 0)
        .driver("i40e");
    let config = DaemonConfig::default()
        .sysfs_root(fs.root())
        .events(EventsSetting::None);
    let mut stack = start_stack(config.clone()).await;
    let mut companion = Companion::start(stack.bus.address(), &desktop);
    companion.wait_for_log("following org.example.VmManager");

    // The service stops (removing its objects), 40 VFs appear meanwhile,
    // it starts again: one notification.
    assert!(stack.daemon.sigterm_and_wait().success());
    companion.wait_for_log("went away");
    add_vfs(&fs, 40);
    stack.daemon = tokio::task::block_in_place(|| Daemon::start(&stack.bus, &config));
    let n = desktop.wait_for("40 PCI devices added", &mut companion);
    assert_common(&n);
    assert_eq!(n.urgency, "LOW");
    assert_eq!(n.category, "device.added");
    assert_eq!(
        n.body,
        "0000:3b:02.0 (VF of 0000:3b:00.0)\n0000:3b:02.1 (VF of 0000:3b:00.0)\n\
         0000:3b:02.2 (VF of 0000:3b:00.0)\n0000:3b:02.3 (VF of 0000:3b:00.0)\nand 36 more"
    );
    // Exactly one notification; no "removed" for the service's own stop.
    let all = desktop.summaries();
    assert_eq!(all, ["40 PCI devices added"], "{}", companion.output());

    // And back: they are gone after the next restart.
    assert!(stack.daemon.sigterm_and_wait().success());
    remove_vfs(&fs, 40);
    stack.daemon = tokio::task::block_in_place(|| Daemon::start(&stack.bus, &config));
    let n = desktop.wait_for("40 PCI devices removed", &mut companion);
    assert_eq!(n.category, "device.removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_device_events_are_coalesced() {
    // The real device component in-process, fed uevents, on a test bus:
    // live InterfacesAdded/Removed and PropertiesChanged.
    let desktop = Desktop::start(true);
    let bus = tokio::task::spawn_blocking(TestBus::start).await.unwrap();
    let fs = FakeSysfs::new();
    fs.device("0000:3b:00.0", 0x8086, 0x1572, 0x020000)
        .sriov(64, 0)
        .driver("i40e");
    fs.device("0000:01:00.0", 0x10de, 0x2204, 0x030000)
        .driver("nvidia")
        .iommu_group(7);
    let service = InProcService::start(&bus, &fs, &[], KernelSysfs).await;
    let mut companion = Companion::start(bus.address(), &desktop);
    companion.wait_for_log("following org.example.VmManager");

    add_vfs(&fs, 40);
    for i in 0..40 {
        let addr = format!("0000:3b:{:02x}.{}", 2 + i / 8, i % 8);
        service.uevent(DeviceAction::Add, &addr).await;
    }
    let n = desktop.wait_for("40 PCI devices added", &mut companion);
    assert_eq!(n.urgency, "LOW");
    assert_eq!(desktop.summaries(), ["40 PCI devices added"]);

    // The GPU is bound to vfio-pci: ready for passthrough.
    fs.rebind("0000:01:00.0", "vfio-pci");
    service.uevent(DeviceAction::Bind, "0000:01:00.0").await;
    let n = desktop.wait_for("0000:01:00.0 is ready for passthrough", &mut companion);
    assert_eq!(n.urgency, "NORMAL");
    assert_eq!(n.category, "device");

    remove_vfs(&fs, 40);
    for i in 0..40 {
        let addr = format!("0000:3b:{:02x}.{}", 2 + i / 8, i % 8);
        service.uevent(DeviceAction::Remove, &addr).await;
    }
    desktop.wait_for("40 PCI devices removed", &mut companion);
    drop(service);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_notification_server_it_waits_and_shows_later() {
    let mut desktop = Desktop::start(false);
    let stack = start_stack(DaemonConfig::default()).await;
    let mut companion = Companion::start(stack.bus.address(), &desktop);
    companion.wait_for_log("following org.example.VmManager");

    let images = public_tempdir("vmm-notify-images-");
    let image = images.path().join("later.qcow2");
    make_clean_qcow2(&image);
    check_disk_as_root(&stack.bus, &image).await;
    companion.wait_for_log("cannot show a notification");
    thread::sleep(Duration::from_millis(1500));
    assert!(companion.is_running(), "{}", companion.output());

    desktop.start_dunst();
    let n = desktop.wait_for("Disk check passed: later.qcow2", &mut companion);
    assert_eq!(n.urgency, "LOW");

    // Autostart and the user unit both starting it: the second one sees
    // the first on the session bus and leaves.
    let mut second = Companion::start(stack.bus.address(), &desktop);
    let status = second
        .child
        .wait_timeout(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("a second companion kept running:\n{}", second.output()));
    assert!(status.success(), "{status}: {}", second.output());
    assert!(
        second.output().contains("another vmmanager-notify owns"),
        "{}",
        second.output()
    );
    assert!(companion.is_running());
}

/// A device detached with auto-return whose driver is gone when its VM
/// exits: the service's `ReturnFinished` becomes a critical notification
/// naming the device and why (a device given back shows none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_not_given_back_after_its_vm_is_a_critical_notification() {
    use common::fake_kernel::FakeKernel;
    use vmmanager_client::PciDeviceProxy;
    use vmmanager_client::options::BindingOptions;
    const GPU: &str = "0000:01:00.0";
    let desktop = Desktop::start(true);
    let (bus, polkit) = Polkit::builder().start_with_bus().await;
    let fs = FakeSysfs::new();
    fs.device(GPU, 0x10de, 0x2204, 0x030000)
        .driver("nvidia")
        .iommu_group(7)
        .names("NVIDIA Corporation", "GA102");
    fs.driver_dir("vfio-pci");
    let kernel = FakeKernel::new(&fs.root());
    let dev = tempfile::tempdir().unwrap();
    std::fs::create_dir(dev.path().join("vfio")).unwrap();
    let node = dev.path().join("vfio/7");
    std::fs::write(&node, "").unwrap();
    let config = common::inproc::config(&fs, dev.path(), &[]);
    let service = InProcService::start_with(&bus, &config, kernel, dev).await;
    let mut companion = Companion::start(bus.address(), &desktop);
    companion.wait_for_log("following org.example.VmManager");

    let client = bus.connect().await;
    let gpu = PciDeviceProxy::builder(&client)
        .path(vmmanager_client::PciAddress::object_path(
            &GPU.parse().unwrap(),
        ))
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    let options = BindingOptions::new().auto_return(true).build();
    gpu.detach(options.clone()).await.unwrap();
    // A VM uses it and exits: given back, no notification.
    let mut vm = util::hold_open(&node, true);
    thread::sleep(Duration::from_millis(300));
    vm.kill_and_wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gpu.driver().await.unwrap() != "nvidia" {
        assert!(
            Instant::now() < deadline,
            "not given back: {}",
            companion.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Again, with nvidia unloaded while the VM runs.
    gpu.detach(options).await.unwrap();
    let mut vm = util::hold_open(&node, true);
    thread::sleep(Duration::from_millis(300));
    std::fs::remove_dir_all(fs.root().join("bus/pci/drivers/nvidia")).unwrap();
    vm.kill_and_wait();
    let n = desktop.wait_for(
        "Not given back (driver did not bind): 0000:01:00.0 NVIDIA Corporation GA102",
        &mut companion,
    );
    assert_common(&n);
    assert_eq!(n.urgency, "CRITICAL");
    assert_eq!(n.category, "device.error");
    assert_eq!(
        n.body,
        "0000:01:00.0: nvidia did not take it back (the nvidia driver is not loaded); it is on \
         no driver"
    );
    assert_eq!(
        desktop.summaries(),
        ["Not given back (driver did not bind): 0000:01:00.0 NVIDIA Corporation GA102"]
    );
    drop(service);
    drop(polkit);
}
