//! Block devices below a PCI device, what stacks on them, and which of
//! them back a mount or swap. Stacked: holders (`holders/`: dm, md, LVM,
//! kpartx's dm partitions), partitions of those (`md126p1`), the NVMe
//! multipath head of a path (`nvme0c0n1` → `nvme0n1`, under the
//! nvme-subsystem, not the PCI device) and loop devices whose backing file
//! is one of their nodes or a file on one (`loop/backing_file`).

use std::collections::HashSet;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{HostUse, HostUseError, Unknown, read_attribute};
use crate::kernel_files::{self, AtLimit};

/// The mount table is read line by line; FUSE lines are skipped unread
/// past their type (any local user can mount thousands: were they counted,
/// anyone could make the table "too long" and block Detach for everyone).
/// The other lines of a host with thousands of mounts (containers) stay
/// far below this; more is an error, never a cut table.
pub const MAX_MOUNTINFO_BYTES: u64 = 64 * 1024 * 1024;
/// One line at most: a mount point, a bind mount's root and a source are
/// at most PATH_MAX each, four times that escaped; root's overlay mounts
/// with many layers are the longest. Longer is an error.
pub const MAX_MOUNTINFO_LINE: usize = 1024 * 1024;
const MAX_SWAPS_BYTES: u64 = 1024 * 1024;
/// Stacking deeper than this (dm on md on dm …) is an error, never cut.
pub const MAX_STACK_DEPTH: usize = 16;

/// One block device: its kernel name, number, and how it is reached from
/// the PCI device (`["vda", "vda2", "dm-0"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BlockDevice {
    pub name: String,
    pub rdev: u64,
    pub chain: Vec<String>,
    /// Its sysfs directory.
    pub dir: PathBuf,
    /// A loop device's backing file, as the kernel names it.
    pub backing_file: Option<String>,
    /// For a partition, its disk's name.
    pub whole: Option<String>,
    /// The devices stacked on it (`holders/`).
    pub holders: Vec<String>,
}

impl BlockDevice {
    /// The device at sysfs directory `dir` (with a `dev` attribute),
    /// reached by `chain` and then `name`.
    fn at(dir: PathBuf, name: String, chain: &[String]) -> Option<BlockDevice> {
        let rdev = device_number(&dir)?;
        let mut chain = chain.to_vec();
        chain.push(name);
        Some(BlockDevice::new(dir, rdev, chain))
    }

    /// One the walk found below the PCI device.
    pub(super) fn found(dir: &Path, name: &str, rdev: u64) -> BlockDevice {
        BlockDevice::new(dir.to_owned(), rdev, vec![name.to_owned()])
    }

    fn new(dir: PathBuf, rdev: u64, chain: Vec<String>) -> BlockDevice {
        let whole = dir
            .join("partition")
            .is_file()
            .then(|| dir.parent()?.file_name()?.to_str().map(str::to_owned))
            .flatten();
        let mut holders: Vec<String> = fs::read_dir(dir.join("holders"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        holders.sort();
        BlockDevice {
            name: chain.last().cloned().unwrap_or_default(),
            rdev,
            chain,
            dir,
            backing_file: None,
            whole,
            holders,
        }
    }
}

/// `found` (block devices below the PCI device) plus everything stacked
/// on them, transitively, sorted by chain. An error past
/// [`MAX_STACK_DEPTH`].
pub(super) fn stacked(
    found: Vec<BlockDevice>,
    sysfs_root: &Path,
    dev_root: &Path,
) -> Result<Vec<BlockDevice>, HostUseError> {
    let mut seen: HashSet<u64> = found.iter().map(|b| b.rdev).collect();
    let mut all = Vec::new();
    let mut queue = found;
    let loops = loop_devices(sysfs_root);
    while !queue.is_empty() {
        while let Some(device) = queue.pop() {
            if device.chain.len() > MAX_STACK_DEPTH {
                return Err(HostUseError::TooDeeplyStacked {
                    chain: device.chain,
                });
            }
            for above in stacked_on(&device, sysfs_root) {
                if seen.insert(above.rdev) {
                    queue.push(above);
                }
            }
            all.push(device);
        }
        // Loops last: their backing files are matched against everything
        // found so far (a loop on a partition of a loop …).
        for (dir, name, backing_file) in &loops {
            let Some(rdev) = device_number(dir) else {
                continue;
            };
            if seen.contains(&rdev) {
                continue;
            }
            let Some(under) = backing_number(dev_root, backing_file)
                .and_then(|number| all.iter().find(|d: &&BlockDevice| d.rdev == number))
            else {
                continue;
            };
            let mut chain = under.chain.clone();
            chain.push(name.clone());
            seen.insert(rdev);
            queue.push(BlockDevice {
                backing_file: Some(backing_file.clone()),
                ..BlockDevice::new(dir.clone(), rdev, chain)
            });
        }
    }
    all.sort_by(|a, b| a.chain.cmp(&b.chain));
    Ok(all)
}

/// What stacks directly on `device`: its holders, its partitions (a
/// stacked device's: `md126p1`; the walk finds the PCI device's own) and,
/// for an NVMe multipath path, its head.
fn stacked_on(device: &BlockDevice, sysfs_root: &Path) -> Vec<BlockDevice> {
    let mut above = Vec::new();
    // Links to the holders' directories (`../../../virtual/block/dm-0`).
    for entry in fs::read_dir(device.dir.join("holders"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        above.extend(BlockDevice::at(entry.path(), name, &device.chain));
    }
    for entry in fs::read_dir(&device.dir).into_iter().flatten().flatten() {
        let dir = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) && dir.join("partition").is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            above.extend(BlockDevice::at(dir, name, &device.chain));
        }
    }
    if let Some(head) = multipath_head(&device.name) {
        let dir = sysfs_root.join("class/block").join(&head);
        above.extend(BlockDevice::at(dir, head, &device.chain));
    }
    above.sort_by(|a, b| a.name.cmp(&b.name));
    above
}

#[cfg(test)]
pub(super) fn multipath_head_of(path: &str) -> Option<String> {
    multipath_head(path)
}

/// The NVMe multipath head of path `nvme<S>c<C>n<N>`: `nvme<S>n<N>`, a
/// block device of the nvme-subsystem the controller is in.
fn multipath_head(path: &str) -> Option<String> {
    let rest = path.strip_prefix("nvme")?;
    let (subsystem, rest) = rest.split_once('c')?;
    let (controller, namespace) = rest.split_once('n')?;
    let numbers = [subsystem, controller, namespace];
    if numbers
        .iter()
        .any(|n| n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    Some(format!("nvme{subsystem}n{namespace}"))
}

/// Every bound loop device: (sysfs dir, name, backing file).
fn loop_devices(sysfs_root: &Path) -> Vec<(PathBuf, String, String)> {
    let mut loops = Vec::new();
    for entry in fs::read_dir(sysfs_root.join("class/block"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let dir = entry.path();
        // Only a bound loop device has a backing file.
        if let Ok(backing_file) = read_attribute(&dir.join("loop/backing_file")) {
            loops.push((dir, name, backing_file));
        }
    }
    loops.sort();
    loops
}

/// What a loop's backing file is on: the number of the node it is, or of
/// the file system holding it. (A file on btrfs has an anonymous number:
/// its file system's mount is found anyway.)
fn backing_number(dev_root: &Path, backing_file: &str) -> Option<u64> {
    block_number_of(&host_path(dev_root, backing_file))
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
    let error = |source: io::Error| HostUseError::MountTable {
        path: path.clone(),
        source,
    };
    let file = kernel_files::open_regular(&path).map_err(|e| error(e.into_io()))?;
    mounts_in(
        file,
        dev_root,
        devices,
        MAX_MOUNTINFO_BYTES,
        MAX_MOUNTINFO_LINE,
    )
    .map_err(error)
}

/// [`mounts`] of the table `table`, at most `max_bytes` of lines that are
/// not FUSE's and `max_line` bytes a line.
fn mounts_in(
    table: impl Read,
    dev_root: &Path,
    devices: &[BlockDevice],
    max_bytes: u64,
    max_line: usize,
) -> io::Result<Vec<HostUse>> {
    let mut reader = BufReader::with_capacity(64 * 1024, table);
    let mut line = Vec::new();
    let mut counted = 0u64;
    let mut uses = Vec::new();
    loop {
        line.clear();
        let limit = u64::try_from(max_line)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        (&mut reader).take(limit).read_until(b'\n', &mut line)?;
        if line.is_empty() {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        } else if line.len() > max_line {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line is longer than {max_line} bytes"),
            ));
        }
        let text = String::from_utf8_lossy(&line);
        let Some(mount) = parse_mountinfo_line(&text) else {
            continue;
        };
        if is_fuse(&mount.fs_type) {
            continue;
        }
        counted += line.len() as u64 + 1;
        if counted > max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {max_bytes} bytes of mounts that are not FUSE's"),
            ));
        }
        let by_number = devices.iter().find(|d| d.rdev == mount.rdev);
        // Only a node's name is looked up: a source elsewhere could be on a
        // hung network file system.
        let device = by_number.or_else(|| {
            if !mount.source.starts_with("/dev/") {
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

/// A FUSE file system, which no PCI device's block device backs. Not
/// `fuseblk` (ntfs-3g and other FUSE servers of a block device), which
/// only root can mount.
fn is_fuse(fs_type: &str) -> bool {
    fs_type == "fuse" || fs_type.starts_with("fuse.")
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

    fn vda1() -> Vec<BlockDevice> {
        vec![BlockDevice::found(
            Path::new("/nonexistent"),
            "vda1",
            libc::makedev(254, 1),
        )]
    }

    fn mount_points(uses: &[HostUse]) -> Vec<&str> {
        uses.iter()
            .filter_map(|u| match u {
                HostUse::Mount { mount_point, .. } => Some(mount_point.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Any local user can mount FUSE file systems: thousands of their
    /// lines neither count toward the bound nor hide the mount after them;
    /// `fuseblk` (ntfs-3g on a partition) is matched like any other.
    #[test]
    fn fuse_mounts_do_not_count_toward_the_bound() {
        let fuse = "40 22 0:50 / /home/u/m\\040ount rw - fuse.sshfs u@h:/x rw\n";
        let mut table = fuse.repeat(1000);
        table.push_str("41 22 254:1 / /mnt/win rw - fuseblk /dev/vda1 rw\n");
        table.push_str(&"42 22 0:51 / /home/u/n rw - fuse /dev/fuse rw\n".repeat(1000));
        let max = 4096;
        assert!(table.len() > 20 * max);
        let uses = mounts_in(
            table.as_bytes(),
            Path::new("/nonexistent"),
            &vda1(),
            max as u64,
            256,
        )
        .unwrap();
        assert_eq!(mount_points(&uses), ["/mnt/win"]);
    }

    /// Past the bound (other file systems) or a line longer than its bound:
    /// an error, never a cut table.
    #[test]
    fn a_table_or_line_over_its_bound_is_an_error() {
        let tmpfs = "40 22 0:50 / /run/x rw - tmpfs tmpfs rw\n";
        let last = "41 22 254:1 / /srv rw - ext4 /dev/vda1 rw\n";
        let table = format!("{}{last}", tmpfs.repeat(100));
        let within = (tmpfs.len() * 100 + last.len()) as u64;
        let devices = vda1();
        let dev = Path::new("/nonexistent");
        let uses = mounts_in(table.as_bytes(), dev, &devices, within, 256).unwrap();
        assert_eq!(mount_points(&uses), ["/srv"]);
        let over = mounts_in(table.as_bytes(), dev, &devices, within - 1, 256).unwrap_err();
        assert_eq!(over.kind(), io::ErrorKind::InvalidData, "{over}");
        let long = format!(
            "40 22 0:50 / /{} rw - tmpfs tmpfs rw\n{last}",
            "x".repeat(300)
        );
        let too_long = mounts_in(long.as_bytes(), dev, &devices, within, 256).unwrap_err();
        assert!(
            too_long.to_string().contains("longer than 256"),
            "{too_long}"
        );
        // Exactly at the line bound, and a last line without a newline.
        let at = format!("{}\n{}", &last[..last.len() - 1], &last[..last.len() - 1]);
        let line = last.len() - 1;
        let uses = mounts_in(at.as_bytes(), dev, &devices, within, line).unwrap();
        // Both lines read (the same mount twice: one use).
        assert_eq!(mount_points(&uses), ["/srv"]);
    }
}
