//! VM Manager: a D-Bus system service for hosts that run QEMU/KVM VMs.
//!
//! # Layout
//!
//! Domain code knows nothing about D-Bus; the D-Bus layer knows nothing about
//! sysfs or /proc. Roots such as `/proc` are parameters so tests can point the
//! real code at prepared trees.
//!
//! - [`config`]: `/etc/vmmanager/vmmanager.toml`, every key with a default.
//! - [`disk`]: everything about checking a disk image:
//!   - [`disk::image`]: validate a caller's path, open it once, safely, detect
//!     the format from the header magic;
//!   - [`disk::view`]: do file-system lookups with a caller's permissions, so
//!     a caller learns nothing about files it could not see itself;
//!   - [`disk::usage`]: who uses an image (PID files, /proc fds, QEMU's lock
//!     bytes); scans waiting at the same moment share one /proc pass;
//!   - [`disk::qemu_img`]: run `qemu-img check` on the open image (never its
//!     name) as a given user in its own process group, forked on a thread
//!     of its own (off the async workers), with timeout and cancellation,
//!     and parse its JSON; as the service's child subreaper, kill whatever
//!     leaves that group;
//!   - [`disk::writable`]: for a repair, a handle of the image on a
//!     writable mount when the service's own is on a read-only one;
//!   - [`disk::checker`]: the orchestration: busy set, concurrency limit,
//!     the in-use scan (started while polkit is asked, read only once
//!     authorized), in-use refusal, report.
//! - [`devices`]: PCI devices:
//!   - [`devices::sysfs`]: reading one device's sysfs directory (addresses
//!     are the client crate's [`PciAddress`](vmmanager_client::PciAddress),
//!     which also owns the device object path codec);
//!   - [`devices::inventory`]: the sysfs inventory with passthrough
//!     readiness, reporting which devices changed;
//!   - [`devices::monitor`]: the udev monitor thread (udevd's control socket
//!     is a parameter);
//!   - [`devices::vfio`]: the sysfs writes of detach/reattach to vfio-pci,
//!     and the one rule of which drivers count as VFIO
//!     ([`devices::vfio::is_vfio_driver`]);
//!   - [`devices::passthrough`]: Detach/Reattach's decisions: refuse while a
//!     VM holds the VFIO group, fail closed when that is unknown; and the
//!     bounded scans behind the public `InUseBy` property.
//!   - [`devices::host_use`]: who on the host uses a device (issue 13's
//!     safety gates, not yet wired): mounts and swap on its block devices
//!     and what stacks on them, its interfaces that are up with addresses
//!     or carry the default route (rtnetlink, `host_use/netlink.rs`), the
//!     boot display, connected outputs and framebuffers, and processes
//!     holding its nodes (one /proc pass); each a sentence naming what and
//!     who, and what could not be looked at said as such.
//!   - [`devices::persistent`]: boot-time claims (Detach/Reattach's
//!     `persistent`): driverctl's override files, written atomically
//!     without following symlinks, and the record of which are ours.
//! - [`atomic_file`]: replacing a small state file atomically.
//! - [`kernel_files`]: reading kernel-provided files (/proc, /sys) safely:
//!   the one bounded read (never blocking, regular files only, the caller
//!   says whether the bound truncates or refuses), the one `/proc/PID/stat`
//!   parser and the one sysfs link-name read.
//! - [`procfs`]: reading a /proc tree: who holds a file or device open (an
//!   error, never "nobody", when it cannot look; cancellable; one pass for
//!   many targets, split across CPUs, in `procfs/scan.rs`), the list of
//!   processes with their stat, a process's exe and QEMU `-name` (for disk
//!   users and VFIO group users).
//! - [`auth`]: polkit authorization of D-Bus callers (fail closed).
//! - The D-Bus contract (names, proxies, error enum, report and device
//!   property codecs, the PCI address ↔ object path codec) is the workspace
//!   crate [`vmmanager_client`] (`client/`), shared with `vmctl`, the
//!   companion and the tests.
//! - [`manpage`]: man pages from the binaries' clap definitions.
//! - [`service`]: the D-Bus boundary: the manager and job objects
//!   ([`service::manager`], [`service::job`]), option parsing
//!   ([`service::options`]), reports as dictionaries ([`service::values`]),
//!   callers leaving the bus ([`service::callers`]), the mapping of every
//!   domain error to the one D-Bus error enum ([`service::error`]), and the
//!   daemon's two entry points:
//!   [`service::daemon::build`] (the service's parts from the config and the
//!   host's roots; nothing runs yet) and [`service::daemon::serve`] (export,
//!   take the name, run until shutdown or bus loss, stop and wait for every
//!   task). `vmmanagerd` and the in-process tests both call these two.
//!   Device objects: [`service::devices`] (one `PciDevice` object per
//!   device; the uevents that arrive together are applied as one batch,
//!   then each changed device gets one PropertiesChanged, then the Uevent
//!   signals follow in order) and
//!   [`service::device_properties`] (the property values, from one
//!   function, for getters and signals alike).
//! - [`notify`]: the user-session companion `vmmanager-notify`: follows the
//!   service on the system bus and shows desktop notifications.
//! - [`safe_open`]: opening a file someone else named with one lookup, never
//!   a FIFO or a device; a caller's lookup never through a `/proc` magic
//!   link, with `openat2` or (where a seccomp filter refuses it) without.
//! - [`opener`]: both sides of `vmmanager-opener`, the socket-activated
//!   helper that hands the service an `O_PATH` handle on an image from a
//!   mount namespace built per request (for repairs in directories that
//!   appeared after the service started); [`disk::writable`] decides when
//!   to ask it and checks what it gets.
//! - [`uid_counts`]: work counted per caller uid until its thread has
//!   ended, for limits that bound threads stuck in the kernel, and the one
//!   way to run such blocking work with a stop token and a time limit.
//! - [`process`]: logging and signal handling shared by the long-running
//!   binaries (SIGTERM/SIGINT stop, SIGHUP is logged and ignored; threads
//!   stuck in the kernel get 2 s, then the process exits without them).
//! - `src/bin/`: thin binaries `vmmanagerd` (the service: arguments, config,
//!   bus connection, then `build` + `serve` with signal-driven shutdown),
//!   `vmctl` (CLI), `vmmanager-notify` (session companion) and
//!   `vmmanager-opener` (see [`opener`]).
//!
//! # Methods: their polkit action and their code
//!
//! The interface is `dbus/org.example.VmManager1.xml` (with `<doc>`); the
//! action ids are [`vmmanager_client::names`]'s.
//!
//! | method | polkit action | D-Bus side → domain |
//! |---|---|---|
//! | `CheckDisk` | `check-disk` (the caller's own image, or one libvirt remembers as the caller's), else `check-disk-other-user`; plus `repair-disk` for `repair` | [`service::manager`] (`authorize_image`) → [`disk::checker`] |
//! | `GetDiskUsers` | as `CheckDisk`, without `repair-disk` | [`service::manager`] → [`disk::usage`] |
//! | `Job.Cancel` | none for the job's own caller, else `check-disk-other-user` | [`service::job`] |
//! | `PciDevice.Detach`, `Reattach` | `manage-devices`; plus `force-detach` for a forced Detach the safety gates refused | [`service::devices`] → [`devices::gate`], [`devices::passthrough`] |
//!
//! Properties and signals need no action: `Jobs`, `DiskChecked`, the
//! `PciDevice` properties ([`service::device_properties`]) and `Uevent` are
//! public on the system bus, as with udisks.

pub mod atomic_file;
pub mod auth;
pub mod config;
pub mod devices;
pub mod disk;
pub mod kernel_files;
pub mod manpage;
pub mod notify;
pub mod opener;
pub mod process;
pub mod procfs;
pub mod safe_open;
pub mod service;
pub mod uid_counts;

#[cfg(test)]
mod test_support;
