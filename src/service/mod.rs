//! The D-Bus boundary: objects, options, errors, and the daemon's entry
//! points.
//!
//! This layer turns D-Bus calls into domain calls (`crate::disk`) and domain
//! results back into D-Bus values; it never reads /proc or sysfs itself.
//!
//! # Layout
//! - [`daemon`]: [`daemon::build`] makes everything the service owns from
//!   the config and [`daemon::Roots`]; [`daemon::serve`] runs it on a
//!   connection until a shutdown future fires or the bus is lost, and
//!   returns when every task has stopped.
//! - [`manager`]: the manager object and the state its jobs share;
//!   [`job`]: one object per running check; [`callers`]: work stops when its
//!   caller leaves the bus.
//! - [`devices`]: one object per PCI device, kept in step with the inventory.
//! - [`options`], [`values`], [`error`]: a{sv} options in, report
//!   dictionaries out, the one D-Bus error enum.

pub mod callers;
pub mod daemon;
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
