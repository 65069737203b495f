//! `vmmanager-notify`'s tray icon in a real host: headless GNOME Shell 43
//! with gnome-shell-extension-appindicator (Debian 12's
//! `ubuntu-appindicators@ubuntu.com`, which owns
//! `org.kde.StatusNotifierWatcher`), on a private session bus; the service
//! (its device component fed with uevents, on a prepared sysfs tree) and a
//! real polkitd on a private system-like bus.
//!
//! What the host built is read back from the shell (`Eval`: the panel
//! button and the labels of its menu) and compared with what `GetLayout`
//! returns over the bus, as a host asks for it.
//!
//! Set `VMM_TRAY_SCREENSHOT=docs/tray-menu.png` to keep a screenshot of the
//! open menu (the test always takes one and checks it is a non-empty PNG).

use crate::common;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use zbus::message::Type as MessageType;
use zbus::{Connection, MatchRule, MessageStream, OwnedVariant, Variant};

use common::fake_kernel::FakeKernel;
use common::gnome_shell::{GnomeShell, MenuItem, js_string};
use common::images::{make_corrupt_qcow2, make_leaky_qcow2};
use common::inproc::{self, InProcService};
use common::sysfs::FakeSysfs;
use common::util::{self, ChildGuard, public_tempdir, read_lossy};
use common::world::{check_own_disk_as_nobody, vmctl_as_root};
use common::{Polkit, TestBus};
use vmmanager::devices::DeviceAction;
use vmmanager_client::ManagerProxy;

const NOTIFY_BIN: &str = env!("CARGO_BIN_EXE_vmmanager-notify");
const APPINDICATOR: &str = "ubuntu-appindicators@ubuntu.com";
const WATCHER: &str = "org.kde.StatusNotifierWatcher";
const WAIT: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

const GPU: &str = "0000:01:00.0";
const AUDIO: &str = "0000:01:00.1";
const NIC: &str = "0000:02:00.0";

/// The GPU and its audio function in IOMMU group 7, on their host drivers
/// (no underscores in names: the appindicator extension un-escapes only
/// the first `__` of a label).
fn host_tree() -> FakeSysfs {
    let fs = FakeSysfs::new();
    fs.device(GPU, 0x10de, 0x2204, 0x030000)
        .driver("nvidia")
        .iommu_group(7)
        .names("NVIDIA Corporation", "GA102 [GeForce RTX 3090]");
    fs.device(AUDIO, 0x10de, 0x1aef, 0x040300)
        .driver("snd-hda-intel")
        .iommu_group(7)
        .names(
            "NVIDIA Corporation",
            "GA102 High Definition Audio Controller",
        );
    // vfio-pci is loaded (FakeKernel binds through it).
    fs.driver_dir("vfio-pci");
    fs
}

/// GNOME Shell's notification server, which D-Bus activation would start
/// (the test's session bus activates nothing): it owns
/// org.freedesktop.Notifications and hands notifications to the shell.
fn notification_server(shell: &GnomeShell) -> ChildGuard {
    let mut command = shell.command("gjs");
    command
        .arg("/usr/share/gnome-shell/org.gnome.Shell.Notifications")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(shell.dir().join("notifications.log")).unwrap());
    let child = ChildGuard::new(command.spawn().expect("spawn gjs"), "gjs notifications");
    util::wait_until(
        WAIT,
        "org.freedesktop.Notifications on the session bus",
        || common::bus::name_has_owner_at(shell.session_address(), "org.freedesktop.Notifications"),
        || read_lossy(&shell.dir().join("notifications.log")),
    );
    child
}

/// `vmmanager-notify` in the shell's session; killed on drop.
struct Companion {
    child: ChildGuard,
    log: PathBuf,
}

impl Companion {
    fn start(
        system_bus: &str,
        command: std::process::Command,
        dir: &Path,
        extra: &[&str],
    ) -> Companion {
        let log = dir.join(format!("notify-{}.log", std::process::id()));
        let out = File::create(&log).unwrap();
        let mut command = command;
        command
            .arg("--system-bus-address")
            .arg(system_bus)
            .args(extra)
            .env("RUST_LOG", "debug,zbus=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = command.spawn().expect("spawn vmmanager-notify");
        Companion {
            child: ChildGuard::new(child, "vmmanager-notify"),
            log,
        }
    }

    fn output(&self) -> String {
        read_lossy(&self.log)
    }

    fn wait_for_log(&mut self, text: &str) {
        let log = self.log.clone();
        util::wait_until(
            WAIT,
            &format!("vmmanager-notify to log {text:?}"),
            || {
                assert!(
                    self.child.is_running(),
                    "vmmanager-notify exited:\n{}",
                    read_lossy(&log)
                );
                read_lossy(&log).contains(text)
            },
            || read_lossy(&log),
        );
    }

    fn sigterm_and_wait(&mut self) -> std::process::ExitStatus {
        self.child.signal(libc::SIGTERM);
        self.child
            .wait_timeout(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("vmmanager-notify ignored SIGTERM:\n{}", self.output()))
    }
}

async fn session(shell: &GnomeShell) -> Connection {
    zbus::connection::Builder::address(shell.session_address())
        .build()
        .await
        .expect("connect to the shell's session bus")
}

async fn property(
    connection: &Connection,
    destination: &str,
    path: &str,
    interface: &str,
    name: &str,
) -> zbus::Result<OwnedVariant> {
    let args = (interface, name);
    let call = connection.call_method(
        Some(destination),
        path,
        Some("org.freedesktop.DBus.Properties"),
        "Get",
        &args,
    );
    // A peer that never answers fails the test instead of hanging it.
    let reply = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| {
            zbus::Error::Failure(format!("Get {name}: no answer in {CALL_TIMEOUT:?}"))
        })??;
    reply.body().deserialize()
}

/// A property of the StatusNotifierItem that `owner` serves.
async fn item_property(
    connection: &Connection,
    owner: &str,
    name: &str,
) -> zbus::Result<OwnedVariant> {
    property(
        connection,
        owner,
        "/StatusNotifierItem",
        "org.kde.StatusNotifierItem",
        name,
    )
    .await
}

async fn registered(connection: &Connection) -> Vec<String> {
    match property(
        connection,
        WATCHER,
        "/StatusNotifierWatcher",
        WATCHER,
        "RegisteredStatusNotifierItems",
    )
    .await
    {
        Ok(value) => Vec::<String>::try_from(value).unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Waits until the watcher lists an item of the companion's; returns it
/// (`:1.N@/StatusNotifierItem`).
async fn wait_registered(connection: &Connection, companion: &Companion) -> String {
    let start = Instant::now();
    loop {
        if let Some(item) = registered(connection)
            .await
            .into_iter()
            .find(|i| i.ends_with("@/StatusNotifierItem"))
        {
            return item;
        }
        assert!(
            start.elapsed() < WAIT,
            "the tray icon was not registered within {WAIT:?}\ncompanion:\n{}",
            companion.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The host has our item once: registered by us, not also found by its
/// scan of the bus for unregistered items (which would name it by another
/// of the connection's names and show a second icon).
async fn assert_one_icon(shell: &GnomeShell, connection: &Connection, item: &str) {
    assert_eq!(registered(connection).await, [item]);
    let roles: Vec<String> = blocking(|| shell.status_area_roles())
        .into_iter()
        .filter(|r| r.starts_with("appindicator-"))
        .collect();
    assert_eq!(roles, [role(item)]);
}

/// `GetLayout(0, -1, [])` as a host calls it: the labels, depth first,
/// un-escaped ("" for a separator).
async fn layout_labels(connection: &Connection, owner: &str) -> Vec<String> {
    let args = (0i32, -1i32, Vec::<String>::new());
    let call = connection.call_method(
        Some(owner),
        "/MenuBar",
        Some("com.canonical.dbusmenu"),
        "GetLayout",
        &args,
    );
    let reply = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .expect("GetLayout answers")
        .expect("GetLayout");
    type Node = (i32, HashMap<String, OwnedVariant>, Vec<OwnedVariant>);
    let (_revision, root): (u32, Node) = reply.body().deserialize().expect("u(ia{sv}av)");
    fn walk(fields: &[Variant<'_>], out: &mut Vec<String>) {
        let Variant::Array(children) = &fields[2] else {
            panic!("children are {:?}", fields[2]);
        };
        for child in children.iter() {
            let child = match child {
                Variant::Variant(inner) => &**inner,
                other => other,
            };
            let Variant::Structure(s) = child else {
                panic!("a child is {child:?}");
            };
            let Variant::Dict(props) = &s.fields()[1] else {
                panic!("props are {:?}", s.fields()[1]);
            };
            let label: Option<String> = props.get(&"label").ok().flatten();
            out.push(label.unwrap_or_default().replace("__", "_"));
            walk(s.fields(), out);
        }
    }
    let (id, props, children) = root;
    let fields = [
        Variant::from(id),
        Variant::from(props),
        Variant::from(children),
    ];
    let mut out = Vec::new();
    walk(&fields, &mut out);
    out
}

/// Every label the shell shows in the menu, depth first ("" for a
/// separator).
fn shell_labels(menu: &[MenuItem]) -> Vec<String> {
    menu.iter()
        .flat_map(|m| m.flatten())
        .map(|m| m.text())
        .collect()
}

fn has(labels: &[String], text: &str) -> bool {
    labels.iter().any(|l| l == text)
}

/// The shell's panel role of the companion's indicator.
fn role(item: &str) -> String {
    format!("appindicator-{item}")
}

/// Waits until the shell's menu of `item` satisfies `ok`; returns it.
fn wait_menu(
    shell: &GnomeShell,
    companion: &Companion,
    item: &str,
    what: &str,
    ok: impl Fn(&[String]) -> bool,
) -> Vec<MenuItem> {
    let start = Instant::now();
    loop {
        let roles = shell.status_area_roles();
        if roles.contains(&role(item)) {
            let menu = shell.panel_menu(&role(item));
            if ok(&shell_labels(&menu)) {
                return menu;
            }
            assert!(
                start.elapsed() < WAIT,
                "the shell's menu never showed {what}: {:#?}\ncompanion:\n{}",
                shell_labels(&menu),
                companion.output()
            );
        } else {
            assert!(
                start.elapsed() < WAIT,
                "the shell shows no indicator {item} (roles {roles:?})\n{}",
                shell.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Clicks the menu item labelled `label` in the shell, as a pointer would
/// (`activate` with a real event: the extension reads its time).
fn click(shell: &GnomeShell, item: &str, label: &str) {
    let js = format!(
        "(() => {{ const find = m => {{ for (const i of m._getMenuItems()) {{ \
             if (i.label && i.label.get_text() === {label}) return i; \
             if (i.menu && i.menu !== m) {{ const f = find(i.menu); if (f) return f; }} }} \
             return null; }}; \
           const item = find(Main.panel.statusArea[{role}].menu); \
           if (!item) throw new Error('no item ' + {label}); \
           const event = imports.gi.Clutter.Event.new(imports.gi.Clutter.EventType.BUTTON_RELEASE); \
           item.activate(event); return true; }})()",
        label = js_string(label),
        role = js_string(&role(item)),
    );
    shell
        .eval(&js)
        .unwrap_or_else(|e| panic!("click {label:?}: {e}\n{}", shell.log()));
}

/// The titles of the notifications the shell has.
fn shell_notifications(shell: &GnomeShell) -> Vec<String> {
    shell.eval_json(
        "Main.messageTray.getSources().flatMap(s => s.notifications.map(n => n.title + ': ' + n.bannerBodyText))",
    )
}

/// Subscribes to the menu's LayoutUpdated from `owner`.
async fn layout_updates(connection: &Connection, owner: &str) -> MessageStream {
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender(owner.to_owned())
        .interface("com.canonical.dbusmenu")
        .member("LayoutUpdated")
        .build()
        .expect("a valid rule");
    MessageStream::for_match_rule(rule, connection, None)
        .await
        .expect("subscribe to LayoutUpdated")
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tray_icon_in_gnome_shell_shows_devices_and_checks_and_follows_the_host() {
    let fs = host_tree();
    let (bus, polkit) = tokio::task::spawn_blocking(|| {
        let bus = TestBus::start();
        // nobody may check their own images: another local user's checks.
        let polkit = Polkit::builder()
            .allow_user("org.example.vmmanager.check-disk", "nobody")
            .start(&bus);
        (bus, polkit)
    })
    .await
    .unwrap();
    let mut polkit = Some(polkit);
    // /dev with the group's node, which a "VM" will hold open.
    let dev = tempfile::tempdir().unwrap();
    std::fs::create_dir(dev.path().join("vfio")).unwrap();
    let group_node = dev.path().join("vfio/7");
    std::fs::write(&group_node, "").unwrap();
    let config = inproc::config(&fs, dev.path(), &[]);
    let service = InProcService::start_with(&bus, &config, FakeKernel::new(&fs.root()), dev).await;
    let mut shell = blocking(|| {
        GnomeShell::builder(bus.address())
            .enable(APPINDICATOR)
            .start()
    });
    blocking(|| shell.assert_extension_ok(APPINDICATOR));
    let _notifications = blocking(|| notification_server(&shell));
    let dir = public_tempdir("vmm-tray-");
    let mut companion = Companion::start(bus.address(), shell.command(NOTIFY_BIN), dir.path(), &[]);
    companion.wait_for_log("following org.example.VmManager");
    let session = session(&shell).await;

    // It registers, and the extension shows it with the devices.
    let item = wait_registered(&session, &companion).await;
    let owner = item.split('@').next().unwrap().to_owned();
    let version = env!("CARGO_PKG_VERSION");
    let gpu_title = format!("{GPU} GA102 [GeForce RTX 3090] — not ready");
    let menu = blocking(|| {
        wait_menu(&shell, &companion, &item, "the devices", |labels| {
            has(labels, &gpu_title)
        })
    });
    assert_one_icon(&shell, &session, &item).await;
    let labels = shell_labels(&menu);
    let running = format!("VM Manager {version} is running");
    assert_eq!(
        labels[..4],
        [running.as_str(), "", "PCI devices (2)", gpu_title.as_str()],
        "{labels:#?}"
    );
    let gpu = menu.iter().find(|m| m.text() == gpu_title).unwrap();
    assert_eq!(gpu.kind, "PopupSubMenuMenuItem");
    let gpu_items: Vec<String> = gpu.children.iter().map(MenuItem::text).collect();
    assert_eq!(
        gpu_items,
        [
            "NVIDIA Corporation GA102 [GeForce RTX 3090]",
            "Not ready for passthrough",
            "• bound to nvidia, not vfio-pci",
            "• 0000:01:00.1 in the same IOMMU group is bound to snd-hda-intel",
            "Driver: nvidia",
            "IOMMU group 7 (2 devices)",
            "",
            "Detach for passthrough (bind to vfio-pci)",
        ],
        "{gpu:#?}"
    );
    assert!(!menu[0].sensitive, "the service line is a header");
    assert!(gpu.children.last().unwrap().sensitive);
    // The host shows what a host reads with GetLayout.
    assert_eq!(layout_labels(&session, &owner).await, labels);

    // A device appears: LayoutUpdated, and the shell's menu lists it.
    let mut updates = layout_updates(&session, &owner).await;
    fs.add(NIC, 0x8086, 0x1572, 0x020000)
        .driver("i40e")
        .iommu_group(9);
    service.uevent(DeviceAction::Add, NIC).await;
    let signal = tokio::time::timeout(WAIT, updates.next())
        .await
        .unwrap_or_else(|_| panic!("no LayoutUpdated\n{}", companion.output()))
        .unwrap()
        .unwrap();
    let (revision, parent): (u32, i32) = signal.body().deserialize().unwrap();
    assert_eq!(parent, 0);
    assert!(revision > 1, "{revision}");
    let nic_title = format!("{NIC} — not ready");
    let menu = blocking(|| {
        wait_menu(&shell, &companion, &item, "the new device", |labels| {
            has(labels, &nic_title) && has(labels, "PCI devices (3)")
        })
    });
    assert_eq!(layout_labels(&session, &owner).await, shell_labels(&menu));

    // Another user's check of their own corrupt image: neither listed nor
    // a reason for attention (DiskChecked reaches everyone). Signals come
    // in order: once the next check shows, this one was passed over.
    let images = public_tempdir("vmm-tray-images-");
    let others = images.path().join("others.qcow2");
    make_corrupt_qcow2(&others);
    check_own_disk_as_nobody(&bus, &others).await;

    // A disk check with leaks: listed, and the icon asks for attention.
    let image = images.path().join("leaky.qcow2");
    make_leaky_qcow2(&image);
    let client = bus.connect().await;
    let manager = ManagerProxy::new(&client).await.unwrap();
    let _ = manager
        .check_disk(image.to_str().unwrap(), HashMap::<&str, Variant<'_>>::new())
        .await;
    blocking(|| {
        wait_menu(&shell, &companion, &item, "the disk check", |labels| {
            has(labels, "Disk has leaked clusters: leaky.qcow2")
                && has(labels, "leaky.qcow2 has leaked clusters")
        })
    });
    let labels = layout_labels(&session, &owner).await;
    assert!(
        !labels.iter().any(|l| l.contains("others.qcow2")),
        "{labels:#?}"
    );
    let status = item_property(&session, &owner, "Status").await.unwrap();
    assert_eq!(String::try_from(status).unwrap(), "NeedsAttention");
    let shown_status: String = blocking(|| {
        shell.eval_json(&format!(
            "Main.panel.statusArea[{}]._indicator.status",
            js_string(&role(&item))
        ))
    });
    assert_eq!(shown_status, "NeedsAttention");

    // Detach from the shell's menu: as root, polkit allows it; the device
    // moves to vfio-pci and the menu offers Reattach.
    blocking(|| click(&shell, &item, "Detach for passthrough (bind to vfio-pci)"));
    let menu = blocking(|| {
        wait_menu(&shell, &companion, &item, "the detached GPU", |labels| {
            has(labels, "Driver: vfio-pci") && has(labels, "Reattach to the host driver")
        })
    });
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("vfio-pci"));
    let gpu = menu.iter().find(|m| m.text().starts_with(GPU)).unwrap();
    let gpu_items: Vec<String> = gpu.children.iter().map(MenuItem::text).collect();
    assert!(
        gpu_items.iter().any(|t| t == "Reattach to the host driver")
            && !gpu_items.iter().any(|t| t.starts_with("Detach")),
        "{gpu_items:#?}"
    );

    // A process holds the group open. Nothing signals that (InUseBy is
    // computed when read): opening the menu makes the companion re-read
    // it (AboutToShow), and the menu says who, greying out Reattach.
    let mut holder = util::hold_open(&group_node, false);
    let held = format!("In use by PID {}", holder.pid());
    blocking(|| shell.open_panel_menu(&role(&item)));
    let menu = blocking(|| {
        wait_menu(&shell, &companion, &item, "who holds the GPU", |labels| {
            has(labels, &held)
        })
    });
    let gpu = menu.iter().find(|m| m.text().starts_with(GPU)).unwrap();
    assert!(
        gpu.text()
            .ends_with(&format!("in use by PID {}", holder.pid())),
        "{gpu:#?}"
    );
    let reattach = gpu
        .children
        .iter()
        .find(|m| m.text() == "Reattach to the host driver")
        .unwrap();
    assert!(!reattach.sensitive, "{gpu:#?}");
    blocking(|| shell.close_menus().unwrap());
    holder.kill_and_wait();

    // The screenshot: the menu open with the GPU's submenu (opening it
    // re-reads the holders: nobody now).
    blocking(|| {
        shell.tidy_for_screenshot();
        shell.open_panel_menu(&role(&item));
        wait_menu(&shell, &companion, &item, "the GPU free again", |labels| {
            !labels.iter().any(|l| l.starts_with("In use by"))
                && labels
                    .iter()
                    .any(|l| l.starts_with(GPU) && l.ends_with("— not ready"))
        });
        let gpu_submenu = format!(
            "Main.panel.statusArea[{}].menu._getMenuItems().find(i => i.label && \
             i.label.get_text().startsWith({}))",
            js_string(&role(&item)),
            js_string(GPU)
        );
        shell
            .eval(&format!("{gpu_submenu}.setSubmenuShown(true); true"))
            .expect("open the GPU's submenu");
        shell.wait_eval(
            "the GPU's submenu to be open",
            &format!("{gpu_submenu}.menu.isOpen"),
            WAIT,
        );
        std::thread::sleep(Duration::from_millis(500));
        let png = match std::env::var_os("VMM_TRAY_SCREENSHOT") {
            Some(to) => PathBuf::from(to),
            None => dir.path().join("tray-menu.png"),
        };
        shell.screenshot_actor(
            &format!(
                "Main.panel.statusArea[{}].menu.actor",
                js_string(&role(&item))
            ),
            12,
            &png,
        );
        assert!(
            std::fs::metadata(&png).unwrap().len() > 1000,
            "{}",
            png.display()
        );
        shell.close_menus().unwrap();
    });

    // Detached by vmctl to come back after its VM, and claimed at boot:
    // neither property has a change signal, so opening the menu re-reads
    // them (AboutToShow). Reattach takes both away.
    let returns = "Returns to its host driver when its VM stops";
    let claimed = "Claimed for vfio-pci at boot (by VM Manager)";
    blocking(|| {
        vmctl_as_root(&bus, &["detach", "--auto-return", "--persistent", AUDIO]);
        shell.open_panel_menu(&role(&item));
        let menu = wait_menu(
            &shell,
            &companion,
            &item,
            "the audio function's return and claim",
            |labels| has(labels, returns) && has(labels, claimed),
        );
        let audio = menu.iter().find(|m| m.text().starts_with(AUDIO)).unwrap();
        let audio_items: Vec<String> = audio.children.iter().map(MenuItem::text).collect();
        assert!(
            has(&audio_items, returns) && has(&audio_items, claimed),
            "{audio_items:#?}"
        );
        shell.close_menus().unwrap();
        vmctl_as_root(&bus, &["reattach", "--persistent", AUDIO]);
        shell.open_panel_menu(&role(&item));
        wait_menu(
            &shell,
            &companion,
            &item,
            "the audio function back on the host",
            |labels| !has(labels, returns) && !has(labels, claimed),
        );
        shell.close_menus().unwrap();
    });

    // Without polkitd the service refuses (fails closed): the failure is a
    // notification in the shell.
    drop(polkit.take());
    blocking(|| click(&shell, &item, "Reattach to the host driver"));
    let failed = format!("Reattach failed: {GPU}");
    blocking(|| {
        shell.wait_eval(
            "the failure notification",
            &format!(
                "Main.messageTray.getSources().some(s => s.notifications.some(n => n.title === {}))",
                js_string(&failed)
            ),
            WAIT,
        )
    });
    let notes = blocking(|| shell_notifications(&shell));
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with(&failed) && n.contains("polkit")),
        "{notes:#?}"
    );
    assert_eq!(fs.driver_of(GPU).as_deref(), Some("vfio-pci"));

    // The host goes and comes back: the extension disabled and enabled…
    blocking(|| {
        shell
            .eval(&format!(
                "Main.extensionManager.disableExtension({0}); \
                 Main.extensionManager.enableExtension({0}); true",
                js_string(APPINDICATOR)
            ))
            .unwrap()
    });
    companion.wait_for_log("org.kde.StatusNotifierWatcher appeared");
    let again = wait_registered(&session, &companion).await;
    assert_eq!(again, item);
    assert_one_icon(&shell, &session, &item).await;
    blocking(|| {
        wait_menu(
            &shell,
            &companion,
            &item,
            "the devices after the extension came back",
            |l| has(l, &nic_title),
        )
    });
    // …and the whole shell restarted.
    blocking(|| shell.restart());
    let again = wait_registered(&session, &companion).await;
    assert_eq!(again, item);
    assert_one_icon(&shell, &session, &item).await;
    let menu = blocking(|| {
        wait_menu(
            &shell,
            &companion,
            &item,
            "the devices after the shell restarted",
            |l| has(l, &nic_title),
        )
    });
    assert_eq!(layout_labels(&session, &owner).await, shell_labels(&menu));

    // SIGTERM: the companion leaves, and the icon with it.
    assert!(
        companion.sigterm_and_wait().success(),
        "{}",
        companion.output()
    );
    let start = Instant::now();
    while !registered(&session).await.is_empty() {
        assert!(
            start.elapsed() < WAIT,
            "the icon stayed after the companion left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(service);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_tray_host_or_with_no_tray_it_runs_quietly() {
    use common::bus::SessionBus;

    let fs = host_tree();
    let bus = tokio::task::spawn_blocking(TestBus::start).await.unwrap();
    let service = InProcService::start(&bus, &fs, &[], FakeKernel::new(&fs.root())).await;
    let dir = public_tempdir("vmm-tray-quiet-");
    let session_bus = SessionBus::start(dir.path());
    let session = zbus::connection::Builder::address(session_bus.address())
        .build()
        .await
        .unwrap();
    let command = |dir: &Path| {
        let mut c = std::process::Command::new(NOTIFY_BIN);
        c.env_clear()
            .env("DBUS_SESSION_BUS_ADDRESS", session_bus.address())
            .env("HOME", dir);
        c
    };

    // No watcher: the item is served, waits, and nothing is logged above
    // debug about it.
    let mut companion = Companion::start(bus.address(), command(dir.path()), dir.path(), &[]);
    companion.wait_for_log("following org.example.VmManager");
    companion.wait_for_log("no org.kde.StatusNotifierWatcher on the session bus");
    let owner = wait_for_owner(&session, "org.example.VmManager.Notify").await;
    let id = item_property(&session, &owner, "Id")
        .await
        .expect("the item is served");
    assert_eq!(String::try_from(id).unwrap(), "vmmanager-notify");
    let labels = layout_labels(&session, &owner).await;
    assert!(has(&labels, "PCI devices (2)"), "{labels:?}");
    let output = companion.output();
    for line in output.lines() {
        assert!(
            !(line.contains(" WARN ") || line.contains(" ERROR ")),
            "a warning without a tray host: {line}\n{output}"
        );
    }
    assert!(
        companion.sigterm_and_wait().success(),
        "{}",
        companion.output()
    );

    // --no-tray: no item at all.
    let mut companion = Companion::start(
        bus.address(),
        command(dir.path()),
        dir.path(),
        &["--no-tray"],
    );
    companion.wait_for_log("following org.example.VmManager");
    companion.wait_for_log("tray icon turned off");
    let owner = wait_for_owner(&session, "org.example.VmManager.Notify").await;
    let err = item_property(&session, &owner, "Id")
        .await
        .expect_err("no item with --no-tray");
    assert!(
        err.to_string().contains("UnknownObject") || err.to_string().contains("Unknown"),
        "{err}"
    );
    assert!(
        companion.sigterm_and_wait().success(),
        "{}",
        companion.output()
    );
    drop(service);
}

/// The unique name owning `name` on `connection`'s bus, once it is owned.
async fn wait_for_owner(connection: &Connection, name: &str) -> String {
    let dbus = zbus::fdo::DBusProxy::new(connection).await.unwrap();
    let start = Instant::now();
    loop {
        if let Ok(owner) = dbus
            .get_name_owner(zbus::names::BusName::try_from(name).unwrap())
            .await
        {
            return owner.to_string();
        }
        assert!(start.elapsed() < WAIT, "nobody owns {name}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
