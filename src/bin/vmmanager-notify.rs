//! `vmmanager-notify`: desktop notifications for VM Manager, run in the
//! user's graphical session.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use vmmanager::notify::{self, Options};

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
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Listen on this D-Bus address instead of the system bus (development
    /// and tests), e.g. unix:path=/tmp/test-bus.
    #[arg(long, value_name = "ADDRESS")]
    system_bus_address: Option<String>,
}

fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The user unit's stderr goes to the journal (JOURNAL_STREAM set): log
    // structured fields there; otherwise plain text on stderr.
    let journald = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(|| tracing_journald::layer().ok())
        .flatten();
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(layer) => registry.with(layer).init(),
        None => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    let options = Options {
        system_bus_address: args.system_bus_address,
        ..Options::default()
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("vmmanager-notify: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
        let result = notify::run(options, shutdown).await;
        signals.abort();
        result
    });
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("vmmanager-notify: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM (session end) or SIGINT: stop cleanly.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
