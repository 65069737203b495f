//! A private, system-like D-Bus daemon per test, and clients for it; a
//! private session bus.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::util::{
    self, ChildGuard, CmdOutput, NOBODY, command_as, public_tempdir, read_lossy, write_file,
};

/// The project's bus policy, used as-is so tests exercise what ships.
pub const PROJECT_BUS_POLICY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/dbus/org.example.VmManager.conf"
);

/// The host's polkit bus policy (read only).
const POLKIT_BUS_POLICY: &str = "/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf";

/// The longest any test's method call may take: a call that never gets a
/// reply fails the test instead of hanging the suite (no call here takes a
/// minute; a check's own bounds are far shorter).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(180);

/// How long to wait for a bus name to appear or vanish: generous, since
/// polkitd alone took over 15 s to take its name once, on 2 cores busy
/// with builds and TCG guests.
pub const NAME_TIMEOUT: Duration = Duration::from_secs(45);

/// `dbus-daemon` with a system-bus policy (deny own and method calls by
/// default) plus the project's and polkit's policy files, on
/// `unix:path=<tmp>/bus.sock`.
pub struct TestBus {
    // Field order: the daemon dies before its directory is removed.
    child: ChildGuard,
    address: String,
    dir: TempDir,
}

impl TestBus {
    pub fn start() -> TestBus {
        // 0755: polkitd and nobody must reach the socket.
        let dir = public_tempdir("vmm-bus-");
        let sock = dir.path().join("bus.sock");
        // The shipped policy itself, so tests exercise what is installed.
        let project_policy = Path::new(PROJECT_BUS_POLICY);
        assert!(project_policy.exists(), "{PROJECT_BUS_POLICY} is missing");
        let conf = dir.path().join("bus.conf");
        write_file(
            &conf,
            bus_config(&sock, project_policy, Path::new(POLKIT_BUS_POLICY)),
            0o644,
        );
        let stderr_path = dir.path().join("bus.stderr");
        let child = spawn_dbus_daemon(&conf, &sock, &stderr_path, "dbus-daemon");
        let address = format!("unix:path={}", sock.display());
        TestBus {
            child,
            address,
            dir,
        }
    }

    /// `unix:path=…/bus.sock`, for `--bus-address`, `busctl --address` and zbus.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The bus's private temp dir (0755); tests may put files here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILLs and reaps dbus-daemon: every connection to it ends at once,
    /// as when the system bus crashes.
    pub fn kill(&mut self) {
        self.child.kill_and_wait();
    }

    /// dbus-daemon's stderr so far (policy errors show up here).
    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.path().join("bus.stderr"))
    }

    /// `busctl --address=ADDR ARGS…` as root.
    pub fn busctl(&self, args: &[&str]) -> CmdOutput {
        self.busctl_as(None, args)
    }

    /// `busctl` as `nobody` (uid/gid 65534, no supplementary groups).
    pub fn busctl_as_nobody(&self, args: &[&str]) -> CmdOutput {
        self.busctl_as(Some((NOBODY, NOBODY)), args)
    }

    /// `busctl` as `user` = (uid, gid), or root when `None`.
    pub fn busctl_as(&self, user: Option<(u32, u32)>, args: &[&str]) -> CmdOutput {
        busctl_at(&self.address, user, args)
    }

    pub fn name_has_owner(&self, name: &str) -> bool {
        name_has_owner_at(&self.address, name)
    }

    /// Waits until `name` has an owner; panics with `diag()` on timeout or as
    /// soon as `alive` reports the would-be owner gone.
    pub fn wait_for_name(
        &self,
        name: &str,
        mut alive: impl FnMut() -> bool,
        diag: impl FnOnce() -> String,
    ) {
        let start = Instant::now();
        loop {
            if self.name_has_owner(name) {
                return;
            }
            if !alive() {
                // It may have taken the name just before exiting.
                if self.name_has_owner(name) {
                    return;
                }
                panic!("the process that should own {name} exited\n{}", diag());
            }
            if start.elapsed() >= NAME_TIMEOUT {
                panic!(
                    "{name} got no owner on the test bus within {NAME_TIMEOUT:?}\n{}",
                    diag()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_for_name_gone(&self, name: &str) {
        util::wait_until(
            NAME_TIMEOUT,
            &format!("{name} to lose its owner"),
            || !self.name_has_owner(name),
            || self.stderr(),
        );
    }

    /// A typed zbus connection (as root, the test process's uid).
    pub async fn connect(&self) -> zbus::Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .method_timeout(CALL_TIMEOUT)
            .build()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.address))
    }

    /// A zbus connection as `uid`/`gid`: the bus (SO_PEERCRED) and polkit
    /// see that user. The socket is connected on a short-lived thread that
    /// changes only its own credentials (raw `setresuid`, not glibc's
    /// process-wide one), so the rest of the test stays root.
    pub async fn connect_as(&self, uid: u32, gid: u32) -> zbus::Connection {
        let sock = self.dir.path().join("bus.sock");
        let stream = thread::spawn(move || {
            // SAFETY: plain syscalls on this thread's credentials; the thread
            // ends right after connecting, taking the changed ids with it.
            let ok = unsafe {
                libc::syscall(libc::SYS_setresgid, -1i64, i64::from(gid), -1i64) == 0
                    && libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<u32>()) == 0
                    && libc::syscall(libc::SYS_setresuid, -1i64, i64::from(uid), -1i64) == 0
            };
            assert!(
                ok,
                "setresuid/setresgid: {}",
                std::io::Error::last_os_error()
            );
            std::os::unix::net::UnixStream::connect(&sock)
                .unwrap_or_else(|e| panic!("connect to {} as uid {uid}: {e}", sock.display()))
        })
        .join()
        .expect("connecting thread panicked");
        zbus::connection::Builder::unix_stream(stream)
            .user_id(uid)
            .method_timeout(CALL_TIMEOUT)
            .build()
            .await
            .unwrap_or_else(|e| panic!("connect to {} as uid {uid}: {e}", self.address))
    }

    /// A connection held open by another process running as `user`, whose
    /// unique name can serve as a polkit `system-bus-name` subject.
    pub fn idle_client_as(&self, user: Option<(u32, u32)>) -> IdleClient {
        // dbus-monitor stays connected; as non-root its BecomeMonitor is
        // refused and it falls back to an ordinary (harmless) match rule.
        let child = command_as(user, "dbus-monitor")
            .arg("--address")
            .arg(&self.address)
            .arg("type='signal',interface='org.example.HarnessIdle'")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dbus-monitor");
        let mut child = ChildGuard::new(child, "dbus-monitor");
        let pid = child.pid().to_string();
        let mut unique_name = None;
        util::wait_until(
            NAME_TIMEOUT,
            "the idle client's connection",
            || {
                assert!(child.is_running(), "dbus-monitor exited early");
                let out = self.busctl(&["list", "--unique", "--no-legend"]);
                unique_name = out
                    .stdout
                    .lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>())
                    .find(|cols| cols.get(1) == Some(&pid.as_str()))
                    .map(|cols| cols[0].to_owned());
                unique_name.is_some()
            },
            || self.stderr(),
        );
        IdleClient {
            unique_name: unique_name.unwrap(),
            _process: child,
        }
    }
}

/// A bus connection owned by a separate (possibly non-root) process, which
/// lives as long as this value.
pub struct IdleClient {
    pub unique_name: String,
    _process: ChildGuard,
}

/// `busctl --address=ADDRESS ARGS…` as `user` (root when `None`).
pub fn busctl_at(address: &str, user: Option<(u32, u32)>, args: &[&str]) -> CmdOutput {
    let mut cmd = command_as(user, "busctl");
    cmd.arg(format!("--address={address}"))
        .arg("--no-pager")
        .args(args);
    util::run(&mut cmd)
}

/// The unique name owning `name` on the bus at `address`; panics when none.
pub fn name_owner_at(address: &str, name: &str) -> String {
    let out = ask_bus_about(address, "GetNameOwner", name);
    // busctl prints `s ":1.5"`.
    match out.stdout.trim().strip_prefix("s ") {
        Some(owner) if out.success() => owner.trim_matches('"').to_owned(),
        _ => panic!("GetNameOwner({name}) failed: {out:#?}"),
    }
}

/// `busctl call` of the bus's own `method(s name)`, as root.
fn ask_bus_about(address: &str, method: &str, name: &str) -> CmdOutput {
    busctl_at(
        address,
        None,
        &[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            method,
            "s",
            name,
        ],
    )
}

pub fn name_has_owner_at(address: &str, name: &str) -> bool {
    let out = ask_bus_about(address, "NameHasOwner", name);
    match out.stdout.trim() {
        "b true" => true,
        "b false" => false,
        _ => panic!("NameHasOwner({name}) failed: {out:#?}"),
    }
}

/// A private session bus with no activatable services.
pub struct SessionBus {
    _child: ChildGuard,
    address: String,
}

impl SessionBus {
    /// `dbus-daemon` listening on `DIR/session.sock`, logging to
    /// `DIR/session-bus.log`.
    pub fn start(dir: &Path) -> SessionBus {
        let socket = dir.join("session.sock");
        let conf = dir.join("session-bus.conf");
        write_file(&conf, session_bus_config(&socket), 0o644);
        let log = dir.join("session-bus.log");
        let child = spawn_dbus_daemon(&conf, &socket, &log, "session dbus-daemon");
        let address = format!("unix:path={}", socket.display());
        SessionBus {
            _child: child,
            address,
        }
    }

    pub fn address(&self) -> &str {
        &self.address
    }
}

/// `dbus-daemon --config-file=CONF` listening on `socket`, its stderr in
/// `log`; returns once it listens (it prints its address then: read on a
/// thread so a wedged daemon cannot hang the test).
fn spawn_dbus_daemon(conf: &Path, socket: &Path, log: &Path, what: &str) -> ChildGuard {
    let child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .args(["--nofork", "--print-address"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display())))
        .spawn()
        .expect("spawn dbus-daemon");
    let mut child = ChildGuard::new(child, what);
    let printed = util::first_line(&mut child, Duration::from_secs(10));
    let address = format!("unix:path={}", socket.display());
    if !printed.starts_with(&address) {
        panic!(
            "{what} did not start (printed {printed:?}, exit {:?}); stderr:\n{}",
            child.try_wait(),
            read_lossy(log)
        );
    }
    child
}

/// A private session bus config: anyone may own and call anything; no
/// service directories, so nothing is activated.
pub fn session_bus_config(socket: &Path) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
        xml_escape(&socket.display().to_string())
    )
}

/// `s` as XML character data or a double-quoted attribute value.
pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Debian's system.conf default policy minus the parts that need a real
/// system (user switch, fork, activation, syslog, pidfile).
/// The bus configuration template shared with `scripts/run-dev`.
const BUS_CONFIG_TEMPLATE: &str = include_str!("../data/system-bus.conf.in");

fn bus_config(sock: &Path, project_policy: &Path, polkit_policy: &Path) -> String {
    BUS_CONFIG_TEMPLATE
        .replace("@SOCKET@", &xml_escape(&sock.display().to_string()))
        .replace(
            "@PROJECT_POLICY@",
            &xml_escape(&project_policy.display().to_string()),
        )
        .replace(
            "@POLKIT_POLICY@",
            &xml_escape(&polkit_policy.display().to_string()),
        )
}

/// `GetManagedObjects` of the service's ObjectManager.
pub async fn managed_objects(
    connection: &zbus::Connection,
) -> std::collections::HashMap<
    zbus::OwnedObjectPath,
    std::collections::HashMap<
        zbus::names::OwnedInterfaceName,
        std::collections::HashMap<String, zbus::OwnedVariant>,
    >,
> {
    zbus::fdo::ObjectManagerProxy::builder(connection)
        .destination("org.example.VmManager")
        .path("/org/example/VmManager")
        .build()
        .await
        .expect("ObjectManager proxy")
        .get_managed_objects()
        .await
        .expect("GetManagedObjects")
}

/// `dbus-monitor` (as root: a real monitor, which the bus shows every
/// matching message) writing what it sees to a file; killed on drop.
pub struct BusMonitor {
    // Field order: the monitor dies before its directory is removed.
    _child: ChildGuard,
    dir: TempDir,
}

impl BusMonitor {
    /// Starts watching `rule` (a match rule) on `bus`; returns once the bus
    /// has made it a monitor, so nothing sent afterwards is missed.
    pub fn start(bus: &TestBus, rule: &str) -> BusMonitor {
        let dir = public_tempdir("vmm-monitor-");
        let out = dir.path().join("monitor.out");
        let child = Command::new("dbus-monitor")
            .arg("--address")
            .arg(bus.address())
            .arg("--monitor")
            .arg(rule)
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("create monitor.out"))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dbus-monitor");
        let mut child = ChildGuard::new(child, "dbus-monitor");
        // Becoming a monitor drops its unique name: NameLost is printed.
        util::wait_until(
            NAME_TIMEOUT,
            "dbus-monitor to become a monitor",
            || {
                assert!(child.is_running(), "dbus-monitor exited early");
                read_lossy(&out).contains("member=NameLost")
            },
            || bus.stderr(),
        );
        BusMonitor { _child: child, dir }
    }

    /// The messages seen so far, each as dbus-monitor prints it (header
    /// line and arguments).
    pub fn messages(&self) -> Vec<String> {
        let text = read_lossy(&self.dir.path().join("monitor.out"));
        let mut messages: Vec<String> = Vec::new();
        for line in text.lines() {
            let header = ["method call ", "method return ", "error ", "signal "]
                .iter()
                .any(|kind| line.starts_with(kind));
            match messages.last_mut() {
                Some(last) if !header => {
                    last.push('\n');
                    last.push_str(line);
                }
                _ => messages.push(line.to_owned()),
            }
        }
        messages
    }
}
