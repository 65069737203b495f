//! `vmctl` on a terminal runs polkit's text agent (pkttyagent) for its
//! call: a non-root user whose action needs `auth_admin` is asked for the
//! password right there, with the real polkitd, polkit-agent-helper-1 and
//! PAM checking it. Without a terminal, with `--no-ask-password` or as root
//! no agent is started; without a working agent vmctl still answers (not
//! authorized, exit 5) and never hangs.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use common::bus::{BusMonitor, busctl_at};
use common::images::make_clean_qcow2;
use common::pty::Terminal;
use common::util::{give, in_private_mounts, public_tempdir, run, setpriv_args, write_file};
use common::{DaemonConfig, NOBODY, Polkit, PolkitBuilder, Stack};
use tempfile::TempDir;

const VMCTL: &str = env!("CARGO_BIN_EXE_vmctl");
/// vmctl's exit status for "not authorized".
const NOT_AUTHORIZED: i32 = 5;
/// 128 + SIGINT.
const INTERRUPTED: i32 = 130;
/// Generous: polkitd, pkttyagent and the helper start on 2 busy cores.
const PROMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// root's password in the private /etc/shadow of [`in_password_namespace`].
const ROOT_PASSWORD: &str = "vmctl-tty-test";
/// `openssl passwd -6 -salt vmmtestsalt vmctl-tty-test`.
const ROOT_PASSWORD_HASH: &str = "$6$vmmtestsalt$1ZFKllJkmfUsPKlnAnotAiJX65C7aIYBxHcXtAx/kU5U1PyFGnjY.XRxRgJQH2l/jloEQUyysaf80VOVuvdiq1";

/// What polkit's text agent prints when it asks.
const BANNER: &str = "==== AUTHENTICATING FOR org.example.vmmanager.check-disk ====";

/// The bus, polkitd (asking for root when an action needs an admin) and
/// the service, a clean image owned by nobody (whose check needs
/// `auth_admin`: nobody has no session), and a monitor of calls to polkit.
struct Setup {
    monitor: BusMonitor,
    stack: Stack,
    image: PathBuf,
    _images: TempDir,
}

impl Setup {
    fn start() -> Setup {
        let polkit: PolkitBuilder = Polkit::builder().admin("unix-user:root");
        let stack = Stack::start(polkit, &DaemonConfig::default());
        let images = public_tempdir("vmm-images-");
        let image = images.path().join("own.qcow2");
        make_clean_qcow2(&image);
        give(&image, NOBODY, 0o644);
        let monitor = BusMonitor::start(
            &stack.bus,
            "type='method_call',interface='org.freedesktop.PolicyKit1.Authority'",
        );
        Setup {
            monitor,
            stack,
            image,
            _images: images,
        }
    }

    fn address(&self) -> &str {
        self.stack.bus.address()
    }

    /// `setpriv … vmctl --bus-address ADDRESS ARGS… IMAGE` as nobody.
    fn vmctl_as_nobody(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("/usr/bin/setpriv");
        cmd.args(setpriv_args(NOBODY, NOBODY))
            .arg(VMCTL)
            .arg("--bus-address")
            .arg(self.address())
            .args(args)
            .arg(&self.image)
            .env_remove("NO_COLOR");
        cmd
    }

    /// The agents registered with polkitd so far: RegisterAuthenticationAgent
    /// calls (with or without options), as dbus-monitor prints them.
    fn registrations(&self) -> Vec<String> {
        self.monitor
            .messages()
            .into_iter()
            .filter(|m| {
                m.starts_with("method call ") && m.contains("member=RegisterAuthenticationAgent")
            })
            .collect()
    }
}

/// The unique bus name that sent `message` (`sender=:1.7 -> …`).
fn sender(message: &str) -> &str {
    message
        .split_whitespace()
        .find_map(|w| w.strip_prefix("sender="))
        .unwrap_or_else(|| panic!("no sender in {message}"))
}

/// The one agent registered for vmctl's own process (`unix-process`, pid
/// `vmctl`); returns its bus name.
fn registered_for(registrations: &[String], vmctl: u32) -> String {
    let pid = format!("uint32 {vmctl}\n");
    let ours: Vec<&String> = registrations
        .iter()
        .filter(|call| call.contains("\"unix-process\"") && call.contains(&pid))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "not one agent for vmctl (PID {vmctl}): {registrations:#?}"
    );
    sender(ours[0]).to_owned()
}

/// The PID of the process behind `unique_name`.
fn pid_of(bus: &str, unique_name: &str) -> u32 {
    let out = busctl_at(
        bus,
        None,
        &[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetConnectionUnixProcessID",
            "s",
            unique_name,
        ],
    );
    let reply = out.expect_success("GetConnectionUnixProcessID");
    reply
        .trim()
        .strip_prefix("u ")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("unexpected reply {reply:?}"))
}

/// Waits for vmctl to exit and checks that its agent went first: stopped
/// and reaped by vmctl itself (not merely killed by the kernel when vmctl
/// died, and left for init to reap). Returns vmctl's exit status and the
/// screen.
fn exit_without_agent(terminal: &mut Terminal, agent: u32) -> (ExitStatus, String) {
    let status = terminal.wait_exit(PROMPT_TIMEOUT).expect("vmctl to finish");
    let agent_left = Path::new(&format!("/proc/{agent}")).exists();
    terminal.finish_reading();
    let screen = terminal.screen();
    assert!(
        !agent_left,
        "vmctl exited before its agent (PID {agent}): {screen}"
    );
    assert!(terminal.echo(), "echo left off: {screen}");
    (status, screen)
}

/// `cmd` in a private mount namespace where root's password is
/// [`ROOT_PASSWORD`] and the default system bus is the test's: what
/// polkit-agent-helper-1 (setuid root, with a cleared environment) reads
/// and talks to. Nothing outside the namespace changes.
fn in_password_namespace(cmd: &Command, bus: &Path, dir: &Path) -> Command {
    let shadow = dir.join("shadow");
    let host = std::fs::read_to_string("/etc/shadow").expect("read /etc/shadow");
    let private: String = host
        .lines()
        .map(|line| match line.split_once(':') {
            Some(("root", rest)) => {
                let after_hash = rest.split_once(':').map_or("", |(_, after)| after);
                format!("root:{ROOT_PASSWORD_HASH}:{after_hash}\n")
            }
            _ => format!("{line}\n"),
        })
        .collect();
    write_file(&shadow, private, 0o600);
    const SCRIPT: &str = "mount --bind \"$1\" /etc/shadow \
        && mount -t tmpfs -o mode=0755 tmpfs /run/dbus \
        && : >/run/dbus/system_bus_socket \
        && mount --bind \"$2\" /run/dbus/system_bus_socket \
        && shift 2 && exec \"$@\"";
    let mut wrapped = in_private_mounts(SCRIPT);
    wrapped
        .arg(&shadow)
        .arg(bus)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    wrapped
}

#[test]
fn a_terminal_user_types_the_admin_password_and_the_check_runs() {
    let setup = Setup::start();
    let dir = tempfile::tempdir().unwrap();
    let bus_socket = setup.stack.bus.dir().join("bus.sock");
    let check = || {
        let cmd = setup.vmctl_as_nobody(&["check-disk"]);
        Terminal::spawn(in_password_namespace(&cmd, &bus_socket, dir.path()))
    };
    // Asked for the admin's password, on this terminal, for vmctl's call;
    // vmctl answers as polkit does.
    let type_password = |terminal: &mut Terminal, password: &str| {
        terminal.wait_for(BANNER, PROMPT_TIMEOUT);
        terminal.wait_for("Authenticating as: root", PROMPT_TIMEOUT);
        terminal.wait_for("Password:", PROMPT_TIMEOUT);
        terminal.wait_for_echo_off(PROMPT_TIMEOUT);
        let agent = registered_for(&setup.registrations(), terminal.pid());
        let agent = pid_of(setup.address(), &agent);
        terminal.type_keys(&format!("{password}\n"));
        let (status, screen) = exit_without_agent(terminal, agent);
        println!("{screen}");
        assert!(
            !screen.contains(password),
            "the password was echoed: {screen}"
        );
        (status, screen)
    };

    let (status, screen) = type_password(&mut check(), "not-the-password");
    assert_eq!(status.code(), Some(NOT_AUTHORIZED), "{screen}");
    assert!(
        screen.contains("==== AUTHENTICATION FAILED ===="),
        "{screen}"
    );
    assert!(screen.contains("not authorized"), "{screen}");

    let (status, screen) = type_password(&mut check(), ROOT_PASSWORD);
    assert_eq!(status.code(), Some(0), "{screen}");
    assert!(
        screen.contains("==== AUTHENTICATION COMPLETE ===="),
        "{screen}"
    );
    assert!(screen.contains("no errors found"), "{screen}");
}

#[test]
fn ctrl_c_at_the_prompt_interrupts_and_restores_the_terminal() {
    let setup = Setup::start();
    let mut terminal = Terminal::spawn(setup.vmctl_as_nobody(&["check-disk"]));
    terminal.wait_for(BANNER, PROMPT_TIMEOUT);
    terminal.wait_for("Password:", PROMPT_TIMEOUT);
    terminal.wait_for_echo_off(PROMPT_TIMEOUT);
    let agent = registered_for(&setup.registrations(), terminal.pid());
    let agent = pid_of(setup.address(), &agent);
    terminal.type_keys("\x03");
    let (status, screen) = exit_without_agent(&mut terminal, agent);
    assert_eq!(status.code(), Some(INTERRUPTED), "{screen}");
}

#[test]
fn no_agent_without_a_terminal_with_no_ask_password_or_as_root() {
    let setup = Setup::start();

    // On a terminal with --no-ask-password: refused, nobody asked.
    let mut terminal = Terminal::spawn(setup.vmctl_as_nobody(&["--no-ask-password", "check-disk"]));
    let status = terminal.wait(PROMPT_TIMEOUT).expect("vmctl to finish");
    let screen = terminal.screen();
    assert_eq!(status.code(), Some(NOT_AUTHORIZED), "{screen}");
    assert!(!screen.contains("AUTHENTICATING"), "{screen}");
    assert!(screen.contains("not authorized"), "{screen}");

    // Without a terminal (stdin is /dev/null), even though it may ask.
    let out = run(&mut setup.vmctl_as_nobody(&["check-disk"]));
    assert_eq!(out.status.code(), Some(NOT_AUTHORIZED), "{out:?}");
    // vmctl's message alone: no agent complained about a missing terminal.
    assert!(out.stderr.starts_with("vmctl: "), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");

    // root on a terminal: polkit never asks root.
    let mut root = Command::new(VMCTL);
    root.arg("--bus-address")
        .arg(setup.address())
        .arg("check-disk")
        .arg(&setup.image);
    let mut terminal = Terminal::spawn(root);
    let status = terminal.wait(PROMPT_TIMEOUT).expect("vmctl to finish");
    assert_eq!(status.code(), Some(0), "{}", terminal.screen());

    let registrations = setup.registrations();
    assert!(registrations.is_empty(), "{registrations:#?}");
}

/// pkttyagent not there (not executable), or unable to register (polkitd
/// gone): vmctl goes on without it and answers "not authorized" at once.
/// vmctl runs it by its absolute path, so one earlier on `PATH` is never
/// run.
#[test]
fn without_a_working_agent_vmctl_answers_not_authorized() {
    let mut setup = Setup::start();
    let decoy_dir = public_tempdir("vmm-decoy-path-");
    write_file(
        &decoy_dir.path().join("pkttyagent"),
        "#!/bin/sh\necho DECOY-AGENT-RAN\n",
        0o755,
    );

    // In a private mount namespace, /dev/null over the real pkttyagent.
    let vmctl = setup.vmctl_as_nobody(&["check-disk"]);
    let mut missing =
        in_private_mounts("mount --bind /dev/null /usr/bin/pkttyagent && exec \"$@\"");
    missing
        .arg(vmctl.get_program())
        .args(vmctl.get_args())
        .env_remove("NO_COLOR")
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", decoy_dir.path().display()),
        );
    let mut terminal = Terminal::spawn(missing);
    let status = terminal.wait(PROMPT_TIMEOUT).expect("vmctl to finish");
    let screen = terminal.screen();
    println!("{screen}");
    assert_eq!(status.code(), Some(NOT_AUTHORIZED), "{screen}");
    assert!(!screen.contains("AUTHENTICATING"), "{screen}");
    assert!(!screen.contains("DECOY-AGENT-RAN"), "{screen}");
    let registrations = setup.registrations();
    assert!(registrations.is_empty(), "{registrations:#?}");

    // polkitd gone: pkttyagent cannot register and exits; the service
    // cannot ask polkit either and refuses.
    setup.stack.polkit.stop();
    let mut terminal = Terminal::spawn(setup.vmctl_as_nobody(&["check-disk"]));
    let status = terminal.wait(PROMPT_TIMEOUT).expect("vmctl to finish");
    let screen = terminal.screen();
    println!("{screen}");
    assert_eq!(status.code(), Some(NOT_AUTHORIZED), "{screen}");
    assert!(!screen.contains("AUTHENTICATING"), "{screen}");
}
