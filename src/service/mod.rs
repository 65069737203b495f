//! The D-Bus boundary: objects, options, errors, and the daemon's run loop.
//!
//! This layer turns D-Bus calls into domain calls (`crate::disk`) and domain
//! results back into D-Bus values; it never reads /proc or sysfs itself.

pub mod callers;
pub mod daemon;
pub mod devices;
pub mod error;
pub mod job;
pub mod manager;
pub mod options;
pub mod values;

// The contract's names live in the client crate, shared with every client.
pub use vmmanager_client::names::{BUS_NAME, DEVICES_PATH, JOBS_PATH, MANAGER_PATH};
