//! The passthrough decisions of Detach and Reattach, free of D-Bus.
//!
//! A device whose VFIO group a process holds open (a running VM) is never
//! moved: pulling it from under the VM would crash the guest or worse. When
//! it cannot be found out who holds the group (the /proc scan failed, timed
//! out or was stopped) the answer is no as well: **fail closed**. Only then
//! does [`VfioBinder`] make the sysfs writes.
//!
//! Who holds a group is also public (the `InUseBy` property, any local user,
//! no authorization): those scans are bounded in number, each counting until
//! its thread has ended ([`Passthrough::users_for_anyone`]).
//!
//! Before a Detach unbinds anything, the safety gates ([`gate`]) say what
//! the host would lose ([`Passthrough::detach_blockers`]); the caller
//! refuses with [`PassthroughError::HostInUse`] unless it was forced.
//!
//! With [`Persistence::AtBoot`], the move is made to last: once it has
//! succeeded, Detach writes a boot-time claim ([`persistent`]) for every
//! endpoint it put (or found) on vfio-pci, and Reattach removes the
//! device's claim and those of the members it gives back that this service
//! wrote. A claim for another driver is checked for before anything moves
//! and refuses the whole call ([`PassthroughError::BootClaimRefused`]).
//! A claim that cannot be written after the move leaves the devices where
//! the move put them — on vfio-pci only until the next boot, which is the
//! safe side — and removes the claims this call wrote
//! ([`PassthroughError::BootClaimAfterMove`]).
//!
//! Errors are typed ([`PassthroughError`]); the D-Bus layer maps them to its
//! error names in one place (`service::error`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::auto_return::ReturnOutcome;
use super::gate::{self, Blocker, Blockers, Described, PublicUse};
use super::host_use::{self, HostRoots, Look, Network};
use super::persistent::{self, BootClaims, BootOverride, Claimed, PersistError};
use super::sysfs::{self, SysfsError};
use super::vfio::{
    self, GroupOutcome, MarkedReturn, Outcome, ReturnMark, VfioBinder, VfioError, VfioUser,
};
use crate::procfs::{HoldersError, SCAN_TIMEOUT};
use crate::uid_counts::{self, Unfinished};
use vmmanager_client::PciAddress;

/// Scans of [`Passthrough::users_for_anyone`] running at once, all readers
/// together. Their reader is often unknown (GetManagedObjects and
/// InterfacesAdded read properties without a caller), so the bound is one
/// for all. A scan takes milliseconds; a thread stuck on a process whose
/// /proc files hang keeps its place until it ends, so reads cannot pile up
/// such threads. A read beyond them is refused at once, never waits: the
/// getter runs under the object server's lock, and a flood of reads that
/// waited would hold up every other call and the device task.
pub const PUBLIC_SCANS: usize = 4;

/// How long a give-back after use waits for the original driver to bind
/// after the reattach (drivers may probe asynchronously).
pub const RETURN_VERIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits (bounded by [`RETURN_VERIFY_TIMEOUT`]; not for a driver that is
/// not loaded at all) until `current()` is `expected` — or, for a device
/// that had no driver, anything but a VFIO driver. A driver may probe
/// asynchronously.
fn verify_bound(
    sysfs_root: &Path,
    expected: Option<String>,
    current: impl Fn() -> Option<String>,
) -> ReturnOutcome {
    let deadline = Instant::now() + RETURN_VERIFY_TIMEOUT;
    loop {
        let now = current();
        let done = match &expected {
            Some(name) => now.as_ref() == Some(name),
            None => !now.as_deref().is_some_and(vfio::is_vfio_driver),
        };
        if done {
            return ReturnOutcome::Returned { driver: now };
        }
        let Some(expected) = &expected else {
            return ReturnOutcome::Failed {
                reason: format!("it is still on {}", now.unwrap_or_default()),
            };
        };
        let loaded = sysfs_root.join("bus/pci/drivers").join(expected).is_dir();
        let reason = if !loaded {
            format!("the {expected} driver is not loaded")
        } else if Instant::now() >= deadline {
            format!(
                "not bound {}s after the reattach",
                RETURN_VERIFY_TIMEOUT.as_secs()
            )
        } else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        return ReturnOutcome::DidNotBind {
            expected: expected.clone(),
            actual: now,
            reason,
        };
    }
}

/// Which way a device moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// To vfio-pci ([`VfioBinder::detach`]).
    Detach,
    /// Back to a host driver ([`VfioBinder::reattach`]).
    Reattach,
}

/// What a Detach or Reattach moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The device alone.
    Device,
    /// Every non-bridge endpoint of its IOMMU group
    /// ([`VfioBinder::detach_group`], [`VfioBinder::reattach_group`]).
    Group,
}

/// Whether a move lasts beyond the next boot ([`persistent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Boot-time claims are left as they are.
    UntilReboot,
    /// Detach: claim the devices for vfio-pci at boot; Reattach: remove
    /// those claims.
    AtBoot,
}

impl fmt::Display for Move {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Move::Detach => "detach",
            Move::Reattach => "reattach",
        })
    }
}

/// Why it is not known who holds a VFIO group.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("cannot find out who holds /dev/vfio/{group}: {source}")]
    Scan {
        group: u32,
        #[source]
        source: HoldersError,
    },
    #[error(
        "finding out who holds /dev/vfio/{group} took longer than {}s",
        SCAN_TIMEOUT.as_secs()
    )]
    TimedOut { group: u32 },
    #[error("finding out who holds /dev/vfio/{group} stopped unexpectedly")]
    Panicked { group: u32 },
    #[error(
        "{limit} scans for VFIO group users are running (a process whose /proc files do not \
         answer?); not looking for /dev/vfio/{group}'s"
    )]
    TooMany { group: u32, limit: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    /// A process holds the device's VFIO group or cdev (`user.node`).
    #[error("{address} is in use by {user} through {}; stop the VM first", user.node)]
    InUse { address: PciAddress, user: VfioUser },
    /// Nobody knows whether a process holds the group: nothing was changed.
    #[error("could not find out whether a VM uses {address}; nothing was changed")]
    UsersUnknown {
        address: PciAddress,
        #[source]
        source: UsersError,
    },
    #[error(transparent)]
    Vfio(#[from] VfioError),
    /// The host uses the device or a member of its group (the safety
    /// gates); nothing was written.
    #[error(
        "{address} is in use by the host: {}; nothing was changed (the force option detaches anyway)",
        Described { asked: *address, blockers }
    )]
    HostInUse {
        address: PciAddress,
        blockers: Blockers,
    },
    /// A boot-time claim stood in the way, or could not be looked at,
    /// before anything moved: nothing was changed.
    #[error("{source}; nothing was changed")]
    BootClaimRefused {
        address: PciAddress,
        #[source]
        source: PersistError,
    },
    /// The move succeeded, but a boot-time claim could not follow it.
    #[error("{}", AfterMove { address: *address, action: *action, failed: *failed, source, undone })]
    BootClaimAfterMove {
        address: PciAddress,
        action: Move,
        /// The device whose claim could not be written or removed.
        failed: PciAddress,
        #[source]
        source: PersistError,
        /// Detach: the claims this call wrote and removed again.
        undone: Vec<PciAddress>,
    },
    /// `persistent` where no claims directory is configured.
    #[error("boot-time claims are not configured in this service; nothing was changed")]
    NoBootClaims,
    /// The blocking sysfs work panicked; what it wrote is unknown.
    #[error("the {action} of {address} stopped unexpectedly; see the service's log")]
    Panicked { address: PciAddress, action: Move },
}

/// How [`PassthroughError::BootClaimAfterMove`] says it.
struct AfterMove<'a> {
    address: PciAddress,
    action: Move,
    failed: PciAddress,
    source: &'a PersistError,
    undone: &'a [PciAddress],
}

impl fmt::Display for AfterMove<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let AfterMove {
            address,
            action,
            failed,
            source,
            undone,
        } = self;
        match action {
            Move::Detach => {
                write!(
                    f,
                    "{address} was detached to vfio-pci, but the boot-time claim of {failed} \
                     could not be written: {source}; "
                )?;
                if !undone.is_empty() {
                    let names: Vec<String> = undone.iter().map(ToString::to_string).collect();
                    write!(
                        f,
                        "the claims this call wrote were removed again ({}); ",
                        names.join(", ")
                    )?;
                }
                f.write_str(
                    "nothing is claimed at boot, the devices stay on vfio-pci until the next boot",
                )
            }
            Move::Reattach => write!(
                f,
                "{address} was given back to its driver, but the boot-time claim of {failed} \
                 could not be removed: {source}; {failed} is bound to vfio-pci again at the \
                 next boot"
            ),
        }
    }
}

/// Detach and Reattach with their refusals, and who holds a VFIO group;
/// cheap to clone.
#[derive(Debug, Clone)]
pub struct Passthrough {
    binder: Arc<VfioBinder>,
    proc_root: PathBuf,
    dev_root: PathBuf,
    /// The places of [`Passthrough::users_for_anyone`]'s scans; a scan's
    /// thread holds its place until it ends.
    public_scans: Arc<Semaphore>,
    /// The places of [`Passthrough::host_users_for_anyone`]'s looks.
    public_looks: Arc<Semaphore>,
    /// Where the safety gates read the host's network state.
    network: Network,
    /// Boot-time claims; `None`: not configured (no `persistent`).
    claims: Option<BootClaims>,
}

impl Passthrough {
    /// `proc_root` and `dev_root` are where the VFIO group users are looked
    /// for (`/proc`, `/dev`); `binder` makes the sysfs writes.
    pub fn new(binder: VfioBinder, proc_root: PathBuf, dev_root: PathBuf) -> Self {
        Passthrough {
            binder: Arc::new(binder),
            proc_root,
            dev_root,
            public_scans: Arc::new(Semaphore::new(PUBLIC_SCANS)),
            public_looks: Arc::new(Semaphore::new(PUBLIC_SCANS)),
            network: Network::Kernel,
            claims: None,
        }
    }

    /// Boot-time claims ([`Persistence::AtBoot`], [`boot_override`]) live
    /// in `claims`.
    ///
    /// [`boot_override`]: Self::boot_override
    pub fn with_boot_claims(mut self, claims: BootClaims) -> Self {
        self.claims = Some(claims);
        self
    }

    /// What the device's boot-time claim says (`BootOverride::None` when
    /// claims are not configured); for the `PersistentDriver` property.
    pub async fn boot_override(&self, address: PciAddress) -> Result<BootOverride, PersistError> {
        let Some(claims) = self.claims.clone() else {
            return Ok(BootOverride::None);
        };
        tokio::task::spawn_blocking(move || claims.read(address))
            .await
            .unwrap_or_else(|_| {
                Err(PersistError::Read {
                    path: persistent::file_name(address).into(),
                    source: std::io::Error::other("the read stopped unexpectedly"),
                })
            })
    }

    /// The claims a [`Persistence`] needs: refused when it needs them and
    /// there are none.
    fn claims_for(&self, persistence: Persistence) -> Result<Option<BootClaims>, PassthroughError> {
        match (persistence, &self.claims) {
            (Persistence::UntilReboot, _) => Ok(None),
            (Persistence::AtBoot, Some(claims)) => Ok(Some(claims.clone())),
            (Persistence::AtBoot, None) => Err(PassthroughError::NoBootClaims),
        }
    }

    /// The safety gates read the network state from `network` instead of
    /// the kernel's (tests on a prepared tree).
    pub fn with_network(mut self, network: Network) -> Self {
        self.network = network;
        self
    }

    fn host_roots(&self) -> HostRoots {
        gate::roots(self.binder.sysfs_root(), &self.proc_root, &self.dev_root)
    }

    /// What the host would lose if the device at `address` — or with
    /// [`Scope::Group`] every endpoint of its IOMMU group `group`, whose
    /// members must still be `approved` (what polkit was shown) — were
    /// detached ([`gate::blockers`]). Bounded by [`SCAN_TIMEOUT`]; a look
    /// that did not finish is a blocker itself (fail closed, and a
    /// forced detach may still go ahead).
    pub async fn detach_blockers(
        &self,
        address: PciAddress,
        group: Option<u32>,
        scope: Scope,
        approved: &[PciAddress],
    ) -> Result<Blockers, PassthroughError> {
        let roots = self.host_roots();
        let network = self.network.clone();
        let binder = self.binder.clone();
        let approved = approved.to_vec();
        let never = CancellationToken::new();
        let scan = uid_counts::spawn_stoppable((), &never, move |stop| {
            let members = match scope {
                Scope::Device => vec![address],
                Scope::Group => {
                    let group = group.ok_or(VfioError::NoGroup(address))?;
                    binder.still_approved(address, group, &approved)?;
                    binder.group_endpoints(address)?
                }
            };
            Ok::<_, VfioError>(gate::blockers(&roots, &network, address, &members, stop))
        });
        let unfinished = match scan.finish(SCAN_TIMEOUT, &never).await {
            Ok(result) => return Ok(result?),
            Err(Unfinished::Panicked(_)) => "stopped unexpectedly".to_owned(),
            Err(Unfinished::TimedOut | Unfinished::Cancelled) => {
                format!("took longer than {}s", SCAN_TIMEOUT.as_secs())
            }
        };
        tracing::warn!(device = %address, "the safety gates' look at the host {unfinished}");
        Ok(Blockers(vec![Blocker {
            member: address,
            text: format!("finding out how the host uses it {unfinished}"),
        }]))
    }

    /// How the host uses the device at `address`, as any local user may
    /// see it: a [`Look::Public`] look ([`gate::public_view`]: no /proc
    /// pass, no probe of its disks), within [`PUBLIC_SCANS`] such looks at
    /// once (places of their own, not InUseBy's). What could not be looked
    /// at reads as an `unknown` entry, never as "no use".
    pub async fn host_users_for_anyone(&self, address: PciAddress) -> Vec<PublicUse> {
        let unknown =
            |why: &str| vec![("unknown", format!("how the host uses it is unknown: {why}"))];
        let Ok(place) = self.public_looks.clone().try_acquire_owned() else {
            return unknown("too many such reads at once; read it again");
        };
        let roots = self.host_roots();
        let network = self.network.clone();
        let never = CancellationToken::new();
        let scan = uid_counts::spawn_stoppable(place, &never, move |stop| {
            host_use::host_uses(&roots, &address, &network, Look::Public, stop)
        });
        match scan.finish(SCAN_TIMEOUT, &never).await {
            Ok(Ok(found)) => gate::public_view(&found),
            Ok(Err(e)) => {
                tracing::warn!(device = %address, "host users: {e}");
                unknown(&e.to_string())
            }
            Err(e) => unknown(&format!("looking {e}")),
        }
    }

    /// Who holds the device at `address` (in VFIO group `group`) open, for
    /// a reader who needs no authorization: [`Passthrough::users`], within
    /// [`PUBLIC_SCANS`] such scans at once, else at once
    /// [`UsersError::TooMany`].
    pub async fn users_for_anyone(
        &self,
        address: PciAddress,
        group: Option<u32>,
    ) -> Result<Vec<VfioUser>, UsersError> {
        let Some(group) = group else {
            return Ok(Vec::new());
        };
        let Ok(place) = self.public_scans.clone().try_acquire_owned() else {
            let refused = UsersError::TooMany {
                group,
                limit: PUBLIC_SCANS,
            };
            tracing::warn!(group, "{refused}");
            return Err(refused);
        };
        self.users(address, Some(group), Scope::Device, place).await
    }

    /// Who holds the device at `address` open, through its VFIO group
    /// `group` or its VFIO cdev (iommufd, [`vfio::device_users`]), bounded
    /// by [`SCAN_TIMEOUT`]; nobody for a device without a group. Only a
    /// device with `/dev/vfio/<group>` or a cdev (bound to vfio-pci) costs
    /// a /proc scan. A scan whose answer is abandoned (timeout, or this
    /// future dropped) is told to stop; `held_until_done` goes with its
    /// thread and is dropped when that ends.
    ///
    /// With [`Scope::Group`], the cdevs of every member of the group count
    /// too: each member is about to move.
    async fn users(
        &self,
        address: PciAddress,
        group: Option<u32>,
        scope: Scope,
        held_until_done: impl Send + 'static,
    ) -> Result<Vec<VfioUser>, UsersError> {
        let Some(group) = group else {
            return Ok(Vec::new());
        };
        let proc_root = self.proc_root.clone();
        let dev_root = self.dev_root.clone();
        let sysfs_root = self.binder.sysfs_root().to_owned();
        // Only abandoning the answer stops the scan.
        let never = CancellationToken::new();
        let scan = uid_counts::spawn_stoppable(held_until_done, &never, move |stop| {
            let devices = match scope {
                Scope::Device => vec![address],
                Scope::Group => sysfs::iommu_group_members(&sysfs_root, group),
            };
            let mut cdevs = Vec::new();
            for device in devices {
                cdevs.extend(
                    sysfs::vfio_cdevs(&sysfs_root, &device).map_err(|e| match e {
                        SysfsError::Io { path, source } => {
                            HoldersError::Unreadable { path, source }
                        }
                        other => HoldersError::Unreadable {
                            path: sysfs::device_dir(&sysfs_root, &device),
                            source: std::io::Error::other(other),
                        },
                    })?,
                );
            }
            vfio::device_users(&proc_root, &dev_root, group, &cdevs, stop)
        });
        let result = match scan.finish(SCAN_TIMEOUT, &never).await {
            Ok(Ok(users)) => return Ok(users),
            Ok(Err(source)) => UsersError::Scan { group, source },
            Err(Unfinished::Panicked(_)) => UsersError::Panicked { group },
            // Nothing cancels `never`: the scan ran out of time.
            Err(Unfinished::TimedOut | Unfinished::Cancelled) => UsersError::TimedOut { group },
        };
        tracing::warn!(group, "{result}");
        Err(result)
    }

    pub fn sysfs_root(&self) -> &Path {
        self.binder.sysfs_root()
    }

    /// Who holds VFIO group `group` (of the device at `address`) or one
    /// of its members' cdevs; for the auto-return watch (not counted: the
    /// service's own).
    pub async fn group_users(
        &self,
        address: PciAddress,
        group: u32,
    ) -> Result<Vec<VfioUser>, UsersError> {
        self.users(address, Some(group), Scope::Group, ()).await
    }

    /// The devices marked to be given back after use.
    pub fn auto_return_marks(&self) -> Vec<PciAddress> {
        self.binder.auto_return_marks()
    }

    /// Marks (`on`) a device this service detached to be given back after
    /// its last VM user exits, or unmarks it.
    pub async fn set_auto_return(
        &self,
        address: PciAddress,
        on: bool,
    ) -> Result<(), PassthroughError> {
        let binder = self.binder.clone();
        tokio::task::spawn_blocking(move || binder.set_auto_return(address, on))
            .await
            .map_err(|_| PassthroughError::Panicked {
                address,
                action: Move::Detach,
            })??;
        Ok(())
    }

    /// Whether the device is marked to be given back after use.
    pub fn auto_return(&self, address: PciAddress) -> bool {
        self.binder.is_marked(address)
    }

    /// The device's auto-return mark, with whether a VM was seen using it.
    pub fn return_mark(&self, address: PciAddress) -> ReturnMark {
        self.binder.return_mark(address)
    }

    /// Records that a VM holds the group of the marked `addresses`
    /// ([`VfioBinder::try_set_in_use`]); `false` when a move under way
    /// holds the binder (try again later).
    pub fn try_set_in_use(&self, addresses: &[PciAddress]) -> bool {
        self.binder.try_set_in_use(addresses)
    }

    /// Gives a marked device back now that no VM holds it: reset (when it
    /// has a reset method), reattach to the driver remembered, and verify
    /// within [`RETURN_VERIFY_TIMEOUT`] that this driver is bound — the
    /// first two as one binder operation ([`VfioBinder::give_back_marked`]).
    /// `None` when nothing was done: a process holds the group again (or
    /// that is unknown: fail closed), or the device is no longer marked.
    pub async fn give_back_after_use(
        &self,
        address: PciAddress,
        group: Option<u32>,
    ) -> Option<ReturnOutcome> {
        if self
            .refuse_if_used(address, group, Scope::Group)
            .await
            .is_err()
        {
            return None;
        }
        let binder = self.binder.clone();
        let work = move || {
            let (remembered, result) = match binder.give_back_marked(address) {
                MarkedReturn::NotMarked => return None,
                MarkedReturn::NotOnVfio => {
                    return Some(ReturnOutcome::Failed {
                        reason: "it was no longer on vfio-pci (reattached meanwhile?)".into(),
                    });
                }
                MarkedReturn::ResetFailed(e) => {
                    return Some(ReturnOutcome::ResetFailed {
                        reason: e.to_string(),
                    });
                }
                MarkedReturn::Reattached { remembered, result } => (remembered, result),
            };
            let expected = remembered.driver;
            let dev = sysfs::device_dir(binder.sysfs_root(), &address);
            let current = || sysfs::driver(&dev).ok().flatten();
            if let Err(e) = result {
                return Some(match expected {
                    Some(expected) => ReturnOutcome::DidNotBind {
                        expected,
                        actual: current(),
                        reason: e.to_string(),
                    },
                    None => ReturnOutcome::Failed {
                        reason: e.to_string(),
                    },
                });
            }
            Some(verify_bound(binder.sysfs_root(), expected, current))
        };
        tokio::task::spawn_blocking(work).await.unwrap_or_else(|_| {
            Some(ReturnOutcome::Failed {
                reason: "the give-back stopped unexpectedly; see the service's log".into(),
            })
        })
    }

    /// Forgets the original drivers of devices gone or no longer detached
    /// ([`VfioBinder::forget_stale`]); for when devices were removed. Waits
    /// for a Detach or Reattach in progress.
    pub async fn forget_stale_drivers(&self) {
        let binder = self.binder.clone();
        if tokio::task::spawn_blocking(move || binder.forget_stale())
            .await
            .is_err()
        {
            tracing::error!("forgetting the original drivers of removed devices failed");
        }
    }

    /// Moves the device at `address` (in VFIO group `group`) unless a
    /// process holds the group or that is unknown; with
    /// [`Persistence::AtBoot`], its boot-time claim follows (see the module
    /// docs). Its scan is not counted: only callers polkit authorized get
    /// here.
    pub async fn change(
        &self,
        address: PciAddress,
        group: Option<u32>,
        action: Move,
        persistence: Persistence,
    ) -> Result<Outcome, PassthroughError> {
        let claims = self.claims_for(persistence)?;
        self.refuse_if_used(address, group, Scope::Device).await?;
        let binder = self.binder.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let to_change = match &claims {
                Some(claims) => claims_to_change(claims, action, address, &[address])?,
                None => Vec::new(),
            };
            let outcome = match action {
                Move::Detach => binder.detach(address),
                Move::Reattach => binder.reattach(address),
            }?;
            if let Some(claims) = &claims {
                follow_move(claims, action, address, &to_change)?;
            }
            Ok::<_, PassthroughError>(outcome)
        })
        .await
        .map_err(|_| PassthroughError::Panicked { address, action })??;
        if !matches!(outcome, Outcome::AlreadyDone { .. }) {
            tracing::info!(device = %address, %action, "binding changed");
        }
        Ok(outcome)
    }

    /// [`change`](Self::change) for the whole IOMMU group `group` of the
    /// device at `address`: refused when a process holds the group or a
    /// member's cdev; the binder reads the members once, in the thread that
    /// moves them, and rolls back on a failure. Members whose boot-time
    /// claim this service wrote go back on Reattach as those it detached
    /// do; with [`Persistence::AtBoot`] every endpoint's claim follows.
    ///
    /// `approved` is the group as polkit was shown it (all members,
    /// bridges included): a group that changed since is refused.
    pub async fn change_group(
        &self,
        address: PciAddress,
        group: Option<u32>,
        action: Move,
        approved: &[PciAddress],
        persistence: Persistence,
    ) -> Result<GroupOutcome, PassthroughError> {
        if group.is_none() {
            return Err(VfioError::NoGroup(address).into());
        }
        let persist = self.claims_for(persistence)?;
        self.refuse_if_used(address, group, Scope::Group).await?;
        let binder = self.binder.clone();
        let claims = self.claims.clone();
        let approved = approved.to_vec();
        let outcome = tokio::task::spawn_blocking(move || {
            let endpoints = binder.group_endpoints(address)?;
            let to_change = match &persist {
                Some(claims) => claims_to_change(claims, action, address, &endpoints)?,
                None => Vec::new(),
            };
            let outcome = match action {
                Move::Detach => binder.detach_group(address, &approved)?,
                Move::Reattach => {
                    let ours = claims
                        .as_ref()
                        .map_or_else(Vec::new, |c| ours(c, &endpoints));
                    binder.reattach_group(address, &approved, &ours)?
                }
            };
            if let Some(claims) = &persist {
                follow_move(claims, action, address, &to_change)?;
            }
            Ok::<_, PassthroughError>(outcome)
        })
        .await
        .map_err(|_| PassthroughError::Panicked { address, action })??;
        if !outcome.moved.is_empty() {
            let moved: Vec<String> = outcome.moved.iter().map(ToString::to_string).collect();
            tracing::info!(device = %address, %action, ?moved, "group binding changed");
        }
        Ok(outcome)
    }

    /// Fails closed: an unknown answer refuses as a holder does.
    async fn refuse_if_used(
        &self,
        address: PciAddress,
        group: Option<u32>,
        scope: Scope,
    ) -> Result<(), PassthroughError> {
        let users = self
            .users(address, group, scope, ())
            .await
            .map_err(|source| PassthroughError::UsersUnknown { address, source })?;
        match users.into_iter().next() {
            Some(user) => Err(PassthroughError::InUse { address, user }),
            None => Ok(()),
        }
    }
}

/// The devices whose boot-time claims a move of `members` (the device
/// `address` among them) changes, checked before anything moves. Detach:
/// every member, each refused when its file names another driver.
/// Reattach: the device's claim (refused when for another driver), and
/// the members' that this service wrote; others' stay.
fn claims_to_change(
    claims: &BootClaims,
    action: Move,
    address: PciAddress,
    members: &[PciAddress],
) -> Result<Vec<PciAddress>, PassthroughError> {
    let refused = |source| PassthroughError::BootClaimRefused { address, source };
    let mut to_change = Vec::new();
    for &member in members {
        let found = match claims.read(member) {
            Ok(found) => found,
            Err(e) if action == Move::Detach || member == address => return Err(refused(e)),
            // Only ours would change: one that cannot be read is left.
            Err(e) => {
                tracing::warn!(device = %member, "boot-time claim left as it is: {e}");
                continue;
            }
        };
        let change = match (&found, action) {
            (BootOverride::Other(driver), _) if action == Move::Detach || member == address => {
                return Err(refused(PersistError::Foreign {
                    address: member,
                    path: claims.path(member),
                    driver: driver.clone(),
                }));
            }
            (_, Move::Detach) => true,
            (BootOverride::Vfio { .. }, Move::Reattach) => member == address || found.is_ours(),
            _ => false,
        };
        if change {
            to_change.push(member);
        }
    }
    Ok(to_change)
}

/// The `members` whose vfio-pci claim this service wrote.
fn ours(claims: &BootClaims, members: &[PciAddress]) -> Vec<PciAddress> {
    members
        .iter()
        .copied()
        .filter(|m| claims.read(*m).is_ok_and(|found| found.is_ours()))
        .collect()
}

/// After a successful move: Detach claims `members` (on a failure, what
/// this call wrote is removed again); Reattach removes their claims.
fn follow_move(
    claims: &BootClaims,
    action: Move,
    address: PciAddress,
    members: &[PciAddress],
) -> Result<(), PassthroughError> {
    let mut written = Vec::new();
    for &member in members {
        let result = match action {
            Move::Detach => claims.claim(member).map(|claimed| {
                if claimed == Claimed::Written {
                    written.push(member);
                }
            }),
            Move::Reattach => claims.release(member).map(drop),
        };
        if let Err(source) = result {
            let mut undone = Vec::new();
            for &undo in written.iter().rev() {
                match claims.release(undo) {
                    Ok(_) => undone.push(undo),
                    Err(e) => {
                        tracing::error!(device = %undo, "cannot remove the boot-time claim this call wrote: {e}")
                    }
                }
            }
            return Err(PassthroughError::BootClaimAfterMove {
                address,
                action,
                failed: member,
                source,
                undone,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{DeadFuse, eventually};
    use std::time::Duration;

    /// InUseBy needs no authorization, and a /proc read can hang for good
    /// (here all of /proc sits on a dead FUSE mount). A reader who gives up
    /// leaves the scan's thread behind, so that thread keeps its place:
    /// otherwise every read would pin one more thread, without end.
    #[tokio::test]
    async fn public_scans_are_bounded_until_their_threads_end() {
        let fuse = DeadFuse::mount();
        let dev = tempfile::tempdir().unwrap();
        std::fs::create_dir(dev.path().join("vfio")).unwrap();
        std::fs::write(dev.path().join("vfio/7"), "").unwrap();
        let binder = VfioBinder::new(dev.path().join("sys"), None);
        let proc_root = fuse.path().join("proc");
        let passthrough = Passthrough::new(binder, proc_root, dev.path().to_owned());
        let read = || passthrough.users_for_anyone("0000:00:01.0".parse().unwrap(), Some(7));
        for _ in 0..PUBLIC_SCANS {
            let gave_up = tokio::time::timeout(Duration::from_millis(300), read()).await;
            assert!(gave_up.is_err(), "the scan is stuck");
        }
        // Refused at once: a getter never waits for a place.
        let next = tokio::time::timeout(Duration::from_secs(1), read()).await;
        assert!(
            matches!(
                next,
                Ok(Err(UsersError::TooMany {
                    group: 7,
                    limit: PUBLIC_SCANS
                }))
            ),
            "{PUBLIC_SCANS} stuck scans, and a reader may start another"
        );
        drop(fuse);
        eventually("the stuck scans end and give their places back", || {
            passthrough.public_scans.available_permits() == PUBLIC_SCANS
        })
        .await;
    }
}
