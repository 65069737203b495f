//! The GNOME Shell extension (`desktop/gnome-shell`) in a real headless
//! GNOME Shell 43, against the real `vmmanagerd` and polkitd on a private
//! system-like bus; and the harness itself ([`common::gnome_shell`]).

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::fake_kernel::FakeKernel;
use common::gnome_shell::{self, ExtensionState, GnomeShell, MenuItem};
use common::images::{make_clean_qcow2, make_corrupt_qcow2};
use common::inproc::InProcService;
use common::sysfs::FakeSysfs;
use common::util::{self, ChildGuard};
use common::world::{check_disk_as_root, check_own_disk_as_nobody, vmctl_as_root};
use common::{Daemon, DaemonConfig, Polkit, TestBus};
use tempfile::TempDir;
use vmmanager::config::EventsSetting;
use vmmanager::devices::{DeviceAction, DeviceEvent, MonitorMessage};
use vmmanager_client::PciAddress;

/// Debian 12's gnome-shell-extension-appindicator.
const APPINDICATOR: &str = "ubuntu-appindicators@ubuntu.com";

/// A minimal GNOME 43 extension: a panel button with a two-item menu.
const HELLO_EXTENSION: &str = r#"
const {St} = imports.gi;
const Main = imports.ui.main;
const PanelMenu = imports.ui.panelMenu;
const PopupMenu = imports.ui.popupMenu;
let button = null;
function init() {}
function enable() {
    button = new PanelMenu.Button(0.0, 'hello', false);
    button.add_child(new St.Icon({icon_name: 'face-smile-symbolic', style_class: 'system-status-icon'}));
    button.menu.addMenuItem(new PopupMenu.PopupMenuItem('Hello', {reactive: false}));
    const sub = new PopupMenu.PopupSubMenuMenuItem('More');
    sub.menu.addMenuItem(new PopupMenu.PopupMenuItem('Inside'));
    button.menu.addMenuItem(sub);
    Main.panel.addToStatusArea('hello-test', button);
}
function disable() { button.destroy(); button = null; }
"#;

fn hello_extension(dir: &Path) -> std::path::PathBuf {
    let ext = dir.join("hello@example.org");
    fs::create_dir(&ext).unwrap();
    fs::write(
        ext.join("metadata.json"),
        r#"{"uuid": "hello@example.org", "name": "Hello", "description": "test", "shell-version": ["43"]}"#,
    )
    .unwrap();
    fs::write(ext.join("extension.js"), HELLO_EXTENSION).unwrap();
    ext
}

#[test]
fn harness_runs_a_shell_with_a_system_extension_and_cleans_up() {
    let bus = TestBus::start();
    let sources = util::public_tempdir("vmm-hello-");
    let mut shell = GnomeShell::builder(bus.address())
        .enable(APPINDICATOR)
        .install(&hello_extension(sources.path()))
        .setting("org/gnome/desktop/interface", "clock-show-seconds", "true")
        .env("VMM_HARNESS_MARK", "set")
        .virtual_monitor(1024, 768)
        .start();
    shell.assert_extension_ok(APPINDICATOR);
    shell.assert_extension_ok("hello@example.org");
    let runtime_mode = fs::metadata(shell.runtime_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(runtime_mode & 0o777, 0o700);
    let info = shell.extension_info("hello@example.org");
    assert_eq!(
        Path::new(info.fields["path"].as_str().unwrap()),
        shell
            .home()
            .join(".local/share/gnome-shell/extensions/hello@example.org")
    );
    let menu = shell.panel_menu("hello-test");
    let texts: Vec<String> = menu
        .iter()
        .flat_map(|m| m.flatten())
        .map(|m| m.text())
        .collect();
    assert_eq!(texts, ["Hello", "More", "Inside"], "{menu:#?}");
    assert!(!menu[0].sensitive && menu[1].sensitive);
    assert_eq!(menu[1].kind, "PopupSubMenuMenuItem");
    assert_eq!(
        shell.eval(
            "new imports.gi.Gio.Settings({schema_id: 'org.gnome.desktop.interface'})\
             .get_boolean('clock-show-seconds')"
        ),
        Ok("true".into())
    );
    assert_eq!(
        shell.eval("imports.gi.GLib.getenv('VMM_HARNESS_MARK')"),
        Ok("\"set\"".into())
    );
    // A client in the session's environment reaches the shell.
    let out = util::run(shell.command("gdbus").args([
        "call",
        "--session",
        "--dest=org.gnome.Shell",
        "--object-path=/org/gnome/Shell",
        "--method=org.gnome.Shell.Eval",
        "global.display.get_size()",
    ]));
    assert_eq!(
        out.expect_success("gdbus call").trim(),
        "(true, '[1024,768]')"
    );
    assert_eq!(
        shell.extension_info("no-such@example.org").state,
        ExtensionState::Unknown
    );
    assert!(
        common::bus::name_has_owner_at(shell.session_address(), "org.kde.StatusNotifierWatcher"),
        "the appindicator extension hosts the watcher"
    );
    assert_eq!(shell.eval("1 + 1"), Ok("2".into()));
    assert!(shell.eval("no_such_thing()").is_err());
    let size: [i32; 2] = shell.eval_json("global.display.get_size()");
    assert_eq!(size, [1024, 768]);
    let roles = shell.status_area_roles();
    assert!(roles.iter().any(|r| r == "quickSettings"), "{roles:?}");

    // Screenshots: the whole screen and a menu.
    shell.tidy_for_screenshot();
    let png = shell.dir().join("screen.png");
    shell.screenshot(&png);
    shell.open_panel_menu("dateMenu");
    let menu_png = shell.dir().join("menu.png");
    shell.screenshot_actor("Main.panel.statusArea.dateMenu.menu.actor", 8, &menu_png);
    assert!(fs::metadata(&menu_png).unwrap().len() > 1000);

    // A helper the shell starts that outlives its parent (double fork) is
    // reaped and killed with the shell, not left to the host's PID 1.
    let pidfile = shell.dir().join("orphan.pid");
    shell
        .eval(&format!(
            "imports.gi.GLib.spawn_command_line_async(\"sh -c 'sleep 600 & echo $! > {}'\")",
            pidfile.display()
        ))
        .unwrap();
    util::wait_until(
        Duration::from_secs(10),
        "the orphan's PID file",
        || fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n')),
        String::new,
    );
    // Its PID in the shell's namespace; find the host PID by the shell's
    // namespace: the only `sleep 600` below the namespace's init. The PID
    // file is written right after the fork, possibly before the child has
    // exec'd `sleep`, so look until it has.
    let shell_pid = shell.pid();
    let ns = fs::read_link(format!("/proc/{shell_pid}/ns/pid")).unwrap();
    let find_orphans = || -> Vec<u32> {
        fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|pid: &u32| {
                fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() == Some(&ns)
                    && fs::read_to_string(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c == "sleep\x00600\x00")
            })
            .collect()
    };
    util::wait_until(
        Duration::from_secs(10),
        "the orphan's `sleep 600` in the shell's namespace",
        || !find_orphans().is_empty(),
        String::new,
    );
    let orphans = find_orphans();
    assert_eq!(orphans.len(), 1, "{orphans:?}");

    // Restart on the same session: the extensions come back.
    shell.restart();
    shell.assert_extension_ok(APPINDICATOR);
    shell.assert_extension_ok("hello@example.org");
    assert!(!util::alive(orphans[0]), "the orphan outlived the shell");

    let status = shell.stop().expect("was running");
    assert!(status.success(), "gnome-shell: {status}\n{}", shell.log());
    assert!(!util::alive(shell_pid));
}

// ---------------------------------------------------------------------------
// The extension.

const UUID: &str = "vmmanager@example.org";
const ROLE: &str = "vmmanager";

const GPU: &str = "0000:01:00.0";
const AUDIO: &str = "0000:01:00.1";
const USB: &str = "0000:00:14.0";
const NIC: &str = "0000:03:00.0";
const VF: &str = "0000:03:02.0";

/// How long the menu may take to show a change (D-Bus round trips).
const SHOW_TIMEOUT: Duration = Duration::from_secs(30);

/// The extension built from desktop/gnome-shell/src by its build script, as
/// `make` builds it; (temp dir, the GNOME 43 build's directory).
fn build_extension() -> (TempDir, PathBuf) {
    let out = util::public_tempdir("vmm-gnome-ext-");
    util::run(
        Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/desktop/gnome-shell/build.py"
            ))
            .arg(out.path()),
    )
    .expect_success("desktop/gnome-shell/build.py");
    let dir = out.path().join("legacy").join(UUID);
    (out, dir)
}

/// A host's worth of devices: a GPU and its audio function sharing IOMMU
/// group 1 on their host drivers, a USB controller without a group, and an
/// SR-IOV NIC on vfio-pci alone in group 5 (ready).
fn host() -> FakeSysfs {
    let fs = FakeSysfs::new();
    fs.device(USB, 0x8086, 0xa36d, 0x0c0330).driver("xhci_hcd");
    fs.device(GPU, 0x10de, 0x1eb8, 0x030000)
        .driver("nvidia")
        .iommu_group(1)
        .names("NVIDIA Corporation", "TU104GL [Tesla T4]");
    fs.device(AUDIO, 0x10de, 0x10f8, 0x040300)
        .driver("snd_hda_intel")
        .iommu_group(1)
        .names("NVIDIA Corporation", "TU104 HD Audio Controller");
    fs.device(NIC, 0x8086, 0x1572, 0x020000)
        .driver("vfio-pci")
        .iommu_group(5)
        .sriov(64, 0)
        .names(
            "Intel Corporation",
            "Ethernet Controller X710 for 10GbE SFP+ with a name long enough to wrap",
        );
    fs.driver_dir("vfio-pci");
    fs
}

/// The device rows of the menu: (address, the row's text, its submenu's
/// texts).
fn device_rows(menu: &[MenuItem]) -> Vec<(String, String, Vec<String>)> {
    menu.iter()
        .filter(|m| m.kind == "PopupSubMenuMenuItem")
        .map(|m| {
            let text = m.text();
            let address = text.split(' ').next().unwrap_or_default().to_owned();
            let details = m.children.iter().map(MenuItem::text).collect();
            (address, text, details)
        })
        .collect()
}

/// The menu's texts after the "Recent disk checks" separator.
fn check_rows(menu: &[MenuItem]) -> Vec<String> {
    menu.iter()
        .map(MenuItem::text)
        .skip_while(|t| t != "Recent disk checks")
        .skip(1)
        .collect()
}

/// Waits until `ok(menu)`; panics with the menu and the shell's log.
#[track_caller]
fn wait_menu(shell: &GnomeShell, what: &str, ok: impl Fn(&[MenuItem]) -> bool) -> Vec<MenuItem> {
    let start = Instant::now();
    loop {
        let menu = shell.panel_menu(ROLE);
        if ok(&menu) {
            return menu;
        }
        assert!(
            start.elapsed() < SHOW_TIMEOUT,
            "timed out waiting for the menu to show {what}; menu:\n{}\nshell log:\n{}",
            dump(&menu),
            shell.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn dump(menu: &[MenuItem]) -> String {
    let mut out = String::new();
    for item in menu {
        out += &format!(
            "{} [{}{}]\n",
            item.text(),
            item.kind,
            if item.sensitive { "" } else { ", insensitive" }
        );
        for child in &item.children {
            out += &format!("    {} [{}]\n", child.text(), child.kind);
        }
    }
    out
}

fn addresses(menu: &[MenuItem]) -> Vec<String> {
    device_rows(menu).into_iter().map(|(a, _, _)| a).collect()
}

fn icon(shell: &GnomeShell) -> String {
    shell.eval_json(&format!(
        "Main.panel.statusArea[{}]._icon.icon_name",
        gnome_shell::js_string(ROLE)
    ))
}

/// `vmctl devices --json`: address → properties.
fn vmctl_devices(bus: &TestBus) -> BTreeMap<String, serde_json::Value> {
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&vmctl_as_root(bus, &["devices", "--json"])).unwrap();
    json.into_iter()
        .map(|d| (d["Address"].as_str().unwrap().to_owned(), d))
        .collect()
}

/// Every device `vmctl devices` lists is in the menu with the same
/// readiness, blockers, driver and names, and nothing else is.
#[track_caller]
fn assert_menu_matches_vmctl(menu: &[MenuItem], bus: &TestBus) {
    let devices = vmctl_devices(bus);
    let rows = device_rows(menu);
    assert_eq!(
        rows.iter().map(|(a, _, _)| a.clone()).collect::<Vec<_>>(),
        devices.keys().cloned().collect::<Vec<_>>(),
        "{}",
        dump(menu)
    );
    for (address, text, details) in rows {
        let d = &devices[&address];
        let all = details.join("\n");
        if d["PassthroughReady"] == true {
            assert!(text.ends_with("— ready for passthrough"), "{text}");
            assert!(all.contains("Ready for passthrough"), "{all}");
        } else {
            assert!(text.contains("— not ready"), "{text}");
            for blocker in d["PassthroughBlockers"].as_array().unwrap() {
                assert!(
                    all.contains(&format!("• {}", blocker.as_str().unwrap())),
                    "{address}: {blocker} missing in {all}"
                );
            }
        }
        // What Detach would refuse for, unless it is on vfio-pci already.
        if !d["Driver"].as_str().unwrap().contains("vfio") {
            for used in d["HostUsers"].as_array().unwrap() {
                let text = used["text"].as_str().unwrap();
                assert!(
                    all.contains(&format!("• {text}")),
                    "{address}: {text} missing in {all}"
                );
            }
        }
        match d["Driver"].as_str().unwrap() {
            "" => assert!(all.contains("No driver"), "{all}"),
            driver => assert!(all.contains(&format!("Driver: {driver} ·")), "{all}"),
        }
        for name in ["VendorName", "DeviceName"] {
            assert!(text.contains(d[name].as_str().unwrap()), "{name}: {text}");
        }
    }
}

/// A process holding `node` open whose command line says QEMU's
/// `-name guest=NAME`, as a VM holding a VFIO group does.
fn vm_holding(node: &Path, name: &str) -> ChildGuard {
    let child = Command::new("python3")
        .args([
            "-c",
            "import sys, time; f = open(sys.argv[1]); print(flush=True); time.sleep(600)",
        ])
        .arg(node)
        .args(["-name", &format!("guest={name},debug-threads=on")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let mut guard = ChildGuard::new(child, "VFIO group holder");
    assert_eq!(util::first_line(&mut guard, Duration::from_secs(10)), "\n");
    guard
}

/// Saves the open menu as PNG in the shell's dir and, when
/// `VMM_GNOME_SCREENSHOT` is set, there too (e.g. docs/gnome-shell-menu.png).
fn screenshot_menu(shell: &GnomeShell) {
    let png = shell.dir().join("menu.png");
    shell.screenshot_actor(
        &format!(
            "Main.panel.statusArea[{}].menu.actor",
            gnome_shell::js_string(ROLE)
        ),
        16,
        &png,
    );
    assert!(
        fs::metadata(&png).unwrap().len() > 5000,
        "an almost empty PNG"
    );
    if let Some(to) = std::env::var_os("VMM_GNOME_SCREENSHOT") {
        fs::copy(&png, &to).unwrap_or_else(|e| panic!("copy to {to:?}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_shows_devices_and_checks_and_follows_the_service() {
    let (_build, extension) = build_extension();
    let fs = host();
    let dev = util::public_tempdir("vmm-dev-");
    fs::create_dir(dev.path().join("vfio")).unwrap();
    fs::write(dev.path().join("vfio/5"), "").unwrap();
    let mut config = DaemonConfig::default()
        .sysfs_root(fs.root())
        .events(EventsSetting::None);
    config.config.devices.udev_data_dir = fs.udev_data_dir();
    config.config.devices.dev_root = dev.path().to_owned();

    // The shell starts before the service, as at a login where nothing
    // has used the service yet.
    // nobody may check their own images: another local user's checks.
    let (bus, polkit) = Polkit::builder()
        .allow_user("org.example.vmmanager.check-disk", "nobody")
        .start_with_bus()
        .await;
    let shell = tokio::task::block_in_place(|| {
        GnomeShell::builder(bus.address())
            .install(&extension)
            .start()
    });
    shell.assert_extension_ok(UUID);
    let menu = wait_menu(&shell, "the service not running", |m| {
        m.first()
            .is_some_and(|i| i.text() == "VM Manager service is not running")
    });
    assert!(device_rows(&menu).is_empty());
    assert!(
        menu.iter()
            .any(|i| i.text() == "Start the service" && i.sensitive)
    );
    assert_eq!(icon(&shell), "computer-symbolic");

    let mut daemon = tokio::task::block_in_place(|| Daemon::start(&bus, &config));
    let menu = wait_menu(&shell, "4 devices", |m| device_rows(m).len() == 4);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(menu[0].text(), format!("VM Manager {version} — running"));
    assert!(!menu.iter().any(|i| i.text() == "Start the service"));
    assert_menu_matches_vmctl(&menu, &bus);
    assert_eq!(addresses(&menu), [USB, GPU, AUDIO, NIC]);

    // A VM holds the NIC's VFIO group: the menu says so once opened (it
    // reads InUseBy then: the property sends no change signals).
    let vm = vm_holding(&dev.path().join("vfio/5"), "win11");
    tokio::task::block_in_place(|| shell.open_panel_menu(ROLE));
    let holder = format!("in use by VM \"win11\" (PID {})", vm.pid());
    let menu = wait_menu(&shell, "the NIC in use", |m| {
        device_rows(m)
            .iter()
            .any(|(a, t, _)| a == NIC && t.ends_with(&holder))
    });
    let (_, _, nic) = device_rows(&menu)
        .into_iter()
        .find(|(a, _, _)| a == NIC)
        .unwrap();
    assert!(
        nic.contains(&format!("In use by VM \"win11\" (PID {})", vm.pid())),
        "{nic:?}"
    );
    assert!(
        nic.contains(&"Reattach to its host driver".to_owned()),
        "{nic:?}"
    );
    shell.close_menus().unwrap();

    // Disk checks made by another client, newest first; a corrupt one
    // needs attention until the menu is opened.
    let images = util::public_tempdir("vmm-gnome-images-");
    let clean = images.path().join("clean.qcow2");
    let corrupt = images.path().join("corrupt.qcow2");
    make_clean_qcow2(&clean);
    make_corrupt_qcow2(&corrupt);
    // Another user's check of their own corrupt image is not shown: it
    // would push this user's checks out and fake a warning. Signals come
    // in order: once the next check shows, this one was passed over.
    let others = images.path().join("others.qcow2");
    make_corrupt_qcow2(&others);
    check_own_disk_as_nobody(&bus, &others).await;
    check_disk_as_root(&bus, &clean).await;
    let menu = wait_menu(&shell, "the clean check", |m| {
        !check_rows(m).is_empty() && !check_rows(m)[0].starts_with("No disk")
    });
    assert!(
        check_rows(&menu)[0].starts_with("clean.qcow2: no errors\n"),
        "{:?}",
        check_rows(&menu)
    );
    assert_eq!(check_rows(&menu).len(), 1, "{:?}", check_rows(&menu));
    assert_eq!(
        icon(&shell),
        "computer-symbolic",
        "a clean check needs no attention"
    );
    check_disk_as_root(&bus, &corrupt).await;
    let menu = wait_menu(&shell, "both checks", |m| check_rows(m).len() == 2);
    let checks = check_rows(&menu);
    assert!(
        checks[0].starts_with("corrupt.qcow2: corrupt, 1 corruption\n"),
        "{checks:?}"
    );
    assert!(
        checks[0].contains(&format!("{} (qcow2) · ", corrupt.display())),
        "{checks:?}"
    );
    assert!(
        checks[1].starts_with("clean.qcow2: no errors\n"),
        "{checks:?}"
    );
    assert_eq!(icon(&shell), "dialog-warning-symbolic");

    // The firmware made the GPU its boot display: HostUsers says so (no
    // change signal), and opening the GPU's submenu reads it again.
    fs.write_attr(GPU, "boot_vga", "1\n");
    // The screenshot for the README: the open menu with the GPU's details.
    tokio::task::block_in_place(|| {
        shell.tidy_for_screenshot();
        open_device_submenu(&shell, GPU);
        let menu = wait_menu(&shell, "the GPU's host uses", |m| {
            row(m, GPU).1.iter().any(|t| {
                t == "Used by the host:\n• it is the boot display (the firmware's console)"
            })
        });
        // The same sentences as vmctl's (the service's).
        let gpu = &vmctl_devices(&bus)[GPU];
        let details = row(&menu, GPU).1.join("\n");
        for used in gpu["HostUsers"].as_array().unwrap() {
            let text = used["text"].as_str().unwrap();
            assert!(
                details.contains(&format!("• {text}")),
                "{text} missing in {details}"
            );
        }
        screenshot_menu(&shell);
        // Long names and blockers wrap: the menu stays narrow (unwrapped,
        // the NIC's name alone made it wider than 700 px).
        let width: f64 = shell.eval_json(&format!(
            "Main.panel.statusArea[{}].menu.actor.width",
            gnome_shell::js_string(ROLE)
        ));
        assert!(width < 600.0, "the menu is {width} px wide");
    });
    assert_eq!(
        icon(&shell),
        "computer-symbolic",
        "seen once the menu was open"
    );
    shell.close_menus().unwrap();

    drop(vm);

    // The service stops: the menu says so and its devices go; the checks
    // of the session stay. A device goes and another comes meanwhile.
    assert!(daemon.sigterm_and_wait().success());
    let menu = wait_menu(&shell, "the service gone", |m| {
        m[0].text() == "VM Manager service is not running" && device_rows(m).is_empty()
    });
    assert_eq!(check_rows(&menu).len(), 2);
    fs.remove(AUDIO);
    fs.add(VF, 0x8086, 0x154c, 0x020000)
        .physfn(NIC)
        .iommu_group(6);
    daemon = tokio::task::block_in_place(|| Daemon::start(&bus, &config));
    let menu = wait_menu(&shell, "the service back with its new devices", |m| {
        addresses(m) == [USB, GPU, NIC, VF]
    });
    assert_menu_matches_vmctl(&menu, &bus);
    let (_, _, vf) = device_rows(&menu)
        .into_iter()
        .find(|(a, _, _)| a == VF)
        .unwrap();
    assert!(vf.contains(&format!("Virtual function of {NIC}")), "{vf:?}");
    assert_eq!(check_rows(&menu).len(), 2);

    // The screen locks (the shell's screen shield pushes this session
    // mode): the extension stays enabled, hidden, and keeps listening; a
    // check finishing meanwhile is there after unlocking, with the older
    // ones and the attention it needs.
    let visible = || -> bool {
        shell.eval_json(&format!(
            "Main.panel.statusArea[{}].visible",
            gnome_shell::js_string(ROLE)
        ))
    };
    assert!(visible());
    shell
        .eval("Main.sessionMode.pushMode('unlock-dialog')")
        .unwrap();
    assert_eq!(shell.extension_info(UUID).state, ExtensionState::Enabled);
    assert!(!visible(), "nothing of it on the lock screen");
    let while_locked = images.path().join("while-locked.qcow2");
    make_corrupt_qcow2(&while_locked);
    check_disk_as_root(&bus, &while_locked).await;
    shell
        .eval("Main.sessionMode.popMode('unlock-dialog')")
        .unwrap();
    assert!(visible());
    let menu = wait_menu(&shell, "the check made while locked", |m| {
        check_rows(m).len() == 3
    });
    let checks = check_rows(&menu);
    assert!(
        checks[0].starts_with("while-locked.qcow2: corrupt, 1 corruption\n")
            && checks[1].starts_with("corrupt.qcow2: ")
            && checks[2].starts_with("clean.qcow2: "),
        "{checks:?}"
    );
    assert_eq!(icon(&shell), "dialog-warning-symbolic");

    shell.assert_extension_ok(UUID);
    assert_no_extension_messages(&shell);
    drop(shell);
    drop(daemon);
    drop(polkit);
}

/// Nothing in the shell's log comes from the extension (a JS error or
/// warning quotes its file).
#[track_caller]
fn assert_no_extension_messages(shell: &GnomeShell) {
    let log = shell.log();
    assert!(!log.contains(&format!("{UUID}/extension.js")), "{log}");
}

fn uevent(action: DeviceAction, address: &str) -> MonitorMessage {
    MonitorMessage::Event(DeviceEvent {
        action,
        address: address.parse::<PciAddress>().unwrap(),
        vendor_name: None,
        device_name: None,
    })
}

/// The row of `address` and its submenu's texts (empty when absent).
fn row(menu: &[MenuItem], address: &str) -> (String, Vec<String>) {
    device_rows(menu)
        .into_iter()
        .find(|(a, _, _)| a == address)
        .map(|(_, text, details)| (text, details))
        .unwrap_or_default()
}

/// Opens the panel menu afresh and in it the submenu of `address` (which
/// makes the extension read what has no change signal).
fn open_device_submenu(shell: &GnomeShell, address: &str) {
    // Closing the menu closes its submenus: the next open is a new one.
    shell.close_menus().unwrap();
    shell.open_panel_menu(ROLE);
    shell.activate_menu_item(ROLE, &[address]).unwrap();
    shell.wait_eval(
        &format!("the submenu of {address} to open"),
        &format!(
            "[...Main.panel.statusArea[{}]._devices.values()] \
             .some(r => r.address === {} && r.item.menu.isOpen)",
            gnome_shell::js_string(ROLE),
            gnome_shell::js_string(address)
        ),
        Duration::from_secs(10),
    );
}

/// Actors on the stage carrying one of the extension's style classes.
fn extension_actors(shell: &GnomeShell) -> usize {
    shell.eval_json(
        "(function count(a) { \
           const own = ['vmmanager-text', 'vmmanager-devices', 'vmmanager-attention'] \
             .some(c => a.has_style_class_name && a.has_style_class_name(c)) ? 1 : 0; \
           return own + a.get_children().reduce((n, c) => n + count(c), 0); })(global.stage)",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_detaches_and_reattaches_and_follows_live_devices() {
    let (_build, extension) = build_extension();
    let fs = host();
    let kernel = FakeKernel::new(&fs.root());
    // The real device service in this process (its sysfs writes go to the
    // fake kernel, its events come from the test), real bus and polkitd.
    let (bus, _polkit) = Polkit::builder().start_with_bus().await;
    let service = InProcService::start(&bus, &fs, &[], kernel.clone()).await;
    let shell = tokio::task::block_in_place(|| {
        GnomeShell::builder(bus.address())
            .install(&extension)
            .start()
    });
    shell.assert_extension_ok(UUID);
    wait_menu(&shell, "4 devices", |m| {
        addresses(m) == [USB, GPU, AUDIO, NIC]
    });

    // Detach both functions of the GPU from the menu.
    shell
        .activate_menu_item(ROLE, &[GPU, "Detach for passthrough"])
        .unwrap();
    // The call returns after the properties changed: "Detaching…" until then.
    let menu = wait_menu(&shell, "the GPU on vfio-pci", |m| {
        let details = row(m, GPU).1;
        details.iter().any(|d| d.starts_with("Driver: vfio-pci"))
            && details.contains(&"Reattach to its host driver".to_owned())
    });
    assert!(row(&menu, GPU).0.ends_with("— not ready"), "{menu:?}");
    shell
        .activate_menu_item(ROLE, &[AUDIO, "Detach for passthrough"])
        .unwrap();
    wait_menu(&shell, "the whole group ready", |m| {
        [GPU, AUDIO]
            .iter()
            .all(|a| row(m, a).0.ends_with("— ready for passthrough"))
    });
    let writes: Vec<String> = kernel
        .take_log()
        .into_iter()
        .map(|(path, _)| path)
        .collect();
    assert!(
        writes.contains(&format!("bus/pci/devices/{GPU}/driver_override")),
        "{writes:?}"
    );
    assert!(
        writes.contains(&format!("bus/pci/devices/{AUDIO}/driver_override")),
        "{writes:?}"
    );
    assert_eq!(icon(&shell), "computer-symbolic");

    // Giving the audio function back costs the GPU its readiness: that
    // needs attention.
    shell
        .activate_menu_item(ROLE, &[AUDIO, "Reattach"])
        .unwrap();
    let menu = wait_menu(&shell, "the GPU no longer ready", |m| {
        row(m, GPU).0.ends_with("— not ready any more")
    });
    assert!(
        row(&menu, AUDIO)
            .1
            .iter()
            .any(|d| d.starts_with("Driver: snd_hda_intel"))
    );
    assert_eq!(icon(&shell), "dialog-warning-symbolic");

    // A Detach that fails shows the service's message on the device.
    let failing = format!("bus/pci/devices/{USB}/driver_override");
    kernel.set(|s| s.fail = Some(failing));
    shell
        .activate_menu_item(ROLE, &[USB, "Detach for passthrough"])
        .unwrap();
    let menu = wait_menu(&shell, "the failed Detach", |m| {
        row(m, USB)
            .1
            .iter()
            .any(|d| d.starts_with("Detach failed: "))
    });
    let failure = row(&menu, USB)
        .1
        .into_iter()
        .find(|d| d.starts_with("Detach failed"))
        .unwrap();
    assert!(failure.contains("driver_override"), "{failure}");
    assert!(
        !failure.contains("org.example.VmManager1.Error"),
        "{failure}"
    );
    kernel.set(|s| s.fail = None);

    // Detached by vmctl to come back after its VM, and claimed at boot:
    // neither property has a change signal, so the submenu reads them when
    // it opens. Reattach takes both away.
    let returns = "Returns to its host driver when its VM stops";
    let claimed = "Claimed for vfio-pci at boot (by VM Manager)";
    let audio_shows = |m: &[MenuItem]| {
        let details = row(m, AUDIO).1;
        [returns, claimed].map(|line| details.iter().any(|d| d == line))
    };
    tokio::task::block_in_place(|| {
        vmctl_as_root(&bus, &["detach", "--auto-return", "--persistent", AUDIO]);
        open_device_submenu(&shell, AUDIO);
        wait_menu(&shell, "the audio function's return and claim", |m| {
            audio_shows(m) == [true, true]
        });
        vmctl_as_root(&bus, &["reattach", "--persistent", AUDIO]);
        open_device_submenu(&shell, AUDIO);
        let menu = wait_menu(&shell, "the audio function back on the host", |m| {
            audio_shows(m) == [false, false]
                && row(m, AUDIO)
                    .1
                    .iter()
                    .any(|d| d.starts_with("Driver: snd_hda_intel"))
        });
        assert!(
            !row(&menu, GPU)
                .1
                .iter()
                .any(|d| d == returns || d == claimed),
            "{}",
            dump(&menu)
        );
        shell.close_menus().unwrap();
    });

    // Hot-plug: a device that comes appears, one that goes disappears.
    fs.add(VF, 0x8086, 0x154c, 0x020000).iommu_group(6);
    service.send(uevent(DeviceAction::Add, VF)).await;
    wait_menu(&shell, "the new device", |m| {
        addresses(m) == [USB, GPU, AUDIO, NIC, VF]
    });
    fs.remove(USB);
    service.send(uevent(DeviceAction::Remove, USB)).await;
    wait_menu(&shell, "the device gone", |m| {
        addresses(m) == [GPU, AUDIO, NIC, VF]
    });

    // disable() (the user turning it off; a screen lock does not disable
    // it) leaves nothing behind and stays deaf to the service; enable()
    // starts over.
    assert!(extension_actors(&shell) > 0);
    shell
        .eval(&format!("Main.extensionManager.disableExtension({UUID:?})"))
        .unwrap();
    assert_eq!(shell.extension_info(UUID).state, ExtensionState::Disabled);
    assert!(!shell.status_area_roles().contains(&ROLE.to_owned()));
    assert_eq!(extension_actors(&shell), 0);
    fs.add(USB, 0x8086, 0xa36d, 0x0c0330).driver("xhci_hcd");
    service.send(uevent(DeviceAction::Add, USB)).await;
    fs.rebind(AUDIO, "vfio-pci");
    service.send(uevent(DeviceAction::Bind, AUDIO)).await;
    let images = util::public_tempdir("vmm-gnome-images-");
    let image = images.path().join("while-disabled.qcow2");
    make_clean_qcow2(&image);
    check_disk_as_root(&bus, &image).await;
    // The service has sent its signals; give a handler left connected the
    // time to run (and fail on destroyed actors, which the log would show).
    let objects = common::bus::managed_objects(&bus.connect().await).await;
    assert_eq!(
        objects
            .keys()
            .filter(|p| p.contains("/devices/pci_"))
            .count(),
        5
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    shell
        .eval(&format!("Main.extensionManager.enableExtension({UUID:?})"))
        .unwrap();
    shell.assert_extension_ok(UUID);
    wait_menu(&shell, "the devices after enable", |m| {
        addresses(m) == [USB, GPU, AUDIO, NIC, VF]
            && row(m, GPU).0.ends_with("— ready for passthrough")
    });
    assert_eq!(
        icon(&shell),
        "computer-symbolic",
        "a new start, nothing seen yet"
    );
    assert_no_extension_messages(&shell);
    drop(shell);
    drop(service);
}

/// The service owns its name but never answers (hung at startup): the
/// extension's first GetManagedObjects times out (25 s). Once that owner is
/// gone and a working service comes, the devices are listed all the same.
/// Then: an image name that is markup shows literally, and idle, the shell
/// makes no call to the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_follows_a_service_that_hung_escapes_names_and_never_polls() {
    let (_build, extension) = build_extension();
    let fs = host();
    let config = DaemonConfig::default()
        .sysfs_root(fs.root())
        .udev_data_dir(fs.udev_data_dir())
        .events(EventsSetting::None);
    let (bus, polkit) = Polkit::builder().start_with_bus().await;
    let mut hung = tokio::task::block_in_place(|| Daemon::start(&bus, &config));
    hung.signal(libc::SIGSTOP);
    let shell = tokio::task::block_in_place(|| {
        GnomeShell::builder(bus.address())
            .install(&extension)
            .start()
    });
    shell.assert_extension_ok(UUID);
    // Past D-Bus's default call timeout (25 s): the extension's first
    // GetManagedObjects has failed.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(device_rows(&shell.panel_menu(ROLE)).is_empty());
    hung.signal(libc::SIGKILL);
    assert!(hung.wait_exit(Duration::from_secs(10)).is_some());
    let daemon = tokio::task::block_in_place(|| Daemon::start(&bus, &config));
    let menu = wait_menu(&shell, "the devices of the working service", |m| {
        addresses(m) == [USB, GPU, AUDIO, NIC]
    });
    assert!(
        !menu.iter().any(|i| i.text().starts_with("Cannot follow")),
        "{}",
        dump(&menu)
    );

    // An image name that is Pango markup shows literally (escaped).
    let images = util::public_tempdir("vmm-gnome-images-");
    let marked_up = images.path().join("a&amp;<b>x.qcow2");
    make_clean_qcow2(&marked_up);
    check_disk_as_root(&bus, &marked_up).await;
    let menu = wait_menu(&shell, "the check of the marked-up name", |m| {
        check_rows(m).len() == 1 && !check_rows(m)[0].starts_with("No disk")
    });
    let check = &check_rows(&menu)[0];
    assert!(
        check.starts_with("a&amp;<b>x.qcow2: no errors\n")
            && check.contains(&format!("{} (qcow2) · ", marked_up.display())),
        "{check:?}"
    );

    // Idle with the menu closed, the shell calls nothing on the service:
    // it never polls. (InUseBy reads on appearing devices are done: the
    // check above came after them.)
    assert!(!device_rows(&menu).is_empty());
    shell.close_menus().unwrap();
    let owner = common::bus::name_owner_at(bus.address(), "org.example.VmManager");
    let monitor =
        tokio::task::block_in_place(|| common::bus::BusMonitor::start(&bus, "type='method_call'"));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let to_service = |messages: Vec<String>| -> Vec<String> {
        messages
            .into_iter()
            .filter(|m| {
                m.starts_with("method call ")
                    && [&owner, "org.example.VmManager"]
                        .iter()
                        .any(|d| m.contains(&format!(" destination={d} ")))
            })
            .collect()
    };
    let calls = to_service(monitor.messages());
    assert!(calls.is_empty(), "the shell polled the service: {calls:#?}");
    // The monitor does see a call to the service (so zero means zero).
    bus.busctl(&[
        "get-property",
        "org.example.VmManager",
        "/org/example/VmManager",
        "org.example.VmManager1",
        "Version",
    ])
    .expect_success("busctl get-property Version");
    util::wait_until(
        Duration::from_secs(10),
        "the monitor to see busctl's call",
        || !to_service(monitor.messages()).is_empty(),
        String::new,
    );
    assert_no_extension_messages(&shell);
    drop(shell);
    drop(daemon);
    drop(polkit);
}
