//! `vmmanager-notify`: desktop notifications and a tray icon for VM
//! Manager, run in the user's graphical session.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmmanager::notify::{self, Options};
use vmmanager::process;

/// Shows desktop notifications for VM Manager (org.example.VmManager): disk
/// check results (with a "Repair leaks" button), PCI devices added or
/// removed, and devices becoming ready or unready for passthrough.
///
/// It also shows a tray icon (a StatusNotifierItem, as KDE Plasma, XFCE,
/// Cinnamon and MATE show natively, and GNOME with the AppIndicator
/// extension) whose menu has the same at a glance: whether the service
/// runs and its version, each PCI device (readiness or what blocks it,
/// driver, IOMMU group, the VM holding it) with Detach or Reattach, and
/// the recent disk checks. The icon asks for attention while an image is
/// corrupt or leaks, could not be checked, or an allow-listed device is
/// not ready. Detach and Reattach run as the user, so the desktop's polkit
/// agent may ask for a password; a failure becomes a notification. Without
/// a tray host (org.kde.StatusNotifierWatcher) there is no icon until one
/// appears; --no-tray turns it off.
///
/// Runs in the user's graphical session (started by XDG autostart or the
/// systemd user unit vmmanager-notify.service). It waits for the service
/// when it is not running and follows it across restarts. Notifications go
/// to the session bus's notification server (DBUS_SESSION_BUS_ADDRESS); when
/// none answers, they are retried with backoff.
///
/// Logs go to the journal under systemd, else to stderr; set RUST_LOG (e.g.
/// RUST_LOG=debug) to change the level.
///
/// SIGTERM or SIGINT stop it. SIGHUP (a closing terminal) is logged and
/// ignored: it keeps running.
#[derive(Debug, Parser)]
#[command(name = "vmmanager-notify", version, about, long_about)]
struct Args {
    /// Listen on this D-Bus address instead of the system bus (development
    /// and tests), e.g. unix:path=/tmp/test-bus.
    #[arg(long, value_name = "ADDRESS")]
    system_bus_address: Option<String>,

    /// Do not show the tray icon, only notifications (for desktops that
    /// show the same status another way, e.g. GNOME with the VM Manager
    /// extension).
    #[arg(long)]
    no_tray: bool,

    /// Write the man page vmmanager-notify.1 into DIR and exit (`make`
    /// runs this).
    #[arg(long, value_name = "DIR", hide = true)]
    generate_man: Option<PathBuf>,
}

/// vmmanager-notify(1), from the same clap definitions as `--help`.
fn generate_man(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    use vmmanager::manpage::{self, Body, Section};
    let items = Body::items;
    let extra = [
        Section::new(
            "FILES",
            items(&[
                (
                    "/etc/xdg/autostart/vmmanager-notify.desktop",
                    "Starts it at login on desktops that run XDG autostart entries; copy it to \
                     ~/.config/autostart and add --no-tray to Exec= to keep the notifications only.",
                ),
                (
                    "/usr/lib/systemd/user/vmmanager-notify.service",
                    "The systemd user unit (systemctl --user enable --now vmmanager-notify.service).",
                ),
            ]),
        ),
        Section::new(
            "ENVIRONMENT",
            items(&[
                (
                    "DBUS_SESSION_BUS_ADDRESS",
                    "The session bus: notifications, the tray icon, and the name \
                     org.example.VmManager.Notify that keeps it to one instance per session.",
                ),
                (
                    "DBUS_SYSTEM_BUS_ADDRESS",
                    "The system bus, where the service is, when --system-bus-address is not given.",
                ),
                ("RUST_LOG", "Log filter, e.g. debug (default: info)."),
                (
                    "JOURNAL_STREAM",
                    "Set by systemd: when it names this process's stderr, logs go to the journal.",
                ),
            ]),
        ),
        Section::new(
            "SEE ALSO",
            Body::SeeAlso(
                [("vmctl", "1"), ("vmmanagerd", "8"), ("polkit", "8")]
                    .map(|(n, s)| (n.to_string(), s.to_string()))
                    .into(),
            ),
        ),
    ];
    std::fs::create_dir_all(dir)?;
    manpage::write(dir, Args::command(), "1", &extra).map(|_| ())
}

/// What a SIGHUP (e.g. the terminal it was started from closing) does.
const ON_HANGUP: &str = "ignored; vmmanager-notify keeps running";

fn main() -> ExitCode {
    process::ignore_hangup();
    let args = Args::parse();
    if let Some(dir) = &args.generate_man {
        return match generate_man(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmmanager-notify: {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let logging = process::init_logging();
    let options = Options {
        system_bus_address: args.system_bus_address,
        tray: !args.no_tray,
        ..Options::default()
    };
    process::run_until_signal("vmmanager-notify", logging, ON_HANGUP, |shutdown| {
        notify::run(options, shutdown)
    })
}
