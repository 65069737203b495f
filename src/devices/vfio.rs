//! Detach to / reattach from vfio-pci, and who holds a VFIO group.
//!
//! Detach is libvirt's `nodedev-detach` sequence, all under the sysfs root:
//! 1. `vfio-pci` → `bus/pci/devices/ADDR/driver_override`
//! 2. `ADDR` → `bus/pci/devices/ADDR/driver/unbind` (only when bound)
//! 3. `ADDR` → `bus/pci/drivers_probe`, then the `driver` link must name
//!    vfio-pci.
//!
//! Reattach gives the device back:
//! 1. the `driver_override` it had before the detach → `driver_override`,
//!    or `"\n"` when it had none (an empty write clears it; libvirt writes
//!    the same)
//! 2. `ADDR` → `bus/pci/drivers/CURRENT/unbind` (only when bound to a VFIO
//!    driver, see below)
//! 3. `ADDR` → `bus/pci/drivers/ORIGINAL/bind` when the original driver is
//!    remembered and still loaded, else `ADDR` → `bus/pci/drivers_probe`
//!    (a group rollback leaves a device that had no driver without one)
//! 4. only when the override it had names another driver than ORIGINAL:
//!    that override → `driver_override` (see below).
//!
//! # The override a device had before
//! An override someone else set (`pci-stub`, `none` to keep every driver
//! off, driverctl's) is theirs: Detach remembers it with the original
//! driver and Reattach writes it back instead of clearing it, so the device
//! ends where it was, on the same driver with the same override. With an
//! override set, the kernel binds the device only to the driver it names,
//! an explicit `bind` included. So when the override names the original
//! driver (the usual case: on pci-stub with `pci-stub`), it goes back in
//! step 1 and the bind agrees with it; when it names another driver (set
//! while the device stayed bound), step 1 clears it, the device is bound
//! to its original driver, and the override is written back in step 4: the
//! device is where it was, and its next probe follows the override as it
//! would have. A device that had no driver is probed with its override in
//! place, so the kernel's pick agrees with it (`none` keeps it unbound).
//! A VFIO override (`vfio-pci`) is not given back by Reattach, which would
//! hand the device to VFIO again at its next probe; a group rollback does
//! give it back, to leave the device exactly as it found it.
//!
//! The original drivers live in [`VfioBinder`] and, when configured, in a
//! small state file so a daemon restart does not forget them; what no longer
//! has a use (the device is gone, or no longer given to VFIO) is forgotten
//! at start and whenever devices are removed ([`VfioBinder::forget_stale`]).
//! Every write goes
//! through a [`SysfsWriter`], so tests can record the exact sequence and play
//! the kernel's part in a prepared tree. Whether a VM holds the group is the
//! caller's check, with [`group_users`] and [`iommu_group_of`].
//!
//! # Which drivers count as VFIO
//! [`is_vfio_driver`] is the one rule, used by readiness
//! ([`super::inventory`]), Detach and Reattach: vfio-pci and its vendor
//! variant drivers (`mlx5_vfio_pci`, `nvgrace-gpu-vfio-pci`, …), which give
//! the device to VFIO just as well (QEMU's `-device vfio-pci` opens them
//! alike) and add to it (e.g. live migration). So a device on a variant
//! driver is ready for passthrough, Detach leaves it there ("already
//! detached", nothing written, rather than swapping it to plain vfio-pci),
//! and Reattach unbinds it from the variant and gives it back to a host
//! driver. A variant driver binds only through `driver_override` (its ID
//! table is override-only), so clearing the override is enough for
//! `drivers_probe` to pick the host driver.

mod state;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, TryLockError};

use tokio_util::sync::CancellationToken;

use super::sysfs;
use crate::procfs::{self, HoldersError, Target};
use vmmanager_client::PciAddress;

/// The stub driver devices are detached to.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// vfio-pci itself and its vendor variant drivers (`mlx5_vfio_pci`,
/// `nvgrace-gpu-vfio-pci`, …): a device bound to any of them is given to
/// VFIO (see the module docs).
pub fn is_vfio_driver(driver: &str) -> bool {
    driver == VFIO_DRIVER || driver.ends_with("_vfio_pci") || driver.ends_with("-vfio-pci")
}

/// The VFIO node through which a process holds a device, named as the
/// host's /dev names it (it is matched by device number, so a QEMU with a
/// private /dev counts too).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum VfioNode {
    /// `/dev/vfio/<group>`: the device's IOMMU group (legacy VFIO).
    Group(u32),
    /// `/dev/vfio/devices/<name>`: the device's own cdev (iommufd).
    Cdev(String),
}

impl fmt::Display for VfioNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VfioNode::Group(group) => write!(f, "/dev/vfio/{group}"),
            VfioNode::Cdev(name) => write!(f, "/dev/vfio/devices/{name}"),
        }
    }
}

/// A process holding a device open through VFIO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioUser {
    pub pid: u32,
    /// Resolved `/proc/PID/exe` ("" when unknown).
    pub exe: String,
    /// QEMU `-name`, "" when none.
    pub vm_name: String,
    /// What it holds open (the group's node when it holds several).
    pub node: VfioNode,
}

/// How a Detach/Reattach refusal names the holder.
impl fmt::Display for VfioUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.vm_name.is_empty() {
            write!(f, "PID {} ({})", self.pid, self.exe)
        } else {
            write!(f, "VM \"{}\" (PID {})", self.vm_name, self.pid)
        }
    }
}

/// Processes under `proc_root` holding `<dev_root>/vfio/<group>` open, sorted
/// by PID; empty when the node does not exist. A character device node is
/// matched by its device number, so a QEMU that opened its own copy of the
/// node (libvirt's private /dev) counts too; any other file by its inode.
///
/// An error means it is unknown who holds it (/proc unreadable, the service
/// out of descriptors, `cancel` cancelled), never "nobody".
pub fn group_users(
    proc_root: &Path,
    dev_root: &Path,
    group: u32,
    cancel: &CancellationToken,
) -> Result<Vec<VfioUser>, HoldersError> {
    device_users(proc_root, dev_root, group, &[], cancel)
}

/// [`group_users`], plus the holders of the device's VFIO cdevs
/// (from [`sysfs::vfio_cdevs`]), which an iommufd QEMU opens instead of
/// the group (`/dev/vfio/devices/vfioN`), matched by number. `/dev/iommu`,
/// which it opens too, names no device.
pub fn device_users(
    proc_root: &Path,
    dev_root: &Path,
    group: u32,
    cdevs: &[sysfs::VfioCdev],
    cancel: &CancellationToken,
) -> Result<Vec<VfioUser>, HoldersError> {
    let node = dev_root.join("vfio").join(group.to_string());
    let (mut targets, mut nodes): (Vec<Target>, Vec<VfioNode>) = cdevs
        .iter()
        .map(|cdev| {
            let rdev = libc::makedev(cdev.major, cdev.minor);
            (
                Target::CharDevice { rdev },
                VfioNode::Cdev(cdev.name.clone()),
            )
        })
        .unzip();
    match std::fs::metadata(&node) {
        Ok(meta) => {
            targets.push(Target::of(&meta));
            nodes.push(VfioNode::Group(group));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(HoldersError::Unreadable { path: node, source }),
    }
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    // No process has PID 0, so nobody is skipped: the daemon never opens
    // VFIO groups itself. Holders come per target, in `nodes`' order.
    let mut holders: Vec<(u32, VfioNode)> = procfs::holders_of_any(proc_root, &targets, 0, cancel)?
        .into_iter()
        .zip(nodes)
        .flat_map(|(holders, node)| holders.into_iter().map(move |h| (h.pid, node.clone())))
        .collect();
    holders.sort_unstable();
    holders.dedup_by_key(|(pid, _)| *pid);
    let users = holders
        .into_iter()
        .map(|(pid, node)| VfioUser {
            pid,
            exe: procfs::exe(proc_root, pid).unwrap_or_default(),
            vm_name: procfs::vm_name_of(proc_root, pid),
            node,
        })
        .collect();
    Ok(users)
}

/// The IOMMU group of a device: the name of its `iommu_group` link.
pub fn iommu_group_of(sysfs_root: &Path, address: PciAddress) -> Option<u32> {
    sysfs::iommu_group(&device_dir(sysfs_root, address)).ok()?
}

/// Writes one value to one sysfs attribute.
pub trait SysfsWriter: Send + Sync {
    /// Writes `value` to the existing file `path` with a single write(2).
    fn write(&self, path: &Path, value: &[u8]) -> io::Result<()>;
}

/// The real thing: plain writes to the kernel's sysfs files.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelSysfs;

impl SysfsWriter for KernelSysfs {
    fn write(&self, path: &Path, value: &[u8]) -> io::Result<()> {
        // No O_CREAT: a missing attribute is an error, never a new file. One
        // write(2) is one store() in the kernel; a retry would be a second one.
        let mut file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NOFOLLOW)
            .open(path)?;
        let n = file.write(value)?;
        if n != value.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {n} of {} bytes", value.len()),
            ));
        }
        Ok(())
    }
}

/// One write that was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsWrite {
    pub path: PathBuf,
    pub value: String,
}

/// The writes made so far, for error messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Writes(pub Vec<SysfsWrite>);

impl fmt::Display for Writes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("nothing");
        }
        for (i, w) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{:?} to {}", w.value, w.path.display())?;
        }
        Ok(())
    }
}

/// What a detach or reattach did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The device moved; `writes` lists every write in order.
    Done {
        driver: Option<String>,
        writes: Vec<SysfsWrite>,
    },
    /// Already in the requested state: nothing was written.
    AlreadyDone { driver: Option<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("PCI device {0} not found")]
    NotFound(PciAddress),
    #[error(
        "the vfio-pci driver is not available ({} is missing); load it with `modprobe vfio-pci`",
        .0.display()
    )]
    VfioUnavailable(PathBuf),
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "writing {value:?} to {} failed: {source}; already written: {done}",
        path.display()
    )]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
        done: Writes,
    },
    /// `auto-return` for a device this service did not detach.
    #[error("{0} was not detached by this service: there is no driver to give it back to")]
    NotDetachedByUs(PciAddress),
    /// The group option on a device without an IOMMU group.
    #[error("{0} has no IOMMU group")]
    NoGroup(PciAddress),
    /// The device is not among its group's endpoints (a bridge, or the
    /// group changed while it was read).
    #[error("{address} is not an endpoint of IOMMU group {group}")]
    NotInGroup { address: PciAddress, group: u32 },
    #[error("{0}")]
    Group(Box<GroupFailure>),
    /// The group's members are not those authorized (and gated): a device
    /// was added to or removed from it meanwhile.
    #[error(
        "the IOMMU group {group} of {address} changed since the call was authorized; nothing was changed, try again"
    )]
    GroupChanged { address: PciAddress, group: u32 },
    #[error(
        "{address} ended up bound to {} instead of {expected}; written: {done}",
        actual.as_deref().unwrap_or("no driver")
    )]
    WrongDriver {
        address: PciAddress,
        /// A driver name, or "a driver other than vfio-pci".
        expected: String,
        actual: Option<String>,
        done: Writes,
    },
}

/// Where a device is bound: its driver and its `driver_override`. What
/// Detach remembers of a device, and what a group rollback checks a member
/// against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Binding {
    /// None: no driver.
    pub driver: Option<String>,
    /// None: unset (`(null)`).
    pub driver_override: Option<String>,
    /// Remembered only (unmarked in what is read from a device): give the
    /// device back after its last VM user exits (Detach's `auto-return`).
    pub auto_return: ReturnMark,
}

/// Whether a device detached by us goes back by itself after use, and how
/// far its use has got. Saved with its original driver, so that a VM that
/// exits while the service is not running is noticed when it starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReturnMark {
    #[default]
    Unmarked,
    /// Marked; no VM seen holding its group yet (an idle group is waited
    /// on, not given back).
    Marked,
    /// Marked, and a VM was seen holding its group: given back as soon as
    /// nobody holds it.
    InUse,
}

impl ReturnMark {
    pub fn is_marked(self) -> bool {
        self != ReturnMark::Unmarked
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.driver.as_deref().unwrap_or("no driver"))?;
        if let Some(name) = &self.driver_override {
            write!(f, " with driver_override {name}")?;
        }
        Ok(())
    }
}

/// What Reattach needs of each device we detached, by address.
type Remembered = BTreeMap<PciAddress, Binding>;

/// One device's move, with the binder's map of original drivers locked.
type MoveFn = fn(&VfioBinder, &mut Remembered, PciAddress) -> Result<Outcome, VfioError>;

/// Why a device is given back: asked for, or undoing a group detach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GiveBack {
    /// Reattach: to a host driver.
    Reattach,
    /// A group detach's rollback: exactly where it was, so a device that
    /// had no driver stays without one and a VFIO override goes back too.
    Undo,
}

/// How a device given back gets its driver.
enum BackTo {
    /// Still on its own driver (a detach failed before the unbind).
    Stays,
    Bind(String),
    /// The kernel picks (by the override, when one is given back).
    Probe,
    /// None: it had none (a rollback only).
    Unbound,
}

/// Which way a group moved, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupMove {
    Detach,
    Reattach,
}

impl fmt::Display for GroupMove {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GroupMove::Detach => "detach",
            GroupMove::Reattach => "reattach",
        })
    }
}

/// What a group detach or reattach did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOutcome {
    /// Members moved, in the order they were.
    pub moved: Vec<PciAddress>,
    /// Members already where they should be: nothing written.
    pub unchanged: Vec<PciAddress>,
}

/// A member the rollback did not bring back to where it started.
#[derive(Debug)]
pub struct RollbackFailure {
    pub address: PciAddress,
    /// Why: the failed back-move, or reading where it was left. None when
    /// the back-move succeeded but left it elsewhere (e.g. on vfio-pci
    /// with its override cleared).
    pub error: Option<VfioError>,
    /// Where it was before this call.
    pub was: Binding,
    /// Where it was left; None when that could not be read.
    pub left: Option<Binding>,
}

/// A group move that failed at one member, and what its rollback did.
#[derive(Debug)]
pub struct GroupFailure {
    pub action: GroupMove,
    /// The device the call was made on.
    pub address: PciAddress,
    /// The member whose move failed.
    pub failed: PciAddress,
    pub source: VfioError,
    /// Members given back and found where they started (driver and
    /// override), in the order they were (newest first).
    pub rolled_back: Vec<PciAddress>,
    pub rollback_failed: Vec<RollbackFailure>,
}

impl fmt::Display for GroupFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the group {} of {} failed at {}: {}; ",
            self.action, self.address, self.failed, self.source
        )?;
        if self.rolled_back.is_empty() {
            f.write_str("nothing to roll back")?;
        } else {
            let names: Vec<String> = self.rolled_back.iter().map(ToString::to_string).collect();
            write!(f, "rolled back: {}", names.join(", "))?;
        }
        for failure in &self.rollback_failed {
            let left = match &failure.left {
                Some(left) => left.to_string(),
                None => "an unknown driver".to_owned(),
            };
            match &failure.error {
                Some(error) => write!(
                    f,
                    "; rolling back {} failed ({error}), left on {left}",
                    failure.address
                )?,
                None => write!(
                    f,
                    "; rolling back {} left it on {left} instead of {}",
                    failure.address, failure.was
                )?,
            }
        }
        Ok(())
    }
}

impl VfioError {
    /// Whether the failed move wrote anything before failing (then it has
    /// something to undo).
    fn wrote_something(&self) -> bool {
        match self {
            VfioError::Write { done, .. } | VfioError::WrongDriver { done, .. } => {
                !done.0.is_empty()
            }
            _ => false,
        }
    }
}

/// What [`VfioBinder::give_back_marked`] did.
#[derive(Debug)]
pub enum MarkedReturn {
    /// Not marked (any more): nothing done.
    NotMarked,
    /// No longer on a VFIO driver (reattached meanwhile): mark dropped.
    NotOnVfio,
    /// The reset failed: still on vfio-pci, its driver remembered.
    ResetFailed(VfioError),
    /// Reset (when it can be) and reattached, or the reattach's error.
    Reattached {
        remembered: Binding,
        result: Result<Outcome, VfioError>,
    },
}

/// Moves devices to and from vfio-pci and remembers where they came from.
pub struct VfioBinder {
    sysfs_root: PathBuf,
    state_file: Option<PathBuf>,
    writer: Box<dyn SysfsWriter>,
    /// Original driver and override per device detached by us. The lock
    /// is held for a whole operation, so they never interleave.
    originals: Mutex<Remembered>,
    /// The devices marked `auto_return` in `originals`, copied after every
    /// change: readable at any time, while an unbind that can take seconds
    /// holds `originals` (the async getters must never wait for that).
    marks: RwLock<BTreeMap<PciAddress, ReturnMark>>,
}

impl fmt::Debug for VfioBinder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioBinder")
            .field("sysfs_root", &self.sysfs_root)
            .field("state_file", &self.state_file)
            .finish_non_exhaustive()
    }
}

impl VfioBinder {
    /// Writes the real sysfs under `sysfs_root`; loads `state_file` if given.
    pub fn new(sysfs_root: PathBuf, state_file: Option<PathBuf>) -> Self {
        Self::with_writer(sysfs_root, state_file, Box::new(KernelSysfs))
    }

    /// Like [`new`](Self::new) with another writer (tests).
    pub fn with_writer(
        sysfs_root: PathBuf,
        state_file: Option<PathBuf>,
        writer: Box<dyn SysfsWriter>,
    ) -> Self {
        let originals: Remembered = state_file.as_deref().map(state::load).unwrap_or_default();
        let marks = RwLock::new(marked(&originals));
        let binder = VfioBinder {
            sysfs_root,
            state_file,
            writer,
            originals: Mutex::new(originals),
            marks,
        };
        // The file outlives restarts, so it may name devices gone or given
        // back while no daemon ran.
        binder.forget_stale();
        binder
    }

    /// Forgets the original drivers that have no use any more (see
    /// [`drop_stale`]) and saves what is left. Call it when devices go
    /// away (a VF goes with its PF's `sriov_numvfs`). Blocking: waits for
    /// a running Detach or Reattach.
    pub fn forget_stale(&self) {
        let mut originals = self.lock();
        let dropped = drop_stale(&self.sysfs_root, &mut originals);
        if !dropped.is_empty() {
            tracing::info!(
                devices = ?dropped.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "forgot the original drivers of devices gone or no longer detached"
            );
            self.save(&originals);
        }
    }

    pub fn sysfs_root(&self) -> &Path {
        &self.sysfs_root
    }

    /// The remembered original driver: `None` when the device was not
    /// detached by us, `Some(None)` when it had no driver.
    pub fn original_driver(&self, address: PciAddress) -> Option<Option<String>> {
        self.lock().get(&address).map(|b| b.driver.clone())
    }

    /// What Reattach will give the device back to: `None` when it was not
    /// detached by us.
    pub fn remembered(&self, address: PciAddress) -> Option<Binding> {
        self.lock().get(&address).cloned()
    }

    /// Marks (or unmarks) a device this service detached to be given back
    /// after its last VM user exits (see `devices::auto_return`); saved
    /// with its original driver. [`VfioError::NotDetachedByUs`] for any
    /// other device: there is nothing remembered to give it back to.
    pub fn set_auto_return(&self, address: PciAddress, on: bool) -> Result<(), VfioError> {
        let mut originals = self.lock();
        let entry = originals
            .get_mut(&address)
            .ok_or(VfioError::NotDetachedByUs(address))?;
        // Marking again starts a new wait: a Detach asks for the device
        // for a VM to come, so a use seen before (even one whose end the
        // service missed) is over.
        let mark = if on {
            ReturnMark::Marked
        } else {
            ReturnMark::Unmarked
        };
        if entry.auto_return != mark {
            entry.auto_return = mark;
            self.save(&originals);
        }
        Ok(())
    }

    /// Records that a VM was seen holding the group of each marked device
    /// of `addresses` ([`ReturnMark::InUse`]), saved at once so that the
    /// VM's exit counts even when the service was not running to see it.
    /// Never waits: `false` when a move under way holds the lock (an
    /// unbind can wait for seconds), so the caller tries again later.
    pub fn try_set_in_use(&self, addresses: &[PciAddress]) -> bool {
        let mut originals = match self.originals.try_lock() {
            Ok(originals) => originals,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        let mut changed = false;
        for address in addresses {
            if let Some(entry) = originals.get_mut(address)
                && entry.auto_return == ReturnMark::Marked
            {
                entry.auto_return = ReturnMark::InUse;
                changed = true;
            }
        }
        if changed {
            self.save(&originals);
        }
        true
    }

    /// The devices marked to be given back after use. Never waits for a
    /// move under way.
    pub fn auto_return_marks(&self) -> Vec<PciAddress> {
        let marks = self.marks.read().unwrap_or_else(PoisonError::into_inner);
        marks.keys().copied().collect()
    }

    /// The device's mark ([`ReturnMark::Unmarked`] when not detached by
    /// us). Never waits for a move under way.
    pub fn return_mark(&self, address: PciAddress) -> ReturnMark {
        let marks = self.marks.read().unwrap_or_else(PoisonError::into_inner);
        marks.get(&address).copied().unwrap_or_default()
    }

    /// Whether the device is marked to be given back after use. Never
    /// waits for a move under way.
    pub fn is_marked(&self, address: PciAddress) -> bool {
        self.return_mark(address).is_marked()
    }

    /// Gives a marked device back after use, as one operation under the
    /// lock, so a Detach or Reattach cannot come in between: only if it is
    /// still marked and still on a VFIO driver (a device someone reattached
    /// meanwhile is never reset from under its host driver). The mark goes
    /// first: one attempt per use. Then the reset (when it has one), then
    /// [`reattach`](Self::reattach).
    pub fn give_back_marked(&self, address: PciAddress) -> MarkedReturn {
        let mut originals = self.lock();
        let Some(entry) = originals
            .get_mut(&address)
            .filter(|b| b.auto_return.is_marked())
        else {
            return MarkedReturn::NotMarked;
        };
        entry.auto_return = ReturnMark::Unmarked;
        let remembered = entry.clone();
        self.save(&originals);
        let on_vfio = self
            .existing_device(address)
            .and_then(|dev| read_driver(&dev))
            .is_ok_and(|d| d.as_deref().is_some_and(is_vfio_driver));
        if !on_vfio {
            return MarkedReturn::NotOnVfio;
        }
        if let Err(e) = self.reset(address) {
            return MarkedReturn::ResetFailed(e);
        }
        MarkedReturn::Reattached {
            remembered,
            result: self.reattach_locked(&mut originals, address),
        }
    }

    /// Resets the device through its sysfs `reset` (a function-level,
    /// bus or power-management reset, whichever the kernel picked). `false`
    /// when the device has no reset method (no `reset` file).
    pub fn reset(&self, address: PciAddress) -> Result<bool, VfioError> {
        let dev = self.existing_device(address)?;
        let reset = dev.join("reset");
        if !reset.exists() {
            return Ok(false);
        }
        Sequence::new(&*self.writer).write(reset, "1")?;
        Ok(true)
    }

    /// Binds the device to vfio-pci; nothing to do when it is on a VFIO
    /// driver already (a variant included). Blocking (an unbind can take
    /// seconds).
    pub fn detach(&self, address: PciAddress) -> Result<Outcome, VfioError> {
        self.detach_locked(&mut self.lock(), address)
    }

    fn detach_locked(
        &self,
        originals: &mut Remembered,
        address: PciAddress,
    ) -> Result<Outcome, VfioError> {
        let dev = self.existing_device(address)?;
        let current = read_driver(&dev)?;
        if current.as_deref().is_some_and(is_vfio_driver) {
            return Ok(Outcome::AlreadyDone { driver: current });
        }
        let vfio = driver_dir(&self.sysfs_root, VFIO_DRIVER);
        if !vfio.is_dir() {
            return Err(VfioError::VfioUnavailable(vfio));
        }
        // Nothing written yet: an override that could not be given back
        // refuses the detach rather than be lost.
        let seen_override = read_override_strictly(&dev)?;
        if let Some(name) = seen_override
            .as_deref()
            .filter(|name| !state::valid_driver_name(name))
        {
            return Err(VfioError::Read {
                path: dev.join("driver_override"),
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{name:?} is not a driver name, so it could not be given back"),
                ),
            });
        }
        // Remember first, so a failure midway still leaves Reattach a way
        // back. An unbound device we already know is an earlier detach that
        // failed after the unbind: keep its real original. A VFIO override
        // on a device we know is that detach's own write: keep the one
        // saved before it.
        let known = originals.get(&address).cloned();
        let ours = known.is_some() && seen_override.as_deref().is_some_and(is_vfio_driver);
        let mut remember = known.clone().unwrap_or_default();
        if current.is_some() || known.is_none() {
            remember.driver = current.clone();
        }
        if !ours {
            remember.driver_override = seen_override;
        }
        if known.as_ref() != Some(&remember) {
            originals.insert(address, remember);
            self.save(originals);
        }

        let addr = address.to_string();
        let mut seq = Sequence::new(&*self.writer);
        seq.write(dev.join("driver_override"), VFIO_DRIVER)?;
        if current.is_some() {
            seq.write(dev.join("driver").join("unbind"), &addr)?;
        }
        seq.write(self.sysfs_root.join("bus/pci/drivers_probe"), &addr)?;

        let now = read_driver(&dev).unwrap_or(None);
        if now.as_deref() != Some(VFIO_DRIVER) {
            return Err(seq.wrong_driver(address, VFIO_DRIVER.to_owned(), now));
        }
        Ok(seq.done(now))
    }

    /// Takes the device off its VFIO driver (a variant included) and gives
    /// it back to its original driver (or lets the kernel probe one when
    /// that is unknown). Blocking.
    pub fn reattach(&self, address: PciAddress) -> Result<Outcome, VfioError> {
        self.reattach_locked(&mut self.lock(), address)
    }

    fn reattach_locked(
        &self,
        originals: &mut Remembered,
        address: PciAddress,
    ) -> Result<Outcome, VfioError> {
        self.give_back(originals, address, GiveBack::Reattach)
    }

    /// A group detach's rollback (see [`GiveBack::Undo`]).
    fn undo_detach_locked(
        &self,
        originals: &mut Remembered,
        address: PciAddress,
    ) -> Result<Outcome, VfioError> {
        self.give_back(originals, address, GiveBack::Undo)
    }

    fn give_back(
        &self,
        originals: &mut Remembered,
        address: PciAddress,
        why: GiveBack,
    ) -> Result<Outcome, VfioError> {
        let dev = self.existing_device(address)?;
        let current = read_driver(&dev)?;
        let on_vfio = current.as_deref().is_some_and(is_vfio_driver);
        let overridden = read_override(&dev).as_deref().is_some_and(is_vfio_driver);
        let remembered = originals.get(&address).cloned().unwrap_or_default();
        let original = remembered
            .driver
            .clone()
            .filter(|d| driver_dir(&self.sysfs_root, d).is_dir());
        // A device still unbound after a failed detach is brought back too.
        let pending = current.is_none() && original.is_some();
        if !on_vfio && !overridden && !pending {
            if originals.remove(&address).is_some() {
                self.save(originals);
            }
            return Ok(Outcome::AlreadyDone { driver: current });
        }

        let give_back_override = remembered
            .driver_override
            .filter(|name| why == GiveBack::Undo || !is_vfio_driver(name));
        // Still on its own driver (a detach failed before the unbind): the
        // override was all that was left to undo.
        let target = if current.is_some() && !on_vfio {
            BackTo::Stays
        } else if let Some(name) = original {
            BackTo::Bind(name)
        } else if why == GiveBack::Undo && remembered.driver.is_none() {
            BackTo::Unbound
        } else {
            BackTo::Probe
        };
        // The kernel would refuse to bind the original driver while an
        // override names another one: that override goes back last.
        let override_last = match (&give_back_override, &target) {
            (Some(name), BackTo::Bind(driver)) if name != driver => give_back_override.clone(),
            _ => None,
        };
        let override_first = match override_last {
            Some(_) => "\n",
            None => give_back_override.as_deref().unwrap_or("\n"),
        };

        let addr = address.to_string();
        let mut seq = Sequence::new(&*self.writer);
        seq.write(dev.join("driver_override"), override_first)?;
        if let Some(vfio) = current.as_deref().filter(|_| on_vfio) {
            seq.write(driver_dir(&self.sysfs_root, vfio).join("unbind"), &addr)?;
        }
        match &target {
            BackTo::Bind(name) => {
                seq.write(driver_dir(&self.sysfs_root, name).join("bind"), &addr)?
            }
            BackTo::Probe => seq.write(self.sysfs_root.join("bus/pci/drivers_probe"), &addr)?,
            BackTo::Stays | BackTo::Unbound => {}
        }

        let now = read_driver(&dev).unwrap_or(None);
        let wrong = match &target {
            BackTo::Bind(name) => (now.as_ref() != Some(name)).then(|| name.clone()),
            BackTo::Unbound => now.is_some().then(|| "no driver".to_owned()),
            BackTo::Stays | BackTo::Probe => now
                .as_deref()
                .is_some_and(is_vfio_driver)
                .then(|| format!("a driver other than {VFIO_DRIVER}")),
        };
        if let Some(expected) = wrong {
            return Err(seq.wrong_driver(address, expected, now));
        }
        if let Some(name) = override_last {
            seq.write(dev.join("driver_override"), &name)?;
        }
        originals.remove(&address);
        self.save(originals);
        Ok(seq.done(now))
    }

    /// [`detach`](Self::detach) for every non-bridge endpoint of the
    /// device's IOMMU group, in address order, each remembering its own
    /// original driver; members already on a VFIO driver are left alone.
    /// When one fails, what this call moved is given back in reverse order
    /// ([`GroupFailure`]). The group is read here, under the lock, so what
    /// is decided is what is acted on. Blocking.
    /// `approved`: the whole group as it was authorized and gated
    /// ([`still_approved`](Self::still_approved)).
    pub fn detach_group(
        &self,
        address: PciAddress,
        approved: &[PciAddress],
    ) -> Result<GroupOutcome, VfioError> {
        let mut originals = self.lock();
        self.check_approved(address, approved)?;
        let members = self.group_endpoints(address)?;
        // Said once, as NotSupported, rather than as the first member's
        // failure.
        let vfio = driver_dir(&self.sysfs_root, VFIO_DRIVER);
        if !vfio.is_dir() {
            return Err(VfioError::VfioUnavailable(vfio));
        }
        self.move_all(
            &mut originals,
            GroupMove::Detach,
            address,
            &members,
            Self::detach_locked,
            Self::undo_detach_locked,
        )
    }

    /// [`reattach`](Self::reattach) for the device and every member of its
    /// group that this service detached (its original driver is
    /// remembered) or that is in `also` (bound at boot by a claim this
    /// service wrote). Members on vfio-pci that we did not detach (bound at
    /// boot by `vfio-pci.ids`, driverctl, by hand) stay there: someone put
    /// them there on purpose. Rolled back like
    /// [`detach_group`](Self::detach_group). Blocking.
    pub fn reattach_group(
        &self,
        address: PciAddress,
        approved: &[PciAddress],
        also: &[PciAddress],
    ) -> Result<GroupOutcome, VfioError> {
        let mut originals = self.lock();
        self.check_approved(address, approved)?;
        let members: Vec<PciAddress> = self
            .group_endpoints(address)?
            .into_iter()
            .filter(|m| *m == address || originals.contains_key(m) || also.contains(m))
            .collect();
        self.move_all(
            &mut originals,
            GroupMove::Reattach,
            address,
            &members,
            Self::reattach_locked,
            Self::detach_locked,
        )
    }

    /// Refuses when `address`'s IOMMU group `group` no longer has exactly
    /// the members `approved` (in any order): what polkit was shown and
    /// the safety gates looked at is what moves, or nothing does.
    pub fn still_approved(
        &self,
        address: PciAddress,
        group: u32,
        approved: &[PciAddress],
    ) -> Result<(), VfioError> {
        let now = group_members(&self.sysfs_root, group)?;
        let mut expected = approved.to_vec();
        expected.sort();
        expected.dedup();
        if now != expected || iommu_group_of(&self.sysfs_root, address) != Some(group) {
            return Err(VfioError::GroupChanged { address, group });
        }
        Ok(())
    }

    fn check_approved(
        &self,
        address: PciAddress,
        approved: &[PciAddress],
    ) -> Result<(), VfioError> {
        self.existing_device(address)?;
        let group = iommu_group_of(&self.sysfs_root, address).ok_or(VfioError::NoGroup(address))?;
        self.still_approved(address, group, approved)
    }

    /// The endpoints of `address`'s IOMMU group, bridges left out (they
    /// keep pcieport; vfio-pci refuses them), sorted. Fails closed: a
    /// group that cannot be listed whole, or a member whose class cannot
    /// be read (or that is gone), is an error, not a guess.
    pub fn group_endpoints(&self, address: PciAddress) -> Result<Vec<PciAddress>, VfioError> {
        self.existing_device(address)?;
        let group = iommu_group_of(&self.sysfs_root, address).ok_or(VfioError::NoGroup(address))?;
        let mut endpoints = Vec::new();
        for member in group_members(&self.sysfs_root, group)? {
            let info =
                sysfs::read_device(&self.sysfs_root, &member).map_err(|e| VfioError::Read {
                    path: device_dir(&self.sysfs_root, member),
                    source: io::Error::other(e),
                })?;
            if !info.is_bridge() {
                endpoints.push(member);
            }
        }
        if !endpoints.contains(&address) {
            // The group changed under us or the device is a bridge itself.
            return Err(VfioError::NotInGroup { address, group });
        }
        Ok(endpoints)
    }

    /// Applies `forward` to each member; on a failure, `back` to what was
    /// moved (the failed member first, when it wrote something), newest
    /// first. A member that vanished since the group was read is NotFound,
    /// rolled back like any failure.
    fn move_all(
        &self,
        originals: &mut Remembered,
        action: GroupMove,
        address: PciAddress,
        members: &[PciAddress],
        forward: MoveFn,
        back: MoveFn,
    ) -> Result<GroupOutcome, VfioError> {
        let mut moved: Vec<(PciAddress, Binding)> = Vec::new();
        let mut unchanged = Vec::new();
        let fail = |originals: &mut Remembered, failed, source, moved: &[(PciAddress, Binding)]| {
            let (rolled_back, rollback_failed) = self.roll_back(originals, moved, back);
            VfioError::Group(Box::new(GroupFailure {
                action,
                address,
                failed,
                source,
                rolled_back,
                rollback_failed,
            }))
        };
        for &member in members {
            // Where it starts, for the rollback to be checked against.
            let start = match self.binding_of(member) {
                Ok(start) => start,
                Err(source) => return Err(fail(originals, member, source, &moved)),
            };
            match forward(self, originals, member) {
                Ok(Outcome::Done { .. }) => moved.push((member, start)),
                Ok(Outcome::AlreadyDone { .. }) => unchanged.push(member),
                Err(source) => {
                    if source.wrote_something() {
                        moved.push((member, start));
                    }
                    return Err(fail(originals, member, source, &moved));
                }
            }
        }
        Ok(GroupOutcome {
            moved: moved.into_iter().map(|(member, _)| member).collect(),
            unchanged,
        })
    }

    /// `back` for each of `moved`, newest first. Only a member found where
    /// it started, on the same driver with the same override, counts as
    /// rolled back: a back-move that failed midway (the override cleared,
    /// the unbind refused) or that succeeded elsewhere is a failure naming
    /// where the member was left.
    fn roll_back(
        &self,
        originals: &mut Remembered,
        moved: &[(PciAddress, Binding)],
        back: MoveFn,
    ) -> (Vec<PciAddress>, Vec<RollbackFailure>) {
        let mut rolled_back = Vec::new();
        let mut failures = Vec::new();
        for (member, start) in moved.iter().rev() {
            let result = back(self, originals, *member);
            let left = self.binding_of(*member);
            let (error, left) = match (result, left) {
                (Ok(_), Ok(left)) if left == *start => {
                    rolled_back.push(*member);
                    continue;
                }
                (Ok(_), Ok(left)) => (None, Some(left)),
                (Ok(_), Err(unreadable)) => (Some(unreadable), None),
                (Err(error), left) => (Some(error), left.ok()),
            };
            failures.push(RollbackFailure {
                address: *member,
                error,
                was: start.clone(),
                left,
            });
        }
        (rolled_back, failures)
    }

    /// The device's driver and override, both read (an unreadable one is
    /// an error, not a guess).
    fn binding_of(&self, address: PciAddress) -> Result<Binding, VfioError> {
        let dev = self.existing_device(address)?;
        Ok(Binding {
            driver: read_driver(&dev)?,
            driver_override: read_override_strictly(&dev)?,
            auto_return: ReturnMark::Unmarked,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Remembered> {
        // The map is whole after every statement: a panic elsewhere cannot
        // leave it half-updated.
        self.originals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn existing_device(&self, address: PciAddress) -> Result<PathBuf, VfioError> {
        let dev = device_dir(&self.sysfs_root, address);
        if dev.is_dir() {
            Ok(dev)
        } else {
            Err(VfioError::NotFound(address))
        }
    }

    /// Persistence is best effort: the detach itself has happened.
    fn save(&self, originals: &Remembered) {
        *self.marks.write().unwrap_or_else(PoisonError::into_inner) = marked(originals);
        if let Some(path) = &self.state_file
            && let Err(e) = state::save(path, originals)
        {
            tracing::warn!("cannot save original drivers to {}: {e}", path.display());
        }
    }
}

/// The devices of `originals` marked to be given back after use.
fn marked(originals: &Remembered) -> BTreeMap<PciAddress, ReturnMark> {
    originals
        .iter()
        .filter(|(_, b)| b.auto_return.is_marked())
        .map(|(a, b)| (*a, b.auto_return))
        .collect()
}

/// Drops the remembered original drivers that Reattach could no longer
/// use, and returns their devices: a device that is gone (a destroyed VF),
/// or one that is no longer given to VFIO — bound to another driver
/// without a VFIO `driver_override`, or left without a driver when nothing
/// is remembered to give it back to. A device on a VFIO driver, with a
/// VFIO override, or unbound after a detach that failed midway keeps its
/// entry; so does one whose driver cannot be read (kept rather than lost).
fn drop_stale(sysfs_root: &Path, originals: &mut Remembered) -> Vec<PciAddress> {
    let mut dropped = Vec::new();
    originals.retain(|&address, original| {
        let dev = device_dir(sysfs_root, address);
        let keep = dev.is_dir()
            && match read_driver(&dev) {
                Ok(Some(driver)) if is_vfio_driver(&driver) => true,
                Ok(None) if original.driver.is_some() => true,
                Ok(_) => read_override(&dev).is_some_and(|o| is_vfio_driver(&o)),
                Err(_) => true,
            };
        if !keep {
            dropped.push(address);
        }
        keep
    });
    dropped
}

/// The writes of one operation, so a failure can say what was already done.
struct Sequence<'a> {
    writer: &'a dyn SysfsWriter,
    done: Vec<SysfsWrite>,
}

impl<'a> Sequence<'a> {
    fn new(writer: &'a dyn SysfsWriter) -> Self {
        Sequence {
            writer,
            done: Vec::new(),
        }
    }

    fn write(&mut self, path: PathBuf, value: &str) -> Result<(), VfioError> {
        match self.writer.write(&path, value.as_bytes()) {
            Ok(()) => {
                tracing::info!("wrote {value:?} to {}", path.display());
                self.done.push(SysfsWrite {
                    path,
                    value: value.to_owned(),
                });
                Ok(())
            }
            Err(source) => Err(VfioError::Write {
                path,
                value: value.to_owned(),
                source,
                done: Writes(std::mem::take(&mut self.done)),
            }),
        }
    }

    fn wrong_driver(
        self,
        address: PciAddress,
        expected: String,
        actual: Option<String>,
    ) -> VfioError {
        VfioError::WrongDriver {
            address,
            expected,
            actual,
            done: Writes(self.done),
        }
    }

    fn done(self, driver: Option<String>) -> Outcome {
        Outcome::Done {
            driver,
            writes: self.done,
        }
    }
}

/// `PciAddress` prints only hex digits, `:` and `.`: no path traversal.
fn device_dir(root: &Path, address: PciAddress) -> PathBuf {
    sysfs::device_dir(root, &address)
}

fn driver_dir(root: &Path, driver: &str) -> PathBuf {
    root.join("bus/pci/drivers").join(driver)
}

fn read_driver(dev: &Path) -> Result<Option<String>, VfioError> {
    sysfs::driver(dev).map_err(|e| VfioError::Read {
        path: dev.join("driver"),
        source: e.into_io(),
    })
}

/// The `driver_override` value; `None` when unset (`(null)`) or unreadable.
fn read_override(dev: &Path) -> Option<String> {
    sysfs::driver_override(dev).ok().flatten()
}

/// The `driver_override` value, `None` when unset; unreadable is an error.
fn read_override_strictly(dev: &Path) -> Result<Option<String>, VfioError> {
    sysfs::driver_override(dev).map_err(|e| VfioError::Read {
        path: dev.join("driver_override"),
        source: e.into_io(),
    })
}

/// The PCI devices the kernel lists in IOMMU group `group`, sorted. Unlike
/// [`sysfs::iommu_group_members`] (readiness, which shows what it can), a
/// listing that fails, even at one entry, is an error: a member left out
/// would be neither checked nor moved.
fn group_members(sysfs_root: &Path, group: u32) -> Result<Vec<PciAddress>, VfioError> {
    let path = sysfs_root
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let unreadable = |source| VfioError::Read {
        path: path.clone(),
        source,
    };
    let mut members = Vec::new();
    for entry in std::fs::read_dir(&path).map_err(unreadable)? {
        let name = entry.map_err(unreadable)?.file_name();
        // Non-PCI members (platform devices on ARM) are not ours to move.
        if let Some(address) = name.to_str().and_then(|n| n.parse().ok()) {
            members.push(address);
        }
    }
    members.sort();
    members.dedup();
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::FakeSysfs;

    /// Each device a remembered entry can meet, on a prepared tree.
    #[test]
    fn entries_reattach_could_not_use_are_dropped() {
        const ON_VFIO: &str = "0000:01:00.0";
        const ON_VARIANT: &str = "0000:01:00.1";
        const DETACH_FAILED_BEFORE_UNBIND: &str = "0000:02:00.0";
        const DETACH_FAILED_AFTER_UNBIND: &str = "0000:02:00.1";
        const DRIVER_UNREADABLE: &str = "0000:03:00.0";
        const GIVEN_BACK_BY_HAND: &str = "0000:04:00.0";
        const UNBOUND_AS_BEFORE: &str = "0000:04:00.1";
        const DESTROYED_VF: &str = "0000:05:10.0";
        const NEVER_THERE: &str = "0000:06:00.0";
        let tree = FakeSysfs::new();
        let add = |addr| tree.add(addr, 0x8086, 0x10ca, 0x020000);
        add(ON_VFIO).driver("vfio-pci");
        add(ON_VARIANT).driver("mlx5_vfio_pci");
        add(DETACH_FAILED_BEFORE_UNBIND)
            .driver("igb")
            .driver_override("vfio-pci");
        add(DETACH_FAILED_AFTER_UNBIND).driver_override("vfio-pci");
        add(DRIVER_UNREADABLE);
        tree.write_attr(DRIVER_UNREADABLE, "driver", "not a link");
        add(GIVEN_BACK_BY_HAND).driver("igb");
        add(UNBOUND_AS_BEFORE);
        add("0000:05:00.0").driver("igb").sriov(7, 1);
        add(DESTROYED_VF).driver("vfio-pci").physfn("0000:05:00.0");
        tree.remove(DESTROYED_VF);

        let entry = |addr: &str, driver: Option<&str>| {
            let binding = Binding {
                auto_return: ReturnMark::Unmarked,
                driver: driver.map(str::to_owned),
                driver_override: None,
            };
            (addr.parse().unwrap(), binding)
        };
        let mut originals: Remembered = [
            entry(ON_VFIO, Some("igb")),
            entry(ON_VARIANT, Some("mlx5_core")),
            entry(DETACH_FAILED_BEFORE_UNBIND, Some("igb")),
            entry(DETACH_FAILED_AFTER_UNBIND, Some("igb")),
            entry(DRIVER_UNREADABLE, Some("igb")),
            entry(GIVEN_BACK_BY_HAND, Some("igb")),
            entry(UNBOUND_AS_BEFORE, None),
            entry(DESTROYED_VF, Some("igbvf")),
            entry(NEVER_THERE, Some("igb")),
        ]
        .into_iter()
        .collect();

        let dropped = drop_stale(&tree.root(), &mut originals);
        let names =
            |addrs: Vec<&PciAddress>| addrs.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            names(dropped.iter().collect()),
            [
                GIVEN_BACK_BY_HAND,
                UNBOUND_AS_BEFORE,
                DESTROYED_VF,
                NEVER_THERE
            ]
        );
        assert_eq!(
            names(originals.keys().collect()),
            [
                ON_VFIO,
                ON_VARIANT,
                DETACH_FAILED_BEFORE_UNBIND,
                DETACH_FAILED_AFTER_UNBIND,
                DRIVER_UNREADABLE
            ]
        );
        assert!(drop_stale(&tree.root(), &mut originals).is_empty());
    }

    /// At start, the state file loses what [`drop_stale`] drops, on disk too.
    #[test]
    fn a_binder_starts_without_stale_entries() {
        let tree = FakeSysfs::new();
        tree.add("0000:01:00.0", 0x8086, 0x10ca, 0x020000)
            .driver("vfio-pci");
        let dir = tempfile::tempdir().unwrap();
        let state_file = dir.path().join("vfio-drivers");
        std::fs::write(&state_file, "0000:01:00.0 igb\n0000:05:10.0 igbvf\n").unwrap();
        let binder = VfioBinder::new(tree.root(), Some(state_file.clone()));
        let detached: PciAddress = "0000:01:00.0".parse().unwrap();
        let gone: PciAddress = "0000:05:10.0".parse().unwrap();
        assert_eq!(binder.original_driver(detached), Some(Some("igb".into())));
        assert_eq!(binder.original_driver(gone), None);
        assert_eq!(
            state::load(&state_file).into_iter().collect::<Vec<_>>(),
            [(
                detached,
                Binding {
                    auto_return: ReturnMark::Unmarked,
                    driver: Some("igb".to_owned()),
                    driver_override: None
                }
            )]
        );

        // A device that goes while the daemon runs: forgotten when told.
        tree.remove("0000:01:00.0");
        binder.forget_stale();
        assert_eq!(binder.original_driver(detached), None);
        assert!(state::load(&state_file).is_empty());
    }

    #[test]
    fn vfio_drivers() {
        assert!(is_vfio_driver("vfio-pci"));
        assert!(is_vfio_driver("mlx5_vfio_pci"));
        assert!(is_vfio_driver("nvgrace-gpu-vfio-pci"));
        assert!(!is_vfio_driver("pci-stub"));
        assert!(!is_vfio_driver("vfio"));
    }
}
