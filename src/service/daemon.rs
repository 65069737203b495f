//! The daemon's life, in two steps (as mini-redis's `server::run(listener,
//! shutdown)`), so that `vmmanagerd` and the in-process tests run the same
//! wiring:
//!
//! - [`build`]: everything the service owns, from the configuration and the
//!   host's [`Roots`]; no connection, and nothing running yet.
//! - [`serve`]: on a connection the caller made, export every object, then
//!   take the name; serve until `shutdown` fires or the bus is lost; then
//!   stop every job (and every qemu-img with it) and the device monitor,
//!   and return only when all of them are gone.

use crate::devices::host_use::Network;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;
use zbus::Connection;
use zbus::fdo::{ObjectManager, RequestNameFlags, RequestNameReply};

use super::devices::{DeviceService, DeviceSettings, EventSource};
use super::manager::{Manager, ManagerState};
use super::{BUS_NAME, MANAGER_PATH};
use crate::auth::Authority;
use crate::config::{Config, EventsSetting};
use crate::devices::MonitorMessage;
use crate::devices::inventory::AllowEntry;
use crate::devices::monitor::{self, EventGroup, MonitorOptions};
use crate::devices::persistent::BootClaims;
use crate::devices::vfio::{KernelSysfs, SysfsWriter, VfioBinder};
use crate::disk::checker::DiskChecker;
use crate::disk::usage::UsageScanner;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Only `vmmanagerd` connects; [`serve`] is given a connection.
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

/// Where the service meets the kernel beyond the paths the configuration
/// names (every root, udevd's control socket included, is a config key):
/// device events, sysfs writes and the network state the safety gates
/// read. The daemon uses [`Roots::host`]; in-process tests feed events
/// through a channel, let a fake kernel answer the writes on a prepared
/// tree and give the network state its interfaces are in.
pub struct Roots {
    /// Replaces the netlink monitor (and `devices.events`) when given.
    pub device_events: Option<mpsc::Receiver<MonitorMessage>>,
    /// Does the sysfs writes of Detach and Reattach.
    pub sysfs_writer: Arc<dyn SysfsWriter>,
    /// Where Detach's safety gates see the host's interfaces and routes.
    pub network: Network,
}

impl Roots {
    /// The real kernel: netlink events, plain sysfs writes.
    pub fn host() -> Roots {
        Roots {
            device_events: None,
            sysfs_writer: Arc::new(KernelSysfs),
            network: Network::Kernel,
        }
    }
}

/// Everything the service owns before it is served: built by [`build`],
/// consumed by [`serve`]. Nothing in it runs: a `Parts` dropped unserved
/// leaves nothing behind.
pub struct Parts {
    checker: DiskChecker,
    devices: DeviceParts,
}

/// The device component's settings and event source, started by `serve`.
struct DeviceParts {
    settings: DeviceSettings,
    source: EventSource,
    /// Where the original drivers of detached devices are remembered.
    vfio_state_file: Option<PathBuf>,
    sysfs_writer: Arc<dyn SysfsWriter>,
}

/// The service's parts for `config` (already validated by
/// [`Config::parse`]) on `roots`.
pub fn build(config: &Config, roots: Roots) -> Parts {
    let scanner = UsageScanner::new(
        config.system.proc_root.clone(),
        config.disk.pidfile_patterns.clone(),
    );
    let checker = DiskChecker::new(
        scanner,
        config.disk.qemu_img.clone(),
        config.disk.opener_socket.clone(),
        config.check_limits(),
    );

    let devices = &config.devices;
    let settings = DeviceSettings {
        sysfs_root: config.system.sysfs_root.clone(),
        udev_data_dir: devices.udev_data_dir.clone(),
        hwdb: devices.hwdb,
        proc_root: config.system.proc_root.clone(),
        dev_root: devices.dev_root.clone(),
        network: roots.network,
        allow_list: devices
            .permitted
            .iter()
            .filter_map(|p| AllowEntry::new(&p.selector, p.resource_name.clone()).ok())
            .collect(),
        boot_claims: Some(BootClaims::new(
            devices.driver_overrides_dir.clone(),
            non_empty(&devices.boot_claims_record),
        )),
    };
    let group = |socket: &Path| match devices.events {
        EventsSetting::Auto => Some(monitor::detect_group_at(socket)),
        EventsSetting::Udev => Some(EventGroup::Udev),
        EventsSetting::Kernel => Some(EventGroup::Kernel),
        EventsSetting::None => None,
    };
    let source = match (roots.device_events, group(&devices.udev_control_socket)) {
        (Some(receiver), _) => EventSource::Channel(receiver),
        (None, Some(group)) => EventSource::Udev(MonitorOptions {
            group,
            control_socket: devices.udev_control_socket.clone(),
            receive_buffer: devices.receive_buffer_bytes as usize,
        }),
        (None, None) => EventSource::None,
    };
    Parts {
        checker,
        devices: DeviceParts {
            settings,
            source,
            vfio_state_file: non_empty(&devices.vfio_state_file),
            sysfs_writer: roots.sysfs_writer,
        },
    }
}

/// A configured path, `None` for "" (the configuration's "none").
fn non_empty(path: &Path) -> Option<PathBuf> {
    (!path.as_os_str().is_empty()).then(|| path.to_owned())
}

/// Serves `parts` on `connection` until `shutdown` completes (then `Ok`) or
/// the connection is closed (then [`DaemonError::BusLost`]).
///
/// Every object is exported before the name is taken, so a client activated
/// by the name never finds one missing. Returns only after every task it
/// started has ended: checks cancelled and their qemu-img groups killed,
/// polkit calls given up, the device monitor thread joined, the objects
/// removed and, on a normal stop, the name released. The connection is left
/// open for the caller.
pub async fn serve(
    connection: Connection,
    parts: Parts,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let Parts { checker, devices } = parts;
    let state = ManagerState::start(checker, Authority::new(connection.clone()), &connection)
        .await
        .map_err(DaemonError::Export)?;
    if let Err(e) = export_manager(&connection, &state).await {
        stop(&connection, &state, None).await;
        return Err(e);
    }
    let devices = start_devices(devices, &connection, &state).await;

    if let Err(e) = take_name(&connection).await {
        // Leave nothing running behind a failed start.
        stop(&connection, &state, Some(devices)).await;
        return Err(e);
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        unique_name = ?connection.unique_name().map(|n| n.as_str()),
        "serving {BUS_NAME}"
    );

    // zbus reports no reason for a close; the socket simply ended.
    let bus_lost = tokio::select! {
        () = shutdown => false,
        () = connection.closed() => true,
    };
    if bus_lost {
        tracing::error!(
            "lost the connection to the bus: the bus daemon closed it or the socket failed; \
             stopping"
        );
    } else {
        tracing::info!("shutting down: stopping running checks and the device monitor");
    }
    stop(&connection, &state, Some(devices)).await;
    if bus_lost {
        // No bus, no name to release.
        return Err(DaemonError::BusLost);
    }
    if let Err(e) = connection.release_name(BUS_NAME).await {
        tracing::warn!("cannot release {BUS_NAME}: {e}");
    }
    Ok(())
}

/// The ObjectManager and the manager object, both at [`MANAGER_PATH`].
async fn export_manager(
    connection: &Connection,
    state: &Arc<ManagerState>,
) -> Result<(), DaemonError> {
    let server = connection.object_server();
    server
        .at(MANAGER_PATH, ObjectManager)
        .await
        .map_err(DaemonError::Export)?;
    server
        .at(MANAGER_PATH, Manager::new(Arc::clone(state)))
        .await
        .map_err(DaemonError::Export)?;
    Ok(())
}

/// Ends every job (qemu-img included), polkit call and device task, then
/// unexports the manager: the object server is the connection's and the
/// manager holds the connection (through its authority), so leaving it there
/// would keep open a connection its owner dropped. The ObjectManager stays
/// (it holds nothing) and answers "no objects" until the connection closes.
/// The devices stop while it is still there, so their InterfacesRemoved go
/// out; the manager's removal emits nothing (no ObjectManager above it).
async fn stop(connection: &Connection, state: &ManagerState, devices: Option<DeviceService>) {
    state.shutdown().await;
    if let Some(devices) = devices {
        devices.stop().await;
    }
    let _ = connection
        .object_server()
        .remove::<Manager, _>(MANAGER_PATH)
        .await;
}

/// The PCI device objects and their event source. A monitor that cannot
/// start (no netlink here, or udevd forced but absent) is logged and the
/// devices are enumerated once, rather than the whole service failing.
async fn start_devices(
    parts: DeviceParts,
    connection: &Connection,
    state: &ManagerState,
) -> DeviceService {
    let DeviceParts {
        settings,
        source,
        vfio_state_file,
        sysfs_writer,
    } = parts;
    let group = match &source {
        EventSource::Udev(options) => Some(options.group),
        _ => None,
    };
    // A second binder is needed when the first start fails; both write
    // through the one writer.
    let binder = || {
        VfioBinder::with_writer(
            settings.sysfs_root.clone(),
            vfio_state_file.clone(),
            Box::new(SharedWriter(Arc::clone(&sysfs_writer))),
        )
    };
    let start = |source| {
        DeviceService::start(
            connection.clone(),
            settings.clone(),
            state.authority.clone(),
            state.callers.clone(),
            binder(),
            source,
        )
    };
    match start(source).await {
        Ok(service) => {
            tracing::info!(events = ?group, "device monitor running");
            service
        }
        Err(e) => {
            tracing::error!("{e}; devices are listed once and not kept up to date");
            start(EventSource::None)
                .await
                .expect("starting without an event source cannot fail")
        }
    }
}

/// One [`SysfsWriter`] behind a `Box` for each [`VfioBinder`].
struct SharedWriter(Arc<dyn SysfsWriter>);

impl SysfsWriter for SharedWriter {
    fn write(&self, path: &Path, value: &[u8]) -> std::io::Result<()> {
        self.0.write(path, value)
    }
}

/// Takes the well-known name, refusing to queue behind another owner.
async fn take_name(connection: &Connection) -> Result<(), DaemonError> {
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
