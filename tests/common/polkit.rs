//! A real polkitd per test, seeing the project's actions and per-test rules.

use std::fs::{self, File};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::bus::{TestBus, busctl_at, name_has_owner_at};
use super::util::{self, ChildGuard, public_tempdir, read_lossy, write_file};

/// The project's polkit actions, used as-is so tests exercise what ships.
pub const PROJECT_POLKIT_POLICY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/polkit/org.example.vmmanager.policy"
);

pub const POLKIT_NAME: &str = "org.freedesktop.PolicyKit1";

const POLKITD: &str = "/usr/lib/polkit-1/polkitd";

/// Bind the two directories polkitd reads over the host's, in a private mount
/// namespace that disappears with polkitd; `$1` = actions, `$2` = rules.
const POLKITD_SCRIPT: &str = "mount --bind \"$1\" /usr/share/polkit-1/actions \
    && mount --bind \"$2\" /etc/polkit-1/rules.d \
    && exec /usr/lib/polkit-1/polkitd --no-debug";

/// polkit's answer to CheckAuthorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthResult {
    pub authorized: bool,
    pub challenge: bool,
}

#[derive(Default)]
pub struct PolkitBuilder {
    rules: Vec<String>,
    admins: Vec<String>,
}

impl PolkitBuilder {
    /// Adds one JavaScript rule, e.g.
    /// `polkit.addRule(function(action, subject) { ... });`.
    pub fn rule(mut self, js: impl Into<String>) -> Self {
        self.rules.push(js.into());
        self
    }

    /// Adds a rule that answers YES for `action` when the subject is `user`.
    pub fn allow_user(self, action: &str, user: &str) -> Self {
        self.rule(format!(
            "polkit.addRule(function(action, subject) {{ \
             if (action.id == {action:?} && subject.user == {user:?}) \
             return polkit.Result.YES; }});"
        ))
    }

    /// The administrators an `auth_admin` action asks for, e.g.
    /// `unix-user:root`, instead of the host's default (Debian: the sudo
    /// group, or root when it is empty).
    pub fn admin(mut self, identity: &str) -> Self {
        self.admins.push(identity.to_owned());
        self
    }

    /// A new [`TestBus`] and this polkitd on it, started off the async
    /// workers (both block while they come up).
    pub async fn start_with_bus(self) -> (TestBus, Polkit) {
        tokio::task::spawn_blocking(move || {
            let bus = TestBus::start();
            let polkit = self.start(&bus);
            (bus, polkit)
        })
        .await
        .expect("start the bus and polkitd")
    }

    pub fn start(self, bus: &TestBus) -> Polkit {
        let dir = public_tempdir("vmm-polkit-");
        let actions = dir.path().join("actions");
        let rules = dir.path().join("rules");
        for d in [&actions, &rules] {
            fs::create_dir(d).expect("mkdir");
            util::set_mode(d, 0o755);
        }
        let policy = actions.join("org.example.vmmanager.policy");
        fs::copy(PROJECT_POLKIT_POLICY, &policy)
            .unwrap_or_else(|e| panic!("copy {PROJECT_POLKIT_POLICY}: {e}"));
        // polkitd runs as the polkitd user and must read it.
        util::set_mode(&policy, 0o644);
        write_file(
            &rules.join("50-test.rules"),
            self.rules.join("\n") + "\n",
            0o644,
        );
        if !self.admins.is_empty() {
            // Sorts before the host's 50-default.rules, whose admin rule
            // would answer first.
            write_file(
                &rules.join("10-test-admins.rules"),
                format!(
                    "polkit.addAdminRule(function(action, subject) {{ return {:?}; }});\n",
                    self.admins
                ),
                0o644,
            );
        }

        let stderr_path = dir.path().join("polkitd.stderr");
        let log = File::create(&stderr_path).expect("create polkitd.stderr");
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(POLKITD_SCRIPT)
            .arg("sh")
            .arg(&actions)
            .arg(&rules)
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn unshare polkitd");
        let mut child = ChildGuard::new(child, "polkitd");
        bus.wait_for_name(
            POLKIT_NAME,
            || child.is_running(),
            || {
                format!(
                    "polkitd ({POLKITD}) stderr:\n{}\ndbus-daemon stderr:\n{}",
                    read_lossy(&stderr_path),
                    bus.stderr()
                )
            },
        );
        Polkit {
            child,
            address: bus.address().to_owned(),
            dir,
        }
    }
}

/// polkitd on a [`TestBus`]; killed (and its mount namespace gone) on drop.
pub struct Polkit {
    child: ChildGuard,
    address: String,
    dir: TempDir,
}

impl Polkit {
    pub fn builder() -> PolkitBuilder {
        PolkitBuilder::default()
    }

    /// polkitd with the project's actions and no extra rules.
    pub fn start(bus: &TestBus) -> Polkit {
        Self::builder().start(bus)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.path().join("polkitd.stderr"))
    }

    /// Kills polkitd and returns once its bus name is gone, so the next
    /// authorization check cannot still reach it.
    pub fn stop(&mut self) {
        self.child.kill_and_wait();
        util::wait_until(
            Duration::from_secs(15),
            "org.freedesktop.PolicyKit1 to lose its owner",
            || !name_has_owner_at(&self.address, POLKIT_NAME),
            String::new,
        );
    }

    /// CheckAuthorization for a `unix-process` subject (no interaction).
    pub fn check_process(&self, pid: u32, uid: u32, action: &str) -> AuthResult {
        let start_time = process_start_time(pid);
        self.check(&[
            "unix-process",
            "3",
            "pid",
            "u",
            &pid.to_string(),
            "start-time",
            "t",
            &start_time.to_string(),
            "uid",
            "i",
            &uid.to_string(),
            action,
        ])
    }

    /// CheckAuthorization for a `system-bus-name` subject (no interaction).
    pub fn check_bus_name(&self, unique_name: &str, action: &str) -> AuthResult {
        self.check(&["system-bus-name", "1", "name", "s", unique_name, action])
    }

    fn check(&self, subject_and_action: &[&str]) -> AuthResult {
        let mut args = vec![
            "call",
            POLKIT_NAME,
            "/org/freedesktop/PolicyKit1/Authority",
            "org.freedesktop.PolicyKit1.Authority",
            "CheckAuthorization",
            "(sa{sv})sa{ss}us",
        ];
        args.extend_from_slice(subject_and_action);
        // details: none; flags: 0 (no user interaction); cancellation id: "".
        args.extend_from_slice(&["0", "0", ""]);
        let out = busctl_at(&self.address, None, &args);
        let text = out.expect_success("CheckAuthorization");
        let mut words = text.split_whitespace().skip(1);
        let mut next_bool = || match words.next() {
            Some("true") => true,
            Some("false") => false,
            _ => panic!("unexpected CheckAuthorization reply: {out:#?}"),
        };
        AuthResult {
            authorized: next_bool(),
            challenge: next_bool(),
        }
    }
}

/// Field 22 of /proc/PID/stat, which polkit uses to tell PID reuse apart.
pub fn process_start_time(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // comm may contain spaces and parens; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')').expect("malformed stat") + 2..];
    rest.split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("no start time in /proc/{pid}/stat"))
}
