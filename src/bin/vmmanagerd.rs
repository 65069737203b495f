//! `vmmanagerd`: the VM Manager system service.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmmanager::config::{Config, DEFAULT_CONFIG_PATH};
use vmmanager::disk::qemu_img;
use vmmanager::process;
use vmmanager::service::daemon::{self, DaemonError, Roots};
use zbus::connection::Builder;

/// The VM Manager system service (D-Bus name org.example.VmManager).
///
/// Checks VM disk images with qemu-img only when no running VM uses them, and
/// manages PCI devices for passthrough. Normally started by D-Bus activation
/// or systemd (vmmanagerd.service); clients use busctl, vmctl or desktop
/// applets. Authorization is decided by polkit.
///
/// Logs go to the journal when started by systemd, else to stderr; set
/// RUST_LOG (e.g. RUST_LOG=debug) to change the level.
///
/// SIGTERM or SIGINT stop it: running checks are cancelled and their
/// qemu-img killed first. SIGHUP is logged and ignored: the configuration is
/// read only at start; restart the service to apply changes. When the
/// connection to the bus is lost (dbus-daemon stopped or crashed), it kills
/// every qemu-img it started and exits with status 1, so that systemd
/// (Restart=on-failure) starts it again.
#[derive(Debug, Parser)]
#[command(
    name = "vmmanagerd",
    version,
    about,
    long_about,
    after_long_help = EXIT_STATUS_HELP
)]
struct Args {
    /// Serve on this D-Bus address instead of the system bus (development
    /// and tests), e.g. unix:path=/tmp/test-bus.
    #[arg(long, value_name = "ADDRESS")]
    bus_address: Option<String>,

    /// Configuration file. Without it, /etc/vmmanager/vmmanager.toml is read
    /// if it exists; every setting has a built-in default.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Write the man pages vmmanagerd.8 and vmmanager-opener.8 into DIR and
    /// exit (`make` runs this).
    #[arg(long, value_name = "DIR", hide = true)]
    generate_man: Option<PathBuf>,
}

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0   stopped by SIGTERM or SIGINT
  1   error: the bus cannot be reached, the bus name is taken, or the
      connection to the bus was lost while serving (running checks are
      stopped first; systemd restarts the service)
  2   wrong command-line usage
  78  the configuration file is invalid (EX_CONFIG)";

/// What SIGHUP does (see the long help).
const ON_HANGUP: &str =
    "the configuration is read only at start; restart the service to apply changes";

/// vmmanager-opener(8). The opener takes no arguments and stays small (no
/// clap), so its page is made here, with vmmanagerd's.
const OPENER_ABOUT: &str = "Open a disk image for a VM Manager repair (socket activated)";

const OPENER_DESCRIPTION: &str = "\
Started by systemd for each connection to vmmanager-opener.socket \
(vmmanager-opener@.service, the connection on stdin); never run by hand. \
vmmanagerd connects only to repair an image whose directory is read-only in \
its own mount namespace: systemd builds that namespace once, when the \
service starts, so a ReadWritePaths= directory made later stays read-only \
in it. Each opener instance gets a namespace built when the connection \
comes, with the same ReadWritePaths= list.

It reads one absolute path (at most 4095 bytes, no NUL) from a root peer, \
opens it with O_PATH, without following symbolic links, sends the \
descriptor back (SCM_RIGHTS) or one error line, and exits. It never reads \
or writes a file's contents. vmmanagerd uses the descriptor only if it is \
the very file it checked and lies on a writable mount; qemu-img then \
reopens it with the caller's own permissions.

To allow repairs in another directory, add ReadWritePaths=-DIR in a drop-in \
for both vmmanager-opener@.service and vmmanagerd.service (systemctl edit).";

const OPENER_EXIT_STATUS: &str = "\
Exit status:
  0   the descriptor was sent
  1   refused (not root, a bad path, the path cannot be opened) or the
      answer could not be sent; the reason is in the journal
  2   started with arguments";

/// vmmanagerd(8), from the same clap definitions as `--help`, and
/// vmmanager-opener(8).
fn generate_man(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    use vmmanager::manpage::{self, Body, Section};
    let items = Body::items;
    let extra = [
        Section::new(
            "FILES",
            items(&[
                (
                    DEFAULT_CONFIG_PATH,
                    "Configuration (TOML); every setting has a default, so the file is optional.",
                ),
                (
                    vmmanager::opener::DEFAULT_SOCKET,
                    "vmmanager-opener(8)'s socket, asked for repairs in directories that are \
                     read-only for the service (disk.opener-socket).",
                ),
            ]),
        ),
        Section::new(
            "ENVIRONMENT",
            items(&[
                (
                    "DBUS_SYSTEM_BUS_ADDRESS",
                    "The system bus to serve on when --bus-address is not given.",
                ),
                (
                    "RUST_LOG",
                    "Log filter, e.g. debug or vmmanager=trace (default: info).",
                ),
                (
                    "JOURNAL_STREAM",
                    "Set by systemd: when it names this process's stderr, logs go to the journal with structured fields.",
                ),
            ]),
        ),
        Section::new(
            "SEE ALSO",
            Body::SeeAlso(
                [
                    ("vmctl", "1"),
                    ("vmmanager-opener", "8"),
                    ("busctl", "1"),
                    ("polkit", "8"),
                    ("qemu-img", "1"),
                    ("dbus-daemon", "1"),
                ]
                .map(|(n, s)| (n.to_string(), s.to_string()))
                .into(),
            ),
        ),
    ];
    std::fs::create_dir_all(dir)?;
    manpage::write(dir, Args::command(), "8", &extra)?;

    let opener = clap::Command::new("vmmanager-opener")
        .about(OPENER_ABOUT)
        .long_about(OPENER_DESCRIPTION)
        .after_long_help(OPENER_EXIT_STATUS)
        .disable_help_flag(true)
        .disable_version_flag(true);
    let opener_extra = [
        Section::new(
            "FILES",
            items(&[(
                vmmanager::opener::DEFAULT_SOCKET,
                "The socket (vmmanager-opener.socket: root only, one instance per connection).",
            )]),
        ),
        Section::new(
            "SEE ALSO",
            Body::SeeAlso(
                [
                    ("vmmanagerd", "8"),
                    ("systemd.socket", "5"),
                    ("systemd.exec", "5"),
                ]
                .map(|(n, s)| (n.to_string(), s.to_string()))
                .into(),
            ),
        ),
    ];
    manpage::write(dir, opener, "8", &opener_extra).map(|_| ())
}

fn main() -> ExitCode {
    process::ignore_hangup();
    let args = Args::parse();
    if let Some(dir) = &args.generate_man {
        return match generate_man(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmmanagerd: {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let logging = process::init_logging();
    // Before anything is spawned: descendants of qemu-img that leave its
    // process group must become our children, so a check can kill them.
    if let Err(e) = qemu_img::become_subreaper() {
        tracing::warn!("cannot become a child subreaper ({e}); strays of qemu-img go to init");
    }
    let (path, explicit) = match &args.config {
        Some(path) => (path.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let config = match Config::load(&path, explicit) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vmmanagerd: {e}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    process::run_until_signal("vmmanagerd", logging, ON_HANGUP, |shutdown| async move {
        let builder = match &args.bus_address {
            Some(address) => Builder::address(address.as_str()),
            None => Builder::system(),
        };
        let connection = builder.build().await.map_err(DaemonError::Connect)?;
        tracing::debug!(bus = ?args.bus_address.as_deref().unwrap_or("system"), "connected");
        let parts = daemon::build(&config, Roots::host());
        daemon::serve(connection, parts, shutdown.cancelled_owned()).await
    })
}
