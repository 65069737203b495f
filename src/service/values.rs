//! Domain results as D-Bus dictionaries (`a{sv}`), with the exact keys of
//! API.md.

use std::collections::HashMap;

use zbus::{OwnedVariant, Variant};

use super::error::VmError;
use crate::disk::checker::DiskReport;
use crate::disk::usage::DiskUser;

/// A D-Bus dictionary `a{sv}`.
pub type Dict = HashMap<String, OwnedVariant>;

/// Wraps a plain value (never a file descriptor) as an owned variant.
pub fn variant<'a>(value: impl Into<Variant<'a>>) -> OwnedVariant {
    OwnedVariant::try_from(value.into()).expect("only fd variants can fail to be owned")
}

/// One entry of `users` / GetDiskUsers.
pub fn user_dict(user: &DiskUser) -> Dict {
    let found_by: Vec<&str> = user.found_by.iter().map(|f| f.as_str()).collect();
    let pidfile = user
        .pidfile
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    HashMap::from([
        ("pid".to_owned(), variant(user.pid)),
        ("exe".to_owned(), variant(user.exe.as_str())),
        ("vm-name".to_owned(), variant(user.vm_name.as_str())),
        ("writable".to_owned(), variant(user.writable)),
        ("found-by".to_owned(), variant(found_by)),
        ("pidfile".to_owned(), variant(pidfile.as_str())),
    ])
}

pub fn users_list(users: &[DiskUser]) -> Vec<Dict> {
    users.iter().map(user_dict).collect()
}

/// The CheckDisk report; with `error` set, also the `error` and
/// `error-message` keys of the `DiskChecked` signal.
pub fn report_dict(report: &DiskReport, error: Option<&VmError>) -> Dict {
    let c = &report.counts;
    let stale: Vec<String> = report
        .usage
        .stale_pidfiles
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let result = report.result.map_or("", |r| r.as_str());
    let users = users_list(&report.usage.users);
    let mut dict = HashMap::from([
        (
            "image".to_owned(),
            variant(report.image.to_string_lossy().as_ref()),
        ),
        ("format".to_owned(), variant(report.format.as_str())),
        ("result".to_owned(), variant(result)),
        ("consistent".to_owned(), variant(report.consistent)),
        ("check-errors".to_owned(), variant(c.check_errors)),
        ("corruptions".to_owned(), variant(c.corruptions)),
        ("leaks".to_owned(), variant(c.leaks)),
        ("corruptions-fixed".to_owned(), variant(c.corruptions_fixed)),
        ("leaks-fixed".to_owned(), variant(c.leaks_fixed)),
        ("image-end-offset".to_owned(), variant(c.image_end_offset)),
        ("total-clusters".to_owned(), variant(c.total_clusters)),
        (
            "allocated-clusters".to_owned(),
            variant(c.allocated_clusters),
        ),
        (
            "fragmented-clusters".to_owned(),
            variant(c.fragmented_clusters),
        ),
        (
            "compressed-clusters".to_owned(),
            variant(c.compressed_clusters),
        ),
        ("users".to_owned(), variant(users)),
        ("stale-pidfiles".to_owned(), variant(stale)),
        ("run-as-uid".to_owned(), variant(report.run_as_uid)),
        (
            "duration-ms".to_owned(),
            variant(u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX)),
        ),
    ]);
    if let Some(error) = error {
        dict.insert(
            "error".to_owned(),
            variant(format!(
                "org.example.VmManager1.Error.{}",
                error.short_name()
            )),
        );
        dict.insert("error-message".to_owned(), variant(error.message()));
    }
    dict
}
