//! The `org.kde.StatusNotifierItem` object: the icon in the panel, its
//! tooltip, and where its menu is. Hosts read the properties once and
//! re-read one when its `New…` signal arrives (the specification's own
//! change signals, not PropertiesChanged).

use zbus::object_server::SignalEmitter;
use zbus::{OwnedObjectPath, fdo, interface};

use super::menu::MENU_PATH;

/// Where the item is served: the path a watcher assumes for a bus name.
pub const ITEM_PATH: &str = "/StatusNotifierItem";

/// `Status` values of the specification (`Passive` would hide the icon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemStatus {
    Active,
    NeedsAttention,
}

impl ItemStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemStatus::Active => "Active",
            ItemStatus::NeedsAttention => "NeedsAttention",
        }
    }
}

/// What the item shows; [`content::item`](super::content::item) makes it
/// from the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemState {
    pub status: ItemStatus,
    /// The tooltip's title and body.
    pub tooltip_title: String,
    pub tooltip_body: String,
}

/// An icon as a pixmap: `(width, height, ARGB32 bytes)`; none are sent,
/// every icon is a theme name.
type Pixmap = (i32, i32, Vec<u8>);

/// The item object; the tray task replaces [`state`](Self::state) and
/// emits the `New…` signals for what changed.
pub struct StatusNotifierItem {
    pub id: &'static str,
    pub title: &'static str,
    pub icon_name: &'static str,
    pub attention_icon_name: &'static str,
    pub state: ItemState,
}

#[interface(name = "org.kde.StatusNotifierItem")]
impl StatusNotifierItem {
    #[zbus(signal)]
    pub async fn new_title(emitter: &SignalEmitter<'_>) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn new_icon(emitter: &SignalEmitter<'_>) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn new_attention_icon(emitter: &SignalEmitter<'_>) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn new_overlay_icon(emitter: &SignalEmitter<'_>) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn new_tool_tip(emitter: &SignalEmitter<'_>) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn new_status(emitter: &SignalEmitter<'_>, status: &str) -> zbus::Result<()>;

    /// The menu is the item's only interaction (`ItemIsMenu`); hosts that
    /// call these anyway get no error.
    fn context_menu(&self, _x: i32, _y: i32) {}

    fn activate(&self, _x: i32, _y: i32) {}

    fn secondary_activate(&self, _x: i32, _y: i32) {}

    fn scroll(&self, _delta: i32, _orientation: String) {}

    #[zbus(property(emits_changed_signal = "false"))]
    fn category(&self) -> &str {
        "SystemServices"
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn id(&self) -> &str {
        self.id
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn title(&self) -> &str {
        self.title
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn status(&self) -> &str {
        self.state.status.as_str()
    }

    /// No window of ours.
    #[zbus(property(emits_changed_signal = "false"))]
    fn window_id(&self) -> i32 {
        0
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn icon_theme_path(&self) -> &str {
        ""
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn icon_name(&self) -> &str {
        self.icon_name
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn icon_pixmap(&self) -> Vec<Pixmap> {
        Vec::new()
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn overlay_icon_name(&self) -> &str {
        ""
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn overlay_icon_pixmap(&self) -> Vec<Pixmap> {
        Vec::new()
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn attention_icon_name(&self) -> &str {
        self.attention_icon_name
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn attention_icon_pixmap(&self) -> Vec<Pixmap> {
        Vec::new()
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn attention_movie_name(&self) -> &str {
        ""
    }

    /// `(icon name, icon pixmaps, title, description)`.
    #[zbus(property(emits_changed_signal = "false"))]
    fn tool_tip(&self) -> (&str, Vec<Pixmap>, &str, &str) {
        (
            self.icon_name,
            Vec::new(),
            &self.state.tooltip_title,
            &self.state.tooltip_body,
        )
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn item_is_menu(&self) -> bool {
        true
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn menu(&self) -> fdo::Result<OwnedObjectPath> {
        OwnedObjectPath::try_from(MENU_PATH).map_err(|e| fdo::Error::Failed(e.to_string()))
    }
}
