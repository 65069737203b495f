//! D-Bus values as JSON (`vmctl --json`, test output): integers stay
//! integers, dictionaries become objects, arrays become arrays.

use zbus::Variant;

use crate::dict::Dict;

/// A D-Bus value as JSON, for `--json` output: integers stay integers,
/// dictionaries become objects (non-string keys as their JSON text), arrays
/// and structures become arrays, object paths and signatures strings, and a
/// file descriptor `null`.
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
///
/// ```
/// use vmmanager_client::dict::{Dict, variant};
/// use vmmanager_client::json::dict_to_json;
///
/// let report = Dict::from([
///     ("result".to_owned(), variant("leaks")),
///     ("leaks".to_owned(), variant(3u64)),
/// ]);
/// assert_eq!(dict_to_json(&report).to_string(), r#"{"leaks":3,"result":"leaks"}"#);
/// ```
pub fn dict_to_json(dict: &Dict) -> serde_json::Value {
    let sorted: std::collections::BTreeMap<&String, serde_json::Value> =
        dict.iter().map(|(k, v)| (k, variant_to_json(v))).collect();
    serde_json::to_value(sorted).unwrap_or(serde_json::Value::Null)
}
