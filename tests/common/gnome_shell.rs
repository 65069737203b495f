//! A real, headless GNOME Shell (43 on Debian 12) per test, on a private
//! session bus, with the extensions a test asks for.
//!
//! ```ignore
//! let bus = TestBus::start();                       // the shell's "system bus"
//! let mut shell = GnomeShell::builder(bus.address())
//!     .install(Path::new("target/gnome-shell/legacy/vmmanager@example.org"))
//!     .enable("ubuntu-appindicators@ubuntu.com")   // a system extension
//!     .start();                                     // waits for startup and extensions
//! assert_eq!(shell.extension_info(UUID).state, ExtensionState::Enabled);
//! let keys: Vec<String> = shell.eval_json("Object.keys(Main.panel.statusArea)");
//! let menu = shell.panel_menu("vmmanager");         // labels of every item
//! shell.open_panel_menu("vmmanager");
//! shell.screenshot_actor("Main.panel.statusArea['vmmanager'].menu.actor", 12, &png);
//! shell.restart();                                  // same session bus and HOME
//! // dropped: menus closed, shell stopped, helpers killed, dirs removed
//! ```
//!
//! What it sets up (facts measured in ../shared/DESIGN.md):
//! - `gnome-shell --headless --wayland --no-x11 --virtual-monitor WxH
//!   --unsafe-mode`: unsafe mode lets `org.gnome.Shell.Eval` run (the only
//!   way to read what the shell shows) and lets any caller take screenshots.
//! - A private session bus without activation (nothing starts behind the
//!   test's back), its own `HOME`, `XDG_RUNTIME_DIR` (0700),
//!   `XDG_CONFIG_HOME`, `XDG_DATA_HOME`, `XDG_CACHE_HOME`; the environment is
//!   otherwise cleared, so the host's display and buses are never reached.
//! - GSettings through the keyfile backend (`GSETTINGS_BACKEND=keyfile`,
//!   `$XDG_CONFIG_HOME/glib-2.0/settings/keyfile`), written before start:
//!   dconf would need dconf-service activated on the session bus.
//! - `DBUS_SYSTEM_BUS_ADDRESS` = the address given (its logind code needs a
//!   system bus; `Gio.DBus.system` in extensions follows it).
//! - The shell runs in its own PID namespace under `unshare --pid --fork
//!   --kill-child`, with `bash` as the namespace's init: helpers it spawns
//!   and orphans re-parent to that bash, which reaps them, and when the shell
//!   exits (or the test dies) the kernel kills everything left in the
//!   namespace. Nothing re-parents to the host's PID 1.
//! - Stopping closes open menus first (the shell can crash when terminated
//!   with a menu open), then calls `Meta.exit(SUCCESS)` through Eval: on
//!   SIGTERM gnome-shell 43 headless always segfaults in its teardown.
//!   SIGTERM and SIGKILL only follow if it does not exit.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use tempfile::TempDir;

use super::bus::SessionBus;
use super::util::{self, ChildGuard, make_dir, public_tempdir, read_lossy, write_file};

/// The shell came up in 1–5 s when measured; allow for a machine busy with
/// builds and other tests.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(90);

/// How long the shell may take to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The namespace's init: starts the shell, passes SIGTERM on, reaps every
/// child (bash's SIGCHLD handling waits for any PID, orphans included) and
/// exits with the shell's status; the kernel then kills what is left.
const INIT_SCRIPT: &str = r#"trap 'kill -TERM "$shell" 2>/dev/null' TERM
"$@" & shell=$!
wait "$shell"; status=$?
while kill -0 "$shell" 2>/dev/null; do wait "$shell"; status=$?; done
exit "$status""#;

/// `org.gnome.Shell.Extensions` states (js/misc/extensionUtils.js).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtensionState {
    Enabled,
    Disabled,
    Error,
    OutOfDate,
    Downloading,
    Initialized,
    /// No such extension (GetExtensionInfo returns an empty dict).
    Unknown,
    Other(i64),
}

impl ExtensionState {
    fn from_number(n: Option<i64>) -> ExtensionState {
        match n {
            None => ExtensionState::Unknown,
            Some(1) => ExtensionState::Enabled,
            Some(2) => ExtensionState::Disabled,
            Some(3) => ExtensionState::Error,
            Some(4) => ExtensionState::OutOfDate,
            Some(5) => ExtensionState::Downloading,
            Some(6) => ExtensionState::Initialized,
            Some(n) => ExtensionState::Other(n),
        }
    }

    /// Whether the shell has finished with the extension (loaded or not).
    pub fn is_settled(self) -> bool {
        !matches!(
            self,
            ExtensionState::Initialized | ExtensionState::Downloading
        )
    }
}

/// What `GetExtensionInfo` says about one extension.
#[derive(Debug, Clone)]
pub struct ExtensionInfo {
    pub state: ExtensionState,
    /// The load error, "" when none.
    pub error: String,
    /// Every field, as JSON (`uuid`, `path`, `shell-version`, ...).
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// One item of a panel menu, as shown: the text of every label in it, in
/// order; for a submenu, its items.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct MenuItem {
    pub texts: Vec<String>,
    /// Whether it reacts to clicks (headers and details are insensitive).
    pub sensitive: bool,
    /// JS class name, e.g. `PopupMenuItem`, `PopupSubMenuMenuItem`.
    pub kind: String,
    /// Items of a submenu or section, else empty.
    pub children: Vec<MenuItem>,
}

impl MenuItem {
    /// The labels joined with " | ", e.g. `0000:01:00.0 | ready`.
    pub fn text(&self) -> String {
        self.texts.join(" | ")
    }

    /// This item and every item below it, depth first.
    pub fn flatten(&self) -> Vec<&MenuItem> {
        let mut all = vec![self];
        for child in &self.children {
            all.extend(child.flatten());
        }
        all
    }
}

/// Options of a shell not started yet.
pub struct GnomeShellBuilder {
    system_bus: String,
    enabled: Vec<String>,
    installed: Vec<PathBuf>,
    settings: Vec<(String, String, String)>,
    monitor: (u32, u32),
    env: Vec<(OsString, OsString)>,
}

impl GnomeShellBuilder {
    /// Enables an extension the shell finds by itself (e.g. the system's
    /// `ubuntu-appindicators@ubuntu.com`, Debian's
    /// gnome-shell-extension-appindicator).
    pub fn enable(mut self, uuid: &str) -> Self {
        self.enabled.push(uuid.to_owned());
        self
    }

    /// Copies the extension directory `dir` (with its `metadata.json`) to
    /// the private `~/.local/share/gnome-shell/extensions/UUID` and enables it.
    pub fn install(mut self, dir: &Path) -> Self {
        self.installed.push(dir.to_owned());
        self
    }

    /// A GSettings value in GVariant text, e.g.
    /// `.setting("org/gnome/desktop/interface", "clock-show-seconds", "true")`.
    pub fn setting(mut self, path: &str, key: &str, value: &str) -> Self {
        self.settings
            .push((path.to_owned(), key.to_owned(), value.to_owned()));
        self
    }

    /// The virtual monitor's size (default 1280x800).
    pub fn virtual_monitor(mut self, width: u32, height: u32) -> Self {
        self.monitor = (width, height);
        self
    }

    /// An extra variable in the shell's environment.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts the session bus and the shell; returns once the shell has
    /// finished starting up and every enabled extension is settled (enabled
    /// or failed: check with [`GnomeShell::extension_info`]).
    pub fn start(self) -> GnomeShell {
        let dir = public_tempdir("vmm-gnome-shell-");
        let home = dir.path().join("home");
        make_dir(&home, 0o700, None);
        let runtime = dir.path().join("runtime");
        make_dir(&runtime, 0o700, None);
        let mut uuids = self.enabled.clone();
        let extensions = home.join(".local/share/gnome-shell/extensions");
        for source in &self.installed {
            let uuid = extension_uuid(source);
            copy_tree(source, &extensions.join(&uuid));
            uuids.push(uuid);
        }
        let config = dir.path().join("config");
        write_keyfile(&config, &uuids, &self.settings);
        let session_bus = SessionBus::start(dir.path());
        let mut shell = GnomeShell {
            process: None,
            session_bus,
            uuids,
            builder: self,
            dir,
            starts: 0,
        };
        shell.launch();
        shell
    }
}

/// `unshare` (host side) and the namespace's init (bash, the shell's
/// parent), in guards.
struct ShellProcess {
    unshare: ChildGuard,
    /// Host PID of the namespace's init.
    init_pid: u32,
    log: PathBuf,
}

/// A running headless GNOME Shell and its session; everything is stopped
/// and removed on drop.
pub struct GnomeShell {
    // Field order: the shell goes before its session bus and directory.
    process: Option<ShellProcess>,
    session_bus: SessionBus,
    uuids: Vec<String>,
    builder: GnomeShellBuilder,
    dir: TempDir,
    /// How many times the shell was started (logs are shell-N.log).
    starts: u32,
}

impl GnomeShell {
    /// `system_bus`: the address the shell and its extensions get as the
    /// system bus (a [`super::TestBus`]'s).
    pub fn builder(system_bus: &str) -> GnomeShellBuilder {
        GnomeShellBuilder {
            system_bus: system_bus.to_owned(),
            enabled: Vec::new(),
            installed: Vec::new(),
            settings: Vec::new(),
            monitor: (1280, 800),
            env: Vec::new(),
        }
    }

    pub fn session_address(&self) -> &str {
        self.session_bus.address()
    }

    /// The session's private `HOME`.
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// The session's `XDG_RUNTIME_DIR` (0700).
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("runtime")
    }

    /// A temp dir of the session (0755), removed on drop; tests may put files here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `program` with this session's environment (session and system bus,
    /// HOME, XDG dirs, Wayland display), e.g. a tray client.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear();
        for (k, v) in self.environment() {
            cmd.env(k, v);
        }
        cmd.env("WAYLAND_DISPLAY", "wayland-0");
        cmd
    }

    /// The host PID of the shell itself.
    pub fn pid(&self) -> u32 {
        let init = self.process().init_pid;
        children(init)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("the shell is not running\n{}", self.log()))
    }

    /// Whether the shell (its namespace's init) is still running.
    pub fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|p| p.unshare.is_running())
    }

    /// The last shell's stdout and stderr (also after it stopped).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("shell-{}.log", self.starts))
    }

    /// Runs `js` in the shell (`org.gnome.Shell.Eval`): `Ok(JSON text of
    /// the value)` ("" for undefined), or `Err(the exception as text)`.
    pub fn eval(&self, js: &str) -> Result<String, String> {
        let reply = self.call(&[
            "org.gnome.Shell",
            "/org/gnome/Shell",
            "org.gnome.Shell",
            "Eval",
            "s",
            js,
        ])?;
        let text = reply[1].as_str().unwrap_or_default().to_owned();
        match reply[0].as_bool() {
            Some(true) => Ok(text),
            _ => Err(text),
        }
    }

    /// [`eval`](Self::eval) that must succeed, its JSON decoded.
    #[track_caller]
    pub fn eval_json<T: DeserializeOwned>(&self, js: &str) -> T {
        let json = self
            .eval(js)
            .unwrap_or_else(|e| panic!("Eval failed: {e}\ncode: {js}\nshell log:\n{}", self.log()));
        serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("Eval returned {json:?} ({e}) for: {js}"))
    }

    /// Waits until `js` evaluates to `true`; panics after `timeout` with
    /// what it last returned and the shell's log.
    #[track_caller]
    pub fn wait_eval(&self, what: &str, js: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let last = self.eval(js);
            if last.as_deref() == Ok("true") {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\nlast result: {last:?}\n\
                 code: {js}\nshell log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `org.gnome.Shell.Extensions.GetExtensionInfo(uuid)`.
    pub fn extension_info(&self, uuid: &str) -> ExtensionInfo {
        let reply = self.extensions_call("GetExtensionInfo", uuid);
        // busctl's JSON: {"name": {"type": "s", "data": ...}, ...}.
        let fields: serde_json::Map<String, serde_json::Value> = reply[0]
            .as_object()
            .expect("GetExtensionInfo returns a dict")
            .iter()
            .map(|(k, v)| (k.clone(), v["data"].clone()))
            .collect();
        ExtensionInfo {
            state: ExtensionState::from_number(
                fields
                    .get("state")
                    .and_then(|s| s.as_f64())
                    .map(|s| s as i64),
            ),
            error: fields
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or_default()
                .to_owned(),
            fields,
        }
    }

    /// `org.gnome.Shell.Extensions.GetExtensionErrors(uuid)`.
    pub fn extension_errors(&self, uuid: &str) -> Vec<String> {
        serde_json::from_value(self.extensions_call("GetExtensionErrors", uuid)[0].clone())
            .expect("GetExtensionErrors returns strings")
    }

    /// Panics unless the extension is enabled with no errors.
    #[track_caller]
    pub fn assert_extension_ok(&self, uuid: &str) {
        let info = self.extension_info(uuid);
        let errors = self.extension_errors(uuid);
        assert!(
            info.state == ExtensionState::Enabled && info.error.is_empty() && errors.is_empty(),
            "{uuid}: {info:#?}\nerrors: {errors:?}\nshell log:\n{}",
            self.log()
        );
    }

    /// `Main.panel.statusArea`'s keys (roles), e.g. `quickSettings`.
    pub fn status_area_roles(&self) -> Vec<String> {
        self.eval_json("Object.keys(Main.panel.statusArea)")
    }

    /// The items of the menu of the panel button `role`
    /// (`Main.panel.statusArea[role]`), open or not.
    #[track_caller]
    pub fn panel_menu(&self, role: &str) -> Vec<MenuItem> {
        self.eval_json(&format!(
            "{MENU_WALKER}; __vmmMenu(Main.panel.statusArea[{}].menu)",
            js_string(role)
        ))
    }

    /// Opens the menu of panel button `role` without animation.
    #[track_caller]
    pub fn open_panel_menu(&self, role: &str) {
        let role = js_string(role);
        self.eval(&format!(
            "Main.overview.hide(); Main.panel.statusArea[{role}].menu.open(0)"
        ))
        .unwrap_or_else(|e| panic!("open menu {role}: {e}"));
        self.wait_eval(
            "the menu to be open and laid out",
            &format!(
                "(m => m.isOpen && m.actor.visible && m.actor.get_stage() !== null \
                 && m.actor.width > 0)(Main.panel.statusArea[{role}].menu)"
            ),
            Duration::from_secs(10),
        );
    }

    /// Closes every open panel menu (without animation) and the overview.
    pub fn close_menus(&self) -> Result<String, String> {
        self.eval(
            "Object.values(Main.panel.statusArea).forEach(b => { \
               if (b && b.menu && b.menu.isOpen) b.menu.close(0); }); \
             Main.overview.hide(); true",
        )
    }

    /// Hides the overview (shown at startup) and removes notifications
    /// (e.g. "Logged in as a privileged user"), for a clean screenshot.
    pub fn tidy_for_screenshot(&self) {
        self.eval(
            "Main.overview.hide(); \
             Main.messageTray.getSources().forEach(s => s.destroy()); true",
        )
        .unwrap_or_else(|e| panic!("tidy: {e}"));
        self.wait_eval(
            "the overview to be hidden",
            "!Main.overview.visible && !Main.overview.animationInProgress",
            Duration::from_secs(10),
        );
    }

    /// The whole screen as PNG (`org.gnome.Shell.Screenshot.Screenshot`).
    pub fn screenshot(&self, to: &Path) {
        self.screenshot_call("Screenshot", "bbs", &["false", "false"], &absolute(to));
    }

    /// A rectangle of the screen as PNG (`ScreenshotArea`).
    pub fn screenshot_area(&self, x: i32, y: i32, width: i32, height: i32, to: &Path) {
        let [x, y, width, height] = [x, y, width, height].map(|n| n.to_string());
        self.screenshot_call(
            "ScreenshotArea",
            "iiiibs",
            &[&x, &y, &width, &height, "false"],
            &absolute(to),
        );
    }

    /// The box of the actor `actor_js` (e.g.
    /// `Main.panel.statusArea['x'].menu.actor`) widened by `margin` pixels
    /// on each side (within the screen) and joined with the top panel, as PNG.
    pub fn screenshot_actor(&self, actor_js: &str, margin: i32, to: &Path) {
        let [x, y, w, h]: [f64; 4] = self.eval_json(&format!(
            "(a => {{ const [x, y] = a.get_transformed_position(); \
                     const [w, h] = a.get_transformed_size(); return [x, y, w, h]; }})({actor_js})"
        ));
        let (screen_w, screen_h) = (
            f64::from(self.builder.monitor.0),
            f64::from(self.builder.monitor.1),
        );
        let margin = f64::from(margin);
        let left = (x - margin).max(0.0);
        let right = (x + w + margin).min(screen_w);
        let bottom = (y + h + margin).min(screen_h);
        assert!(
            w > 0.0 && h > 0.0,
            "{actor_js} has no size: {w}x{h} at {x},{y}"
        );
        self.screenshot_area(left as i32, 0, (right - left) as i32, bottom as i32, to);
    }

    /// Stops the shell and starts it again on the same session bus, HOME
    /// and settings (e.g. to test a client that must follow the shell);
    /// returns once it and its extensions are up.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Closes menus, then asks the shell to exit (`Meta.exit`); SIGTERM
    /// and at last SIGKILL if it does not within 15 s each. Returns the
    /// shell's exit status, `None` when it was already stopped. Everything
    /// it started dies with its PID namespace.
    ///
    /// Not SIGTERM first: gnome-shell 43 headless segfaults in its teardown
    /// after SIGTERM (and after `global.context.terminate()`), menus closed
    /// or not; `Meta.exit(SUCCESS)` exits with 0. Extensions' `disable()`
    /// does not run either way (test it with `disableExtension`).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut process = self.process.take()?;
        if process.unshare.is_running() {
            // A menu open at exit can crash the shell. The exit call gets no
            // reply (the shell is gone), so its error says nothing.
            let _ = self.close_menus();
            let _ = self.eval("imports.gi.Meta.exit(imports.gi.Meta.ExitCode.SUCCESS)");
        }
        if let Some(status) = process.unshare.wait_timeout(STOP_TIMEOUT) {
            return Some(status);
        }
        eprintln!(
            "gnome-shell did not exit within {STOP_TIMEOUT:?} of Meta.exit; SIGTERM\n{}",
            read_lossy(&process.log)
        );
        // SAFETY: kill(2) on the namespace's init, which cannot have been
        // reaped (and its PID reused) while unshare, its parent, runs.
        if process.unshare.is_running() {
            unsafe { libc::kill(process.init_pid as libc::pid_t, libc::SIGTERM) };
        }
        process
            .unshare
            .wait_timeout(STOP_TIMEOUT)
            .or_else(|| Some(process.unshare.kill_and_wait()))
    }

    fn launch(&mut self) {
        self.starts += 1;
        let log = self.log_path();
        let (width, height) = self.builder.monitor;
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--fork", "--kill-child", "--", "bash", "-c"])
            .arg(INIT_SCRIPT)
            .args(["init", "gnome-shell", "--headless", "--wayland", "--no-x11"])
            .arg("--virtual-monitor")
            .arg(format!("{width}x{height}"))
            .arg("--unsafe-mode")
            .env_clear()
            .envs(self.environment())
            .envs(self.builder.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        let out = File::create(&log).expect("create shell log");
        cmd.stdout(out.try_clone().expect("dup log")).stderr(out);
        let child = cmd.spawn().expect("spawn unshare gnome-shell");
        let mut unshare = ChildGuard::new(child, "unshare gnome-shell");
        let mut init_pid = None;
        util::wait_until(
            Duration::from_secs(10),
            "unshare to fork the namespace's init",
            || {
                assert!(unshare.is_running(), "unshare exited: {}", read_lossy(&log));
                init_pid = children(unshare.pid()).into_iter().next();
                init_pid.is_some()
            },
            || read_lossy(&log),
        );
        self.process = Some(ShellProcess {
            unshare,
            init_pid: init_pid.unwrap(),
            log,
        });
        self.wait_started();
    }

    /// Until the shell owns org.gnome.Shell, has finished starting up, and
    /// each enabled extension is settled.
    fn wait_started(&mut self) {
        let start = Instant::now();
        loop {
            assert!(
                self.is_running(),
                "gnome-shell exited during startup\n{}",
                self.log()
            );
            let started = super::bus::name_has_owner_at(self.session_address(), "org.gnome.Shell")
                && self.eval("Main.layoutManager._startingUp") == Ok("false".into())
                && self
                    .uuids
                    .iter()
                    .all(|uuid| self.extension_info(uuid).state.is_settled());
            if started {
                return;
            }
            assert!(
                start.elapsed() < STARTUP_TIMEOUT,
                "gnome-shell did not finish starting within {STARTUP_TIMEOUT:?}\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn process(&self) -> &ShellProcess {
        self.process.as_ref().expect("the shell is stopped")
    }

    fn environment(&self) -> BTreeMap<&'static str, String> {
        let dir = self.dir.path();
        let path = |p: &str| dir.join(p).display().to_string();
        BTreeMap::from([
            (
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("LANG", "C.UTF-8".into()),
            ("HOME", path("home")),
            ("XDG_RUNTIME_DIR", path("runtime")),
            ("XDG_CONFIG_HOME", path("config")),
            ("XDG_DATA_HOME", path("home/.local/share")),
            ("XDG_CACHE_HOME", path("home/.cache")),
            ("XDG_STATE_HOME", path("home/.local/state")),
            ("GSETTINGS_BACKEND", "keyfile".into()),
            ("DBUS_SESSION_BUS_ADDRESS", self.session_address().into()),
            ("DBUS_SYSTEM_BUS_ADDRESS", self.builder.system_bus.clone()),
        ])
    }

    /// `busctl call ARGS…` on the session bus: the reply's values, or the
    /// error busctl printed (e.g. while the shell is still starting).
    fn call(&self, args: &[&str]) -> Result<Vec<serde_json::Value>, String> {
        let out = util::run(
            Command::new("busctl")
                .arg(format!("--address={}", self.session_address()))
                .args(["--json=short", "--no-pager", "--timeout=30", "call"])
                .args(args),
        );
        if !out.success() {
            return Err(format!("busctl call {args:?}: {}", out.stderr.trim()));
        }
        let json: serde_json::Value = serde_json::from_str(&out.stdout)
            .map_err(|e| format!("busctl printed {:?}: {e}", out.stdout))?;
        json["data"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("no data in {}", out.stdout))
    }

    #[track_caller]
    fn call_ok(&self, args: &[&str]) -> Vec<serde_json::Value> {
        self.call(args)
            .unwrap_or_else(|e| panic!("{e}\nshell log:\n{}", self.log()))
    }

    #[track_caller]
    fn extensions_call(&self, method: &str, uuid: &str) -> Vec<serde_json::Value> {
        self.call_ok(&[
            "org.gnome.Shell",
            "/org/gnome/Shell",
            "org.gnome.Shell.Extensions",
            method,
            "s",
            uuid,
        ])
    }

    #[track_caller]
    fn screenshot_call(&self, method: &str, signature: &str, args: &[&str], to: &Path) {
        let mut all = vec![
            "org.gnome.Shell",
            "/org/gnome/Shell/Screenshot",
            "org.gnome.Shell.Screenshot",
            method,
            signature,
        ];
        all.extend_from_slice(args);
        let to_text = to.display().to_string();
        all.push(&to_text);
        let reply = self.call_ok(&all);
        assert_eq!(
            reply[0].as_bool(),
            Some(true),
            "the shell refused the screenshot: {reply:?}\n{}",
            self.log()
        );
        let size = fs::metadata(to).map(|m| m.len()).unwrap_or(0);
        assert!(size > 0, "screenshot {} is empty", to.display());
    }
}

impl Drop for GnomeShell {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Collects a PopupMenu's items as [`MenuItem`]s: every St.Label's text
/// (visible ones only) in each item, recursing into submenus and sections.
const MENU_WALKER: &str = r#"
var __vmmMenu = function (menu) {
    const labels = actor => {
        if (!actor.visible) return [];
        if (actor.clutter_text !== undefined && typeof actor.get_text === 'function')
            return actor.get_text() ? [actor.get_text()] : [];
        return actor.get_children().flatMap(labels);
    };
    return menu._getMenuItems().map(item => {
        const section = typeof item._getMenuItems === 'function';
        const inner = section ? item : (item.menu && item.menu !== menu ? item.menu : null);
        return {
            texts: section ? [] : labels(item.actor ?? item),
            sensitive: section || (typeof item.getSensitive === 'function' ? item.getSensitive() : true),
            kind: item.constructor.name,
            children: inner ? __vmmMenu(inner) : [],
        };
    });
}"#;

/// `s` as a JavaScript string literal (JSON is valid JS here).
pub fn js_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

fn write_keyfile(config: &Path, uuids: &[String], settings: &[(String, String, String)]) {
    let dir = config.join("glib-2.0/settings");
    fs::create_dir_all(&dir).expect("mkdir glib-2.0/settings");
    let list = uuids
        .iter()
        .map(|u| format!("'{u}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut groups: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    // No welcome tour; the extensions the test wants.
    groups.entry("org/gnome/shell").or_default().extend([
        format!("enabled-extensions=[{list}]"),
        "welcome-dialog-last-shown-version='999'".to_owned(),
    ]);
    for (path, key, value) in settings {
        groups
            .entry(path.as_str())
            .or_default()
            .push(format!("{key}={value}"));
    }
    let text: String = groups
        .iter()
        .map(|(group, lines)| format!("[{group}]\n{}\n\n", lines.join("\n")))
        .collect();
    write_file(&dir.join("keyfile"), text, 0o600);
}

/// The `uuid` of `dir/metadata.json`.
fn extension_uuid(dir: &Path) -> String {
    let path = dir.join("metadata.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    json["uuid"]
        .as_str()
        .unwrap_or_else(|| panic!("{} has no uuid", path.display()))
        .to_owned()
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("mkdir {}: {e}", to.display()));
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The children of process `pid` (from /proc, its main thread's list).
fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}
