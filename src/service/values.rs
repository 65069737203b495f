//! Domain results as D-Bus dictionaries (`a{sv}`): the domain values become
//! the client crate's [`CheckReport`] and [`DiskUser`], whose `to_dict` is
//! the one encoder of the keys in `dbus/org.example.VmManager1.xml` (and
//! whose `from_dict` is what clients decode with).

use vmmanager_client::{CheckReport, ReportError};

use super::error::VmError;
use crate::disk::checker::DiskReport;
use crate::disk::usage::DiskUser;

pub use vmmanager_client::dict::{Dict, variant};

/// A path as the service's answers and messages carry it: the job's
/// `Target`, polkit's `image` detail, DiskChecked's argument and the report's
/// `image` all show the same text for the same image.
pub fn path_text(path: &std::path::Path) -> String {
    path.to_string_lossy().into_owned()
}

/// One disk user as the contract has it.
fn contract_user(user: &DiskUser) -> vmmanager_client::DiskUser {
    vmmanager_client::DiskUser {
        pid: user.pid,
        exe: user.exe.clone(),
        vm_name: user.vm_name.clone(),
        writable: user.writable,
        found_by: user.found_by.iter().map(|&f| f.into()).collect(),
        pidfile: user.pidfile.as_deref().map(path_text).unwrap_or_default(),
    }
}

/// GetDiskUsers' answer.
pub fn users_list(users: &[DiskUser]) -> Vec<Dict> {
    users.iter().map(|u| contract_user(u).to_dict()).collect()
}

/// The CheckDisk report of a check `started_by_uid` asked for; with `error`
/// set, also the `error` and `error-message` keys of the `DiskChecked` signal.
pub fn report_dict(report: &DiskReport, started_by_uid: u32, error: Option<&VmError>) -> Dict {
    let c = &report.counts;
    CheckReport {
        image: path_text(&report.image),
        format: report.format.as_str().to_owned(),
        result: report.result.map(Into::into),
        consistent: report.consistent,
        check_errors: c.check_errors,
        corruptions: c.corruptions,
        leaks: c.leaks,
        corruptions_fixed: c.corruptions_fixed,
        leaks_fixed: c.leaks_fixed,
        image_end_offset: c.image_end_offset,
        total_clusters: c.total_clusters,
        allocated_clusters: c.allocated_clusters,
        fragmented_clusters: c.fragmented_clusters,
        compressed_clusters: c.compressed_clusters,
        users: report.usage.users.iter().map(contract_user).collect(),
        stale_pidfiles: report
            .usage
            .stale_pidfiles
            .iter()
            .map(|p| path_text(p))
            .collect(),
        run_as_uid: report.run_as_uid,
        started_by_uid,
        duration_ms: u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX),
        error: error.map(ReportError::from),
    }
    .to_dict()
}
