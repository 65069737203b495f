//! End-to-end test harness: every test gets its own D-Bus daemon, polkitd,
//! `vmmanagerd` and QEMU guests, all real processes in guards that kill and
//! reap them on drop (panics included), with temp dirs removed afterwards.
//! Nothing is shared between tests, so they run in parallel.
//!
//! # Layout
//! - [`bus`]: [`TestBus`] (private system-like dbus-daemon), `busctl` as root
//!   or `nobody`, zbus connections, [`IdleClient`].
//! - [`polkit`]: [`Polkit`], a real polkitd seeing the project's actions and
//!   per-test JavaScript rules.
//! - [`daemon`]: [`Daemon`] and its [`DaemonConfig`].
//! - [`vm`]: [`Vm`], a QEMU guest holding images.
//! - [`libvirt`]: [`libvirt::Libvirt`], a real libvirtd (system or session
//!   mode) in a private mount namespace, its domains, and the daemon
//!   configuration that runs `vmmanagerd` in that namespace.
//! - [`images`]: test disk images.
//! - [`util`]: process guards and bounded waits.
//! - [`dead_fuse`]: [`DeadFuse`], a FUSE mount whose server never answers
//!   (the unit tests' own, `src/test_support/dead_fuse.rs`).
//! - [`world`]: [`world::World`], bus + polkitd + daemon + image dir for
//!   disk tests, with report helpers.
//! - [`gnome_shell`]: [`gnome_shell::GnomeShell`], a headless GNOME Shell on
//!   a private session bus with the extensions a test enables; Eval, menus,
//!   extension state, screenshots.
//!
//! Needs root, `dbus-daemon`, `busctl`, `setpriv`, `unshare`, `nsenter`,
//! polkitd, `qemu-system-x86_64` and libvirt's daemons and `virsh` (see
//! `scripts/install-deps`).

pub mod bus;
pub mod daemon;
#[path = "../../src/test_support/dead_fuse.rs"]
pub mod dead_fuse;
pub mod fake_kernel;
#[path = "../../src/test_support/fd_copies.rs"]
pub mod fd_copies;
pub mod gnome_shell;
pub mod images;
pub mod inproc;
pub mod libvirt;
pub mod polkit;
#[path = "../../src/test_support/sysfs.rs"]
pub mod sysfs;
pub mod udevd;
pub mod util;
pub mod vm;
pub mod world;

pub use bus::TestBus;
pub use daemon::{Daemon, DaemonConfig, MANAGER_IFACE, MANAGER_PATH, SERVICE_NAME};
pub use dead_fuse::DeadFuse;
pub use polkit::{Polkit, PolkitBuilder};
pub use util::{CmdOutput, NOBODY};
pub use vm::Vm;

/// Bus, polkitd and daemon together, torn down daemon first.
pub struct Stack {
    pub daemon: Daemon,
    pub polkit: Polkit,
    pub bus: TestBus,
}

impl Stack {
    /// Starts all three; `polkit` carries the test's rules.
    pub fn start(polkit: PolkitBuilder, config: &DaemonConfig) -> Stack {
        let bus = TestBus::start();
        let polkit = polkit.start(&bus);
        let daemon = Daemon::start(&bus, config);
        Stack {
            daemon,
            polkit,
            bus,
        }
    }
}
