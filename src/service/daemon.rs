//! The daemon's life: export objects, take the name, serve until told to
//! stop or until the bus connection is lost, then stop every job (and every
//! qemu-img with it) and, when the bus is still there, release the name.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use zbus::connection::Builder;
use zbus::fdo::{ObjectManager, RequestNameFlags, RequestNameReply};

use super::devices::{DeviceService, DeviceSettings, EventSource};
use super::manager::{Manager, ManagerState};
use super::{BUS_NAME, MANAGER_PATH};
use crate::auth::Authority;
use crate::config::{Config, EventsSetting};
use crate::devices::inventory::AllowEntry;
use crate::devices::monitor::{self, EventGroup, MonitorOptions};
use crate::devices::vfio::VfioBinder;
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
    /// The bus daemon went away (or the socket failed). Nothing can reach
    /// the service any more, so it stops with an error and lets systemd
    /// (`Restart=on-failure`) start it again on a working bus.
    #[error("lost the connection to the bus")]
    BusLost,
}

/// Which bus to serve on.
#[derive(Debug, Clone)]
pub enum Bus {
    System,
    Address(String),
}

/// Runs the service until `shutdown` is cancelled (then `Ok`) or the bus
/// connection is closed (then [`DaemonError::BusLost`]). Returns after every
/// job has ended and, on a normal stop, the name is released.
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
    let checker = DiskChecker::new(scanner, config.disk.qemu_img.clone(), config.check_limits());
    let state = ManagerState::start(checker, Authority::new(connection.clone()), &connection)
        .await
        .map_err(DaemonError::Export)?;

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
    let devices = start_devices(&config, &connection, &state).await;

    if let Err(e) = take_name(&connection).await {
        // Leave nothing running behind a failed start.
        devices.stop().await;
        state.shutdown().await;
        return Err(e);
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        ?bus,
        "serving {BUS_NAME}"
    );

    // zbus reports no reason for a close; the socket simply ended.
    let bus_lost = tokio::select! {
        () = shutdown.cancelled() => false,
        () = connection.closed() => true,
    };
    if bus_lost {
        tracing::error!(
            ?bus,
            "lost the connection to the bus: the bus daemon closed it or the socket failed; \
             stopping"
        );
    } else {
        tracing::info!("shutting down: stopping running checks and the device monitor");
    }
    state.shutdown().await;
    devices.stop().await;
    if bus_lost {
        // No bus, no name to release.
        return Err(DaemonError::BusLost);
    }
    if let Err(e) = connection.release_name(BUS_NAME).await {
        tracing::warn!("cannot release {BUS_NAME}: {e}");
    }
    tracing::info!("stopped");
    Ok(())
}

/// The PCI device objects and their event source. A monitor that cannot
/// start (no netlink here, or udevd forced but absent) is logged and the
/// devices are enumerated once, rather than the whole service failing.
async fn start_devices(
    config: &Config,
    connection: &zbus::Connection,
    state: &ManagerState,
) -> DeviceService {
    let devices = &config.devices;
    let settings = DeviceSettings {
        sysfs_root: config.system.sysfs_root.clone(),
        udev_data_dir: devices.udev_data_dir.clone(),
        proc_root: config.system.proc_root.clone(),
        dev_root: devices.dev_root.clone(),
        allow_list: config
            .devices
            .permitted
            .iter()
            .filter_map(|p| AllowEntry::new(&p.selector, p.resource_name.clone()).ok())
            .collect(),
    };
    let state_file =
        (!devices.vfio_state_file.as_os_str().is_empty()).then(|| devices.vfio_state_file.clone());
    let binder = || VfioBinder::new(config.system.sysfs_root.clone(), state_file.clone());
    let group = match devices.events {
        EventsSetting::Auto => Some(monitor::detect_group()),
        EventsSetting::Udev => Some(EventGroup::Udev),
        EventsSetting::Kernel => Some(EventGroup::Kernel),
        EventsSetting::None => None,
    };
    let source = match group {
        Some(group) => EventSource::Udev(MonitorOptions {
            receive_buffer: devices.receive_buffer_bytes as usize,
            ..MonitorOptions::new(group)
        }),
        None => EventSource::None,
    };
    let authority = state.authority.clone();
    let callers = state.callers.clone();
    match DeviceService::start(
        connection.clone(),
        settings.clone(),
        authority.clone(),
        callers.clone(),
        binder(),
        source,
    )
    .await
    {
        Ok(service) => {
            tracing::info!(events = ?group, "device monitor running");
            service
        }
        Err(e) => {
            tracing::error!("{e}; devices are listed once and not kept up to date");
            DeviceService::start(
                connection.clone(),
                settings,
                authority,
                callers,
                binder(),
                EventSource::None,
            )
            .await
            .expect("starting without an event source cannot fail")
        }
    }
}

/// Takes the well-known name, refusing to queue behind another owner.
async fn take_name(connection: &zbus::Connection) -> Result<(), DaemonError> {
    let reply = connection
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
        .map_err(|e| DaemonError::Name(e.to_string()))?;
    if reply != RequestNameReply::PrimaryOwner {
        return Err(DaemonError::Name(format!(
            "another process owns it ({reply:?})"
        )));
    }
    Ok(())
}
