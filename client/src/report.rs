//! The CheckDisk report (also DiskChecked's dictionary) and the disk users
//! of GetDiskUsers, as typed values: the service encodes them with
//! `to_dict`, clients decode them with `from_dict`, so the keys of
//! [`names::report`] and [`names::user`] are read and written only here.

use std::fmt;

use crate::Error;
use crate::dict::{self, Dict, variant};
use crate::names::{report, user};

/// What a check found: the report's `result`. The strings are spelled only
/// in [`as_str`](Self::as_str).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckResult {
    /// `clean`: no errors.
    Clean,
    /// `leaks`: leaked clusters only; they waste space, data is safe.
    Leaks,
    /// `corrupt`: corruptions (perhaps leaks too); data may be at risk.
    Corrupt,
    /// `not-supported`: the format has no metadata qemu-img can check.
    NotSupported,
    /// A value this client does not know (from a newer service), as sent.
    Unknown(String),
}

impl CheckResult {
    /// Every value this client knows, for [`from_name`](Self::from_name).
    const KNOWN: [CheckResult; 4] = [
        CheckResult::Clean,
        CheckResult::Leaks,
        CheckResult::Corrupt,
        CheckResult::NotSupported,
    ];

    /// The value as the report spells it.
    pub fn as_str(&self) -> &str {
        match self {
            CheckResult::Clean => "clean",
            CheckResult::Leaks => "leaks",
            CheckResult::Corrupt => "corrupt",
            CheckResult::NotSupported => "not-supported",
            CheckResult::Unknown(name) => name,
        }
    }

    /// Reads a `result` value; one this client does not know becomes
    /// [`Unknown`](Self::Unknown), so a newer service never breaks it.
    pub fn from_name(name: &str) -> CheckResult {
        known_or_unknown(
            &Self::KNOWN,
            name,
            CheckResult::as_str,
            CheckResult::Unknown,
        )
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a disk user was found: an entry of its `found-by`. The strings are
/// spelled only in [`as_str`](Self::as_str).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FoundBy {
    /// `pidfile`: a PID file named a live QEMU that holds the image.
    Pidfile,
    /// `proc`: /proc shows an open file descriptor on the image.
    Proc,
    /// `lock`: it holds QEMU's lock bytes on the image.
    Lock,
    /// A value this client does not know (from a newer service), as sent.
    Unknown(String),
}

impl FoundBy {
    /// Every value this client knows, for [`from_name`](Self::from_name).
    const KNOWN: [FoundBy; 3] = [FoundBy::Pidfile, FoundBy::Proc, FoundBy::Lock];

    /// The value as `found-by` spells it.
    pub fn as_str(&self) -> &str {
        match self {
            FoundBy::Pidfile => "pidfile",
            FoundBy::Proc => "proc",
            FoundBy::Lock => "lock",
            FoundBy::Unknown(name) => name,
        }
    }

    /// Reads a `found-by` entry; one this client does not know becomes
    /// [`Unknown`](Self::Unknown), so a newer service never breaks it.
    pub fn from_name(name: &str) -> FoundBy {
        known_or_unknown(&Self::KNOWN, name, FoundBy::as_str, FoundBy::Unknown)
    }
}

impl fmt::Display for FoundBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The known value spelled `name` (by `as_str`, the one spelling), else
/// `unknown(name)`.
fn known_or_unknown<T: Clone>(
    known: &[T],
    name: &str,
    as_str: fn(&T) -> &str,
    unknown: fn(String) -> T,
) -> T {
    known
        .iter()
        .find(|value| as_str(value) == name)
        .cloned()
        .unwrap_or_else(|| unknown(name.to_owned()))
}

/// One process (or one QEMU lock held from another PID namespace) that uses
/// an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskUser {
    /// 0 for a QEMU image lock whose holder /proc does not show.
    pub pid: u32,
    /// Resolved executable, "" when unknown.
    pub exe: String,
    /// QEMU's `-name`, "" when none.
    pub vm_name: String,
    /// Holds the image open for writing.
    pub writable: bool,
    /// How it was found, in the order the service sent.
    pub found_by: Vec<FoundBy>,
    /// The PID file that named it, "" when none.
    pub pidfile: String,
}

impl DiskUser {
    /// Reads one entry of GetDiskUsers (or of a report's `users`).
    pub fn from_dict(d: &Dict) -> DiskUser {
        DiskUser {
            pid: dict::u32(d, user::PID).unwrap_or_default(),
            exe: dict::string(d, user::EXE).unwrap_or_default(),
            vm_name: dict::string(d, user::VM_NAME).unwrap_or_default(),
            writable: dict::boolean(d, user::WRITABLE).unwrap_or_default(),
            found_by: dict::strings(d, user::FOUND_BY)
                .unwrap_or_default()
                .iter()
                .map(|name| FoundBy::from_name(name))
                .collect(),
            pidfile: dict::string(d, user::PIDFILE).unwrap_or_default(),
        }
    }

    /// The entry as the service sends it.
    pub fn to_dict(&self) -> Dict {
        let found_by: Vec<&str> = self.found_by.iter().map(FoundBy::as_str).collect();
        Dict::from([
            (user::PID.to_owned(), variant(self.pid)),
            (user::EXE.to_owned(), variant(self.exe.as_str())),
            (user::VM_NAME.to_owned(), variant(self.vm_name.as_str())),
            (user::WRITABLE.to_owned(), variant(self.writable)),
            (user::FOUND_BY.to_owned(), variant(found_by)),
            (user::PIDFILE.to_owned(), variant(self.pidfile.as_str())),
        ])
    }
}

/// The error a DiskChecked signal reports for a check that failed after
/// authorization.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportError {
    /// The D-Bus error name, e.g. `org.example.VmManager1.Error.InUse`.
    pub name: String,
    /// Its message, fit to show a user.
    pub message: String,
}

impl ReportError {
    /// The same error as an [`Error`], to match on.
    pub fn to_error(&self) -> Error {
        Error::from_name(&self.name, &self.message)
    }
}

impl From<&Error> for ReportError {
    fn from(e: &Error) -> Self {
        use zbus::DBusError;
        ReportError {
            name: e.name().to_string(),
            message: e.description().unwrap_or_default().to_owned(),
        }
    }
}

/// A CheckDisk report, or the dictionary of a DiskChecked signal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Canonical path of the image.
    pub image: String,
    /// `qcow2`, `qed`, `vdi`, `vhdx`, `vmdk`, `parallels` or `raw`.
    pub format: String,
    /// What the check found; `None` (sent as "") when it ended in an
    /// error.
    pub result: Option<CheckResult>,
    /// False when checked with `force-share` while in use.
    pub consistent: bool,
    /// Errors qemu-img met while checking (e.g. unreadable metadata).
    pub check_errors: u64,
    /// Corruptions found (after a repair: those left).
    pub corruptions: u64,
    /// Leaked clusters found (after a repair: those left).
    pub leaks: u64,
    /// Corruptions the repair fixed.
    pub corruptions_fixed: u64,
    /// Leaked clusters the repair freed.
    pub leaks_fixed: u64,
    /// Where the image's data ends, in bytes; 0 when qemu-img does not say.
    pub image_end_offset: u64,
    /// Clusters the virtual disk has.
    pub total_clusters: u64,
    /// Clusters holding data.
    pub allocated_clusters: u64,
    /// Allocated clusters not stored in guest order.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// Who used the image.
    pub users: Vec<DiskUser>,
    /// PID files that should name this image's VM but do not.
    pub stale_pidfiles: Vec<String>,
    /// The uid qemu-img ran as.
    pub run_as_uid: u32,
    /// The uid of the caller that asked for the check.
    pub started_by_uid: u32,
    /// How long the check took, in milliseconds.
    pub duration_ms: u64,
    /// DiskChecked only: the error the check ended in.
    pub error: Option<ReportError>,
}

impl CheckReport {
    /// Reads a report. A missing `consistent` reads as true (nothing says
    /// otherwise); other missing or mistyped keys read as empty or zero.
    pub fn from_dict(d: &Dict) -> CheckReport {
        let u64 = |key| dict::u64(d, key).unwrap_or_default();
        let error = dict::string(d, report::ERROR)
            .filter(|name| !name.is_empty())
            .map(|name| ReportError {
                name,
                message: dict::string(d, report::ERROR_MESSAGE).unwrap_or_default(),
            });
        CheckReport {
            image: dict::string(d, report::IMAGE).unwrap_or_default(),
            format: dict::string(d, report::FORMAT).unwrap_or_default(),
            result: dict::string(d, report::RESULT)
                .filter(|name| !name.is_empty())
                .map(|name| CheckResult::from_name(&name)),
            consistent: dict::boolean(d, report::CONSISTENT).unwrap_or(true),
            check_errors: u64(report::CHECK_ERRORS),
            corruptions: u64(report::CORRUPTIONS),
            leaks: u64(report::LEAKS),
            corruptions_fixed: u64(report::CORRUPTIONS_FIXED),
            leaks_fixed: u64(report::LEAKS_FIXED),
            image_end_offset: u64(report::IMAGE_END_OFFSET),
            total_clusters: u64(report::TOTAL_CLUSTERS),
            allocated_clusters: u64(report::ALLOCATED_CLUSTERS),
            fragmented_clusters: u64(report::FRAGMENTED_CLUSTERS),
            compressed_clusters: u64(report::COMPRESSED_CLUSTERS),
            users: dict::dicts(d, report::USERS)
                .unwrap_or_default()
                .iter()
                .map(DiskUser::from_dict)
                .collect(),
            stale_pidfiles: dict::strings(d, report::STALE_PIDFILES).unwrap_or_default(),
            run_as_uid: dict::u32(d, report::RUN_AS_UID).unwrap_or_default(),
            started_by_uid: dict::u32(d, report::STARTED_BY_UID).unwrap_or_default(),
            duration_ms: u64(report::DURATION_MS),
            error,
        }
    }

    /// Whether this check is `uid`'s own: started by them, or of an image of
    /// theirs (qemu-img runs as the image's owner). DiskChecked reaches every
    /// local user; a per-user applet shows only its user's checks, so that
    /// others can neither bury nor fake them.
    pub fn concerns(&self, uid: u32) -> bool {
        self.started_by_uid == uid || self.run_as_uid == uid
    }

    /// Reads a DiskChecked signal's arguments; the image argument stands in
    /// for a missing `image` key.
    pub fn from_signal(image: &str, d: &Dict) -> CheckReport {
        let mut report = CheckReport::from_dict(d);
        if report.image.is_empty() {
            image.clone_into(&mut report.image);
        }
        report
    }

    /// The report as the service sends it: every key, plus `error` and
    /// `error-message` when [`error`](Self::error) is set.
    pub fn to_dict(&self) -> Dict {
        let users: Vec<Dict> = self.users.iter().map(DiskUser::to_dict).collect();
        let mut d = Dict::from([
            (report::IMAGE.to_owned(), variant(self.image.as_str())),
            (report::FORMAT.to_owned(), variant(self.format.as_str())),
            (
                report::RESULT.to_owned(),
                variant(self.result.as_ref().map_or("", CheckResult::as_str)),
            ),
            (report::CONSISTENT.to_owned(), variant(self.consistent)),
            (report::CHECK_ERRORS.to_owned(), variant(self.check_errors)),
            (report::CORRUPTIONS.to_owned(), variant(self.corruptions)),
            (report::LEAKS.to_owned(), variant(self.leaks)),
            (
                report::CORRUPTIONS_FIXED.to_owned(),
                variant(self.corruptions_fixed),
            ),
            (report::LEAKS_FIXED.to_owned(), variant(self.leaks_fixed)),
            (
                report::IMAGE_END_OFFSET.to_owned(),
                variant(self.image_end_offset),
            ),
            (
                report::TOTAL_CLUSTERS.to_owned(),
                variant(self.total_clusters),
            ),
            (
                report::ALLOCATED_CLUSTERS.to_owned(),
                variant(self.allocated_clusters),
            ),
            (
                report::FRAGMENTED_CLUSTERS.to_owned(),
                variant(self.fragmented_clusters),
            ),
            (
                report::COMPRESSED_CLUSTERS.to_owned(),
                variant(self.compressed_clusters),
            ),
            (report::USERS.to_owned(), variant(users)),
            (
                report::STALE_PIDFILES.to_owned(),
                variant(self.stale_pidfiles.clone()),
            ),
            (report::RUN_AS_UID.to_owned(), variant(self.run_as_uid)),
            (
                report::STARTED_BY_UID.to_owned(),
                variant(self.started_by_uid),
            ),
            (report::DURATION_MS.to_owned(), variant(self.duration_ms)),
        ]);
        if let Some(error) = &self.error {
            d.insert(report::ERROR.to_owned(), variant(error.name.as_str()));
            d.insert(
                report::ERROR_MESSAGE.to_owned(),
                variant(error.message.as_str()),
            );
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        let report = CheckReport {
            image: "/vms/a.qcow2".into(),
            format: "qcow2".into(),
            result: Some(CheckResult::Leaks),
            consistent: false,
            leaks: 3,
            total_clusters: 16384,
            users: vec![DiskUser {
                pid: 4242,
                exe: "/usr/bin/qemu-system-x86_64".into(),
                vm_name: "win11".into(),
                writable: true,
                found_by: vec![
                    FoundBy::Pidfile,
                    FoundBy::Proc,
                    FoundBy::Unknown("ebpf".into()),
                ],
                pidfile: "/vms/a.pid".into(),
            }],
            stale_pidfiles: vec!["/vms/old.pid".into()],
            run_as_uid: 1000,
            started_by_uid: 1001,
            duration_ms: 7,
            error: Some(ReportError::from(&Error::InUse("used".into()))),
            ..CheckReport::default()
        };
        let dict = report.to_dict();
        assert_eq!(dict.len(), 21);
        assert_eq!(CheckReport::from_dict(&dict), report);
        assert!(matches!(
            report.error.unwrap().to_error(),
            Error::InUse(m) if m == "used"
        ));
    }

    #[test]
    fn a_check_concerns_who_started_it_and_the_image_owner_only() {
        let report = CheckReport {
            started_by_uid: 1000,
            run_as_uid: 1001,
            ..CheckReport::default()
        };
        assert!(report.concerns(1000) && report.concerns(1001));
        assert!(!report.concerns(1002) && !report.concerns(0));
    }

    #[test]
    fn missing_keys_read_as_empty_and_the_signal_names_the_image() {
        let report = CheckReport::from_signal("/a", &Dict::new());
        assert_eq!(report.image, "/a");
        assert!(report.consistent && report.error.is_none() && report.users.is_empty());
        assert_eq!(report.result, None);
    }

    #[test]
    fn results_and_sources_are_spelled_as_the_contract_says() {
        let results = [
            (CheckResult::Clean, "clean"),
            (CheckResult::Leaks, "leaks"),
            (CheckResult::Corrupt, "corrupt"),
            (CheckResult::NotSupported, "not-supported"),
        ];
        for (result, name) in results {
            assert_eq!(result.as_str(), name);
            assert_eq!(CheckResult::from_name(name), result);
        }
        let sources = [
            (FoundBy::Pidfile, "pidfile"),
            (FoundBy::Proc, "proc"),
            (FoundBy::Lock, "lock"),
        ];
        for (source, name) in sources {
            assert_eq!(source.as_str(), name);
            assert_eq!(FoundBy::from_name(name), source);
        }
    }

    #[test]
    fn values_a_newer_service_sends_are_kept_as_sent() {
        let d = Dict::from([
            (report::RESULT.to_owned(), variant("bit-rot")),
            (
                report::USERS.to_owned(),
                variant(vec![Dict::from([(
                    user::FOUND_BY.to_owned(),
                    variant(vec!["lock", "fanotify"]),
                )])]),
            ),
        ]);
        let report = CheckReport::from_dict(&d);
        assert_eq!(report.result, Some(CheckResult::Unknown("bit-rot".into())));
        assert_eq!(
            report.users[0].found_by,
            [FoundBy::Lock, FoundBy::Unknown("fanotify".into())]
        );
        // And they go out again unchanged.
        let again = report.to_dict();
        assert_eq!(CheckReport::from_dict(&again), report);
        assert_eq!(
            dict::string(&again, report::RESULT).as_deref(),
            Some("bit-rot")
        );
    }

    #[test]
    fn an_empty_result_is_none_and_is_sent_as_empty() {
        let d = Dict::from([(report::RESULT.to_owned(), variant(""))]);
        let report = CheckReport::from_dict(&d);
        assert_eq!(report.result, None);
        assert_eq!(
            dict::string(&report.to_dict(), report::RESULT).as_deref(),
            Some("")
        );
    }
}
