//! Client side of the D-Bus API: typed proxies and value helpers shared by
//! `vmctl`, the notification companion and the tests.

use std::collections::HashMap;

use zbus::{OwnedObjectPath, OwnedVariant, Variant, proxy};

/// `org.example.VmManager1` on `/org/example/VmManager`.
#[proxy(
    interface = "org.example.VmManager1",
    default_service = "org.example.VmManager",
    default_path = "/org/example/VmManager"
)]
pub trait Manager {
    #[zbus(allow_interactive_auth)]
    fn check_disk(
        &self,
        image: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> zbus::Result<HashMap<String, OwnedVariant>>;

    #[zbus(allow_interactive_auth)]
    fn get_disk_users(
        &self,
        image: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> zbus::Result<Vec<HashMap<String, OwnedVariant>>>;

    #[zbus(signal)]
    fn disk_checked(
        &self,
        image: String,
        report: HashMap<String, OwnedVariant>,
    ) -> zbus::Result<()>;

    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn jobs(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
}

/// `org.example.VmManager1.Job`.
#[proxy(
    interface = "org.example.VmManager1.Job",
    default_service = "org.example.VmManager"
)]
pub trait Job {
    #[zbus(allow_interactive_auth)]
    fn cancel(&self, options: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;

    #[zbus(signal)]
    fn completed(&self, success: bool, message: String) -> zbus::Result<()>;

    #[zbus(property)]
    fn operation(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn target(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn started_by_uid(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn start_time(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn cancelable(&self) -> zbus::Result<bool>;
}

/// A D-Bus value as JSON, for `--json` output: integers stay integers,
/// dictionaries become objects, arrays become arrays.
pub fn variant_to_json(value: &Variant<'_>) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Variant::U8(n) => J::from(*n),
        Variant::Bool(b) => J::from(*b),
        Variant::I16(n) => J::from(*n),
        Variant::U16(n) => J::from(*n),
        Variant::I32(n) => J::from(*n),
        Variant::U32(n) => J::from(*n),
        Variant::I64(n) => J::from(*n),
        Variant::U64(n) => J::from(*n),
        Variant::F64(n) => J::from(*n),
        Variant::Str(s) => J::from(s.as_str()),
        Variant::Signature(s) => J::from(s.to_string()),
        Variant::ObjectPath(p) => J::from(p.as_str()),
        Variant::Variant(inner) => variant_to_json(inner),
        Variant::Array(items) => J::Array(items.iter().map(variant_to_json).collect()),
        Variant::Dict(dict) => {
            let mut map = serde_json::Map::new();
            for (k, v) in dict.iter() {
                let key = match k {
                    Variant::Str(s) => s.as_str().to_owned(),
                    other => variant_to_json(other).to_string(),
                };
                map.insert(key, variant_to_json(v));
            }
            J::Object(map)
        }
        Variant::Structure(s) => J::Array(s.fields().iter().map(variant_to_json).collect()),
        #[cfg(unix)]
        Variant::Fd(_) => J::Null,
    }
}

/// A whole `a{sv}` dictionary as a JSON object with sorted keys.
pub fn dict_to_json(dict: &HashMap<String, OwnedVariant>) -> serde_json::Value {
    let sorted: std::collections::BTreeMap<&String, serde_json::Value> =
        dict.iter().map(|(k, v)| (k, variant_to_json(v))).collect();
    serde_json::to_value(sorted).unwrap_or(serde_json::Value::Null)
}

/// `org.example.VmManager1.PciDevice` on `/org/example/VmManager/devices/pci_…`.
#[proxy(
    interface = "org.example.VmManager1.PciDevice",
    default_service = "org.example.VmManager"
)]
pub trait PciDevice {
    #[zbus(allow_interactive_auth)]
    fn detach(&self, options: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;

    #[zbus(allow_interactive_auth)]
    fn reattach(&self, options: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;

    #[zbus(signal)]
    fn uevent(&self, action: String) -> zbus::Result<()>;

    #[zbus(property)]
    fn address(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn driver(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn passthrough_ready(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn passthrough_blockers(&self) -> zbus::Result<Vec<String>>;
}

/// The object path of the device with `address` (`0000:03:00.0` →
/// `/org/example/VmManager/devices/pci_0000_03_00_0`), or `None` when the
/// text is not a PCI address.
pub fn device_path(address: &str) -> Option<OwnedObjectPath> {
    let parsed: crate::devices::address::PciAddress = address.parse().ok()?;
    OwnedObjectPath::try_from(format!(
        "/org/example/VmManager/devices/{}",
        parsed.object_name()
    ))
    .ok()
}
