//! The at-a-glance state the tray shows: whether the service runs (and its
//! version), its PCI devices, and the latest disk checks. [`watch`] keeps
//! it current from the same signals that become notifications and
//! publishes it through a `tokio::sync::watch` channel, which hands a
//! reader only the newest state (a burst of 40 device changes is one
//! update for the tray).
//!
//! [`watch`]: super::watch

use std::collections::VecDeque;

use vmmanager_client::{CheckReport, CheckResult, DeviceProperties, Error};

use super::policy::file_name;

/// How many disk checks the tray lists (one per image, newest first).
pub const RECENT_CHECKS: usize = 5;

/// Whether the service is on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Service {
    /// Not on the bus (it may be started by D-Bus activation on the first
    /// call), or not looked at yet.
    #[default]
    NotRunning,
    /// Followed; its `Version` ("" when it could not be read).
    Running { version: String },
}

/// What the tray shows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    pub service: Service,
    /// The service's devices, sorted by address; empty while it is not
    /// running.
    pub devices: Vec<DeviceProperties>,
    /// The latest check of each image this session saw, newest first, at
    /// most [`RECENT_CHECKS`].
    pub checks: VecDeque<CheckReport>,
}

/// The sending half the watcher owns; the tray holds receivers.
pub type StatusSender = tokio::sync::watch::Sender<Status>;
pub type StatusReceiver = tokio::sync::watch::Receiver<Status>;

impl Status {
    /// Records a check: it replaces an older check of the same image and
    /// goes first; the oldest beyond [`RECENT_CHECKS`] is dropped.
    pub fn push_check(&mut self, report: CheckReport) {
        self.checks.retain(|c| c.image != report.image);
        self.checks.push_front(report);
        self.checks.truncate(RECENT_CHECKS);
    }

    /// Why the user should look, in words fit for a menu or a tooltip;
    /// empty when all is well. A checked image that is corrupt, leaks or
    /// could not be checked, and an allow-listed device (the
    /// administrator meant it for passthrough) that is not ready.
    pub fn attention(&self) -> Vec<String> {
        let mut reasons: Vec<String> = self.checks.iter().filter_map(check_attention).collect();
        reasons.extend(
            self.devices
                .iter()
                .filter(|d| d.permitted && !d.passthrough_ready)
                .map(|d| {
                    format!(
                        "{} is allow-listed but not ready for passthrough",
                        d.address
                    )
                }),
        );
        reasons
    }

    pub fn needs_attention(&self) -> bool {
        !self.attention().is_empty()
    }
}

fn check_attention(report: &CheckReport) -> Option<String> {
    let name = file_name(&report.image);
    if let Some(error) = &report.error {
        return match error.to_error() {
            // Someone chose to run the VM or cancel: nothing is wrong.
            Error::InUse(_) | Error::Cancelled(_) => None,
            _ => Some(format!("{name} could not be checked")),
        };
    }
    match report.result {
        Some(CheckResult::Corrupt) => Some(format!("{name} is corrupt")),
        Some(CheckResult::Leaks) => Some(format!("{name} has leaked clusters")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmmanager_client::ReportError;

    fn check(image: &str, result: CheckResult) -> CheckReport {
        CheckReport {
            image: image.into(),
            result: Some(result),
            ..CheckReport::default()
        }
    }

    #[test]
    fn checks_are_one_per_image_newest_first_and_bounded() {
        let mut s = Status::default();
        for i in 0..7 {
            s.push_check(check(&format!("/vms/{i}.qcow2"), CheckResult::Clean));
        }
        s.push_check(check("/vms/4.qcow2", CheckResult::Leaks));
        let images: Vec<&str> = s.checks.iter().map(|c| c.image.as_str()).collect();
        assert_eq!(
            images,
            [
                "/vms/4.qcow2",
                "/vms/6.qcow2",
                "/vms/5.qcow2",
                "/vms/3.qcow2",
                "/vms/2.qcow2"
            ]
        );
        assert_eq!(s.attention(), ["4.qcow2 has leaked clusters"]);
        // A later clean check of the image clears it.
        s.push_check(check("/vms/4.qcow2", CheckResult::Clean));
        assert!(!s.needs_attention());
    }

    #[test]
    fn what_needs_attention() {
        let mut s = Status::default();
        s.push_check(check("/vms/bad.qcow2", CheckResult::Corrupt));
        let mut busy = check("/vms/busy.qcow2", CheckResult::Clean);
        busy.result = None;
        busy.error = Some(ReportError::from(&Error::InUse("VM".into())));
        s.push_check(busy.clone());
        busy.image = "/vms/broken.qcow2".into();
        busy.error = Some(ReportError::from(&Error::CheckFailed("boom".into())));
        s.push_check(busy);
        s.devices = vec![
            DeviceProperties {
                address: "0000:01:00.0".into(),
                permitted: true,
                ..DeviceProperties::default()
            },
            // Not allow-listed: its host driver is where it belongs.
            DeviceProperties {
                address: "0000:02:00.0".into(),
                ..DeviceProperties::default()
            },
            DeviceProperties {
                address: "0000:03:00.0".into(),
                permitted: true,
                passthrough_ready: true,
                ..DeviceProperties::default()
            },
        ];
        assert_eq!(
            s.attention(),
            [
                "broken.qcow2 could not be checked",
                "bad.qcow2 is corrupt",
                "0000:01:00.0 is allow-listed but not ready for passthrough"
            ]
        );
    }
}
