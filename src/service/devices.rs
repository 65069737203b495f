//! PCI device objects on the bus, kept in step with the inventory.
//!
//! One owned task per service ([`DeviceService`]): it subscribes to udev
//! first, then enumerates sysfs, exports one object per device, and applies
//! every event to the inventory, publishing exactly what changed. `stop()`
//! returns only after the monitor thread has exited and every device object
//! is gone; after that nothing of this component runs or emits.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vmmanager_client::DeviceProperties;
use vmmanager_client::names::polkit_detail;
use zbus::message::Header;
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant, interface};

use super::callers::Callers;
use super::device_properties;
use super::error::VmError;
use super::options::parse_interactive_only;
use super::values::Dict;
use crate::auth::{Action, Authority};
use crate::devices::inventory::{AllowEntry, DeviceState, Inventory, InventoryChange};
use crate::devices::monitor::{DeviceMonitor, MonitorOptions};
use crate::devices::passthrough::{Move, Passthrough};
use crate::devices::vfio::VfioBinder;
use crate::devices::{DeviceAction, DeviceEvent, MonitorMessage};
use vmmanager_client::PciAddress;

/// The D-Bus name of the device interface.
pub use vmmanager_client::names::DEVICE_INTERFACE;

/// Where device events come from.
pub enum EventSource {
    /// The udev netlink monitor (kernel or udev group).
    Udev(MonitorOptions),
    /// Events fed by the caller (tests with a prepared sysfs tree).
    Channel(mpsc::Receiver<MonitorMessage>),
    /// No events: enumerate once (hosts without netlink, e.g. containers).
    None,
}

/// Roots and policy of the device component.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    pub sysfs_root: PathBuf,
    pub udev_data_dir: PathBuf,
    pub proc_root: PathBuf,
    pub dev_root: PathBuf,
    pub allow_list: Vec<AllowEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceServiceError {
    #[error("cannot start the udev monitor: {0}")]
    Monitor(#[from] crate::devices::monitor::MonitorError),
}

/// Handle of the running device component; `stop` consumes it.
pub struct DeviceService {
    cancel: CancellationToken,
    task: JoinHandle<()>,
    /// Feeds the inventory task as the monitor does (tests, resyncs).
    events: mpsc::Sender<MonitorMessage>,
}

/// A re-read the service asks for itself (after Detach/Reattach), answered
/// once the objects show the result.
struct Reread {
    address: PciAddress,
    done: oneshot::Sender<()>,
}

impl DeviceService {
    /// Subscribes (udev), enumerates, exports the objects, and returns once
    /// all devices present now are on the bus.
    /// `binder` does the sysfs writes of Detach/Reattach (tests give it a
    /// writer that plays the kernel's part on a prepared tree); `callers`
    /// stops a polkit check whose caller left the bus.
    pub async fn start(
        connection: Connection,
        settings: DeviceSettings,
        authority: Arc<Authority>,
        callers: Arc<Callers>,
        binder: VfioBinder,
        source: EventSource,
    ) -> Result<DeviceService, DeviceServiceError> {
        let (sender, receiver) = mpsc::channel(1024);
        let (reread_sender, rereads) = mpsc::channel(16);
        // Subscribe before enumerating (libvirt's order): an event between
        // the two is applied after the enumeration, and applying it twice
        // is harmless.
        let (monitor, external) = match source {
            EventSource::Udev(options) => {
                (Some(DeviceMonitor::start(options, sender.clone())?), None)
            }
            EventSource::Channel(receiver) => (None, Some(receiver)),
            EventSource::None => (None, None),
        };
        let shared = Arc::new(Shared {
            connection: connection.clone(),
            authority,
            callers,
            passthrough: Passthrough::new(
                binder,
                settings.proc_root.clone(),
                settings.dev_root.clone(),
            ),
            rereads: reread_sender,
        });
        let mut inventory = Inventory::new(
            settings.sysfs_root.clone(),
            settings.udev_data_dir.clone(),
            settings.allow_list.clone(),
        );
        let initial = tokio::task::spawn_blocking(move || {
            let changes = inventory.resync();
            (inventory, changes)
        })
        .await
        .expect("enumeration does not panic");
        let (inventory, changes) = initial;
        publish(&shared, changes).await;

        let cancel = CancellationToken::new();
        let sources = Sources {
            own: receiver,
            external,
            rereads,
        };
        let task = tokio::spawn(run(shared, inventory, sources, monitor, cancel.clone()));
        Ok(DeviceService {
            cancel,
            task,
            events: sender,
        })
    }

    /// Feeds a message as if the monitor had sent it.
    pub async fn inject(&self, message: MonitorMessage) {
        let _ = self.events.send(message).await;
    }

    /// Stops the monitor thread and the task, removes every device object,
    /// and returns when all of that is done.
    pub async fn stop(self) {
        self.cancel.cancel();
        if let Err(e) = self.task.await {
            tracing::error!("device task failed: {e}");
        }
    }
}

/// What device objects share with the task.
struct Shared {
    connection: Connection,
    authority: Arc<Authority>,
    callers: Arc<Callers>,
    passthrough: Passthrough,
    rereads: mpsc::Sender<Reread>,
}

/// Everything the task listens to.
struct Sources {
    /// The monitor's (and `inject`'s) messages.
    own: mpsc::Receiver<MonitorMessage>,
    /// A caller-fed event stream (tests).
    external: Option<mpsc::Receiver<MonitorMessage>>,
    rereads: mpsc::Receiver<Reread>,
}

async fn run(
    shared: Arc<Shared>,
    mut inventory: Inventory,
    mut sources: Sources,
    monitor: Option<DeviceMonitor>,
    cancel: CancellationToken,
) {
    loop {
        let (message, done) = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(message) = sources.own.recv() => (message, None),
            Some(message) = recv_optional(&mut sources.external) => (message, None),
            Some(reread) = sources.rereads.recv() => {
                let event = DeviceEvent {
                    action: DeviceAction::Change,
                    address: reread.address,
                    vendor_name: None,
                    device_name: None,
                };
                (MonitorMessage::Event(event), Some(reread.done))
            }
        };
        let from_kernel = done.is_none();
        let (back, changes) = tokio::task::spawn_blocking({
            let message = message.clone();
            move || {
                let update = |inventory: &mut Inventory| match &message {
                    MonitorMessage::Event(event) => inventory.apply(event),
                    MonitorMessage::Resync => {
                        tracing::warn!("device events were lost: re-reading all devices");
                        inventory.resync()
                    }
                };
                // A bug triggered by one odd device must not end event
                // processing: log it and re-read everything instead.
                let changes = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    update(&mut inventory)
                }))
                .unwrap_or_else(|_| {
                    tracing::error!("updating the device inventory failed: re-reading all devices");
                    inventory.resync()
                });
                (inventory, changes)
            }
        })
        .await
        .expect("the update catches its own panics");
        inventory = back;
        publish(&shared, changes).await;
        if let (MonitorMessage::Event(event), true) = (&message, from_kernel) {
            emit_uevent(&shared, event).await;
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    }
    // Stop the source first, so nothing new arrives, then take the objects
    // down: when `stop` returns, nothing of this component is left.
    if let Some(monitor) = monitor {
        monitor.stop().await;
    }
    let server = shared.connection.object_server();
    for state in inventory.devices() {
        let _ = server
            .remove::<PciDeviceObject, _>(state.info.address.object_path())
            .await;
    }
}

/// `recv` on an optional channel; pends forever when there is none or it is
/// closed (the select's other branches still run).
async fn recv_optional(
    receiver: &mut Option<mpsc::Receiver<MonitorMessage>>,
) -> Option<MonitorMessage> {
    match receiver {
        Some(r) => match r.recv().await {
            Some(message) => Some(message),
            None => {
                *receiver = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

async fn publish(shared: &Arc<Shared>, changes: Vec<InventoryChange>) {
    let server = shared.connection.object_server();
    for change in changes {
        match change {
            InventoryChange::Added(state) => {
                let path = state.info.address.object_path();
                let object = PciDeviceObject {
                    state: Mutex::new(state),
                    shared: shared.clone(),
                };
                match server.at(&path, object).await {
                    Ok(None) => {}
                    // Already exported (an add for a known device): update it.
                    Ok(Some(object)) => {
                        let state = object.state.into_inner().unwrap_or_else(|p| p.into_inner());
                        update(shared, &path, state).await;
                    }
                    Err(e) => tracing::warn!("cannot export {path}: {e}"),
                }
            }
            InventoryChange::Removed(address) => {
                let _ = server
                    .remove::<PciDeviceObject, _>(address.object_path())
                    .await;
            }
            InventoryChange::Changed { new, .. } => {
                let path = new.info.address.object_path();
                update(shared, &path, new).await;
            }
        }
    }
}

/// `Uevent(action)` on the device's object, after its properties are up to
/// date (a removed device has no object left: InterfacesRemoved says it).
async fn emit_uevent(shared: &Arc<Shared>, event: &DeviceEvent) {
    let path = event.address.object_path();
    let server = shared.connection.object_server();
    let Ok(iface) = server.interface::<_, PciDeviceObject>(&path).await else {
        return;
    };
    let action = match &event.action {
        DeviceAction::Add => "add",
        DeviceAction::Remove => "remove",
        DeviceAction::Change => "change",
        DeviceAction::Bind => "bind",
        DeviceAction::Unbind => "unbind",
        DeviceAction::Other(other) => other.as_str(),
    };
    if let Err(e) = PciDeviceObject::uevent(iface.signal_emitter(), action).await {
        tracing::warn!("cannot emit Uevent for {path}: {e}");
    }
}

/// Replaces an object's state and emits one PropertiesChanged with exactly
/// the properties that changed since what the object showed: this is where
/// a uevent becomes PropertiesChanged.
async fn update(shared: &Arc<Shared>, path: &OwnedObjectPath, state: DeviceState) {
    let server = shared.connection.object_server();
    let Ok(iface) = server.interface::<_, PciDeviceObject>(path).await else {
        return;
    };
    let values = {
        let object = iface.get().await;
        let mut current = object.state();
        let values = device_properties::changed(&current, &state);
        *current = state;
        values
    };
    if values.is_empty() {
        return;
    }
    let changed: HashMap<&str, Variant<'_>> =
        values.iter().map(|(k, v)| (*k, (**v).clone())).collect();
    let name = InterfaceName::from_static_str_unchecked(DEVICE_INTERFACE);
    if let Err(e) = zbus::fdo::Properties::properties_changed(
        iface.signal_emitter(),
        name,
        changed,
        Cow::Borrowed(&[]),
    )
    .await
    {
        tracing::warn!("cannot emit PropertiesChanged for {path}: {e}");
    }
}

/// The exported object of one PCI device.
///
/// The state sits behind its own short-lived lock rather than relying on the
/// object server's `get_mut`: Detach waits for the task to re-read the
/// device while zbus holds this object for the call, and the task must be
/// able to update it meanwhile.
pub struct PciDeviceObject {
    state: Mutex<DeviceState>,
    shared: Arc<Shared>,
}

impl PciDeviceObject {
    fn state(&self) -> std::sync::MutexGuard<'_, DeviceState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pci_address(&self) -> PciAddress {
        self.state().info.address
    }

    /// What the getters return ([`device_properties::of`], as the signals).
    fn properties(&self) -> DeviceProperties {
        device_properties::of(&self.state())
    }

    /// Shared part of Detach and Reattach: options, polkit, then the
    /// domain's decision and writes, and a re-read of the device afterwards.
    async fn change_binding(
        &self,
        method: &'static str,
        options: HashMap<String, OwnedVariant>,
        header: &Header<'_>,
        action: Move,
    ) -> Result<(), VmError> {
        let interactive = parse_interactive_only(method, options)?;
        let target = self.pci_address();
        let address = target.to_string();
        let details = HashMap::from([(polkit_detail::DEVICE, address.as_str())]);
        let guard = self.shared.callers.guard(header)?;
        let authority = &self.shared.authority;
        let caller = authority.caller(header).await?;
        let check = authority.check(
            header,
            &caller,
            Action::ManageDevices,
            interactive,
            &details,
        );
        guard.until_gone(check).await?;
        let group = self.state().info.iommu_group;
        self.shared
            .passthrough
            .change(target, group, action)
            .await?;
        // Re-read now, and answer only when the objects show the result,
        // rather than waiting for the kernel's bind/unbind events.
        let (done, answered) = oneshot::channel();
        let reread = Reread {
            address: target,
            done,
        };
        if self.shared.rereads.send(reread).await.is_ok() {
            let _ = answered.await;
        }
        Ok(())
    }
}

/// A host PCI device and whether it can be passed through to a VM.
#[interface(name = "org.example.VmManager1.PciDevice")]
impl PciDeviceObject {
    /// Binds the device to vfio-pci (driver_override, unbind, drivers_probe),
    /// remembering its driver for Reattach. `InUse` when a VM holds its VFIO
    /// group; nothing happens when it is already bound to vfio-pci or a
    /// variant of it (`devices::vfio::is_vfio_driver`). Action
    /// `org.example.vmmanager.manage-devices`. Options:
    /// `auth.no-user-interaction` (b).
    async fn detach(
        &self,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), VmError> {
        self.change_binding("Detach", options, &header, Move::Detach)
            .await
    }

    /// Gives the device back to the driver it had before Detach (or lets the
    /// kernel pick one). `InUse` when a VM holds its VFIO group; nothing
    /// happens when it is not bound to a VFIO driver. Options:
    /// `auth.no-user-interaction` (b).
    async fn reattach(
        &self,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), VmError> {
        self.change_binding("Reattach", options, &header, Move::Reattach)
            .await
    }

    /// The PCI address, e.g. `0000:03:00.0`.
    #[zbus(property(emits_changed_signal = "const"))]
    fn address(&self) -> String {
        self.properties().address
    }

    /// PCI vendor id.
    #[zbus(property)]
    fn vendor_id(&self) -> u16 {
        self.properties().vendor_id
    }

    /// PCI device id.
    #[zbus(property)]
    fn device_id(&self) -> u16 {
        self.properties().device_id
    }

    /// PCI subsystem vendor id.
    #[zbus(property)]
    fn subsystem_vendor_id(&self) -> u16 {
        self.properties().subsystem_vendor_id
    }

    /// PCI subsystem device id.
    #[zbus(property)]
    fn subsystem_device_id(&self) -> u16 {
        self.properties().subsystem_device_id
    }

    /// PCI class, e.g. 0x030000 for a VGA controller.
    #[zbus(property)]
    fn class(&self) -> u32 {
        self.properties().class
    }

    /// Vendor name from the udev hwdb, "" when unknown.
    #[zbus(property)]
    fn vendor_name(&self) -> String {
        self.properties().vendor_name
    }

    /// Device name from the udev hwdb, "" when unknown.
    #[zbus(property)]
    fn device_name(&self) -> String {
        self.properties().device_name
    }

    /// The bound driver, "" when none.
    #[zbus(property)]
    fn driver(&self) -> String {
        self.properties().driver
    }

    /// The IOMMU group, -1 when the device has none.
    #[zbus(property)]
    fn iommu_group(&self) -> i32 {
        self.properties().iommu_group
    }

    /// Addresses of every device in the same IOMMU group.
    #[zbus(property)]
    fn iommu_group_devices(&self) -> Vec<String> {
        self.properties().iommu_group_devices
    }

    /// NUMA node, -1 when unknown.
    #[zbus(property)]
    fn numa_node(&self) -> i32 {
        self.properties().numa_node
    }

    /// SR-IOV: how many VFs the device supports (0 when not capable).
    #[zbus(property)]
    fn sriov_total_vfs(&self) -> u32 {
        self.properties().sriov_total_vfs
    }

    /// SR-IOV: how many VFs are enabled.
    #[zbus(property)]
    fn sriov_num_vfs(&self) -> u32 {
        self.properties().sriov_num_vfs
    }

    /// For a virtual function, the address of its physical function; else "".
    #[zbus(property)]
    fn physical_function(&self) -> String {
        self.properties().physical_function
    }

    /// Whether the device matches the configured passthrough allow-list.
    #[zbus(property)]
    fn permitted(&self) -> bool {
        self.properties().permitted
    }

    /// The resource name of the matching allow-list entry, else "".
    #[zbus(property)]
    fn resource_name(&self) -> String {
        self.properties().resource_name
    }

    /// The IOMMU group exists and every device in it is bound to vfio-pci
    /// (bridges excepted).
    #[zbus(property)]
    fn passthrough_ready(&self) -> bool {
        self.properties().passthrough_ready
    }

    /// Why the device is not ready, in words fit to show a user.
    #[zbus(property)]
    fn passthrough_blockers(&self) -> Vec<String> {
        self.properties().passthrough_blockers
    }

    /// Emitted for every kernel or udev event about this device (`add`,
    /// `change`, `bind`, `unbind`, …) once the properties reflect it. A
    /// removal shows as InterfacesRemoved instead.
    #[zbus(signal)]
    async fn uevent(emitter: &SignalEmitter<'_>, action: &str) -> zbus::Result<()>;

    /// Processes holding /dev/vfio/<group> open: `pid` (u), `exe` (s),
    /// `vm-name` (s). Computed when read; no change signal.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn in_use_by(&self) -> Vec<Dict> {
        let group = self.state().info.iommu_group;
        // Unknown reads as nobody here: a property has no error to say it
        // with (the domain logged why), and Detach/Reattach still refuse.
        self.shared
            .passthrough
            .users(group)
            .await
            .unwrap_or_default()
            .iter()
            .map(|u| device_properties::vfio_user(u).to_dict())
            .collect()
    }
}
