//! Bursts of device changes become one batch: 40 VFs appearing at once is
//! one "40 PCI devices added" notification, not 40. The clock is a
//! parameter, so the windows are unit-tested without sleeping.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::policy::{DeviceBatch, DeviceProperties};

/// One change of one device, as the service reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChange {
    Added(DeviceProperties),
    Removed(DeviceProperties),
    /// `PassthroughReady` changed; `device` holds the new state.
    Readiness {
        device: DeviceProperties,
        was: bool,
    },
}

/// The net change of one address within a window: how it was before the
/// first event, and how it is now.
#[derive(Debug)]
struct Net {
    /// `Some(ready)` when it existed before the window.
    before: Option<bool>,
    now: Option<DeviceProperties>,
    /// The latest view of it, to name it when it is gone.
    seen: DeviceProperties,
}

/// Collects changes until the bus has been quiet for `quiet`, or `max` has
/// passed since the first change of the burst (so a steady trickle still
/// gets reported).
#[derive(Debug)]
pub struct Coalescer {
    quiet: Duration,
    max: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
    pending: BTreeMap<String, Net>,
}

impl Coalescer {
    pub fn new(quiet: Duration, max: Duration) -> Coalescer {
        Coalescer {
            quiet,
            max,
            first: None,
            last: None,
            pending: BTreeMap::new(),
        }
    }

    pub fn push(&mut self, change: DeviceChange, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
        let (seen, before, after) = match change {
            DeviceChange::Added(d) => (d.clone(), None, Some(d)),
            DeviceChange::Removed(d) => (d.clone(), Some(d.passthrough_ready), None),
            DeviceChange::Readiness { device, was } => (device.clone(), Some(was), Some(device)),
        };
        // The first event of an address says how it was before the burst;
        // later ones only move its current state.
        let net = self.pending.entry(seen.address.clone()).or_insert(Net {
            before,
            now: None,
            seen: DeviceProperties::default(),
        });
        net.now = after;
        net.seen = seen;
    }

    /// When the pending batch is due; `None` when nothing is pending.
    pub fn deadline(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        Some((last + self.quiet).min(first + self.max))
    }

    /// The net batch, emptying the coalescer. Changes that cancel out
    /// (added then removed, ready then unready) leave nothing behind.
    pub fn take(&mut self) -> DeviceBatch {
        self.first = None;
        self.last = None;
        let mut batch = DeviceBatch::default();
        for (_, net) in std::mem::take(&mut self.pending) {
            match (net.before, net.now) {
                (None, Some(d)) => batch.added.push(d),
                (Some(_), None) => batch.removed.push(net.seen),
                (Some(was), Some(d)) if was != d.passthrough_ready => {
                    if d.passthrough_ready {
                        batch.became_ready.push(d);
                    } else {
                        batch.became_unready.push(d);
                    }
                }
                _ => {}
            }
        }
        batch
    }
}

/// The changes between two views of the device set (by object path), as
/// after the service restarted: devices that came, went, or changed
/// readiness while it was away.
pub fn diff(
    old: &HashMap<String, DeviceProperties>,
    new: &HashMap<String, DeviceProperties>,
) -> Vec<DeviceChange> {
    let mut changes = Vec::new();
    for (path, device) in new {
        match old.get(path) {
            None => changes.push(DeviceChange::Added(device.clone())),
            Some(before) if before.passthrough_ready != device.passthrough_ready => {
                changes.push(DeviceChange::Readiness {
                    device: device.clone(),
                    was: before.passthrough_ready,
                })
            }
            Some(_) => {}
        }
    }
    for (path, device) in old {
        if !new.contains_key(path) {
            changes.push(DeviceChange::Removed(device.clone()));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(2);

    fn dev(addr: &str, ready: bool) -> DeviceProperties {
        DeviceProperties {
            address: addr.into(),
            passthrough_ready: ready,
            ..DeviceProperties::default()
        }
    }

    fn ms(start: Instant, n: u64) -> Instant {
        start + Duration::from_millis(n)
    }

    #[test]
    fn forty_vfs_are_one_batch() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(QUIET, MAX);
        assert_eq!(c.deadline(), None);
        for i in 0..40u64 {
            let addr = format!("0000:03:{:02x}.{}", i / 8, i % 8);
            c.push(DeviceChange::Added(dev(&addr, false)), ms(t0, i * 5));
        }
        // Due 500 ms after the last event.
        assert_eq!(c.deadline(), Some(ms(t0, 39 * 5 + 500)));
        let batch = c.take();
        assert_eq!(batch.added.len(), 40);
        assert_eq!(batch.added[0].address, "0000:03:00.0");
        assert_eq!(c.deadline(), None);
        assert_eq!(c.take(), DeviceBatch::default());
    }

    #[test]
    fn a_steady_trickle_is_reported_after_the_maximum() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(QUIET, MAX);
        for i in 0..10u64 {
            c.push(
                DeviceChange::Added(dev(&format!("0000:04:00.{i}"), false)),
                ms(t0, i * 400),
            );
        }
        assert_eq!(c.deadline(), Some(ms(t0, 2000)));
    }

    #[test]
    fn changes_that_cancel_out_vanish() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(QUIET, MAX);
        c.push(DeviceChange::Added(dev("0000:01:00.0", false)), t0);
        c.push(DeviceChange::Removed(dev("0000:01:00.0", false)), t0);
        c.push(
            DeviceChange::Readiness {
                device: dev("0000:02:00.0", true),
                was: false,
            },
            t0,
        );
        c.push(
            DeviceChange::Readiness {
                device: dev("0000:02:00.0", false),
                was: true,
            },
            t0,
        );
        c.push(
            DeviceChange::Readiness {
                device: dev("0000:03:00.0", true),
                was: false,
            },
            t0,
        );
        let mut named = dev("0000:05:00.0", true);
        named.device_name = "GA102".into();
        c.push(DeviceChange::Removed(named.clone()), t0);
        let batch = c.take();
        assert!(batch.added.is_empty());
        assert_eq!(batch.removed, [named]);
        assert_eq!(batch.became_ready, [dev("0000:03:00.0", true)]);
        assert!(batch.became_unready.is_empty());
    }

    #[test]
    fn diff_of_two_views() {
        let view = |devices: &[(&str, bool)]| -> HashMap<String, DeviceProperties> {
            devices
                .iter()
                .map(|(a, r)| (format!("/p/{a}"), dev(a, *r)))
                .collect()
        };
        let old = view(&[("a", false), ("b", false), ("c", true)]);
        let new = view(&[("b", true), ("c", true), ("d", false)]);
        let mut c = Coalescer::new(QUIET, MAX);
        for change in diff(&old, &new) {
            c.push(change, Instant::now());
        }
        let batch = c.take();
        assert_eq!(batch.added, [dev("d", false)]);
        assert_eq!(batch.removed, [dev("a", false)]);
        assert_eq!(batch.became_ready, [dev("b", true)]);
        assert!(diff(&new, &new).is_empty());
    }
}
