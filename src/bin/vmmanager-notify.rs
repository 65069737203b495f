//! `vmmanager-notify`: desktop notifications for VM Manager, run in the
//! user's graphical session.

use std::process::ExitCode;

use clap::Parser;
use vmmanager::notify::{self, Options};
use vmmanager::process;

/// Shows desktop notifications for VM Manager (org.example.VmManager): disk
/// check results (with a "Repair leaks" button), PCI devices added or
/// removed, and devices becoming ready or unready for passthrough.
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
#[command(version, about, long_about)]
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
}

/// What a SIGHUP (e.g. the terminal it was started from closing) does.
const ON_HANGUP: &str = "ignored; vmmanager-notify keeps running";

fn main() -> ExitCode {
    process::ignore_hangup();
    let args = Args::parse();
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
