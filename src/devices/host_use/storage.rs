//! Block devices below a PCI device, what stacks on them (dm, md, LVM
//! through `holders/`), and which of them back a mount or swap.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{HostUse, HostUseError, Unknown, read_attribute};
use crate::kernel_files::{self, AtLimit};

/// `/proc/self/mountinfo` of a host with thousands of mounts (containers)
/// stays far below; a longer one is an error, never a cut table.
pub const MAX_MOUNTINFO_BYTES: u64 = 8 * 1024 * 1024;
const MAX_SWAPS_BYTES: u64 = 1024 * 1024;
/// Stacking deeper than this (dm on md on dm …) is not followed further.
const MAX_HOLDER_DEPTH: usize = 8;

/// One block device: its kernel name, number, and how it is reached from
/// the PCI device (`["vda", "vda2", "dm-0"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BlockDevice {
    pub name: String,
    pub rdev: u64,
    pub chain: Vec<String>,
}

/// `found` (block devices below the PCI device, with their sysfs dirs)
/// plus everything holding them, transitively.
pub(super) fn with_holders(found: Vec<(PathBuf, BlockDevice)>) -> Vec<BlockDevice> {
    let mut seen: HashSet<u64> = found.iter().map(|(_, b)| b.rdev).collect();
    let mut all = Vec::new();
    let mut queue: Vec<(PathBuf, BlockDevice, usize)> =
        found.into_iter().map(|(dir, b)| (dir, b, 0)).collect();
    while let Some((dir, device, depth)) = queue.pop() {
        if depth < MAX_HOLDER_DEPTH {
            let holders = dir.join("holders");
            for entry in fs::read_dir(&holders).into_iter().flatten().flatten() {
                // A link to the holder's directory (`../../../virtual/block/dm-0`).
                let holder_dir = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(rdev) = device_number(&holder_dir) else {
                    continue;
                };
                if seen.insert(rdev) {
                    let mut chain = device.chain.clone();
                    chain.push(name.clone());
                    queue.push((holder_dir, BlockDevice { name, rdev, chain }, depth + 1));
                }
            }
        }
        all.push(device);
    }
    all.sort_by(|a, b| a.chain.cmp(&b.chain));
    all
}

/// The `dev` attribute (`MAJOR:MINOR`) of a sysfs device directory as
/// std's `rdev` encodes it.
pub(super) fn device_number(dir: &Path) -> Option<u64> {
    let text = read_attribute(&dir.join("dev")).ok()?;
    let (major, minor) = text.split_once(':')?;
    Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
}

/// The number of the block device at `path` (a node) or, for a regular
/// file (a swap file), of the file system it is on.
fn block_number_of(path: &Path) -> Option<u64> {
    let meta = fs::metadata(path).ok()?;
    if meta.file_type().is_block_device() {
        Some(meta.rdev())
    } else {
        Some(meta.dev())
    }
}

/// `path` as named on the host (`/dev/vda1`), under `dev_root` when it is
/// in /dev: the tests' /dev is a temp dir.
fn host_path(dev_root: &Path, path: &str) -> PathBuf {
    match path.strip_prefix("/dev/") {
        Some(rest) => dev_root.join(rest),
        None => PathBuf::from(path),
    }
}

/// Mounts in the service's own mount table whose device is one of
/// `devices` (by the table's `MAJOR:MINOR`, or by the source node's
/// number: btrfs reports an anonymous device number).
pub(super) fn mounts(
    proc_root: &Path,
    dev_root: &Path,
    devices: &[BlockDevice],
) -> Result<Vec<HostUse>, HostUseError> {
    let path = proc_root.join("self/mountinfo");
    let bytes =
        kernel_files::read_bounded(&path, MAX_MOUNTINFO_BYTES, AtLimit::Refuse).map_err(|e| {
            HostUseError::MountTable {
                path: path.clone(),
                source: e.into_io(),
            }
        })?;
    let text = String::from_utf8_lossy(&bytes);
    let mut uses = Vec::new();
    for line in text.lines() {
        let Some(mount) = parse_mountinfo_line(line) else {
            continue;
        };
        let by_number = devices.iter().find(|d| d.rdev == mount.rdev);
        let device = by_number.or_else(|| {
            if !mount.source.starts_with('/') {
                return None;
            }
            let rdev = fs::metadata(host_path(dev_root, &mount.source))
                .ok()
                .filter(|m| m.file_type().is_block_device())?
                .rdev();
            devices.iter().find(|d| d.rdev == rdev)
        });
        if let Some(device) = device {
            let found = HostUse::Mount {
                mount_point: mount.mount_point,
                fs_type: mount.fs_type,
                source: mount.source,
                chain: device.chain.clone(),
            };
            // The service's own namespace can list one mount twice: a host
            // mount below /mnt propagates both under the original /mnt and
            // under the unit's ReadWritePaths= bind mount of it.
            if !uses.contains(&found) {
                uses.push(found);
            }
        }
    }
    Ok(uses)
}

struct MountLine {
    rdev: u64,
    mount_point: String,
    fs_type: String,
    source: String,
}

/// `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER_OPTIONS`.
fn parse_mountinfo_line(line: &str) -> Option<MountLine> {
    let (before, after) = line.split_once(" - ")?;
    let mut fields = before.split(' ');
    let numbers = fields.nth(2)?;
    let mount_point = unescape(fields.nth(1)?);
    let (major, minor) = numbers.split_once(':')?;
    let mut after = after.split(' ');
    let fs_type = unescape(after.next()?);
    let source = unescape(after.next()?);
    Some(MountLine {
        rdev: libc::makedev(major.parse().ok()?, minor.parse().ok()?),
        mount_point,
        fs_type,
        source,
    })
}

/// The kernel writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = bytes.get(i + 1..i + 4)
            && octal.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let value = octal.iter().fold(0u32, |n, b| n * 8 + u32::from(b - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Swap on one of `devices` (a partition, or a swap file on a file system
/// on one), from `<proc_root>/swaps`. Under the unit's ProcSubset=pid that
/// file does not exist: then the answer is [`Unknown::Swap`], never "no
/// swap".
pub(super) fn swaps(
    proc_root: &Path,
    dev_root: &Path,
    devices: &[BlockDevice],
) -> Result<Vec<HostUse>, Unknown> {
    let path = proc_root.join("swaps");
    let bytes = match kernel_files::read_bounded(&path, MAX_SWAPS_BYTES, AtLimit::Refuse) {
        Ok(bytes) => bytes,
        Err(e) => {
            let reason = if e.is_not_found() {
                format!("{} is not visible (ProcSubset=pid)", path.display())
            } else {
                format!("cannot read {}: {e}", path.display())
            };
            return Err(Unknown::Swap { reason });
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut uses = Vec::new();
    // `Filename Type Size Used Priority`, after a header line.
    for line in text.lines().skip(1) {
        let Some(name) = line.split_ascii_whitespace().next() else {
            continue;
        };
        let name = unescape(name);
        let Some(rdev) = block_number_of(&host_path(dev_root, &name)) else {
            continue;
        };
        if let Some(device) = devices.iter().find(|d| d.rdev == rdev) {
            uses.push(HostUse::Swap {
                path: name,
                chain: device.chain.clone(),
            });
        }
    }
    Ok(uses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let line = "29 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw";
        let mount = parse_mountinfo_line(line).unwrap();
        assert_eq!(mount.rdev, libc::makedev(254, 1));
        assert_eq!(
            (
                mount.mount_point.as_str(),
                mount.fs_type.as_str(),
                mount.source.as_str()
            ),
            ("/", "ext4", "/dev/vda1")
        );
        let odd = "30 29 8:2 / /mnt/a\\040b rw - xfs /dev/sda\\0402 rw";
        let mount = parse_mountinfo_line(odd).unwrap();
        assert_eq!(mount.mount_point, "/mnt/a b");
        assert_eq!(mount.source, "/dev/sda 2");
        assert!(parse_mountinfo_line("garbage").is_none());
        assert!(parse_mountinfo_line("1 2 x:y / / rw - ext4 /dev/x rw").is_none());
        assert_eq!(unescape("a\\134b\\"), "a\\b\\");
    }
}
