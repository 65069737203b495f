//! The device component (`DeviceService`) running inside the test process on
//! a [`TestBus`], on a prepared sysfs tree, with events fed through a
//! channel; and a collector of the signals it emits, as a client sees them.
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
use zbus::fdo::{ObjectManager, RequestNameFlags, RequestNameReply};
use zbus::message::Type;
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath, OwnedVariant};

use vmmanager::auth::Authority;
use vmmanager::devices::MonitorMessage;
use vmmanager::devices::inventory::AllowEntry;
use vmmanager::devices::vfio::VfioBinder;
use vmmanager::service::callers::Callers;
use vmmanager::service::devices::{DeviceService, DeviceSettings, EventSource};
use vmmanager::service::{BUS_NAME, MANAGER_PATH};

use super::bus::TestBus;
use super::sysfs::FakeSysfs;

pub const DEVICE_IFACE: &str = "org.example.VmManager1.PciDevice";

/// How long a test waits for an expected signal.
pub const SIGNAL_TIMEOUT: Duration = Duration::from_secs(15);

/// The device component on its own connection, owning the service name.
pub struct InProcService {
    service: Option<DeviceService>,
    pub connection: Connection,
    events: mpsc::Sender<MonitorMessage>,
    /// Stands in for `/dev` (`vfio/<group>` nodes); empty unless a test
    /// puts something there.
    dev_root: TempDir,
}

/// Settings for a service on `fs`: its sysfs and udev database, the real
/// /proc, and `dev_root` for /dev.
pub fn settings(fs: &FakeSysfs, dev_root: &Path, allow_list: Vec<AllowEntry>) -> DeviceSettings {
    DeviceSettings {
        sysfs_root: fs.root(),
        udev_data_dir: fs.udev_data_dir(),
        proc_root: PathBuf::from("/proc"),
        dev_root: dev_root.to_owned(),
        allow_list,
    }
}

impl InProcService {
    /// Serves the ObjectManager, starts the device component on `fs` with
    /// `binder`, then takes the well-known name (all devices are on the bus
    /// by then).
    pub async fn start(
        bus: &TestBus,
        fs: &FakeSysfs,
        allow_list: Vec<AllowEntry>,
        binder: VfioBinder,
    ) -> InProcService {
        let dev_root = tempfile::tempdir().expect("dev_root temp dir");
        let settings = settings(fs, dev_root.path(), allow_list);
        Self::start_with(bus, settings, binder, dev_root).await
    }

    /// Like [`start`](Self::start) with explicit settings; `dev_root` is
    /// kept alive with the service (settings.dev_root usually points in it).
    pub async fn start_with(
        bus: &TestBus,
        settings: DeviceSettings,
        binder: VfioBinder,
        dev_root: TempDir,
    ) -> InProcService {
        let connection = zbus::connection::Builder::address(bus.address())
            .build()
            .await
            .expect("connect the in-process service");
        connection
            .object_server()
            .at(MANAGER_PATH, ObjectManager)
            .await
            .expect("serve the ObjectManager");
        let (events, receiver) = mpsc::channel(1024);
        let service = DeviceService::start(
            connection.clone(),
            settings,
            Arc::new(Authority::new(connection.clone())),
            // Departures are not watched here: no test leaves mid-call.
            Callers::new(tokio_util::sync::CancellationToken::new()),
            binder,
            EventSource::Channel(receiver),
        )
        .await
        .expect("start the device service");
        // The guard exists from here on, so a failure below still stops it.
        let guard = InProcService {
            service: Some(service),
            connection,
            events,
            dev_root,
        };
        let reply = guard
            .connection
            .request_name_with_flags(BUS_NAME, RequestNameFlags::DO_NOT_QUEUE)
            .await
            .expect("request the service name");
        assert_eq!(reply, RequestNameReply::PrimaryOwner);
        guard
    }

    pub fn dev_root(&self) -> &Path {
        self.dev_root.path()
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

    /// The event channel itself (to show it is closed after `stop`).
    pub fn sender(&self) -> mpsc::Sender<MonitorMessage> {
        self.events.clone()
    }

    /// `DeviceService::stop().await`; the connection stays open.
    pub async fn stop(&mut self) {
        if let Some(service) = self.service.take() {
            service.stop().await;
        }
    }
}

impl Drop for InProcService {
    fn drop(&mut self) {
        let Some(service) = self.service.take() else {
            return;
        };
        // A panicking test: stop the component anyway (never panic here).
        if let Ok(handle) = tokio::runtime::Handle::try_current()
            && handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(|| {
                let _ = handle.block_on(tokio::time::timeout(
                    Duration::from_secs(10),
                    service.stop(),
                ));
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
    /// Anything else: `interface.member` on `path`.
    Other {
        path: String,
        interface: String,
        member: String,
    },
}

impl Sig {
    pub fn path(&self) -> &str {
        match self {
            Sig::Added { path, .. }
            | Sig::Removed { path, .. }
            | Sig::Changed { path, .. }
            | Sig::Uevent { path, .. }
            | Sig::Other { path, .. } => path,
        }
    }

    /// Names of the changed properties, sorted (for `Changed`).
    pub fn changed_names(&self) -> Vec<String> {
        match self {
            Sig::Changed { changed, .. } => {
                let mut names: Vec<String> = changed.keys().cloned().collect();
                names.sort();
                names
            }
            other => panic!("not a PropertiesChanged: {other:?}"),
        }
    }
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
        _ => Sig::Other {
            path,
            interface,
            member,
        },
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
