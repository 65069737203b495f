//! Whether the kernel holds a block device: what the service's own mount
//! table cannot show. A file system mounted only in another mount
//! namespace (a container's, a user's `unshare -m`), one lazily unmounted
//! (`umount -l`) and still busy, swap, a dm/md holder and any exclusive
//! opener all claim the device, and an exclusive open then fails with
//! EBUSY.
//!
//! The node is looked up once, with O_PATH (which opens nothing: no
//! driver sees it), checked by `fstat` to be a block device of the right
//! number, and only that inode is opened, through `/proc/self/fd`:
//! O_RDONLY|O_EXCL|O_NONBLOCK, closed at once. O_NONBLOCK: a CD drive's
//! tray stays as it is. The open of a free device succeeds and changes
//! nothing (a loop device set to clear itself on its last close is only
//! cleared when its last other user already closed it). A mount started
//! in the same instant may fail with EBUSY once.
//!
//! The service's unit must let it open block devices read-only for this
//! (`DeviceAllow=block-* r`; with `DevicePolicy=closed` alone the open is
//! refused: then the answer is [`Probe::Unknown`], never "free").

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::storage::BlockDevice;
use super::{HostUse, Unknown, dev_name, read_attribute};

/// What an exclusive open of a block device said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Probe {
    Free,
    /// EBUSY: the kernel holds it.
    Claimed,
    /// It could not be opened; why.
    Unknown(String),
}

/// Opens `device`'s node (below `dev_root`) exclusively and closes it.
pub(super) fn probe(dev_root: &Path, device: &BlockDevice) -> Probe {
    // A hidden disk (an NVMe multipath path) has no node and can be
    // neither opened nor mounted: its head is probed instead.
    if read_attribute(&device.dir.join("hidden")).is_ok_and(|h| h == "1") {
        return Probe::Free;
    }
    let Some((path, handle)) = node(dev_root, device) else {
        return Probe::Unknown(format!(
            "no node of {} ({}:{}) in {}",
            device.name,
            libc::major(device.rdev),
            libc::minor(device.rdev),
            dev_root.display()
        ));
    };
    match open_exclusively(&handle) {
        Ok(_closed_at_once) => Probe::Free,
        Err(e) => match e.raw_os_error() {
            Some(libc::EBUSY) => Probe::Claimed,
            // No medium (an empty card reader): nothing can be mounted.
            Some(libc::ENOMEDIUM) => Probe::Free,
            Some(libc::EPERM | libc::EACCES) => Probe::Unknown(format!(
                "opening {} was refused ({e}): the service's unit needs DeviceAllow=block-* r",
                path.display()
            )),
            _ => Probe::Unknown(format!("cannot open {}: {e}", path.display())),
        },
    }
}

/// The first of the device's node names below `dev_root` that is a block
/// device of its number (`block/MAJ:MIN`, udev's; the uevent's DEVNAME,
/// devtmpfs's), held by an O_PATH handle.
fn node(dev_root: &Path, device: &BlockDevice) -> Option<(PathBuf, File)> {
    let numbered = format!(
        "block/{}:{}",
        libc::major(device.rdev),
        libc::minor(device.rdev)
    );
    let named = dev_name(&device.dir).unwrap_or_else(|| device.name.clone());
    [numbered, named].into_iter().find_map(|name| {
        let path = dev_root.join(name);
        let handle = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(&path)
            .ok()?;
        let meta = handle.metadata().ok()?;
        (meta.file_type().is_block_device() && meta.rdev() == device.rdev).then_some((path, handle))
    })
}

/// Exactly the inode `handle` holds, opened O_EXCL: no name is looked up
/// again.
fn open_exclusively(handle: &File) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
}

/// Claims of `devices` that no use in `uses` (mounts, swap, loops) or
/// other claim explains, as [`HostUse::Claimed`]; devices that could not
/// be probed, as one [`Unknown::BlockDevices`].
///
/// The kernel's claims spread: a claimed partition makes its disk
/// claimed too, a claimed disk (held by md, say) its partitions, and a
/// dm device claims what it stacks on. Only the claim that explains the
/// others is said: the one highest in a stack, a partition's rather than
/// its disk's unless the disk itself is held.
pub(super) fn claim_uses(
    devices: &[BlockDevice],
    uses: &[HostUse],
    probe: impl Fn(&BlockDevice) -> Probe,
) -> (Vec<HostUse>, Option<Unknown>) {
    let mut claimed = Vec::new();
    let mut unprobed = Vec::new();
    for device in devices {
        match probe(device) {
            Probe::Free => {}
            Probe::Claimed => claimed.push(device),
            Probe::Unknown(reason) => unprobed.push((device.name.as_str(), reason)),
        }
    }
    let used: Vec<&str> = uses
        .iter()
        .filter_map(HostUse::chain)
        .flatten()
        .map(String::as_str)
        .collect();
    let is_used = |d: &BlockDevice| used.contains(&d.name.as_str());
    let is_claimed = |d: &BlockDevice| claimed.iter().any(|c| c.name == d.name);
    // Held itself (a holder, a mount of the whole disk), not just through
    // a partition.
    let held = |d: &BlockDevice| !d.holders.is_empty() || is_used(d);
    let explains = |above: &BlockDevice, below: &BlockDevice| {
        (is_claimed(above) || is_used(above))
            && (above.chain[..above.chain.len() - 1].contains(&below.name)
                || (above.whole.as_deref() == Some(&below.name) && !held(below)))
    };
    let mut said = Vec::new();
    for &device in &claimed {
        let blocked_by_its_disk = device.whole.as_ref().is_some_and(|whole| {
            devices
                .iter()
                .any(|d| d.name == *whole && is_claimed(d) && held(d))
        });
        let explained = devices
            .iter()
            .any(|above| above.name != device.name && explains(above, device));
        if !is_used(device) && !blocked_by_its_disk && !explained {
            said.push(HostUse::Claimed {
                chain: device.chain.clone(),
                held_by: device.holders.clone(),
            });
        }
    }
    let unknown = unprobed.first().map(|(_, reason)| {
        let names: Vec<&str> = unprobed.iter().map(|(name, _)| *name).collect();
        Unknown::BlockDevices {
            reason: format!("{} ({})", reason, names.join(", ")),
        }
    });
    (said, unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(chain: &[&str], whole: Option<&str>, holders: &[&str]) -> BlockDevice {
        BlockDevice {
            name: chain.last().unwrap().to_string(),
            rdev: 0,
            chain: chain.iter().map(ToString::to_string).collect(),
            dir: PathBuf::from("/nonexistent"),
            backing_file: None,
            whole: whole.map(str::to_owned),
            holders: holders.iter().map(ToString::to_string).collect(),
        }
    }

    /// `vda` with `vda1` and `vda2`; `dm-0` on `vda2` (as LVM stacks).
    fn disk() -> Vec<BlockDevice> {
        vec![
            device(&["vda"], None, &[]),
            device(&["vda1"], Some("vda"), &[]),
            device(&["vda2"], Some("vda"), &["dm-0"]),
            device(&["vda2", "dm-0"], None, &[]),
        ]
    }

    fn mount(chain: &[&str]) -> HostUse {
        HostUse::Mount {
            mount_point: "/m".into(),
            fs_type: "ext4".into(),
            source: "/dev/x".into(),
            chain: chain.iter().map(ToString::to_string).collect(),
        }
    }

    /// What is said when `claimed` are claimed, the rest free.
    fn said(devices: &[BlockDevice], uses: &[HostUse], claimed: &[&str]) -> Vec<String> {
        let (said, unknown) = claim_uses(devices, uses, |d| {
            if claimed.contains(&d.name.as_str()) {
                Probe::Claimed
            } else {
                Probe::Free
            }
        });
        assert_eq!(unknown, None);
        said.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn only_the_claim_that_explains_the_others_is_said() {
        let devices = disk();
        // Nothing claimed: nothing said.
        assert_eq!(said(&devices, &[], &[]), [] as [&str; 0]);
        // vda1 mounted here: its claim and its disk's are the mount's.
        assert_eq!(
            said(&devices, &[mount(&["vda1"])], &["vda", "vda1"]),
            [] as [&str; 0]
        );
        // … and dm-0, unmounted, still holds vda2.
        assert_eq!(
            said(&devices, &[mount(&["vda1"])], &["vda", "vda1", "vda2"]),
            ["block device vda2 is held by dm-0, stacked on it"]
        );
        // dm-0 mounted in another namespace: dm-0's claim explains vda2's
        // (held by it), vda2's explains vda's.
        assert_eq!(
            said(&devices, &[], &["vda", "vda2", "dm-0"]),
            [
                "block device vda2 → dm-0 is in use by the kernel: mounted, swap or opened exclusively, possibly in another mount namespace"
            ]
        );
        // dm-0 free, but there: it holds vda2.
        assert_eq!(
            said(&devices, &[], &["vda", "vda2"]),
            ["block device vda2 is held by dm-0, stacked on it"]
        );
        // vda1 mounted elsewhere, beside the mount of dm-0 here.
        assert_eq!(
            said(
                &devices,
                &[mount(&["vda2", "dm-0"])],
                &["vda", "vda1", "vda2", "dm-0"]
            ),
            [
                "block device vda1 is in use by the kernel: mounted, swap or opened exclusively, possibly in another mount namespace"
            ]
        );
    }

    /// An md array on the whole disk claims it, and through it every
    /// partition: the disk is said, not each partition.
    #[test]
    fn a_held_disk_is_said_not_its_partitions() {
        let devices = vec![
            device(&["sda"], None, &["md0"]),
            device(&["sda1"], Some("sda"), &[]),
            device(&["sda2"], Some("sda"), &[]),
            device(&["sda", "md0"], None, &[]),
        ];
        assert_eq!(
            said(&devices, &[], &["sda", "sda1", "sda2"]),
            ["block device sda is held by md0, stacked on it"]
        );
        // The array mounted elsewhere: it explains the disk.
        assert_eq!(
            said(&devices, &[], &["sda", "sda1", "sda2", "md0"]),
            [
                "block device sda → md0 is in use by the kernel: mounted, swap or opened exclusively, possibly in another mount namespace"
            ]
        );
    }

    #[test]
    fn devices_that_cannot_be_opened_are_one_unknown() {
        let devices = disk();
        let (said, unknown) = claim_uses(&devices, &[], |d| match d.name.as_str() {
            "vda1" | "dm-0" => Probe::Unknown(format!("refused {}", d.name)),
            "vda2" => Probe::Claimed,
            _ => Probe::Free,
        });
        assert_eq!(said.len(), 1, "{said:?}");
        assert_eq!(
            unknown.map(|u| u.to_string()).as_deref(),
            Some(
                "whether the kernel holds its block devices (a mount in another mount namespace) is unknown: refused vda1 (vda1, dm-0)"
            )
        );
    }
}
