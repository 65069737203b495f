//! The D-Bus boundary: objects, options, errors, and the daemon's run loop.
//!
//! This layer turns D-Bus calls into domain calls (`crate::disk`) and domain
//! results back into D-Bus values; it never reads /proc or sysfs itself.

pub mod callers;
pub mod daemon;
pub mod device_properties;
pub mod devices;
pub mod error;
pub mod job;
pub mod manager;
pub mod options;
pub mod values;

/// The well-known bus name.
pub const BUS_NAME: &str = "org.example.VmManager";
/// The manager object and ObjectManager root.
pub const MANAGER_PATH: &str = "/org/example/VmManager";
/// Prefix of device objects (`/org/example/VmManager/devices/pci_…`).
pub const DEVICES_PATH: &str = "/org/example/VmManager/devices";
/// Prefix of job objects (`/org/example/VmManager/jobs/N`).
pub const JOBS_PATH: &str = "/org/example/VmManager/jobs";
