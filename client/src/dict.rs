//! `a{sv}` dictionaries: the type the proxies return them as, and building
//! them.
//!
//! The service sends dictionaries for the CheckDisk report, the DiskChecked
//! signal, GetDiskUsers entries and device properties; decode them with
//! [`CheckReport`](crate::CheckReport), [`DiskUser`](crate::DiskUser) and
//! [`DeviceProperties`](crate::DeviceProperties). Those decoders read a
//! missing or mistyped key as empty/zero instead of failing, so a client
//! keeps working with an older or newer service.

use std::collections::HashMap;

use zbus::{OwnedVariant, Variant};

/// A D-Bus dictionary `a{sv}` as zbus returns it: owned, so it outlives
/// the message it came in.
pub type Dict = HashMap<String, OwnedVariant>;

/// Wraps a plain value as an owned variant, e.g. to build a [`Dict`].
///
/// ```
/// use vmmanager_client::dict::{Dict, variant};
/// use vmmanager_client::{DiskUser, names::user};
///
/// let entry = Dict::from([(user::PID.to_owned(), variant(4242u32))]);
/// assert_eq!(DiskUser::from_dict(&entry).pid, 4242);
/// ```
///
/// # Panics
///
/// If `value` is a file descriptor, which cannot be owned without
/// duplicating it; nothing in this API carries one.
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
