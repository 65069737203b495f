//! The one integration-test binary (as ripgrep's `tests/tests.rs`): every
//! file here is a module of it, sharing the harness in [`common`], which is
//! compiled once. Run one file's tests with `cargo test --test tests
//! attacks::`, one test by (part of) its name.

mod common;

mod attacks;
mod boot_claims;
mod bounds;
mod check_disk;
mod desktop_clients;
mod device_dbus;
mod device_inventory;
mod device_lifecycle;
mod device_monitor;
mod device_vfio;
mod devices_real;
mod disk_usage;
mod gnome_shell;
mod harness;
mod introspection;
mod launchers;
mod libvirt;
mod lifecycle;
mod notify;
mod opener;
mod polkit_limits;
mod qemu_img;
mod scan_bounds;
mod tray;
mod units;
mod vmctl_agent;
mod vmctl_cli;
