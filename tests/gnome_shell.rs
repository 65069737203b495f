//! The GNOME Shell extension (`desktop/gnome-shell`) in a real headless
//! GNOME Shell 43, against the real `vmmanagerd` and polkitd on a private
//! system-like bus; and the harness itself ([`common::gnome_shell`]).

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::TestBus;
use common::gnome_shell::{ExtensionState, GnomeShell};
use common::util;

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
    // namespace: the only `sleep 600` below the namespace's init.
    let shell_pid = shell.pid();
    let ns = fs::read_link(format!("/proc/{shell_pid}/ns/pid")).unwrap();
    let orphans: Vec<u32> = fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() == Some(&ns)
                && fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c == "sleep\x00600\x00")
        })
        .collect();
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
