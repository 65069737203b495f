//! The daemon's life: export objects, take the name, serve until told to
//! stop, then stop every job and release the name.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use zbus::connection::Builder;
use zbus::fdo::{ObjectManager, RequestNameFlags, RequestNameReply};

use super::manager::{Manager, ManagerState};
use super::{BUS_NAME, MANAGER_PATH};
use crate::auth::Authority;
use crate::config::Config;
use crate::disk::checker::DiskChecker;
use crate::disk::usage::UsageScanner;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot connect to the bus: {0}")]
    Connect(#[source] zbus::Error),
    #[error("cannot export objects: {0}")]
    Export(#[source] zbus::Error),
    #[error("cannot own the name {BUS_NAME}: {0}")]
    Name(String),
}

/// Which bus to serve on.
#[derive(Debug, Clone)]
pub enum Bus {
    System,
    Address(String),
}

/// Runs the service until `shutdown` is cancelled. Returns after every job
/// has ended and the name is released.
pub async fn run(config: Config, bus: Bus, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let builder = match &bus {
        Bus::System => Builder::system(),
        Bus::Address(address) => Builder::address(address.as_str()),
    };
    let connection = builder.build().await.map_err(DaemonError::Connect)?;

    let scanner = UsageScanner::new(
        config.system.proc_root.clone(),
        config.disk.pidfile_patterns.clone(),
    );
    let checker = DiskChecker::new(
        scanner,
        config.disk.qemu_img.clone(),
        config.default_timeout(),
        config.max_concurrent_checks(),
    );
    let state = ManagerState::new(checker, Authority::new(connection.clone()));

    // Serve everything first, then take the name: a client activated by the
    // name must never find an object missing.
    let server = connection.object_server();
    server
        .at(MANAGER_PATH, ObjectManager)
        .await
        .map_err(DaemonError::Export)?;
    server
        .at(MANAGER_PATH, Manager::new(Arc::clone(&state)))
        .await
        .map_err(DaemonError::Export)?;
    let reply = connection
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
        .map_err(|e| DaemonError::Name(e.to_string()))?;
    if reply != RequestNameReply::PrimaryOwner {
        return Err(DaemonError::Name(format!(
            "another process owns it ({reply:?})"
        )));
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        ?bus,
        "serving {BUS_NAME}"
    );

    shutdown.cancelled().await;
    tracing::info!("shutting down: stopping running checks");
    state.shutdown().await;
    if let Err(e) = connection.release_name(BUS_NAME).await {
        tracing::warn!("cannot release {BUS_NAME}: {e}");
    }
    tracing::info!("stopped");
    Ok(())
}
