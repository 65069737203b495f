//! The tray icon: a StatusNotifierItem (`org.kde.StatusNotifierItem`, the
//! freedesktop/KDE convention) with a `com.canonical.dbusmenu` menu, on the
//! session bus. KDE Plasma, XFCE, Cinnamon and MATE show such items
//! natively; GNOME Shell with gnome-shell-extension-appindicator.
//!
//! Both interfaces are implemented here on the project's zbus rather than
//! with the `ksni` crate: ksni is built on zbus 5, and a second zbus in the
//! tree would mean a second copy of the D-Bus stack in the binary and in
//! every build, for two small interfaces.
//!
//! - [`item`]: the item object (icon, status, tooltip, menu path);
//! - [`menu`]: the dbusmenu object and the numbered layout behind it;
//! - [`content`]: what they show, from the [`Status`] the watcher keeps.
//!
//! [`Tray`] owns one task: it re-renders on every new [`Status`], registers
//! with the `org.kde.StatusNotifierWatcher` whenever that name gets an
//! owner (a host that starts, or restarts, after us), runs the menu's
//! Detach/Reattach calls (interactive: the session's polkit agent may ask
//! for a password) and reports their failures as notifications.
//! Without a watcher the item just waits, logging at debug level only.

pub mod content;
pub mod item;
pub mod menu;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use zbus::fdo::{DBusProxy, NameOwnerChangedStream};
use zbus::names::BusName;
use zbus::object_server::InterfaceRef;
use zbus::{Connection, proxy};

use vmmanager_client::options::AuthOptions;
use vmmanager_client::{Error, PciAddress, PciDeviceProxy};

use super::desktop::Messages;
use super::policy::{self, DeviceCall, Message};
use super::status::{Status, StatusReceiver};
use item::{ITEM_PATH, StatusNotifierItem};
use menu::{DbusMenu, MENU_PATH, MenuAction, Request};

/// The watcher's well-known name on the session bus.
pub const WATCHER_NAME: &str = "org.kde.StatusNotifierWatcher";
const WATCHER_PATH: &str = "/StatusNotifierWatcher";

/// The item's `Id` (stable across sessions, as the specification asks).
pub const ITEM_ID: &str = "vmmanager-notify";

/// Menu requests queued while the task is busy; clicks beyond are dropped.
const REQUESTS: usize = 16;

#[proxy(
    interface = "org.kde.StatusNotifierWatcher",
    default_service = "org.kde.StatusNotifierWatcher",
    default_path = "/StatusNotifierWatcher"
)]
trait StatusNotifierWatcher {
    fn register_status_notifier_item(&self, service: &str) -> zbus::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum TrayError {
    #[error("cannot serve the tray icon on the session bus: {0}")]
    Serve(#[source] zbus::Error),
}

/// What the tray task needs from the rest of the companion.
pub struct TrayLinks {
    /// The system bus, for Detach and Reattach.
    pub system: Connection,
    pub status: StatusReceiver,
    /// Asks the watcher to re-read what has no change signal (`InUseBy`,
    /// `HostUsers`, `AutoReturn`, the boot-time claim).
    pub refresh: mpsc::Sender<()>,
    pub notifications: Messages,
}

/// Handle of the running tray.
pub struct Tray {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Tray {
    /// Serves the item and its menu on `session` and starts the task.
    pub async fn start(session: Connection, links: TrayLinks) -> Result<Tray, TrayError> {
        let (requests_tx, requests) = mpsc::channel(REQUESTS);
        let initial = links.status.borrow().clone();
        let state = content::item(&initial);
        let server = session.object_server();
        server
            .at(
                ITEM_PATH,
                StatusNotifierItem {
                    id: ITEM_ID,
                    title: policy::APP_NAME,
                    icon_name: content::ICON,
                    attention_icon_name: content::ATTENTION_ICON,
                    state,
                },
            )
            .await
            .map_err(TrayError::Serve)?;
        server
            .at(MENU_PATH, DbusMenu::new(requests_tx))
            .await
            .map_err(TrayError::Serve)?;
        let item = server
            .interface::<_, StatusNotifierItem>(ITEM_PATH)
            .await
            .map_err(TrayError::Serve)?;
        let menu = server
            .interface::<_, DbusMenu>(MENU_PATH)
            .await
            .map_err(TrayError::Serve)?;
        let service = item_name(&session);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(
            Task {
                session,
                service,
                shown: Shown { item, menu },
                links,
                requests,
            }
            .run(cancel.clone()),
        );
        Ok(Tray { cancel, task })
    }

    /// Stops the task and its running calls, and waits for them.
    pub async fn stop(self) {
        self.cancel.cancel();
        if let Err(e) = self.task.await {
            tracing::error!("tray task failed: {e}");
        }
    }
}

/// The name the item registers under: the connection's unique name. The
/// specification also allows a well-known `org.kde.StatusNotifierItem-PID-N`,
/// but gnome-shell-extension-appindicator 46 (Debian 12) drops an item
/// registered that way: watching the name, it clears the item's cached
/// `Id` and `Menu` and then fails comparing the re-read value with the
/// cleared one. KDE's and the other watchers take a unique name as well
/// (the item is then at [`ITEM_PATH`]).
fn item_name(session: &Connection) -> String {
    session
        .unique_name()
        .map(|n| n.to_string())
        .unwrap_or_default()
}

struct Task {
    session: Connection,
    /// The bus name registered with the watcher.
    service: String,
    shown: Shown,
    links: TrayLinks,
    requests: mpsc::Receiver<Request>,
}

impl Task {
    async fn run(self, cancel: CancellationToken) {
        let Task {
            session,
            service,
            shown,
            links,
            mut requests,
        } = self;
        let TrayLinks {
            system,
            mut status,
            refresh,
            notifications,
        } = links;
        let mut calls: JoinSet<Option<Message>> = JoinSet::new();
        let mut registrations: JoinSet<zbus::Result<()>> = JoinSet::new();
        // Subscribe before asking for the owner, so a watcher that appears
        // in between is not missed.
        let mut owners = match watch_watcher(&session).await {
            Ok(owners) => Some(owners),
            Err(e) => {
                tracing::warn!("cannot follow {WATCHER_NAME}: {e}; the tray icon may not show");
                None
            }
        };
        if watcher_present(&session).await {
            register(&session, &service, &mut registrations);
        } else {
            tracing::debug!(
                "no {WATCHER_NAME} on the session bus (no tray host yet); waiting for one"
            );
        }
        let first = status.borrow_and_update().clone();
        shown.render(&first).await;
        let mut status_open = true;

        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                changed = status.changed(), if status_open => match changed {
                    Ok(()) => {
                        let now = status.borrow_and_update().clone();
                        shown.render(&now).await;
                    }
                    // The watcher is gone; the companion is stopping.
                    Err(_) => status_open = false,
                },
                Some(appeared) = next_owner(&mut owners) => {
                    if appeared {
                        tracing::info!("{WATCHER_NAME} appeared; registering the tray icon");
                        registrations.abort_all();
                        register(&session, &service, &mut registrations);
                    } else {
                        tracing::debug!("{WATCHER_NAME} went away; waiting for it to return");
                    }
                }
                Some(request) = requests.recv() => match request {
                    Request::Run(action) => {
                        calls.spawn(device_call(system.clone(), action));
                    }
                    // Full: a refresh is queued already.
                    Request::Refresh => {
                        let _ = refresh.try_send(());
                    }
                },
                Some(done) = calls.join_next(), if !calls.is_empty() => {
                    if let Ok(Some(message)) = done {
                        notifications.show(message).await;
                    }
                }
                Some(done) = registrations.join_next(), if !registrations.is_empty() => {
                    match done {
                        Ok(Ok(())) => tracing::info!(
                            service,
                            "tray icon registered with {WATCHER_NAME}"
                        ),
                        Ok(Err(e)) => tracing::warn!("{WATCHER_NAME} refused the tray icon: {e}"),
                        Err(_) => {}
                    }
                }
            }
        }
        calls.shutdown().await;
        registrations.shutdown().await;
    }
}

async fn watch_watcher(session: &Connection) -> zbus::Result<NameOwnerChangedStream> {
    DBusProxy::new(session)
        .await?
        .receive_name_owner_changed_with_args(&[(0, WATCHER_NAME)])
        .await
}

async fn watcher_present(session: &Connection) -> bool {
    let Ok(dbus) = DBusProxy::new(session).await else {
        return false;
    };
    let name = BusName::try_from(WATCHER_NAME).expect("valid bus name");
    dbus.name_has_owner(name).await.unwrap_or(false)
}

/// RegisterStatusNotifierItem, off the task's loop: a host may answer
/// only once it has shown the icon.
fn register(session: &Connection, service: &str, registrations: &mut JoinSet<zbus::Result<()>>) {
    let session = session.clone();
    let service = service.to_owned();
    registrations.spawn(async move {
        StatusNotifierWatcherProxy::builder(&session)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .path(WATCHER_PATH)
            .build()
            .await?
            .register_status_notifier_item(&service)
            .await
    });
}

/// The two served objects.
struct Shown {
    item: InterfaceRef<StatusNotifierItem>,
    menu: InterfaceRef<DbusMenu>,
}

impl Shown {
    /// Shows `status`: new menu layout and properties, the item's status
    /// and tooltip, each with the signal that tells the host.
    async fn render(&self, status: &Status) {
        if let Err(e) = self.render_menu(status).await {
            tracing::warn!("cannot update the tray menu: {e}");
        }
        if let Err(e) = self.render_item(status).await {
            tracing::warn!("cannot update the tray icon: {e}");
        }
    }

    async fn render_menu(&self, status: &Status) -> zbus::Result<()> {
        let entries = content::menu(status);
        let notice = if status.needs_attention() {
            "notice"
        } else {
            "normal"
        };
        let (changes, revision, status_changed) = {
            let mut menu = self.menu.get_mut().await;
            let changes = menu.layout.update(&entries);
            let status_changed = menu.status != notice;
            menu.status = notice;
            (changes, menu.layout.revision(), status_changed)
        };
        let emitter = self.menu.signal_emitter();
        if !changes.updated.is_empty() || !changes.removed.is_empty() {
            DbusMenu::items_properties_updated(emitter, changes.updated, changes.removed).await?;
        }
        if changes.layout {
            tracing::debug!(revision, "tray menu layout updated");
            DbusMenu::layout_updated(emitter, revision, menu::ROOT).await?;
        }
        if status_changed {
            self.menu.get().await.status_changed(emitter).await?;
        }
        Ok(())
    }

    async fn render_item(&self, status: &Status) -> zbus::Result<()> {
        let state = content::item(status);
        let old = {
            let mut item = self.item.get_mut().await;
            std::mem::replace(&mut item.state, state.clone())
        };
        let emitter = self.item.signal_emitter();
        if old.status != state.status {
            tracing::info!(status = state.status.as_str(), "tray icon status");
            StatusNotifierItem::new_status(emitter, state.status.as_str()).await?;
            // Hosts pick the icon by status; some re-read it only on these.
            StatusNotifierItem::new_icon(emitter).await?;
            StatusNotifierItem::new_attention_icon(emitter).await?;
        }
        if old.tooltip_title != state.tooltip_title || old.tooltip_body != state.tooltip_body {
            StatusNotifierItem::new_tool_tip(emitter).await?;
        }
        Ok(())
    }
}

/// `Some(true)` when the watcher got an owner, `Some(false)` when it lost
/// it; pending forever without a stream.
async fn next_owner(owners: &mut Option<NameOwnerChangedStream>) -> Option<bool> {
    match owners {
        Some(stream) => {
            let change = stream.next().await?;
            let args = change.args().ok()?;
            Some(args.new_owner().is_some())
        }
        None => std::future::pending().await,
    }
}

/// Detach or Reattach, as the user (interactive: polkit's agent in the
/// session may ask); a notification when it failed.
async fn device_call(system: Connection, action: MenuAction) -> Option<Message> {
    let (call, address) = match &action {
        MenuAction::Detach(a) => (DeviceCall::Detach, a.clone()),
        MenuAction::Reattach(a) => (DeviceCall::Reattach, a.clone()),
    };
    tracing::info!(?call, address, "device call from the tray menu");
    let result = async {
        let path = address
            .parse::<PciAddress>()
            .map_err(|e| Error::ZBus(zbus::Error::Failure(e.to_string())))?
            .object_path();
        let device = PciDeviceProxy::builder(&system)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .path(path)
            .build()
            .await?;
        let options = AuthOptions::new().build();
        match call {
            DeviceCall::Detach => device.detach(options).await,
            DeviceCall::Reattach => device.reattach(options).await,
        }
        .map_err(Error::from)
    }
    .await;
    match result {
        Ok(()) => {
            tracing::info!(?call, address, "device call done");
            None
        }
        Err(error) => {
            tracing::warn!(?call, address, "device call failed: {error}");
            Some(policy::device_call_failed(call, &address, &error))
        }
    }
}
