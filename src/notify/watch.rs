//! The system side: follows `org.example.VmManager` through its restarts
//! and turns its signals into [`Message`](super::policy::Message)s.
//!
//! Subscriptions are made per owner, with the owner's unique name as the
//! sender: when the service goes, its streams (and match rules) are dropped;
//! when a new owner appears, the companion subscribes to it first and then
//! reads its device objects (subscribe before enumerating, so nothing falls
//! in between). While the service is absent the task only waits for
//! `NameOwnerChanged`; it never polls.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::SelectAll;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zbus::fdo::{DBusProxy, ObjectManagerProxy};
use zbus::message::Type as MessageType;
use zbus::names::{BusName, OwnedUniqueName, UniqueName};
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath};

use super::NotifyError;
use super::coalesce::{Coalescer, DeviceChange, diff};
use super::desktop::Notifier;
use super::policy::{self, CheckReport, DeviceProperties};
use super::status::{Service, StatusSender};

use vmmanager_client::PciAddress;
use vmmanager_client::dict::Dict;
use vmmanager_client::names::{
    BUS_NAME as SERVICE_NAME, DEVICE_INTERFACE, DEVICES_PATH, MANAGER_INTERFACE, MANAGER_PATH,
    signal,
};

/// Signals are queued up to this many per stream while a notification is
/// being shown.
const QUEUE: usize = 1024;

/// Device objects by path, as the service last showed them.
type DeviceView = HashMap<String, DeviceProperties>;

/// What the watcher knows across service restarts.
struct Watcher<'a> {
    connection: &'a Connection,
    notifier: &'a Notifier,
    coalescer: Coalescer,
    /// `None` until the service was first seen: its first device list is
    /// the baseline, not news.
    devices: Option<DeviceView>,
    /// The service's unique name while it is followed.
    owner: Option<OwnedUniqueName>,
    /// The at-a-glance state (for the tray), kept from the same signals.
    status: &'a StatusSender,
    /// The session user's uid: only their own disk checks are shown.
    uid: u32,
}

/// What [`watch`] works with besides the bus.
pub struct Links<'a> {
    pub notifier: &'a Notifier,
    pub status: &'a StatusSender,
    /// Requests to re-read what has no change signal (`InUseBy`, …), e.g.
    /// when the tray menu opens.
    pub refresh: mpsc::Receiver<()>,
}

/// Runs until `shutdown`; an error only when the system bus connection
/// itself is lost.
pub async fn watch(
    connection: &Connection,
    links: Links<'_>,
    quiet: Duration,
    max_delay: Duration,
    shutdown: &CancellationToken,
) -> Result<(), NotifyError> {
    let Links {
        notifier,
        status,
        mut refresh,
    } = links;
    let dbus = DBusProxy::new(connection).await.map_err(NotifyError::Bus)?;
    // Subscribe to owner changes before asking for the owner, so an owner
    // that appears in between is not missed.
    let mut owners = dbus
        .receive_name_owner_changed_with_args(&[(0, SERVICE_NAME)])
        .await
        .map_err(NotifyError::Bus)?;
    let service = BusName::try_from(SERVICE_NAME).expect("valid bus name");
    let mut watcher = Watcher {
        connection,
        notifier,
        coalescer: Coalescer::new(quiet, max_delay),
        devices: None,
        owner: None,
        status,
        // SAFETY: getuid cannot fail and touches no memory.
        uid: unsafe { libc::getuid() },
    };
    let mut signals = match dbus.get_name_owner(service).await {
        Ok(owner) => watcher.follow(owner.inner()).await,
        Err(_) => {
            tracing::info!("{SERVICE_NAME} is not running; waiting for it");
            None
        }
    };

    loop {
        let deadline = watcher.coalescer.deadline().map(Instant::from_std);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            // Signals the old owner sent before it left come before the
            // owner change that follows them.
            Some(message) = next_signal(&mut signals) => watcher.handle(&message).await,
            change = owners.next() => {
                let Some(change) = change else {
                    return Err(NotifyError::Disconnected);
                };
                let args = change.args().map_err(NotifyError::Bus)?;
                // Dropping the streams removes their match rules.
                signals = None;
                watcher.owner_lost().await;
                match args.new_owner().as_ref() {
                    Some(owner) => {
                        tracing::info!(owner = %owner, "{SERVICE_NAME} appeared");
                        signals = watcher.follow(owner).await;
                    }
                    None => tracing::info!("{SERVICE_NAME} went away; waiting for it to return"),
                }
            }
            () = sleep_until(deadline) => watcher.flush().await,
            Some(()) = refresh.recv() => watcher.refresh().await,
        }
    }
}

type Signals = SelectAll<MessageStream>;

async fn next_signal(signals: &mut Option<Signals>) -> Option<zbus::Message> {
    match signals {
        Some(s) => loop {
            match s.next().await {
                Some(Ok(message)) => return Some(message),
                Some(Err(e)) => tracing::debug!("unreadable signal: {e}"),
                // The connection is gone; the owner stream reports it.
                None => std::future::pending::<()>().await,
            }
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The match rules for one owner: DiskChecked, the ObjectManager's signals,
/// device property changes and give-backs after use.
fn rules(owner: &UniqueName<'_>) -> zbus::Result<Vec<MatchRule<'static>>> {
    let owner = owner.to_owned();
    let base = || {
        MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender(owner.clone())
    };
    Ok(vec![
        base()
            .path(MANAGER_PATH)
            .interface(MANAGER_INTERFACE)
            .member(signal::DISK_CHECKED)
            .build()?
            .to_owned(),
        base()
            .path(MANAGER_PATH)
            .interface("org.freedesktop.DBus.ObjectManager")
            .build()?
            .to_owned(),
        base()
            .path_namespace(DEVICES_PATH)
            .interface(DEVICE_INTERFACE)
            .member(signal::RETURN_FINISHED)
            .build()?
            .to_owned(),
        base()
            .path_namespace(DEVICES_PATH)
            .interface("org.freedesktop.DBus.Properties")
            .member("PropertiesChanged")
            .arg(0, DEVICE_INTERFACE)
            .build()?
            .to_owned(),
    ])
}

impl Watcher<'_> {
    /// Subscribes to `owner`'s signals, then reads its devices. `None` when
    /// it went away meanwhile (the next owner change says what is next).
    async fn follow(&mut self, owner: &UniqueName<'_>) -> Option<Signals> {
        match self.subscribe(owner).await {
            Ok((signals, view)) => {
                if let Some(old) = &self.devices {
                    // Changes while the service was away (or restarting).
                    let now = std::time::Instant::now();
                    for change in diff(old, &view) {
                        self.coalescer.push(change, now);
                    }
                }
                tracing::info!(owner = %owner, devices = view.len(), "following {SERVICE_NAME}");
                self.devices = Some(view);
                self.owner = Some(owner.to_owned().into());
                let version = self.version(owner).await;
                self.status
                    .send_modify(|s| s.service = Service::Running { version });
                self.publish_devices();
                Some(signals)
            }
            Err(e) => {
                tracing::warn!(owner = %owner, "cannot follow {SERVICE_NAME}: {e}");
                None
            }
        }
    }

    /// The service's `Version`, "" when it cannot be read.
    async fn version(&self, owner: &UniqueName<'_>) -> String {
        let read = async {
            zbus::fdo::PropertiesProxy::builder(self.connection)
                .destination(owner.to_owned())
                .path(MANAGER_PATH)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await?
                .get(
                    zbus::names::InterfaceName::from_static_str_unchecked(MANAGER_INTERFACE),
                    "Version",
                )
                .await
                .map_err(zbus::Error::from)
        };
        match read.await.map(String::try_from) {
            Ok(Ok(version)) => version,
            Ok(Err(e)) => {
                tracing::debug!("unreadable Version: {e}");
                String::new()
            }
            Err(e) => {
                tracing::debug!("cannot read the service's Version: {e}");
                String::new()
            }
        }
    }

    /// The device view as the tray shows it: sorted, none while the
    /// service is away.
    fn publish_devices(&self) {
        let devices = match (&self.owner, &self.devices) {
            (Some(_), Some(view)) => {
                let mut devices: Vec<DeviceProperties> = view.values().cloned().collect();
                devices.sort_by(|a, b| a.address.cmp(&b.address));
                devices
            }
            _ => Vec::new(),
        };
        self.status.send_if_modified(|s| {
            let changed = s.devices != devices;
            s.devices = devices;
            changed
        });
    }

    /// Re-reads what the service computes when read and never signals
    /// ([`DeviceProperties::COMPUTED_WHEN_READ`]: `InUseBy`, `HostUsers`,
    /// `AutoReturn`, the boot-time claim). Only those: every other property
    /// arrives by signal, and the notifications are made from those.
    async fn refresh(&mut self) {
        let Some(owner) = self.owner.clone() else {
            return;
        };
        let objects = async {
            ObjectManagerProxy::builder(self.connection)
                .destination(owner.clone())
                .path(MANAGER_PATH)
                .build()
                .await?
                .get_managed_objects()
                .await
                .map_err(zbus::Error::from)
        };
        let objects = match objects.await {
            Ok(objects) => objects,
            Err(e) => {
                tracing::debug!("cannot re-read the devices: {e}");
                return;
            }
        };
        let Some(view) = &mut self.devices else {
            return;
        };
        // Only what has no change signal: the rest is kept current by
        // PropertiesChanged.
        for (path, interfaces) in &objects {
            let Some(props) = interfaces
                .iter()
                .find(|(name, _)| name.as_str() == DEVICE_INTERFACE)
                .map(|(_, props)| props)
            else {
                continue;
            };
            let Some(device) = view.get_mut(path.as_str()) else {
                continue;
            };
            let computed: Dict = DeviceProperties::COMPUTED_WHEN_READ
                .iter()
                .filter_map(|name| {
                    let value = props.get(*name)?.try_clone().ok()?;
                    Some(((*name).to_owned(), value))
                })
                .collect();
            device.update(&computed);
        }
        self.publish_devices();
    }

    async fn subscribe(&self, owner: &UniqueName<'_>) -> zbus::Result<(Signals, DeviceView)> {
        let mut signals = SelectAll::new();
        for rule in rules(owner)? {
            signals.push(
                MessageStream::for_match_rule(
                    rule,
                    self.connection,
                    std::num::NonZeroUsize::new(QUEUE),
                )
                .await?,
            );
        }
        let objects = ObjectManagerProxy::builder(self.connection)
            .destination(owner.to_owned())
            .path(MANAGER_PATH)
            .build()
            .await?
            .get_managed_objects()
            .await?;
        let view = objects
            .iter()
            .filter_map(|(path, interfaces)| {
                let props = interfaces
                    .iter()
                    .find(|(name, _)| name.as_str() == DEVICE_INTERFACE)?
                    .1;
                Some((path.to_string(), DeviceProperties::from_properties(props)))
            })
            .collect();
        Ok((signals, view))
    }

    /// The service is gone. The objects it removed while stopping are not
    /// devices leaving the host: they go back into the view (a restart
    /// compares against it) and are not reported.
    async fn owner_lost(&mut self) {
        self.owner = None;
        self.status.send_if_modified(|s| {
            std::mem::replace(&mut s.service, Service::NotRunning) != Service::NotRunning
        });
        self.publish_devices();
        let mut batch = self.coalescer.take();
        if let Some(view) = &mut self.devices {
            for device in batch.removed.drain(..) {
                if let Ok(address) = device.address.parse::<PciAddress>() {
                    view.insert(address.object_path().to_string(), device);
                }
            }
        }
        self.notify_batch(&batch).await;
    }

    async fn flush(&mut self) {
        let batch = self.coalescer.take();
        self.notify_batch(&batch).await;
    }

    async fn notify_batch(&self, batch: &policy::DeviceBatch) {
        for message in policy::device_batch(batch) {
            tracing::info!(summary = message.summary, "device notification");
            self.notifier.show(message).await;
        }
    }

    async fn handle(&mut self, message: &zbus::Message) {
        let header = message.header();
        let (Some(member), Some(path)) = (header.member(), header.path()) else {
            return;
        };
        let path = path.to_string();
        let body = message.body();
        let now = std::time::Instant::now();
        match member.as_str() {
            signal::DISK_CHECKED => {
                let Ok((image, report)) = body.deserialize::<(String, Dict)>() else {
                    return;
                };
                let report = CheckReport::from_signal(&image, &report);
                // DiskChecked is public: another user's checks would bury
                // or fake this user's results.
                if !report.concerns(self.uid) {
                    tracing::debug!(image, "another user's disk check, not shown");
                    return;
                }
                let message = policy::disk_checked(&report);
                self.status.send_modify(|s| s.push_check(report));
                tracing::info!(image, summary = message.summary, "disk check notification");
                self.notifier.show(message).await;
            }
            signal::RETURN_FINISHED => {
                let Ok((outcome, text)) = body.deserialize::<(String, String)>() else {
                    return;
                };
                let label = match self.devices.as_ref().and_then(|v| v.get(&path)) {
                    Some(device) => policy::device_label(device),
                    None => address_of(&path),
                };
                if let Some(message) = policy::return_finished(&label, &outcome, &text) {
                    tracing::info!(summary = message.summary, "give-back notification");
                    self.notifier.show(message).await;
                }
            }
            "InterfacesAdded" => {
                type Added = HashMap<String, Dict>;
                let Ok((object, interfaces)) = body.deserialize::<(OwnedObjectPath, Added)>()
                else {
                    return;
                };
                let Some(props) = interfaces.get(DEVICE_INTERFACE) else {
                    return;
                };
                let info = DeviceProperties::from_properties(props);
                if let Some(view) = &mut self.devices {
                    view.insert(object.to_string(), info.clone());
                }
                self.publish_devices();
                self.coalescer.push(DeviceChange::Added(info), now);
            }
            "InterfacesRemoved" => {
                let Ok((object, interfaces)) = body.deserialize::<(OwnedObjectPath, Vec<String>)>()
                else {
                    return;
                };
                if !interfaces.iter().any(|i| i == DEVICE_INTERFACE) {
                    return;
                }
                let known = self
                    .devices
                    .as_mut()
                    .and_then(|view| view.remove(object.as_str()));
                let info = known.unwrap_or_else(|| DeviceProperties {
                    address: address_of(object.as_str()),
                    ..DeviceProperties::default()
                });
                self.publish_devices();
                self.coalescer.push(DeviceChange::Removed(info), now);
            }
            "PropertiesChanged" => {
                let Ok((_, changed, _)) = body.deserialize::<(String, Dict, Vec<String>)>() else {
                    return;
                };
                let Some(device) = self.devices.as_mut().and_then(|v| v.get_mut(&path)) else {
                    return;
                };
                let was = device.passthrough_ready;
                device.update(&changed);
                let readiness =
                    (device.passthrough_ready != was).then(|| DeviceChange::Readiness {
                        device: device.clone(),
                        was,
                    });
                self.publish_devices();
                if let Some(change) = readiness {
                    self.coalescer.push(change, now);
                }
            }
            _ => {}
        }
    }
}

/// `/org/example/VmManager/devices/pci_0000_03_00_0` → `0000:03:00.0`
/// (for a removal the companion had not seen added); else the path's last
/// element.
fn address_of(path: &str) -> String {
    PciAddress::from_object_path(path).map_or_else(
        |_| path.rsplit('/').next().unwrap_or(path).to_owned(),
        |a| a.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_from_paths() {
        assert_eq!(
            address_of("/org/example/VmManager/devices/pci_0000_03_00_0"),
            "0000:03:00.0"
        );
        assert_eq!(address_of("/org/example/VmManager/devices/odd"), "odd");
    }

    #[test]
    fn rules_name_the_owner() {
        let owner = UniqueName::try_from(":1.42").unwrap();
        let rules = rules(&owner).unwrap();
        assert_eq!(rules.len(), 4);
        for rule in &rules {
            assert!(rule.to_string().contains("sender=':1.42'"), "{rule}");
        }
        assert!(rules[2].to_string().contains(signal::RETURN_FINISHED));
        assert!(rules[3].to_string().contains(DEVICE_INTERFACE));
    }
}
