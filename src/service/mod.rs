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
//!
//! # Member order
//! Each interface declares its signals before its methods. zbus writes
//! members in declaration order, and the introspection of a parent object
//! (`/` included) nests every child object's interfaces. busctl (seen with
//! systemd 252) keeps a method argument's `direction` across the members of
//! a nested `<node>`, so a signal after a method whose last argument is
//! `in` printed "Unexpected signal <arg> direction value 'in'" once per
//! device and job. `tests/introspection.rs` runs `busctl introspect` on
//! every object.

pub mod callers;
pub mod daemon;
pub mod device_properties;
pub mod devices;
pub mod error;
pub mod job;
pub mod manager;
pub mod options;
pub mod values;

// The contract's names live in the client crate, shared with every client.
pub use vmmanager_client::names::{BUS_NAME, DEVICES_PATH, JOBS_PATH, MANAGER_PATH};
