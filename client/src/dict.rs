//! `a{sv}` dictionaries: building them, and reading them leniently.
//!
//! The decoders read a missing or mistyped key as empty/zero instead of
//! failing, so a client keeps working with an older or newer service.

use std::collections::HashMap;

use zbus::{OwnedVariant, Variant};

/// A D-Bus dictionary `a{sv}` as zbus returns it.
pub type Dict = HashMap<String, OwnedVariant>;

/// Wraps a plain value (never a file descriptor) as an owned variant.
pub fn variant<'a>(value: impl Into<Variant<'a>>) -> OwnedVariant {
    OwnedVariant::try_from(value.into()).expect("only fd variants can fail to be owned")
}

fn get<'a>(dict: &'a Dict, key: &str) -> Option<&'a Variant<'static>> {
    dict.get(key).map(|v| &**v)
}

pub(crate) fn string(dict: &Dict, key: &str) -> Option<String> {
    match get(dict, key) {
        Some(Variant::Str(s)) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

pub(crate) fn boolean(dict: &Dict, key: &str) -> Option<bool> {
    match get(dict, key) {
        Some(Variant::Bool(b)) => Some(*b),
        _ => None,
    }
}

/// `t`, or a `u` from a service that sent a narrower type.
pub(crate) fn u64(dict: &Dict, key: &str) -> Option<u64> {
    match get(dict, key) {
        Some(Variant::U64(n)) => Some(*n),
        Some(Variant::U32(n)) => Some(u64::from(*n)),
        _ => None,
    }
}

pub(crate) fn u32(dict: &Dict, key: &str) -> Option<u32> {
    match get(dict, key) {
        Some(Variant::U32(n)) => Some(*n),
        _ => None,
    }
}

pub(crate) fn u16(dict: &Dict, key: &str) -> Option<u16> {
    match get(dict, key) {
        Some(Variant::U16(n)) => Some(*n),
        _ => None,
    }
}

pub(crate) fn i32(dict: &Dict, key: &str) -> Option<i32> {
    match get(dict, key) {
        Some(Variant::I32(n)) => Some(*n),
        _ => None,
    }
}

/// `as`; entries of another type are skipped.
pub(crate) fn strings(dict: &Dict, key: &str) -> Option<Vec<String>> {
    match get(dict, key) {
        Some(Variant::Array(items)) => Some(
            items
                .iter()
                .filter_map(|v| match v {
                    Variant::Str(s) => Some(s.as_str().to_owned()),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}

/// `aa{sv}`; entries of another type are skipped.
pub(crate) fn dicts(dict: &Dict, key: &str) -> Option<Vec<Dict>> {
    match get(dict, key) {
        Some(Variant::Array(items)) => Some(
            items
                .iter()
                .filter_map(|v| Dict::try_from(v.try_clone().ok()?).ok())
                .collect(),
        ),
        _ => None,
    }
}
