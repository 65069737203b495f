//! The tray's menu as `com.canonical.dbusmenu` serves it: the host (the
//! panel) reads the tree with `GetLayout` and the items' properties with
//! `GetGroupProperties`, tells us about clicks with `Event`, and re-reads
//! when we send `LayoutUpdated` (items added, removed or moved) or
//! `ItemsPropertiesUpdated` (labels and the like of items it has).
//!
//! [`content`](super::content) builds the menu as a tree of [`Entry`]s
//! from the state; [`Layout`] turns each new tree into numbered items and
//! says what changed since the last. An item keeps its id as long as its
//! key stays (a device's submenu is the same item while the device is
//! there), so a host that re-reads only the structure after
//! `LayoutUpdated`, as gnome-shell-extension-appindicator does, still sees
//! new labels: they come in `ItemsPropertiesUpdated`. Ids are never reused
//! for another key. Only properties that differ from the specification's
//! defaults are sent, as the specification asks.

use std::collections::{BTreeMap, HashMap};

use tokio::sync::mpsc;
use zbus::object_server::SignalEmitter;
use zbus::{OwnedVariant, fdo, interface};

use vmmanager_client::dict::{Dict, variant};

/// Where the menu object is served (the item's `Menu` property).
pub const MENU_PATH: &str = "/MenuBar";

/// The dbusmenu protocol version implemented (that of libdbusmenu 16.04,
/// which hosts expect).
const VERSION: u32 = 3;

/// The root item, the menu itself.
pub const ROOT: i32 = 0;

/// Property names of menu items (dbusmenu specification).
pub mod prop {
    pub const TYPE: &str = "type";
    pub const LABEL: &str = "label";
    pub const ENABLED: &str = "enabled";
    pub const ICON_NAME: &str = "icon-name";
    pub const CHILDREN_DISPLAY: &str = "children-display";
}

/// A property value of a menu item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prop {
    Str(String),
    Bool(bool),
}

impl Prop {
    fn to_variant(&self) -> OwnedVariant {
        match self {
            Prop::Str(s) => variant(s.as_str()),
            Prop::Bool(b) => variant(*b),
        }
    }
}

/// What clicking an item does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MenuAction {
    /// PciDevice.Detach on the device with this address.
    Detach(String),
    /// PciDevice.Reattach on the device with this address.
    Reattach(String),
}

/// One item of a menu tree as [`content`](super::content) builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Names what the item is about, e.g. `device/0000:03:00.0`; unique in
    /// one tree. The same key keeps the same id across updates.
    pub key: String,
    /// Only non-default properties.
    pub props: BTreeMap<&'static str, Prop>,
    pub children: Vec<Entry>,
    pub action: Option<MenuAction>,
}

impl Entry {
    /// A standard item showing `label` (underscores are doubled: in
    /// dbusmenu a single one marks an access key, and paths and driver
    /// names have them).
    pub fn label(key: impl Into<String>, label: &str) -> Entry {
        let mut props = BTreeMap::new();
        props.insert(prop::LABEL, Prop::Str(label.replace('_', "__")));
        Entry {
            key: key.into(),
            props,
            children: Vec::new(),
            action: None,
        }
    }

    pub fn separator(key: impl Into<String>) -> Entry {
        let mut props = BTreeMap::new();
        props.insert(prop::TYPE, Prop::Str("separator".into()));
        Entry {
            key: key.into(),
            props,
            children: Vec::new(),
            action: None,
        }
    }

    /// Shown greyed out, not clickable.
    pub fn disabled(mut self) -> Entry {
        self.props.insert(prop::ENABLED, Prop::Bool(false));
        self
    }

    /// A freedesktop icon name shown beside the label.
    pub fn icon(mut self, name: &str) -> Entry {
        self.props.insert(prop::ICON_NAME, Prop::Str(name.into()));
        self
    }

    /// Opens `children` as a submenu.
    pub fn submenu(mut self, children: Vec<Entry>) -> Entry {
        self.props
            .insert(prop::CHILDREN_DISPLAY, Prop::Str("submenu".into()));
        self.children = children;
        self
    }

    pub fn on_click(mut self, action: MenuAction) -> Entry {
        self.action = Some(action);
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    props: BTreeMap<&'static str, Prop>,
    children: Vec<i32>,
    action: Option<MenuAction>,
}

/// One node of `GetLayout`'s answer: id, properties, children.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub id: i32,
    pub props: Dict,
    pub children: Vec<Node>,
}

/// `(ia{sv}av)`: a node as it goes on the wire, each child a variant
/// holding the same structure.
pub type WireNode = (i32, Dict, Vec<OwnedVariant>);

impl Node {
    pub fn to_wire(&self) -> WireNode {
        let children = self
            .children
            .iter()
            .map(|child| variant(child.to_wire()))
            .collect();
        (self.id, clone_dict(&self.props), children)
    }
}

fn clone_dict(d: &Dict) -> Dict {
    d.iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.try_clone().expect("menu properties hold no fds"),
            )
        })
        .collect()
}

/// What an update changed, as the two signals carry it.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    /// Items were added, removed or moved: `LayoutUpdated`.
    pub layout: bool,
    /// New or changed properties of items that stayed.
    pub updated: Vec<(i32, Dict)>,
    /// Properties items that stayed no longer have (back to the default).
    pub removed: Vec<(i32, Vec<String>)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.layout && self.updated.is_empty() && self.removed.is_empty()
    }
}

/// The served menu: numbered items and the layout revision.
#[derive(Debug)]
pub struct Layout {
    revision: u32,
    items: HashMap<i32, Item>,
    ids: HashMap<String, i32>,
    next_id: i32,
}

impl Default for Layout {
    fn default() -> Self {
        Layout::new()
    }
}

impl Layout {
    /// An empty menu (just the root).
    pub fn new() -> Layout {
        let mut layout = Layout {
            revision: 0,
            items: HashMap::new(),
            ids: HashMap::new(),
            next_id: ROOT + 1,
        };
        layout.items.insert(ROOT, root(Vec::new()));
        layout
    }

    pub fn revision(&self) -> u32 {
        self.revision
    }

    /// Replaces the menu with `entries` (the root's children) and says
    /// what changed for a host that has the previous one.
    pub fn update(&mut self, entries: &[Entry]) -> Changes {
        let mut items = HashMap::new();
        let mut keys = HashMap::new();
        let top = self.number(entries, &mut items, &mut keys);
        items.insert(ROOT, root(top));
        self.ids = keys;

        let mut changes = Changes {
            layout: items.len() != self.items.len()
                || items.iter().any(|(id, item)| {
                    self.items
                        .get(id)
                        .is_none_or(|old| old.children != item.children)
                }),
            ..Changes::default()
        };
        let mut ids: Vec<&i32> = items.keys().collect();
        ids.sort_unstable();
        for id in ids {
            let (Some(old), new) = (self.items.get(id), &items[id]) else {
                continue;
            };
            let updated: Dict = new
                .props
                .iter()
                .filter(|(name, value)| old.props.get(*name) != Some(*value))
                .map(|(name, value)| ((*name).to_owned(), value.to_variant()))
                .collect();
            let removed: Vec<String> = old
                .props
                .keys()
                .filter(|name| !new.props.contains_key(*name))
                .map(|name| (*name).to_owned())
                .collect();
            if !updated.is_empty() {
                changes.updated.push((*id, updated));
            }
            if !removed.is_empty() {
                changes.removed.push((*id, removed));
            }
        }
        if changes.layout {
            self.revision += 1;
        }
        self.items = items;
        changes
    }

    /// Numbers `entries` (and their children) into `items`, reusing the id
    /// a key had; returns their ids in order.
    fn number(
        &mut self,
        entries: &[Entry],
        items: &mut HashMap<i32, Item>,
        keys: &mut HashMap<String, i32>,
    ) -> Vec<i32> {
        let mut ids = Vec::with_capacity(entries.len());
        for entry in entries {
            let reused = self.ids.get(&entry.key).copied();
            let twice = keys.contains_key(&entry.key);
            debug_assert!(!twice, "menu key {} used twice", entry.key);
            // A key used twice (a bug) still gives two items.
            let id = match reused {
                Some(id) if !twice => id,
                _ => {
                    let id = self.next_id;
                    self.next_id += 1;
                    id
                }
            };
            keys.entry(entry.key.clone()).or_insert(id);
            let children = self.number(&entry.children, items, keys);
            items.insert(
                id,
                Item {
                    props: entry.props.clone(),
                    children,
                    action: entry.action.clone(),
                },
            );
            ids.push(id);
        }
        ids
    }

    pub fn contains(&self, id: i32) -> bool {
        self.items.contains_key(&id)
    }

    pub fn action(&self, id: i32) -> Option<&MenuAction> {
        self.items.get(&id)?.action.as_ref()
    }

    /// `GetLayout`: the subtree under `parent`, `depth` levels deep (-1:
    /// all, 0: the parent alone), with the properties named in `names`
    /// (all when empty). `None` for an unknown id.
    pub fn node(&self, parent: i32, depth: i32, names: &[String]) -> Option<Node> {
        let item = self.items.get(&parent)?;
        let children = if depth == 0 {
            Vec::new()
        } else {
            item.children
                .iter()
                .filter_map(|child| self.node(*child, depth - 1, names))
                .collect()
        };
        Some(Node {
            id: parent,
            props: filtered(item, names),
            children,
        })
    }

    /// `GetGroupProperties`: the named properties (all when `names` is
    /// empty) of each known id in `ids` (of every item when `ids` is
    /// empty), in the order asked.
    pub fn properties(&self, ids: &[i32], names: &[String]) -> Vec<(i32, Dict)> {
        let ids: Vec<i32> = if ids.is_empty() {
            let mut all: Vec<i32> = self.items.keys().copied().collect();
            all.sort_unstable();
            all
        } else {
            ids.to_vec()
        };
        ids.into_iter()
            .filter_map(|id| Some((id, filtered(self.items.get(&id)?, names))))
            .collect()
    }

    /// `GetProperty`: `None` for an unknown id; a property the item does
    /// not set reads as the specification's default.
    pub fn property(&self, id: i32, name: &str) -> Option<Result<OwnedVariant, String>> {
        let item = self.items.get(&id)?;
        Some(match item.props.get(name) {
            Some(value) => Ok(value.to_variant()),
            None => default_property(name).ok_or_else(|| name.to_owned()),
        })
    }
}

fn root(children: Vec<i32>) -> Item {
    let mut props = BTreeMap::new();
    props.insert(prop::CHILDREN_DISPLAY, Prop::Str("submenu".into()));
    Item {
        props,
        children,
        action: None,
    }
}

fn filtered(item: &Item, names: &[String]) -> Dict {
    item.props
        .iter()
        .filter(|(name, _)| names.is_empty() || names.iter().any(|n| n == *name))
        .map(|(name, value)| ((*name).to_owned(), value.to_variant()))
        .collect()
}

fn default_property(name: &str) -> Option<OwnedVariant> {
    Some(match name {
        prop::TYPE => variant("standard"),
        prop::LABEL | prop::ICON_NAME | prop::CHILDREN_DISPLAY => variant(""),
        prop::ENABLED | "visible" => variant(true),
        _ => return None,
    })
}

/// What the menu asks of the tray task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The user clicked an item with an action.
    Run(MenuAction),
    /// The menu is about to open: worth re-reading what has no change
    /// signal (which VM holds a device).
    Refresh,
}

/// The `com.canonical.dbusmenu` object. The tray task replaces its
/// [`Layout`] and emits the signals; clicks go to the task as
/// [`Request`]s (never handled here: a Detach may wait for a password).
pub struct DbusMenu {
    pub layout: Layout,
    /// "notice" when something needs attention, else "normal".
    pub status: &'static str,
    requests: mpsc::Sender<Request>,
}

impl DbusMenu {
    pub fn new(requests: mpsc::Sender<Request>) -> DbusMenu {
        DbusMenu {
            layout: Layout::new(),
            status: "normal",
            requests,
        }
    }

    fn unknown(id: i32) -> fdo::Error {
        fdo::Error::InvalidArgs(format!("no menu item with id {id}"))
    }

    /// An event on a known item; a click on an item with an action is
    /// passed to the tray task. Other events ("opened", "hovered", …) and
    /// clicks on informational items do nothing.
    fn handle_event(&self, id: i32, event_id: &str) -> Result<(), fdo::Error> {
        if !self.layout.contains(id) {
            return Err(Self::unknown(id));
        }
        if event_id == "clicked"
            && let Some(action) = self.layout.action(id)
        {
            tracing::debug!(?action, "menu item clicked");
            if self
                .requests
                .try_send(Request::Run(action.clone()))
                .is_err()
            {
                tracing::warn!(?action, "too many menu clicks at once; ignored");
            }
        }
        Ok(())
    }

    fn about_to_show_item(&self, id: i32) -> bool {
        if id == ROOT {
            // Full means a refresh is already queued.
            let _ = self.requests.try_send(Request::Refresh);
        }
        self.layout.contains(id)
    }
}

#[interface(name = "com.canonical.dbusmenu")]
impl DbusMenu {
    #[zbus(signal)]
    pub async fn items_properties_updated(
        emitter: &SignalEmitter<'_>,
        updated_props: Vec<(i32, Dict)>,
        removed_props: Vec<(i32, Vec<String>)>,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn layout_updated(
        emitter: &SignalEmitter<'_>,
        revision: u32,
        parent: i32,
    ) -> zbus::Result<()>;

    /// Never sent (no hotkeys); declared because the interface has it.
    #[zbus(signal)]
    pub async fn item_activation_requested(
        emitter: &SignalEmitter<'_>,
        id: i32,
        timestamp: u32,
    ) -> zbus::Result<()>;

    fn get_layout(
        &self,
        parent_id: i32,
        recursion_depth: i32,
        property_names: Vec<String>,
    ) -> fdo::Result<(u32, WireNode)> {
        let node = self
            .layout
            .node(parent_id, recursion_depth, &property_names)
            .ok_or_else(|| Self::unknown(parent_id))?;
        Ok((self.layout.revision(), node.to_wire()))
    }

    fn get_group_properties(&self, ids: Vec<i32>, property_names: Vec<String>) -> Vec<(i32, Dict)> {
        self.layout.properties(&ids, &property_names)
    }

    fn get_property(&self, id: i32, name: String) -> fdo::Result<OwnedVariant> {
        match self.layout.property(id, &name) {
            None => Err(Self::unknown(id)),
            Some(Ok(value)) => Ok(value),
            Some(Err(name)) => Err(fdo::Error::InvalidArgs(format!(
                "menu item {id} has no property {name:?}"
            ))),
        }
    }

    fn event(
        &self,
        id: i32,
        event_id: String,
        _data: OwnedVariant,
        _timestamp: u32,
    ) -> fdo::Result<()> {
        self.handle_event(id, &event_id)
    }

    /// The ids that were not found; an error when none was.
    fn event_group(&self, events: Vec<(i32, String, OwnedVariant, u32)>) -> fdo::Result<Vec<i32>> {
        let errors: Vec<i32> = events
            .iter()
            .filter(|(id, event_id, _, _)| self.handle_event(*id, event_id).is_err())
            .map(|(id, _, _, _)| *id)
            .collect();
        if !events.is_empty() && errors.len() == events.len() {
            return Err(fdo::Error::InvalidArgs("no such menu items".into()));
        }
        Ok(errors)
    }

    /// Always false: the menu is kept current with signals, and a refresh
    /// asked for here arrives the same way.
    fn about_to_show(&self, id: i32) -> fdo::Result<bool> {
        match self.about_to_show_item(id) {
            true => Ok(false),
            false => Err(Self::unknown(id)),
        }
    }

    /// `(updates needed, ids not found)`.
    fn about_to_show_group(&self, ids: Vec<i32>) -> fdo::Result<(Vec<i32>, Vec<i32>)> {
        let errors: Vec<i32> = ids
            .iter()
            .copied()
            .filter(|id| !self.about_to_show_item(*id))
            .collect();
        if !ids.is_empty() && errors.len() == ids.len() {
            return Err(fdo::Error::InvalidArgs("no such menu items".into()));
        }
        Ok((Vec::new(), errors))
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> u32 {
        VERSION
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn text_direction(&self) -> &str {
        "ltr"
    }

    #[zbus(property)]
    fn status(&self) -> &str {
        self.status
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn icon_theme_path(&self) -> Vec<String> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::Variant;

    fn device(addr: &str, label: &str, ready: bool) -> Entry {
        let state = if ready { "Ready" } else { "Not ready" };
        Entry::label(format!("dev/{addr}"), label).submenu(vec![
            Entry::label(format!("dev/{addr}/state"), state).disabled(),
            Entry::separator(format!("dev/{addr}/sep")),
            Entry::label(format!("dev/{addr}/detach"), "Detach")
                .on_click(MenuAction::Detach(addr.into())),
        ])
    }

    fn menu(devices: &[(&str, bool)]) -> Vec<Entry> {
        let mut entries = vec![Entry::label("service", "Running").disabled()];
        entries.extend(
            devices
                .iter()
                .map(|(addr, ready)| device(addr, &format!("{addr} NIC"), *ready)),
        );
        entries
    }

    fn label(props: &Dict) -> String {
        match props.get(prop::LABEL).map(|v| &**v) {
            Some(Variant::Str(s)) => s.as_str().to_owned(),
            _ => String::new(),
        }
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn layout_depth_and_property_filter() {
        let mut layout = Layout::new();
        let changes = layout.update(&menu(&[("0000:01:00.0", true)]));
        assert!(changes.layout);
        assert_eq!(layout.revision(), 1);

        // Everything: root → service, device → its three items.
        let all = layout.node(ROOT, -1, &[]).unwrap();
        assert_eq!(all.id, ROOT);
        assert_eq!(all.children.len(), 2);
        assert_eq!(label(&all.children[0].props), "Running");
        assert_eq!(all.children[0].props.len(), 2, "label and enabled");
        let dev = &all.children[1];
        assert_eq!(dev.children.len(), 3);
        assert_eq!(label(&dev.children[2].props), "Detach");

        // Depth 1: the root's children without theirs; depth 0: the root.
        let one = layout.node(ROOT, 1, &[]).unwrap();
        assert_eq!(one.children.len(), 2);
        assert!(one.children[1].children.is_empty());
        assert!(layout.node(ROOT, 0, &[]).unwrap().children.is_empty());

        // The appindicator extension's request: only these two properties.
        let wanted = names(&[prop::TYPE, prop::CHILDREN_DISPLAY]);
        let structure = layout.node(ROOT, -1, &wanted).unwrap();
        assert!(
            structure.children[0].props.is_empty(),
            "type is the default"
        );
        let dev = &structure.children[1];
        assert_eq!(
            dev.props.keys().collect::<Vec<_>>(),
            [prop::CHILDREN_DISPLAY]
        );
        assert_eq!(
            dev.children[1].props.keys().collect::<Vec<_>>(),
            [prop::TYPE]
        );

        // A subtree, and an unknown id.
        let sub = layout.node(dev.id, -1, &[]).unwrap();
        assert_eq!(sub.children.len(), 3);
        assert!(layout.node(9999, -1, &[]).is_none());
    }

    #[test]
    fn group_properties_and_defaults() {
        let mut layout = Layout::new();
        layout.update(&menu(&[("0000:01:00.0", true)]));
        let all = layout.node(ROOT, -1, &[]).unwrap();
        let service = all.children[0].id;
        let detach = all.children[1].children[2].id;
        let got = layout.properties(&[detach, 4242, service], &names(&[prop::LABEL]));
        assert_eq!(got.len(), 2, "the unknown id is left out");
        assert_eq!(got[0].0, detach);
        assert_eq!(label(&got[0].1), "Detach");
        assert_eq!(label(&got[1].1), "Running");
        // Empty list: every item.
        assert_eq!(layout.properties(&[], &[]).len(), 6);

        let enabled = layout.property(detach, prop::ENABLED).unwrap().unwrap();
        assert_eq!(&*enabled, &Variant::Bool(true), "the default");
        let enabled = layout.property(service, prop::ENABLED).unwrap().unwrap();
        assert_eq!(&*enabled, &Variant::Bool(false));
        assert!(layout.property(service, "x-nonsense").unwrap().is_err());
        assert!(layout.property(4242, prop::LABEL).is_none());
        assert_eq!(
            layout.action(detach),
            Some(&MenuAction::Detach("0000:01:00.0".into()))
        );
        assert_eq!(layout.action(service), None);
    }

    #[test]
    fn updates_keep_ids_and_say_what_changed() {
        let mut layout = Layout::new();
        layout.update(&menu(&[("0000:01:00.0", false)]));
        let before = layout.node(ROOT, -1, &[]).unwrap();

        // Same structure, a new label: properties only, same revision.
        let changes = layout.update(&menu(&[("0000:01:00.0", true)]));
        assert!(!changes.layout);
        assert_eq!(layout.revision(), 1);
        let state_id = before.children[1].children[0].id;
        assert_eq!(changes.updated.len(), 1);
        assert_eq!(changes.updated[0].0, state_id);
        assert_eq!(label(&changes.updated[0].1), "Ready");
        assert!(changes.removed.is_empty());

        // Nothing changed: nothing to send.
        assert!(layout.update(&menu(&[("0000:01:00.0", true)])).is_empty());

        // A device appears: layout changes, old ids stay, new ids are new.
        let changes = layout.update(&menu(&[("0000:01:00.0", true), ("0000:02:00.0", true)]));
        assert!(changes.layout);
        assert!(changes.updated.is_empty());
        assert_eq!(layout.revision(), 2);
        let after = layout.node(ROOT, -1, &[]).unwrap();
        assert_eq!(after.children[1].id, before.children[1].id);
        let new_id = after.children[2].id;
        assert!(new_id > before.children[1].children[2].id);

        // It goes and comes back: a fresh id, never the old one.
        layout.update(&menu(&[("0000:01:00.0", true)]));
        layout.update(&menu(&[("0000:01:00.0", true), ("0000:02:00.0", true)]));
        let again = layout.node(ROOT, -1, &[]).unwrap();
        assert!(again.children[2].id > new_id);
        assert!(layout.node(new_id, -1, &[]).is_none());

        // A property dropped back to its default is "removed".
        let mut entries = menu(&[]);
        entries[0] = Entry::label("service", "Running");
        let changes = layout.update(&entries);
        assert!(changes.layout);
        assert_eq!(
            changes.removed,
            [(again.children[0].id, vec![prop::ENABLED.to_owned()])]
        );
    }

    #[test]
    fn labels_escape_underscores() {
        let entry = Entry::label("x", "Driver: snd_hda_intel");
        assert_eq!(
            entry.props[prop::LABEL],
            Prop::Str("Driver: snd__hda__intel".into())
        );
    }

    #[test]
    fn the_wire_form_is_recursive_variants() {
        let mut layout = Layout::new();
        layout.update(&menu(&[("0000:01:00.0", true)]));
        let node = layout.node(ROOT, -1, &[]).unwrap();
        // As GetLayout's reply carries it.
        let message = zbus::Message::method_call("/MenuBar", "GetLayout")
            .build(&(1u32, node.to_wire()))
            .unwrap();
        assert_eq!(
            <WireNode as zbus::Type>::SIGNATURE.to_string(),
            "(ia{sv}av)"
        );
        let (_, back): (u32, WireNode) = message.body().deserialize().unwrap();
        assert_eq!(back.0, ROOT);
        assert_eq!(back.2.len(), 2);
        // The device's child is a variant holding (ia{sv}av) again.
        let Variant::Structure(dev) = &*back.2[1] else {
            panic!("child is {:?}", back.2[1]);
        };
        assert_eq!(dev.signature().to_string(), "(ia{sv}av)");
        let fields = dev.fields();
        assert_eq!(fields[0], Variant::I32(node.children[1].id));
        let Variant::Array(children) = &fields[2] else {
            panic!("children are {:?}", fields[2]);
        };
        assert_eq!(children.len(), 3);
    }
}
