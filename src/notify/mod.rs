//! `vmmanager-notify`: the user-session companion that turns the service's
//! signals into desktop notifications.
//!
//! A system service has no session and cannot show notifications itself;
//! this agent runs in each graphical session (XDG autostart or the systemd
//! user unit), listens on the system bus and notifies on the session bus.
//!
//! - [`policy`]: which signal becomes which summary, body, urgency, icon
//!   and category (plain functions, unit-tested);
//! - [`coalesce`]: bursts of device changes become one batch;
//! - [`watch`]: the system side: follows `org.example.VmManager` through
//!   restarts (`NameOwnerChanged`), subscribes per owner;
//! - [`desktop`]: the session side: notify-rust, one notification id per
//!   topic (replace, don't stack), retry with backoff while no notification
//!   server answers, and the "Repair leaks" action;
//! - [`status`]: the at-a-glance state (service, devices, recent checks)
//!   the watcher keeps from the same signals;
//! - [`tray`]: the tray icon (StatusNotifierItem with a dbusmenu menu)
//!   showing that state, with Detach/Reattach in its menu.

pub mod coalesce;
pub mod desktop;
pub mod policy;
pub mod status;
pub mod tray;
pub mod watch;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use desktop::{Backoff, Notifier};
use tray::{Tray, TrayLinks};

/// How the companion runs; [`Options::default`] is what the binary uses.
#[derive(Debug, Clone)]
pub struct Options {
    /// The system bus address; `None` for the system bus
    /// (`DBUS_SYSTEM_BUS_ADDRESS` or the standard socket).
    pub system_bus_address: Option<String>,
    /// A device burst is reported once the bus was quiet this long…
    pub quiet: Duration,
    /// …or this long after its first change at the latest.
    pub max_delay: Duration,
    /// First and longest delay between attempts while no notification
    /// server answers.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Show the tray icon (when the session has a tray host).
    pub tray: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            system_bus_address: None,
            quiet: Duration::from_millis(500),
            max_delay: Duration::from_secs(2),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            tray: true,
        }
    }
}

/// The name one companion per session owns on the session bus.
pub const SESSION_NAME: &str = "org.example.VmManager.Notify";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("cannot connect to the system bus: {0}")]
    Connect(#[source] zbus::Error),
    #[error("system bus: {0}")]
    Bus(#[source] zbus::Error),
    #[error("the system bus connection closed")]
    Disconnected,
}

/// Runs the companion until `shutdown` is cancelled. Returns an error only
/// when the system bus cannot be reached or is lost; a missing service or
/// notification server is waited for. Returns at once when another
/// companion already runs in this session.
pub async fn run(options: Options, shutdown: CancellationToken) -> Result<(), NotifyError> {
    // Autostart and the user unit may both start it: one instance per
    // session. Held until return; without a session bus there is nothing
    // to guard (and no notifications or tray icon until one appears).
    // The tray serves on this connection.
    let session = match single_instance().await {
        Instance::Other => {
            tracing::info!("another vmmanager-notify owns {SESSION_NAME} in this session; exiting");
            return Ok(());
        }
        Instance::Sole(connection) => Some(connection),
        Instance::Unknown(e) => {
            tracing::warn!("no session bus to register on ({e}); running anyway");
            None
        }
    };
    let builder = match &options.system_bus_address {
        Some(address) => zbus::connection::Builder::address(address.as_str()),
        None => zbus::connection::Builder::system(),
    };
    let connection = builder.build().await.map_err(NotifyError::Connect)?;
    let notifier = Notifier::start(
        connection.clone(),
        Backoff::new(options.retry_min, options.retry_max),
    );
    let (status, status_rx) = tokio::sync::watch::channel(status::Status::default());
    // One pending refresh is enough: it re-reads everything.
    let (refresh_tx, refresh) = mpsc::channel(1);
    let tray = match (&session, options.tray) {
        (Some(session), true) => {
            let links = TrayLinks {
                system: connection.clone(),
                status: status_rx,
                refresh: refresh_tx,
                notifications: notifier.messages(),
            };
            match Tray::start(session.clone(), links).await {
                Ok(tray) => Some(tray),
                Err(e) => {
                    tracing::warn!("{e}; running without a tray icon");
                    None
                }
            }
        }
        (None, true) => None,
        (_, false) => {
            tracing::info!("tray icon turned off (--no-tray)");
            None
        }
    };
    let links = watch::Links {
        notifier: &notifier,
        status: &status,
        refresh,
    };
    let result = watch::watch(
        &connection,
        links,
        options.quiet,
        options.max_delay,
        &shutdown,
    )
    .await;
    if let Some(tray) = tray {
        tray.stop().await;
    }
    notifier.stop().await;
    result
}

enum Instance {
    Sole(zbus::Connection),
    Other,
    Unknown(zbus::Error),
}

async fn single_instance() -> Instance {
    use zbus::fdo::{RequestNameFlags, RequestNameReply};
    let connection = match zbus::connection::Builder::session().build().await {
        Ok(c) => c,
        Err(e) => return Instance::Unknown(e),
    };
    // Answer calls on the name (Peer, Introspectable; UnknownObject for
    // what is not served, e.g. the tray with --no-tray): a connection
    // without an object server leaves callers waiting forever.
    let _ = connection.object_server();
    match connection
        .request_name_with_flags(SESSION_NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
    {
        Ok(RequestNameReply::PrimaryOwner | RequestNameReply::AlreadyOwner) => {
            Instance::Sole(connection)
        }
        Ok(_) => Instance::Other,
        Err(zbus::Error::NameTaken) => Instance::Other,
        Err(e) => Instance::Unknown(e),
    }
}
