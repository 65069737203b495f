//! Detach to / reattach from vfio-pci, and who holds a VFIO group.
//!
//! Detach is libvirt's `nodedev-detach` sequence, all under the sysfs root:
//! 1. `vfio-pci` → `bus/pci/devices/ADDR/driver_override`
//! 2. `ADDR` → `bus/pci/devices/ADDR/driver/unbind` (only when bound)
//! 3. `ADDR` → `bus/pci/drivers_probe`, then the `driver` link must name
//!    vfio-pci.
//!
//! Reattach gives the device back:
//! 1. `"\n"` → `driver_override` (an empty write clears it; libvirt writes
//!    the same)
//! 2. `ADDR` → `bus/pci/drivers/CURRENT/unbind` (only when bound to a VFIO
//!    driver, see below)
//! 3. `ADDR` → `bus/pci/drivers/ORIGINAL/bind` when the original driver is
//!    remembered and still loaded, else `ADDR` → `bus/pci/drivers_probe`.
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
use std::sync::{Mutex, MutexGuard, PoisonError};

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

/// One device's move, with the binder's map of original drivers locked.
type MoveFn = fn(
    &VfioBinder,
    &mut BTreeMap<PciAddress, Option<String>>,
    PciAddress,
) -> Result<Outcome, VfioError>;

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

/// A member the rollback could not give back.
#[derive(Debug)]
pub struct RollbackFailure {
    pub address: PciAddress,
    pub error: VfioError,
    /// The driver it was left on (None: none, or unreadable).
    pub left_on: Option<String>,
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
    /// Members given back, in the order they were (newest first).
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
            write!(
                f,
                "; rolling back {} failed ({}), left on {}",
                failure.address,
                failure.error,
                failure.left_on.as_deref().unwrap_or("no driver")
            )?;
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

/// Moves devices to and from vfio-pci and remembers where they came from.
pub struct VfioBinder {
    sysfs_root: PathBuf,
    state_file: Option<PathBuf>,
    writer: Box<dyn SysfsWriter>,
    /// Original driver (None: was unbound) per device detached by us. The
    /// lock is held for a whole operation, so they never interleave.
    originals: Mutex<BTreeMap<PciAddress, Option<String>>>,
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
        let originals = state_file.as_deref().map(state::load).unwrap_or_default();
        let binder = VfioBinder {
            sysfs_root,
            state_file,
            writer,
            originals: Mutex::new(originals),
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
        self.lock().get(&address).cloned()
    }

    /// Binds the device to vfio-pci; nothing to do when it is on a VFIO
    /// driver already (a variant included). Blocking (an unbind can take
    /// seconds).
    pub fn detach(&self, address: PciAddress) -> Result<Outcome, VfioError> {
        self.detach_locked(&mut self.lock(), address)
    }

    fn detach_locked(
        &self,
        originals: &mut BTreeMap<PciAddress, Option<String>>,
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
        // Remember first, so a failure midway still leaves Reattach a way
        // back. An unbound device we already know is an earlier detach that
        // failed after the unbind: keep its real original.
        if current.is_some() || !originals.contains_key(&address) {
            originals.insert(address, current.clone());
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
        originals: &mut BTreeMap<PciAddress, Option<String>>,
        address: PciAddress,
    ) -> Result<Outcome, VfioError> {
        let dev = self.existing_device(address)?;
        let current = read_driver(&dev)?;
        let on_vfio = current.as_deref().is_some_and(is_vfio_driver);
        let overridden = read_override(&dev).as_deref().is_some_and(is_vfio_driver);
        let original = originals
            .get(&address)
            .cloned()
            .flatten()
            .filter(|d| driver_dir(&self.sysfs_root, d).is_dir());
        // A device still unbound after a failed detach is brought back too.
        let pending = current.is_none() && original.is_some();
        if !on_vfio && !overridden && !pending {
            if originals.remove(&address).is_some() {
                self.save(originals);
            }
            return Ok(Outcome::AlreadyDone { driver: current });
        }

        let addr = address.to_string();
        let mut seq = Sequence::new(&*self.writer);
        seq.write(dev.join("driver_override"), "\n")?;
        if let Some(vfio) = current.as_deref().filter(|_| on_vfio) {
            seq.write(driver_dir(&self.sysfs_root, vfio).join("unbind"), &addr)?;
        }
        // Still on its own driver (a detach failed before the unbind): the
        // cleared override was all that was left to undo.
        let rebind = current.is_none() || on_vfio;
        if rebind {
            match &original {
                Some(name) => {
                    let bind = driver_dir(&self.sysfs_root, name).join("bind");
                    seq.write(bind, &addr)?;
                }
                None => seq.write(self.sysfs_root.join("bus/pci/drivers_probe"), &addr)?,
            }
        }

        let now = read_driver(&dev).unwrap_or(None);
        let wrong = match &original {
            Some(name) if rebind => (now.as_ref() != Some(name)).then(|| name.clone()),
            _ => now
                .as_deref()
                .is_some_and(is_vfio_driver)
                .then(|| format!("a driver other than {VFIO_DRIVER}")),
        };
        if let Some(expected) = wrong {
            return Err(seq.wrong_driver(address, expected, now));
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
            Self::reattach_locked,
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
        let now = sysfs::iommu_group_members(&self.sysfs_root, group);
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
    /// member whose class cannot be read is an error, not a guess.
    pub fn group_endpoints(&self, address: PciAddress) -> Result<Vec<PciAddress>, VfioError> {
        self.existing_device(address)?;
        let group = iommu_group_of(&self.sysfs_root, address).ok_or(VfioError::NoGroup(address))?;
        let mut endpoints = Vec::new();
        for member in sysfs::iommu_group_members(&self.sysfs_root, group) {
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
    /// first.
    fn move_all(
        &self,
        originals: &mut BTreeMap<PciAddress, Option<String>>,
        action: GroupMove,
        address: PciAddress,
        members: &[PciAddress],
        forward: MoveFn,
        back: MoveFn,
    ) -> Result<GroupOutcome, VfioError> {
        let mut moved = Vec::new();
        let mut unchanged = Vec::new();
        for &member in members {
            match forward(self, originals, member) {
                Ok(Outcome::Done { .. }) => moved.push(member),
                Ok(Outcome::AlreadyDone { .. }) => unchanged.push(member),
                Err(source) => {
                    if source.wrote_something() {
                        moved.push(member);
                    }
                    let mut rolled_back = Vec::new();
                    let mut rollback_failed = Vec::new();
                    for &undo in moved.iter().rev() {
                        match back(self, originals, undo) {
                            Ok(_) => rolled_back.push(undo),
                            Err(error) => {
                                let left_on = read_driver(&device_dir(&self.sysfs_root, undo))
                                    .ok()
                                    .flatten();
                                rollback_failed.push(RollbackFailure {
                                    address: undo,
                                    error,
                                    left_on,
                                });
                            }
                        }
                    }
                    return Err(VfioError::Group(Box::new(GroupFailure {
                        action,
                        address,
                        failed: member,
                        source,
                        rolled_back,
                        rollback_failed,
                    })));
                }
            }
        }
        Ok(GroupOutcome { moved, unchanged })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<PciAddress, Option<String>>> {
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
    fn save(&self, originals: &BTreeMap<PciAddress, Option<String>>) {
        if let Some(path) = &self.state_file
            && let Err(e) = state::save(path, originals)
        {
            tracing::warn!("cannot save original drivers to {}: {e}", path.display());
        }
    }
}

/// Drops the remembered original drivers that Reattach could no longer
/// use, and returns their devices: a device that is gone (a destroyed VF),
/// or one that is no longer given to VFIO — bound to another driver
/// without a VFIO `driver_override`, or left without a driver when nothing
/// is remembered to give it back to. A device on a VFIO driver, with a
/// VFIO override, or unbound after a detach that failed midway keeps its
/// entry; so does one whose driver cannot be read (kept rather than lost).
fn drop_stale(
    sysfs_root: &Path,
    originals: &mut BTreeMap<PciAddress, Option<String>>,
) -> Vec<PciAddress> {
    let mut dropped = Vec::new();
    originals.retain(|&address, original| {
        let dev = device_dir(sysfs_root, address);
        let keep = dev.is_dir()
            && match read_driver(&dev) {
                Ok(Some(driver)) if is_vfio_driver(&driver) => true,
                Ok(None) if original.is_some() => true,
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

        let entry =
            |addr: &str, driver: Option<&str>| (addr.parse().unwrap(), driver.map(str::to_owned));
        let mut originals: BTreeMap<PciAddress, Option<String>> = [
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
            [(detached, Some("igb".to_owned()))]
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
