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
//!   server answers, and the "Repair leaks" action.

pub mod coalesce;
pub mod desktop;
pub mod policy;
pub mod watch;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use desktop::{Backoff, Notifier};

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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            system_bus_address: None,
            quiet: Duration::from_millis(500),
            max_delay: Duration::from_secs(2),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
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
    // to guard (and no notifications until one appears).
    let _instance = match single_instance().await {
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
    let result = watch::watch(
        &connection,
        &notifier,
        options.quiet,
        options.max_delay,
        &shutdown,
    )
    .await;
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
