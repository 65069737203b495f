//! The passthrough decisions of Detach and Reattach, free of D-Bus.
//!
//! A device whose VFIO group a process holds open (a running VM) is never
//! moved: pulling it from under the VM would crash the guest or worse. When
//! it cannot be found out who holds the group (the /proc scan failed, timed
//! out or was stopped) the answer is no as well: **fail closed**. Only then
//! does [`VfioBinder`] make the sysfs writes.
//!
//! Errors are typed ([`PassthroughError`]); the D-Bus layer maps them to its
//! error names in one place (`service::error`).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::vfio::{self, Outcome, VfioBinder, VfioError, VfioUser};
use crate::procfs::HoldersError;
use vmmanager_client::PciAddress;

/// How long finding out who holds a VFIO group may take. A read of a stuck
/// process's /proc files can hang; the same bound as a disk's in-use scan
/// (`disk::checker::SCAN_TIMEOUT`), which walks the same /proc.
pub const USERS_SCAN_TIMEOUT: Duration = Duration::from_secs(30);

/// Which way a device moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// To vfio-pci ([`VfioBinder::detach`]).
    Detach,
    /// Back to a host driver ([`VfioBinder::reattach`]).
    Reattach,
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
        USERS_SCAN_TIMEOUT.as_secs()
    )]
    TimedOut { group: u32 },
    #[error("finding out who holds /dev/vfio/{group} stopped unexpectedly")]
    Panicked { group: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    /// A process holds the device's VFIO group.
    #[error("{address} is in use by {user} through /dev/vfio/{group}; stop the VM first")]
    InUse {
        address: PciAddress,
        group: u32,
        user: VfioUser,
    },
    /// Nobody knows whether a process holds the group: nothing was changed.
    #[error("could not find out whether a VM uses {address}; nothing was changed")]
    UsersUnknown {
        address: PciAddress,
        #[source]
        source: UsersError,
    },
    #[error(transparent)]
    Vfio(#[from] VfioError),
    /// The blocking sysfs work panicked; what it wrote is unknown.
    #[error("the {action} of {address} stopped unexpectedly; see the service's log")]
    Panicked { address: PciAddress, action: Move },
}

/// Detach and Reattach with their refusals; cheap to clone.
#[derive(Debug, Clone)]
pub struct Passthrough {
    binder: Arc<VfioBinder>,
    proc_root: PathBuf,
    dev_root: PathBuf,
}

impl Passthrough {
    /// `proc_root` and `dev_root` are where the VFIO group users are looked
    /// for (`/proc`, `/dev`); `binder` makes the sysfs writes.
    pub fn new(binder: VfioBinder, proc_root: PathBuf, dev_root: PathBuf) -> Self {
        Passthrough {
            binder: Arc::new(binder),
            proc_root,
            dev_root,
        }
    }

    /// Who holds VFIO group `group` open, bounded by [`USERS_SCAN_TIMEOUT`];
    /// nobody for a device without a group. Only groups whose
    /// `/dev/vfio/<group>` exists (bound to vfio-pci) cost a /proc scan. A
    /// scan whose answer is abandoned (timeout, or this future dropped) is
    /// told to stop.
    pub async fn users(&self, group: Option<u32>) -> Result<Vec<VfioUser>, UsersError> {
        let Some(group) = group else {
            return Ok(Vec::new());
        };
        let proc_root = self.proc_root.clone();
        let dev_root = self.dev_root.clone();
        let stop = CancellationToken::new();
        let _stop_when_abandoned = stop.clone().drop_guard();
        let scan = tokio::task::spawn_blocking(move || {
            vfio::group_users(&proc_root, &dev_root, group, &stop)
        });
        let result = match tokio::time::timeout(USERS_SCAN_TIMEOUT, scan).await {
            Ok(Ok(Ok(users))) => return Ok(users),
            Ok(Ok(Err(source))) => UsersError::Scan { group, source },
            Ok(Err(_)) => UsersError::Panicked { group },
            Err(_) => UsersError::TimedOut { group },
        };
        tracing::warn!(group, "{result}");
        Err(result)
    }

    /// Moves the device at `address` (in VFIO group `group`) unless a
    /// process holds the group or that is unknown.
    pub async fn change(
        &self,
        address: PciAddress,
        group: Option<u32>,
        action: Move,
    ) -> Result<Outcome, PassthroughError> {
        let users = self
            .users(group)
            .await
            .map_err(|source| PassthroughError::UsersUnknown { address, source })?;
        if let (Some(user), Some(group)) = (users.into_iter().next(), group) {
            return Err(PassthroughError::InUse {
                address,
                group,
                user,
            });
        }
        let binder = self.binder.clone();
        let outcome = tokio::task::spawn_blocking(move || match action {
            Move::Detach => binder.detach(address),
            Move::Reattach => binder.reattach(address),
        })
        .await
        .map_err(|_| PassthroughError::Panicked { address, action })??;
        if !matches!(outcome, Outcome::AlreadyDone { .. }) {
            tracing::info!(device = %address, %action, "binding changed");
        }
        Ok(outcome)
    }
}
