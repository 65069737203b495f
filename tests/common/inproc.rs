//! The whole service inside the test process, as `vmmanagerd` wires it
//! ([`daemon::build`] and [`daemon::serve`]) on a [`TestBus`], on a prepared
//! sysfs tree, with device events fed through a channel; and a collector of
//! the signals it emits, as a client sees them.
//!
//! The service is stopped by [`InProcService::stop`], or by the guard's
//! `Drop` when a test panics (needs a multi-thread runtime:
//! `#[tokio::test(flavor = "multi_thread")]`).

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zbus::message::Type;
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath, OwnedVariant};

use vmmanager::config::{Config, EventsSetting, PermittedDevice};
use vmmanager::devices::host_use::{Network, NetworkSnapshot};
use vmmanager::devices::vfio::SysfsWriter;
use vmmanager::devices::{DeviceAction, DeviceEvent, MonitorMessage};
use vmmanager::service::BUS_NAME;
use vmmanager::service::daemon::{self, DaemonError, Roots};

use super::bus::TestBus;
use super::sysfs::FakeSysfs;

pub const DEVICE_IFACE: &str = "org.example.VmManager1.PciDevice";

/// How long a test waits for an expected signal.
pub const SIGNAL_TIMEOUT: Duration = Duration::from_secs(15);

/// The service on its own connection, owning the service name.
pub struct InProcService {
    /// Fires `serve`'s shutdown.
    shutdown: CancellationToken,
    /// The task running `serve`; `None` once stopped.
    serving: Option<JoinHandle<Result<(), DaemonError>>>,
    pub connection: Connection,
    events: mpsc::Sender<MonitorMessage>,
    /// Stands in for `/dev` (`vfio/<group>` nodes), empty: kept for as long
    /// as the service looks there.
    _dev_root: TempDir,
}

/// The daemon's default configuration pointed at `fs` (sysfs and udev
/// database) and `dev_root` (for /dev), with `permitted` devices; the real
/// /proc, no vfio state file, boot-time claims beside the tree.
pub fn config(fs: &FakeSysfs, dev_root: &Path, permitted: &[(&str, &str)]) -> Config {
    let mut config = Config::default();
    config.system.sysfs_root = fs.root();
    config.devices.udev_data_dir = fs.udev_data_dir();
    // The tree's names are its udev database's alone.
    config.devices.hwdb = false;
    config.devices.dev_root = dev_root.to_owned();
    config.devices.vfio_state_file = PathBuf::new();
    config.devices.driver_overrides_dir = fs.driverctl_dir();
    config.devices.boot_claims_record = fs.boot_claims_record();
    // Events come from the test's channel (see `InProcService::start_with`).
    config.devices.events = EventsSetting::None;
    config.devices.permitted = permitted
        .iter()
        .map(|(selector, resource_name)| PermittedDevice {
            selector: (*selector).to_owned(),
            resource_name: (*resource_name).to_owned(),
        })
        .collect();
    config
}

impl InProcService {
    /// The service on `fs` with `permitted` devices; Detach and Reattach
    /// write through `writer`.
    pub async fn start(
        bus: &TestBus,
        fs: &FakeSysfs,
        permitted: &[(&str, &str)],
        writer: impl SysfsWriter + 'static,
    ) -> InProcService {
        let dev_root = tempfile::tempdir().expect("dev_root temp dir");
        let config = config(fs, dev_root.path(), permitted);
        Self::start_with(bus, &config, writer, dev_root).await
    }

    /// `daemon::build(config)` with events from a channel and sysfs writes
    /// through `writer`, served on a new connection to `bus`; returns once
    /// the service owns its name (all objects are on the bus by then).
    /// `dev_root` is kept alive with the service (the config's dev-root
    /// usually points in it).
    pub async fn start_with(
        bus: &TestBus,
        config: &Config,
        writer: impl SysfsWriter + 'static,
        dev_root: TempDir,
    ) -> InProcService {
        let connection = bus.connect().await;
        let (events, receiver) = mpsc::channel(1024);
        let roots = Roots {
            device_events: Some(receiver),
            sysfs_writer: Arc::new(writer),
            // The tree's interfaces are in no real namespace: none up, no
            // routes, unless a test gives its own.
            network: Network::Given(NetworkSnapshot::default()),
        };
        let parts = daemon::build(config, roots);
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(daemon::serve(
            connection.clone(),
            parts,
            shutdown.clone().cancelled_owned(),
        ));
        // The guard exists from here on, so a failure below still stops it.
        let mut guard = InProcService {
            shutdown,
            serving: Some(serving),
            connection,
            events,
            _dev_root: dev_root,
        };
        guard.wait_for_name().await;
        guard
    }

    /// Waits (bounded) until this service's connection owns [`BUS_NAME`].
    async fn wait_for_name(&mut self) {
        let dbus = zbus::fdo::DBusProxy::new(&self.connection)
            .await
            .expect("a DBus proxy");
        let me = self.unique_name();
        let deadline = tokio::time::Instant::now() + SIGNAL_TIMEOUT;
        loop {
            if let Ok(owner) = dbus.get_name_owner(BUS_NAME.try_into().unwrap()).await
                && owner.as_str() == me
            {
                return;
            }
            if let Some(serving) = self.serving.take_if(|s| s.is_finished()) {
                panic!("serve ended before taking the name: {:?}", serving.await);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the service did not take {BUS_NAME} within {SIGNAL_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The service connection's unique name (the sender of its signals).
    pub fn unique_name(&self) -> String {
        self.connection
            .unique_name()
            .expect("connected to a bus")
            .to_string()
    }

    /// Feeds a message as the udev monitor would.
    pub async fn send(&self, message: MonitorMessage) {
        self.events
            .send(message)
            .await
            .expect("the device service is listening");
    }

    /// Feeds a uevent (no udev names) for the device at `address`.
    pub async fn uevent(&self, action: DeviceAction, address: &str) {
        self.send(MonitorMessage::Event(DeviceEvent {
            action,
            address: address.parse().expect("a PCI address"),
            vendor_name: None,
            device_name: None,
        }))
        .await;
    }

    /// The event channel itself (to show it is closed after `stop`).
    pub fn sender(&self) -> mpsc::Sender<MonitorMessage> {
        self.events.clone()
    }

    /// Fires the shutdown and waits for `serve` to return, which it does
    /// only when every task of the service has ended; the connection stays
    /// open.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(serving) = self.serving.take() {
            let result = serving.await.expect("serve does not panic");
            assert!(result.is_ok(), "serve failed: {result:?}");
        }
    }
}

impl Drop for InProcService {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let Some(serving) = self.serving.take() else {
            return;
        };
        // A panicking test: wait for the service anyway (never panic here).
        if let Ok(handle) = tokio::runtime::Handle::try_current()
            && handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(|| {
                let _ = handle.block_on(tokio::time::timeout(Duration::from_secs(10), serving));
            });
        }
    }
}

/// One signal of the service, decoded.
#[derive(Debug, Clone)]
pub enum Sig {
    /// `InterfacesAdded(path, {iface: props})`.
    Added {
        path: String,
        interfaces: BTreeMap<String, HashMap<String, OwnedVariant>>,
    },
    /// `InterfacesRemoved(path, ifaces)`.
    Removed {
        path: String,
        interfaces: Vec<String>,
    },
    /// `PropertiesChanged(iface, changed, invalidated)` on `path`.
    Changed {
        path: String,
        interface: String,
        changed: HashMap<String, OwnedVariant>,
        invalidated: Vec<String>,
    },
    /// `PciDevice.Uevent(action)` on `path`.
    Uevent { path: String, action: String },
    /// Any other signal, by its member name.
    Other { member: String },
}

/// Every signal one sender emits, in order, as a client on the bus gets it.
pub struct Signals {
    stream: MessageStream,
}

impl Signals {
    /// Subscribes (the match rule is in place when this returns).
    pub async fn subscribe(client: &Connection, sender: &str) -> Signals {
        let rule = MatchRule::builder()
            .msg_type(Type::Signal)
            .sender(sender.to_owned())
            .build()
            .expect("valid sender");
        let stream = MessageStream::for_match_rule(rule, client, NonZeroUsize::new(10_000))
            .await
            .expect("add the match rule");
        Signals { stream }
    }

    /// The next signal, or `None` when none comes within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Sig> {
        let message = tokio::time::timeout(timeout, self.stream.next())
            .await
            .ok()??
            .expect("a valid message");
        Some(decode(&message))
    }

    /// Every signal up to and excluding the first one `last` accepts, which
    /// is returned second. Panics when it does not come in time.
    pub async fn until(&mut self, mut last: impl FnMut(&Sig) -> bool) -> (Vec<Sig>, Sig) {
        let mut before = Vec::new();
        loop {
            match self.next(SIGNAL_TIMEOUT).await {
                Some(sig) if last(&sig) => return (before, sig),
                Some(sig) => before.push(sig),
                None => panic!(
                    "the expected signal did not come within {SIGNAL_TIMEOUT:?}; got {before:#?}"
                ),
            }
        }
    }

    /// Everything before the `Uevent(action)` on `path`.
    pub async fn until_uevent(&mut self, path: &str, action: &str) -> Vec<Sig> {
        self.until(|s| matches!(s, Sig::Uevent { path: p, action: a } if p == path && a == action))
            .await
            .0
    }

    /// Every signal arriving within `window`.
    pub async fn quiet(&mut self, window: Duration) -> Vec<Sig> {
        let deadline = tokio::time::Instant::now() + window;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return got;
            }
            match self.next(left).await {
                Some(sig) => got.push(sig),
                None => return got,
            }
        }
    }
}

fn decode(message: &zbus::Message) -> Sig {
    let header = message.header();
    let path = header.path().map(|p| p.to_string()).unwrap_or_default();
    let interface = header
        .interface()
        .map(|i| i.to_string())
        .unwrap_or_default();
    let member = header.member().map(|m| m.to_string()).unwrap_or_default();
    let body = message.body();
    match (interface.as_str(), member.as_str()) {
        ("org.freedesktop.DBus.ObjectManager", "InterfacesAdded") => {
            let (path, interfaces): (
                OwnedObjectPath,
                HashMap<String, HashMap<String, OwnedVariant>>,
            ) = body.deserialize().expect("InterfacesAdded body");
            Sig::Added {
                path: path.to_string(),
                interfaces: interfaces.into_iter().collect(),
            }
        }
        ("org.freedesktop.DBus.ObjectManager", "InterfacesRemoved") => {
            let (path, interfaces): (OwnedObjectPath, Vec<String>) =
                body.deserialize().expect("InterfacesRemoved body");
            Sig::Removed {
                path: path.to_string(),
                interfaces,
            }
        }
        ("org.freedesktop.DBus.Properties", "PropertiesChanged") => {
            let (iface, changed, invalidated): (
                String,
                HashMap<String, OwnedVariant>,
                Vec<String>,
            ) = body.deserialize().expect("PropertiesChanged body");
            Sig::Changed {
                path,
                interface: iface,
                changed,
                invalidated,
            }
        }
        (DEVICE_IFACE, "Uevent") => {
            let action: String = body.deserialize().expect("Uevent body");
            Sig::Uevent { path, action }
        }
        _ => Sig::Other { member },
    }
}

/// A property value in a comparable form, typed as on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    S(String),
    Q(u16),
    U(u32),
    I(i32),
    B(bool),
    As(Vec<String>),
    /// `aa{sv}` with each dict's values as text (`pid`, `exe`, `vm-name`).
    Dicts(Vec<BTreeMap<String, String>>),
    /// Any other signature.
    Other(String),
}

pub fn val(v: &OwnedVariant) -> Val {
    let sig = v.value_signature().to_string();
    let owned = v.try_clone().expect("clone a variant");
    match sig.as_str() {
        "s" => Val::S(String::try_from(owned).unwrap()),
        "q" => Val::Q(u16::try_from(owned).unwrap()),
        "u" => Val::U(u32::try_from(owned).unwrap()),
        "i" => Val::I(i32::try_from(owned).unwrap()),
        "b" => Val::B(bool::try_from(owned).unwrap()),
        "as" => Val::As(Vec::<String>::try_from(owned).unwrap()),
        "aa{sv}" => {
            let dicts = Vec::<HashMap<String, OwnedVariant>>::try_from(owned).unwrap();
            Val::Dicts(
                dicts
                    .into_iter()
                    .map(|d| {
                        d.into_iter()
                            .map(|(k, v)| {
                                let text = match val(&v) {
                                    Val::S(s) => s,
                                    Val::U(n) => n.to_string(),
                                    other => format!("{other:?}"),
                                };
                                (k, text)
                            })
                            .collect()
                    })
                    .collect(),
            )
        }
        other => Val::Other(other.to_owned()),
    }
}

/// A property dict as `name → Val`, sorted.
pub fn vals(props: &HashMap<String, OwnedVariant>) -> BTreeMap<String, Val> {
    props.iter().map(|(k, v)| (k.clone(), val(v))).collect()
}
