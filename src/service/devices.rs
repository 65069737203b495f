//! PCI device objects on the bus, kept in step with the inventory.
//!
//! One owned task per service ([`DeviceService`]): it subscribes to udev
//! first, then enumerates sysfs, exports one object per device, and applies
//! every event to the inventory, publishing exactly what changed. Events
//! that are already queued when the task wakes form one batch: one trip to
//! the blocking pool, one re-read per device named, one PropertiesChanged
//! per device, then each event's Uevent in arrival order. A batch in which a
//! device is removed is split into steps where that device appears again
//! (`steps`), each step publishing its changes and then its Uevents. `stop()`
//! returns only after the monitor thread has exited and every device object
//! is gone; after that nothing of this component runs or emits.

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
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
use super::options::parse_binding;
use super::values::Dict;
use crate::auth::{Action, Authority};
use crate::devices::auto_return::{AutoReturn, ReturnReport, Watcher};
use crate::devices::host_use::Network;
use crate::devices::inventory::{AllowEntry, DeviceState, Inventory, InventoryChange};
use crate::devices::monitor::{DeviceMonitor, MonitorOptions};
use crate::devices::passthrough::{Move, Passthrough, PassthroughError, Persistence, Scope};
use crate::devices::persistent::{BootClaims, BootOverride};
use crate::devices::vfio::{VfioBinder, VfioError};
use crate::devices::{DeviceAction, DeviceEvent, MonitorMessage};
use vmmanager_client::PciAddress;

/// The D-Bus name of the device interface.
pub use vmmanager_client::names::DEVICE_INTERFACE;

/// Monitor messages queued for the device task at most; also the largest
/// batch it handles in one pass.
const EVENT_CHANNEL_CAPACITY: usize = 1024;

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
    /// Names from the udev hwdb for devices udevd's database has none for.
    pub hwdb: bool,
    pub proc_root: PathBuf,
    pub dev_root: PathBuf,
    /// Where Detach's safety gates see the host's interfaces and routes.
    pub network: Network,
    pub allow_list: Vec<AllowEntry>,
    /// Where Detach/Reattach's `persistent` keeps boot-time claims; `None`:
    /// refused as not supported.
    pub boot_claims: Option<BootClaims>,
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
        let (sender, receiver) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
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
        let mut passthrough = Passthrough::new(
            binder,
            settings.proc_root.clone(),
            settings.dev_root.clone(),
        )
        .with_network(settings.network.clone());
        if let Some(claims) = &settings.boot_claims {
            passthrough = passthrough.with_boot_claims(claims.clone());
        }
        let (report_sender, returns) = mpsc::channel(16);
        let auto_return = match AutoReturn::start(
            passthrough.clone(),
            settings.dev_root.clone(),
            report_sender,
        ) {
            Ok(auto_return) => Some(auto_return),
            Err(e) => {
                tracing::error!(
                    "cannot watch VFIO groups (inotify: {e}); Detach's auto-return is not available"
                );
                None
            }
        };
        let shared = Arc::new(Shared {
            connection: connection.clone(),
            authority,
            callers,
            passthrough,
            returns: auto_return.as_ref().map(AutoReturn::watcher),
            rereads: reread_sender,
        });
        let mut inventory = Inventory::new(
            settings.sysfs_root.clone(),
            settings.udev_data_dir.clone(),
            settings.allow_list.clone(),
        );
        if settings.hwdb {
            inventory = inventory.with_hwdb();
        }
        // The kernel command line, for the ACS override's readiness note.
        inventory = inventory.with_proc_root(&settings.proc_root);
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
            returns,
        };
        let owned = Owned {
            monitor,
            auto_return,
        };
        let task = tokio::spawn(run(shared, inventory, sources, owned, cancel.clone()));
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
    /// Watches the groups of devices to give back after use (None when
    /// inotify is not available).
    returns: Option<Watcher>,
    rereads: mpsc::Sender<Reread>,
}

/// What the task owns and stops when it ends.
struct Owned {
    monitor: Option<DeviceMonitor>,
    auto_return: Option<AutoReturn>,
}

/// What to do once a batch is applied.
enum After {
    /// Events from the kernel: emit their Uevents.
    Uevents,
    /// A re-read of our own: answer it.
    Answer(oneshot::Sender<()>),
    /// A device given back after use: say how it went.
    Report(ReturnReport),
}

/// Everything the task listens to.
struct Sources {
    /// The monitor's (and `inject`'s) messages.
    own: mpsc::Receiver<MonitorMessage>,
    /// A caller-fed event stream (tests).
    external: Option<mpsc::Receiver<MonitorMessage>>,
    rereads: mpsc::Receiver<Reread>,
    /// Give-backs after use, each followed by a re-read of the device.
    returns: mpsc::Receiver<ReturnReport>,
}

async fn run(
    shared: Arc<Shared>,
    mut inventory: Inventory,
    mut sources: Sources,
    owned: Owned,
    cancel: CancellationToken,
) {
    let reread = |address| {
        MonitorMessage::Event(DeviceEvent {
            action: DeviceAction::Change,
            address,
            vendor_name: None,
            device_name: None,
        })
    };
    loop {
        // Whatever else is already queued joins the first message: events
        // that arrive together are handled as one batch.
        let (messages, after) = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(first) = sources.own.recv() => (drain(first, &mut sources.own), After::Uevents),
            Some(messages) = recv_batch_optional(&mut sources.external) => (messages, After::Uevents),
            Some(asked) = sources.rereads.recv() => {
                (vec![reread(asked.address)], After::Answer(asked.done))
            }
            Some(report) = sources.returns.recv() => {
                (vec![reread(report.address)], After::Report(report))
            }
        };
        // A re-read of our own is no kernel event: no Uevent for it.
        let from_kernel = matches!(after, After::Uevents);
        let (back, outcomes) = apply_steps(inventory, steps(messages)).await;
        inventory = back;
        for StepOutcome { step, changes } in outcomes {
            publish(&shared, changes).await;
            if let (Step::Events(events), true) = (&step, from_kernel) {
                emit_uevents(&shared, events).await;
            }
        }
        match after {
            After::Uevents => {}
            After::Answer(done) => {
                let _ = done.send(());
            }
            After::Report(report) => emit_return(&shared, &report).await,
        }
    }
    // Stop the sources first, so nothing new arrives, then take the objects
    // down: when `stop` returns, nothing of this component is left.
    if let Some(monitor) = owned.monitor {
        monitor.stop().await;
    }
    if let Some(auto_return) = owned.auto_return {
        auto_return.stop().await;
    }
    let server = shared.connection.object_server();
    for state in inventory.devices() {
        let _ = server
            .remove::<PciDeviceObject, _>(state.info.address.object_path())
            .await;
    }
}

/// Applies the steps in order on the blocking pool: one trip there per
/// batch, however many events it holds.
async fn apply_steps(mut inventory: Inventory, steps: Vec<Step>) -> (Inventory, Vec<StepOutcome>) {
    tokio::task::spawn_blocking(move || {
        let outcomes = steps
            .into_iter()
            .map(|step| {
                let changes = step.apply(&mut inventory);
                StepOutcome { step, changes }
            })
            .collect();
        (inventory, outcomes)
    })
    .await
    .expect("each step catches its own panics")
}

/// `first` and every message already queued behind it, up to what the
/// channel holds (so one pass stays bounded while a burst goes on).
fn drain(
    first: MonitorMessage,
    receiver: &mut mpsc::Receiver<MonitorMessage>,
) -> Vec<MonitorMessage> {
    let mut messages = Vec::with_capacity(receiver.len() + 1);
    messages.push(first);
    while messages.len() < EVENT_CHANNEL_CAPACITY {
        match receiver.try_recv() {
            Ok(message) => messages.push(message),
            Err(_) => break,
        }
    }
    messages
}

/// One part of a batch, applied to the inventory as a whole and published
/// before the next part.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Events applied together (each device re-read once); their Uevents
    /// follow the step's changes, in arrival order.
    Events(Vec<DeviceEvent>),
    /// Events were lost: re-read everything.
    Resync,
}

struct StepOutcome {
    step: Step,
    changes: Vec<InventoryChange>,
}

impl Step {
    /// Applies the step. A bug triggered by one odd device must not end
    /// event processing: it is logged and everything re-read instead.
    fn apply(&self, inventory: &mut Inventory) -> Vec<InventoryChange> {
        let update = |inventory: &mut Inventory| match self {
            Step::Events(events) => inventory.apply_batch(events),
            Step::Resync => {
                tracing::warn!("device events were lost: re-reading all devices");
                inventory.resync()
            }
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| update(inventory))).unwrap_or_else(
            |_| {
                tracing::error!("updating the device inventory failed: re-reading all devices");
                inventory.resync()
            },
        )
    }
}

/// Splits a batch into steps, keeping the order. Events share a step
/// unless a device is removed in it: its removal and any other event about
/// it go to different steps, so clients still see InterfacesRemoved (and
/// InterfacesAdded when it comes back) rather than a net change. A resync
/// is a step of its own; back-to-back resyncs are one.
fn steps(messages: Vec<MonitorMessage>) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut events: Vec<DeviceEvent> = Vec::new();
    // Devices in `events` → whether one of their events is a removal.
    let mut seen: HashMap<PciAddress, bool> = HashMap::new();
    for message in messages {
        match message {
            MonitorMessage::Resync => {
                if !events.is_empty() {
                    steps.push(Step::Events(std::mem::take(&mut events)));
                    seen.clear();
                }
                if steps.last() != Some(&Step::Resync) {
                    steps.push(Step::Resync);
                }
            }
            MonitorMessage::Event(event) => {
                let removal = event.action == DeviceAction::Remove;
                if let Some(&removed) = seen.get(&event.address)
                    && (removed || removal)
                {
                    steps.push(Step::Events(std::mem::take(&mut events)));
                    seen.clear();
                }
                *seen.entry(event.address).or_default() |= removal;
                events.push(event);
            }
        }
    }
    if !events.is_empty() {
        steps.push(Step::Events(events));
    }
    steps
}

/// The next batch ([`drain`]) from an optional channel; pends forever when
/// there is none or it is closed (the select's other branches still run).
async fn recv_batch_optional(
    receiver: &mut Option<mpsc::Receiver<MonitorMessage>>,
) -> Option<Vec<MonitorMessage>> {
    match receiver {
        Some(r) => match r.recv().await {
            Some(first) => Some(drain(first, r)),
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
    let mut removed = false;
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
                removed = true;
            }
            InventoryChange::Changed { new, .. } => {
                let path = new.info.address.object_path();
                update(shared, &path, new).await;
            }
        }
    }
    // A destroyed VF (or any device gone) needs no original driver any more.
    if removed {
        shared.passthrough.forget_stale_drivers().await;
    }
}

/// `Uevent(action)` for each event, in order, on the device's object, after
/// its properties are up to date (a removed device has no object left:
/// InterfacesRemoved says it). One object lookup per device.
async fn emit_uevents(shared: &Arc<Shared>, events: &[DeviceEvent]) {
    let server = shared.connection.object_server();
    let mut emitters: HashMap<PciAddress, Option<SignalEmitter<'static>>> = HashMap::new();
    for event in events {
        let emitter = match emitters.entry(event.address) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(new) => {
                let path = event.address.object_path();
                let found = server.interface::<_, PciDeviceObject>(&path).await;
                new.insert(found.ok().map(|iface| iface.signal_emitter().clone()))
            }
        };
        let Some(emitter) = emitter else {
            continue;
        };
        if let Err(e) = PciDeviceObject::uevent(emitter, event.action.as_str()).await {
            tracing::warn!("cannot emit Uevent for {}: {e}", emitter.path());
        }
    }
}

/// Most uses polkit's dialog lists (a GPU can have hundreds of holders).
const MAX_POLKIT_USES: usize = 10;

/// `sentences` for polkit's dialog and rules: joined by `; `, at most
/// [`MAX_POLKIT_USES`] of them, the rest counted.
fn polkit_list(sentences: &[String]) -> String {
    let mut shown: Vec<&str> = sentences
        .iter()
        .take(MAX_POLKIT_USES)
        .map(String::as_str)
        .collect();
    let more = sentences.len().saturating_sub(MAX_POLKIT_USES);
    let rest = format!("and {more} more");
    if more > 0 {
        shown.push(&rest);
    }
    shown.join("; ")
}

/// `ReturnFinished` on the object of a device given back after use.
async fn emit_return(shared: &Arc<Shared>, report: &ReturnReport) {
    let path = report.address.object_path();
    let server = shared.connection.object_server();
    let Ok(iface) = server.interface::<_, PciDeviceObject>(&path).await else {
        return;
    };
    let message = format!("{}: {}", report.address, report.outcome);
    if let Err(e) =
        PciDeviceObject::return_finished(iface.signal_emitter(), report.outcome.kind(), &message)
            .await
    {
        tracing::warn!("cannot emit ReturnFinished for {path}: {e}");
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

    /// What the getters return ([`device_properties::of`], as the signals).
    fn properties(&self) -> DeviceProperties {
        device_properties::of(&self.state())
    }

    /// The device's boot-time claim, for the properties; `None` when it
    /// could not be read (logged: a property has no error to say it with).
    async fn boot_override(&self) -> Option<BootOverride> {
        let address = self.state().info.address;
        match self.shared.passthrough.boot_override(address).await {
            Ok(found) => Some(found),
            Err(e) => {
                tracing::warn!(device = %address, "boot-time claim: {e}");
                None
            }
        }
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
        let options = parse_binding(method, options)?;
        let (target, group, group_devices) = {
            let state = self.state();
            (
                state.info.address,
                state.info.iommu_group,
                state.iommu_group_devices.join(","),
            )
        };
        // Said before polkit asks: nothing to authorize when it cannot be done.
        if options.auto_return {
            if self.shared.returns.is_none() {
                return Err(VmError::NotSupported(
                    "Detach: auto-return needs inotify, which the service could not set up (see its log)"
                        .into(),
                ));
            }
            if group.is_none() {
                return Err(VfioError::NoGroup(target).into());
            }
        }
        let address = target.to_string();
        let mut details = HashMap::from([(polkit_detail::DEVICE, address.as_str())]);
        if options.group {
            // What polkit shows and rules see; the move itself reads the
            // group again, in the thread that acts.
            details.insert(polkit_detail::GROUP_DEVICES, group_devices.as_str());
        }
        if options.persistent {
            // So rules can refuse boot-time claims while allowing the rest.
            details.insert(polkit_detail::PERSISTENT, "true");
        }
        let persistence = if options.persistent {
            Persistence::AtBoot
        } else {
            Persistence::UntilReboot
        };
        let guard = self.shared.callers.guard(header)?;
        let authority = &self.shared.authority;
        let caller = authority.caller(header).await?;
        let check = authority.check(
            header,
            &caller,
            Action::ManageDevices,
            options.interactive,
            &details,
        );
        guard.until_gone(check).await?;
        let passthrough = &self.shared.passthrough;
        let scope = if options.group {
            Scope::Group
        } else {
            Scope::Device
        };
        // The group as polkit was shown it: what the gates look at and the
        // binder moves, or nothing moves.
        let approved: Vec<PciAddress> = group_devices
            .split(',')
            .filter_map(|a| a.parse::<PciAddress>().ok())
            .collect();
        if action == Move::Detach {
            let blockers = guard
                .until_gone(passthrough.detach_blockers(target, group, scope, &approved))
                .await?;
            if !blockers.is_empty() {
                if !options.force {
                    return Err(PassthroughError::HostInUse {
                        address: target,
                        blockers,
                    }
                    .into());
                }
                let shown = blockers.sentences(target);
                let uses = polkit_list(&shown);
                let mut details = details.clone();
                details.insert(polkit_detail::HOST_USES, uses.as_str());
                let check = authority.check(
                    header,
                    &caller,
                    Action::ForceDetach,
                    options.interactive,
                    &details,
                );
                guard.until_gone(check).await?;
                // The administrator may have taken minutes to answer: force
                // only what they were shown.
                let now = guard
                    .until_gone(passthrough.detach_blockers(target, group, scope, &approved))
                    .await?;
                if now.sentences(target).iter().any(|s| !shown.contains(s)) {
                    return Err(PassthroughError::HostInUse {
                        address: target,
                        blockers: now,
                    }
                    .into());
                }
                tracing::warn!(
                    device = %target,
                    uid = caller.uid,
                    "detaching although the host uses it (forced): {uses}"
                );
            }
        }
        let (result, reread) = match scope {
            Scope::Group => {
                let result = passthrough
                    .change_group(target, group, action, &approved, persistence)
                    .await;
                // Also after a failure: a rollback that failed left a member
                // elsewhere, and its object must say where.
                (result.map(drop), approved.clone())
            }
            Scope::Device => {
                let result = passthrough.change(target, group, action, persistence).await;
                let reread = if result.is_ok() {
                    vec![target]
                } else {
                    Vec::new()
                };
                (result.map(drop), reread)
            }
        };
        // Re-read now, and answer only when the objects show the result,
        // rather than waiting for the kernel's bind/unbind events.
        for address in reread {
            let (done, answered) = oneshot::channel();
            let reread = Reread { address, done };
            if self.shared.rereads.send(reread).await.is_ok() {
                let _ = answered.await;
            }
        }
        result?;
        if options.auto_return {
            self.mark_for_return(target, group, scope, &approved)
                .await?;
        }
        Ok(())
    }

    /// Detach's `auto-return`: marks the device (with `group`, every
    /// member this service detached) and watches its group.
    async fn mark_for_return(
        &self,
        target: PciAddress,
        group: Option<u32>,
        scope: Scope,
        approved: &[PciAddress],
    ) -> Result<(), VmError> {
        let passthrough = &self.shared.passthrough;
        let members = match scope {
            Scope::Device => vec![target],
            Scope::Group => approved.to_vec(),
        };
        let mut marked = 0;
        for member in members {
            match passthrough.set_auto_return(member, true).await {
                Ok(()) => marked += 1,
                // A group's bridge, or a member someone else put on vfio-pci.
                Err(_) if scope == Scope::Group => {}
                Err(e) => return Err(e.into()),
            }
        }
        if marked == 0 {
            return Err(VfioError::NotDetachedByUs(target).into());
        }
        if let (Some(returns), Some(group)) = (&self.shared.returns, group) {
            returns.watch(group);
        }
        Ok(())
    }
}

/// A host PCI device and whether it can be passed through to a VM.
#[interface(name = "org.example.VmManager1.PciDevice")]
impl PciDeviceObject {
    // Signals first (see "Member order" in the `service` module docs).
    /// Emitted for every kernel or udev event about this device (`add`,
    /// `change`, `bind`, `unbind`, …) once the properties reflect it. A
    /// removal shows as InterfacesRemoved instead.
    #[zbus(signal)]
    async fn uevent(emitter: &SignalEmitter<'_>, action: &str) -> zbus::Result<()>;

    /// Emitted once per give-back of a device detached with `auto-return`,
    /// after its last VM user exited: `outcome` is `returned`,
    /// `reset-failed`, `driver-did-not-bind` or `failed`; `message` says
    /// it in words, with the reason.
    #[zbus(signal)]
    async fn return_finished(
        emitter: &SignalEmitter<'_>,
        outcome: &str,
        message: &str,
    ) -> zbus::Result<()>;

    /// Binds the device to vfio-pci (driver_override, unbind, drivers_probe),
    /// remembering its driver for Reattach. `InUse` when a VM holds its VFIO
    /// group; nothing happens when it is already bound to vfio-pci or a
    /// variant of it (`devices::vfio::is_vfio_driver`). Action
    /// `org.example.vmmanager.manage-devices`. Options:
    /// `auth.no-user-interaction` (b); `group` (b): every non-bridge
    /// endpoint of the IOMMU group, rolled back in reverse order when one
    /// fails (`Failed` names the member, what was rolled back, and any
    /// device the rollback left behind); `persistent` (b): once moved, also
    /// claimed for vfio-pci at boot (`devices::persistent`), polkit detail
    /// `persistent`.
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
    /// `auth.no-user-interaction` (b); `group` (b): the device and every
    /// group member this service detached, each to its own driver;
    /// `persistent` (b): once moved, the boot-time claim is removed.
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

    /// Whether the device goes back to its host driver after its last VM
    /// user exits (Detach's `auto-return`). Computed when read; no change
    /// signal.
    #[zbus(property(emits_changed_signal = "false"))]
    fn auto_return(&self) -> bool {
        let address = self.state().info.address;
        self.shared.passthrough.auto_return(address)
    }

    /// How the host uses the device, as any local user may see it (mounts,
    /// swap, interfaces, display; processes and disk claims only Detach
    /// looks at, after polkit): `kind` (s) and `text` (s) per use.
    /// Computed when read; no change signal.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn host_users(&self) -> Vec<Dict> {
        let address = self.state().info.address;
        self.shared
            .passthrough
            .host_users_for_anyone(address)
            .await
            .into_iter()
            .map(|u| device_properties::host_user(u).to_dict())
            .collect()
    }

    /// The driver the device is claimed for at boot (driverctl's override
    /// file), "" when none. Computed when read; no change signal.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn persistent_driver(&self) -> String {
        let found = self.boot_override().await;
        found
            .as_ref()
            .and_then(BootOverride::driver)
            .unwrap_or_default()
            .to_owned()
    }

    /// Who made the boot-time claim: `vmmanager`, `other` (driverctl, an
    /// admin), `unknown` (unreadable), "" when none. Computed when read; no
    /// change signal.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn persistent_origin(&self) -> String {
        let origin = match self.boot_override().await {
            None => "unknown",
            Some(BootOverride::None) => "",
            Some(BootOverride::Vfio { ours: true }) => "vmmanager",
            Some(BootOverride::Vfio { ours: false } | BootOverride::Other(_)) => "other",
        };
        origin.to_owned()
    }

    /// Processes holding /dev/vfio/<group> or the device's iommufd cdev
    /// (/dev/vfio/devices/vfioN) open: `pid` (u), `exe` (s), `vm-name` (s).
    /// Computed when read; no change signal.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn in_use_by(&self) -> Vec<Dict> {
        let (address, group) = {
            let state = self.state();
            (state.info.address, state.info.iommu_group)
        };
        // Unknown (or too many such reads at once) reads as nobody here: a
        // property has no error to say it with (the domain logged why), and
        // Detach/Reattach still refuse.
        self.shared
            .passthrough
            .users_for_anyone(address, group)
            .await
            .unwrap_or_default()
            .iter()
            .map(|u| device_properties::vfio_user(u).to_dict())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: DeviceAction, address: &str) -> DeviceEvent {
        DeviceEvent {
            action,
            address: address.parse().unwrap(),
            vendor_name: None,
            device_name: None,
        }
    }

    fn message(action: DeviceAction, address: &str) -> MonitorMessage {
        MonitorMessage::Event(event(action, address))
    }

    const A: &str = "0000:01:00.0";
    const B: &str = "0000:02:00.0";

    #[test]
    fn a_batch_is_one_step_in_arrival_order() {
        let batch = vec![
            message(DeviceAction::Change, A),
            message(DeviceAction::Bind, B),
            message(DeviceAction::Change, A),
            message(DeviceAction::Other("move".into()), A),
        ];
        assert_eq!(
            steps(batch),
            [Step::Events(vec![
                event(DeviceAction::Change, A),
                event(DeviceAction::Bind, B),
                event(DeviceAction::Change, A),
                event(DeviceAction::Other("move".into()), A),
            ])]
        );
    }

    #[test]
    fn a_removal_never_shares_a_step_with_the_same_device() {
        let batch = vec![
            message(DeviceAction::Change, A),
            message(DeviceAction::Remove, B),
            message(DeviceAction::Remove, A),
            message(DeviceAction::Add, B),
            message(DeviceAction::Change, B),
            message(DeviceAction::Add, A),
        ];
        assert_eq!(
            steps(batch),
            [
                Step::Events(vec![
                    event(DeviceAction::Change, A),
                    event(DeviceAction::Remove, B)
                ]),
                Step::Events(vec![
                    event(DeviceAction::Remove, A),
                    event(DeviceAction::Add, B),
                    event(DeviceAction::Change, B),
                ]),
                Step::Events(vec![event(DeviceAction::Add, A)]),
            ]
        );
    }

    #[test]
    fn a_resync_is_a_step_of_its_own_and_repeats_collapse() {
        let batch = vec![
            MonitorMessage::Resync,
            message(DeviceAction::Change, A),
            MonitorMessage::Resync,
            MonitorMessage::Resync,
            message(DeviceAction::Change, A),
        ];
        assert_eq!(
            steps(batch),
            [
                Step::Resync,
                Step::Events(vec![event(DeviceAction::Change, A)]),
                Step::Resync,
                Step::Events(vec![event(DeviceAction::Change, A)]),
            ]
        );
        assert_eq!(steps(Vec::new()), []);
    }
}
