//! Boot-time claims: driverctl's override files, so that a device detached
//! with `persistent` is bound to vfio-pci at every boot and hotplug too.
//!
//! # The format (driverctl 0.111, Debian 12)
//! One file per device, `<dir>/pci-<address>` (`/etc/driverctl.d/pci-0000:01:00.0`),
//! holding the driver's name and a newline (`vfio-pci\n`; driverctl writes
//! it with `echo`), mode 0644. When a device is added (coldplug at boot,
//! hotplug), driverctl's udev rule starts `driverctl@pci-<address>.service`,
//! which runs `driverctl load-override`: it reads the name (trailing
//! newlines dropped, an empty file ignored), writes it to the device's
//! `driver_override`, unbinds the device and reprobes it. Without driverctl,
//! the package's own rule (`udev/89-vmmanager-vfio.rules`) does the same for
//! the files that name `vfio-pci`. The directory is a parameter
//! (`[devices] driver-overrides-dir`; tests use a temp dir).
//!
//! # Ours and theirs
//! A claim's content is exactly what driverctl writes, so driverctl lists,
//! loads and unsets ours like its own. Which ones this service wrote is
//! kept apart, in a record (`[devices] boot-claims-record`, normally
//! `/var/lib/vmmanager/boot-claims`): each address with the device and
//! inode numbers and the modification time of the file written. A file
//! counts as ours only while it is that very file, unmodified, and still
//! names vfio-pci, so a claim driverctl (or an admin) removed and made
//! again, or rewrote, is theirs. (The time tells a new file that got the
//! removed one's inode number apart; file times are as fine as the clock
//! tick, so a file removed and made again within the same few
//! milliseconds with the same inode would still read as ours.) Files naming another driver
//! are never replaced or removed: [`PersistError::Foreign`] says so.
//!
//! # Writing safely
//! The directory is opened once (`O_DIRECTORY | O_NOFOLLOW`) and every name
//! is used relative to it (`openat`, `renameat2`, `unlinkat`), never
//! following a symlink; a name that is not a regular file is refused
//! ([`PersistError::NotRegular`]). A claim is written to a temp file,
//! synced, then renamed into place with `RENAME_NOREPLACE` (a file that
//! appeared meanwhile is never replaced), and the directory synced. Reads
//! are bounded. Blocking: call from a blocking thread.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::vfio::VFIO_DRIVER;
use crate::kernel_files::{self, AtLimit, KernelFileError};
use vmmanager_client::PciAddress;

/// What a claim file holds: a driver's name and a newline. driverctl reads
/// any length; names are short, so anything longer is not a claim.
const MAX_OVERRIDE_BYTES: u64 = 256;
/// The record: one short line per device, a few hundred devices at most.
const MAX_RECORD_BYTES: u64 = 64 * 1024;
const MAX_RECORD_ENTRIES: usize = 1024;
/// What driverctl's files get under root's usual umask 022.
const CLAIM_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

/// `pci-<address>`, driverctl's name for a PCI device's file.
pub fn file_name(address: PciAddress) -> String {
    format!("pci-{address}")
}

/// A file's identity: device and inode numbers, modification time (s, ns).
type FileId = (u64, u64, i64, i64);

fn file_id(meta: &std::fs::Metadata) -> FileId {
    (meta.dev(), meta.ino(), meta.mtime(), meta.mtime_nsec())
}

/// What a device's override file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootOverride {
    /// No file: the kernel picks the driver at boot.
    None,
    /// vfio-pci; `ours` when this service wrote this very file.
    Vfio { ours: bool },
    /// Another driver's name (driverctl's or an admin's), or nothing usable
    /// (an empty file); never touched by this service.
    Other(String),
}

impl BootOverride {
    /// The driver claimed at boot, `None` without a claim.
    pub fn driver(&self) -> Option<&str> {
        match self {
            BootOverride::None => None,
            BootOverride::Vfio { .. } => Some(VFIO_DRIVER),
            BootOverride::Other(driver) => Some(driver),
        }
    }

    /// A vfio-pci claim this service wrote.
    pub fn is_ours(&self) -> bool {
        matches!(self, BootOverride::Vfio { ours: true })
    }
}

/// What [`BootClaims::claim`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    Written,
    /// A vfio-pci claim was there already (ours or driverctl's): kept.
    AlreadyThere,
}

/// What [`BootClaims::release`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    Removed,
    NoneThere,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The device's file names another driver: not ours to replace or
    /// remove.
    #[error(
        "{address} has a boot-time override for {} in {} (driverctl's or an admin's); \
         it was left as it is (`driverctl unset-override {address}` removes it)",
        describe_driver(driver), path.display()
    )]
    Foreign {
        address: PciAddress,
        path: PathBuf,
        driver: String,
    },
    #[error("{} is not a regular file; it was left as it is", path.display())]
    NotRegular { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot record the boot-time claim of {address} in {}: {source}", path.display())]
    Record {
        address: PciAddress,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A driver name from a file, quoted and cut for a message.
fn describe_driver(driver: &str) -> String {
    if driver.is_empty() {
        return "no driver (an empty file)".to_owned();
    }
    let mut shown: String = driver.chars().take(40).collect();
    if shown.len() < driver.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

/// The override files of one directory and the record of the ones this
/// service wrote. Cheap to clone; clones share one lock.
#[derive(Debug, Clone)]
pub struct BootClaims {
    dir: PathBuf,
    /// `None`: nothing is remembered, every claim reads as someone else's.
    record: Option<PathBuf>,
    /// Held by each claim and release: the record is read, changed and
    /// written whole, and two at once would lose one's entry.
    changing: Arc<Mutex<()>>,
}

impl BootClaims {
    pub fn new(dir: PathBuf, record: Option<PathBuf>) -> Self {
        BootClaims {
            dir,
            record,
            changing: Arc::default(),
        }
    }

    /// Where `address`'s override file is.
    pub fn path(&self, address: PciAddress) -> PathBuf {
        self.dir.join(file_name(address))
    }

    /// What `address`'s file says. A missing directory or file is
    /// [`BootOverride::None`].
    pub fn read(&self, address: PciAddress) -> Result<BootOverride, PersistError> {
        let Some(dir) = self.open_dir(false)? else {
            return Ok(BootOverride::None);
        };
        self.read_in(&dir, address).map(|(found, _)| found)
    }

    /// Makes `address` bound to vfio-pci at boot: writes its claim unless
    /// one is there already. Refuses a file for another driver.
    pub fn claim(&self, address: PciAddress) -> Result<Claimed, PersistError> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let dir = self.open_dir(true)?.expect("created when missing");
        match self.read_in(&dir, address)? {
            (BootOverride::None, _) => {}
            (BootOverride::Vfio { .. }, _) => return Ok(Claimed::AlreadyThere),
            (BootOverride::Other(driver), _) => return Err(self.foreign(address, driver)),
        }
        let name = file_name(address);
        let id = match self.write_new(&dir, &name) {
            Ok(id) => id,
            // Someone made it meanwhile: theirs to keep.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return match self.read_in(&dir, address)?.0 {
                    BootOverride::Other(driver) => Err(self.foreign(address, driver)),
                    _ => Ok(Claimed::AlreadyThere),
                };
            }
            Err(source) => {
                return Err(PersistError::Write {
                    path: self.path(address),
                    source,
                });
            }
        };
        if let Err(e) = self.update_record(&dir, |record| {
            record.insert(address, id);
        }) {
            // Unrecorded, it would read as someone else's: take it back.
            let _ = unlink_at(&dir, &name);
            let _ = sync_dir(&dir);
            return Err(PersistError::Record {
                address,
                path: self.record.clone().unwrap_or_default(),
                source: e,
            });
        }
        tracing::info!(device = %address, path = %self.path(address).display(), "boot-time claim written");
        Ok(Claimed::Written)
    }

    /// Removes `address`'s vfio-pci claim, whoever wrote it. Refuses a file
    /// for another driver.
    pub fn release(&self, address: PciAddress) -> Result<Released, PersistError> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(dir) = self.open_dir(false)? else {
            return Ok(Released::NoneThere);
        };
        match self.read_in(&dir, address)?.0 {
            BootOverride::None => return Ok(Released::NoneThere),
            BootOverride::Other(driver) => return Err(self.foreign(address, driver)),
            BootOverride::Vfio { .. } => {}
        }
        let removed = unlink_at(&dir, &file_name(address)).and_then(|()| sync_dir(&dir));
        if let Err(source) = removed {
            return Err(PersistError::Remove {
                path: self.path(address),
                source,
            });
        }
        // The file is gone: an entry left behind is dropped at the next
        // update (it names a file that no longer exists).
        if let Err(e) = self.update_record(&dir, |record| {
            record.remove(&address);
        }) {
            tracing::warn!(device = %address, "cannot update the boot-time claim record: {e}");
        }
        tracing::info!(device = %address, path = %self.path(address).display(), "boot-time claim removed");
        Ok(Released::Removed)
    }

    fn foreign(&self, address: PciAddress, driver: String) -> PersistError {
        PersistError::Foreign {
            address,
            path: self.path(address),
            driver,
        }
    }

    /// The directory, `None` when it does not exist (made, 0755, when
    /// `create`). A symlink in its place is refused, not followed.
    fn open_dir(&self, create: bool) -> Result<Option<OwnedFd>, PersistError> {
        let open = || {
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&self.dir)
        };
        let opened = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(DIR_MODE)
                    .create(&self.dir)
                    .map_err(|source| PersistError::Write {
                        path: self.dir.clone(),
                        source,
                    })?;
                // 0755 as driverctl's `mkdir -p` makes it, whatever the
                // umask (the service's is 0077); through the handle, never
                // the name again.
                open().and_then(|dir| {
                    dir.set_permissions(Permissions::from_mode(DIR_MODE))?;
                    Ok(dir)
                })
            }
            other => other,
        };
        match opened {
            Ok(file) => Ok(Some(OwnedFd::from(file))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                Err(PersistError::NotRegular {
                    path: self.dir.clone(),
                })
            }
            Err(source) => Err(PersistError::Read {
                path: self.dir.clone(),
                source,
            }),
        }
    }

    /// What the file says, and its identity when there is one.
    fn read_in(
        &self,
        dir: &OwnedFd,
        address: PciAddress,
    ) -> Result<(BootOverride, Option<FileId>), PersistError> {
        let path = self.path(address);
        let flags =
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
        let file = match open_at(dir, &file_name(address), flags, 0) {
            Ok(fd) => File::from(fd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((BootOverride::None, None)),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(PersistError::NotRegular { path });
            }
            Err(source) => return Err(PersistError::Read { path, source }),
        };
        let raw = match kernel_files::read_open_bounded(&file, MAX_OVERRIDE_BYTES, AtLimit::Refuse)
        {
            Ok(raw) => raw,
            Err(KernelFileError::NotRegularFile) => return Err(PersistError::NotRegular { path }),
            Err(e) => {
                return Err(PersistError::Read {
                    path,
                    source: e.into_io(),
                });
            }
        };
        let meta = file
            .metadata()
            .map_err(|source| PersistError::Read { path, source })?;
        let id = file_id(&meta);
        Ok((self.classify(address, &raw, id), Some(id)))
    }

    fn classify(&self, address: PciAddress, raw: &[u8], id: FileId) -> BootOverride {
        // As driverctl reads it (`$(< file)`): trailing newlines dropped.
        let end = raw.iter().rposition(|&b| b != b'\n').map_or(0, |i| i + 1);
        let driver = String::from_utf8_lossy(&raw[..end]);
        if driver != VFIO_DRIVER {
            return BootOverride::Other(driver.into_owned());
        }
        let ours = self.load_record().get(&address) == Some(&id);
        BootOverride::Vfio { ours }
    }

    /// Writes a new claim as `name` without replacing anything; its
    /// identity. `AlreadyExists` when the name was taken meanwhile.
    fn write_new(&self, dir: &OwnedFd, name: &str) -> io::Result<FileId> {
        let temp = format!(".{name}.vmmanager-new");
        // Left by a crash between create and rename; unlinkat removes a
        // symlink itself, never its target.
        match unlink_at(dir, &temp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let mut file = File::from(open_at(dir, &temp, flags, CLAIM_MODE)?);
        let written = (|| {
            // The service's umask (0077) would make it 0600.
            file.set_permissions(Permissions::from_mode(CLAIM_MODE))?;
            file.write_all(format!("{VFIO_DRIVER}\n").as_bytes())?;
            file.sync_all()?;
            let meta = file.metadata()?;
            rename_no_replace(dir, &temp, name)?;
            Ok(file_id(&meta))
        })();
        match written {
            Ok(id) => {
                sync_dir(dir)?;
                Ok(id)
            }
            Err(e) => {
                let _ = unlink_at(dir, &temp);
                Err(e)
            }
        }
    }

    /// What the record says; empty when there is none or it is unreadable.
    fn load_record(&self) -> BTreeMap<PciAddress, FileId> {
        let Some(path) = &self.record else {
            return BTreeMap::new();
        };
        match kernel_files::read_bounded(path, MAX_RECORD_BYTES, AtLimit::Truncate) {
            Ok(raw) => parse_record(&raw),
            Err(e) => {
                if !e.is_not_found() {
                    tracing::warn!("ignoring {}: {e}", path.display());
                }
                BTreeMap::new()
            }
        }
    }

    /// Applies `change` to the record and saves it, dropping entries whose
    /// file is gone or was replaced. Nothing to do without a record.
    fn update_record(
        &self,
        dir: &OwnedFd,
        change: impl FnOnce(&mut BTreeMap<PciAddress, FileId>),
    ) -> io::Result<()> {
        let Some(path) = &self.record else {
            return Ok(());
        };
        let mut record = self.load_record();
        record.retain(|address, id| {
            matches!(self.read_in(dir, *address), Ok((BootOverride::Vfio { .. }, Some(now))) if now == *id)
        });
        change(&mut record);
        save_record(path, &self.dir, &record)
    }
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn open_at(dir: &OwnedFd, name: &str, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    let name = c_name(name)?;
    // SAFETY: a valid directory fd and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn unlink_at(dir: &OwnedFd, name: &str) -> io::Result<()> {
    let name = c_name(name)?;
    // SAFETY: a valid directory fd and a NUL-terminated name.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn rename_no_replace(dir: &OwnedFd, from: &str, to: &str) -> io::Result<()> {
    let (from, to) = (c_name(from)?, c_name(to)?);
    let fd = dir.as_raw_fd();
    // SAFETY: valid directory fds and NUL-terminated names.
    let done =
        unsafe { libc::renameat2(fd, from.as_ptr(), fd, to.as_ptr(), libc::RENAME_NOREPLACE) };
    if done < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes a rename or unlink in `dir` durable.
fn sync_dir(dir: &OwnedFd) -> io::Result<()> {
    // SAFETY: a valid descriptor.
    if unsafe { libc::fsync(dir.as_raw_fd()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `0000:01:00.0 2049:1234:1700000000:5` lines: address, then device and
/// inode numbers and modification time (seconds, nanoseconds).
fn parse_record(raw: &[u8]) -> BTreeMap<PciAddress, FileId> {
    let text = String::from_utf8_lossy(raw);
    let mut record = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || record.len() >= MAX_RECORD_ENTRIES {
            continue;
        }
        let mut words = line.split_ascii_whitespace();
        let (Some(address), Some(id), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let Ok(address) = address.parse::<PciAddress>() else {
            continue;
        };
        let fields: Vec<&str> = id.split(':').collect();
        let [dev, ino, sec, nsec] = fields.as_slice() else {
            continue;
        };
        if let (Ok(dev), Ok(ino), Ok(sec), Ok(nsec)) =
            (dev.parse(), ino.parse(), sec.parse(), nsec.parse())
        {
            record.insert(address, (dev, ino, sec, nsec));
        }
    }
    record
}

struct RecordText<'a>(&'a Path, &'a BTreeMap<PciAddress, FileId>);

impl fmt::Display for RecordText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "# vmmanager: the boot-time claims it wrote in {} (device:inode:mtime-s:mtime-ns)",
            self.0.display()
        )?;
        for (address, (dev, ino, sec, nsec)) in self.1 {
            writeln!(f, "{address} {dev}:{ino}:{sec}:{nsec}")?;
        }
        Ok(())
    }
}

/// Replaces the record atomically (temp file, fsync, rename).
fn save_record(path: &Path, dir: &Path, record: &BTreeMap<PciAddress, FileId>) -> io::Result<()> {
    crate::atomic_file::replace(path, RecordText(dir, record).to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const A: &str = "0000:01:00.0";
    const B: &str = "0000:01:00.1";

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    struct Setup {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
        record: PathBuf,
        claims: BootClaims,
    }

    fn setup() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("driverctl.d");
        let record = tmp.path().join("state/boot-claims");
        let claims = BootClaims::new(dir.clone(), Some(record.clone()));
        Setup {
            _tmp: tmp,
            dir,
            record,
            claims,
        }
    }

    #[test]
    fn a_claim_is_exactly_what_driverctl_writes_and_reads_back_as_ours() {
        let s = setup();
        assert_eq!(s.claims.read(addr(A)).unwrap(), BootOverride::None);
        assert_eq!(s.claims.claim(addr(A)).unwrap(), Claimed::Written);
        let path = s.dir.join("pci-0000:01:00.0");
        assert_eq!(std::fs::read(&path).unwrap(), b"vfio-pci\n");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
        assert_eq!(
            std::fs::metadata(&s.dir).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        // No temp file left behind.
        let names: Vec<_> = std::fs::read_dir(&s.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["pci-0000:01:00.0"]);
        assert_eq!(
            s.claims.read(addr(A)).unwrap(),
            BootOverride::Vfio { ours: true }
        );
        assert_eq!(s.claims.claim(addr(A)).unwrap(), Claimed::AlreadyThere);
        assert_eq!(s.claims.release(addr(A)).unwrap(), Released::Removed);
        assert!(!path.exists());
        assert_eq!(s.claims.release(addr(A)).unwrap(), Released::NoneThere);
        assert_eq!(s.claims.read(addr(A)).unwrap(), BootOverride::None);
    }

    /// driverctl's own claims (same content, not in the record) are kept
    /// as they are and shown as theirs; one made again after ours was
    /// removed by driverctl is theirs too.
    #[test]
    fn driverctls_claims_are_theirs() {
        let s = setup();
        std::fs::create_dir_all(&s.dir).unwrap();
        std::fs::write(s.dir.join("pci-0000:01:00.1"), "vfio-pci\n").unwrap();
        assert_eq!(
            s.claims.read(addr(B)).unwrap(),
            BootOverride::Vfio { ours: false }
        );
        assert_eq!(s.claims.claim(addr(B)).unwrap(), Claimed::AlreadyThere);
        assert_eq!(
            s.claims.read(addr(B)).unwrap(),
            BootOverride::Vfio { ours: false }
        );

        s.claims.claim(addr(A)).unwrap();
        let path = s.dir.join("pci-0000:01:00.0");
        // `driverctl unset-override`, then `set-override … vfio-pci` (a
        // clock tick later): the new file may well get the old inode
        // number, but not its time.
        let inode = std::fs::metadata(&path).unwrap().ino();
        std::fs::remove_file(&path).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "vfio-pci\n").unwrap();
        assert_eq!(
            s.claims.read(addr(A)).unwrap(),
            BootOverride::Vfio { ours: false }
        );
        let reused = std::fs::metadata(&path).unwrap().ino() == inode;
        eprintln!("inode number reused by the new file: {reused}");

        // driverctl rewriting ours in place (`echo vfio-pci > file`).
        s.claims.release(addr(A)).unwrap();
        s.claims.claim(addr(A)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "vfio-pci\n").unwrap();
        assert_eq!(
            s.claims.read(addr(A)).unwrap(),
            BootOverride::Vfio { ours: false }
        );
    }

    #[test]
    fn another_drivers_override_is_never_replaced_nor_removed() {
        let s = setup();
        std::fs::create_dir_all(&s.dir).unwrap();
        let path = s.dir.join("pci-0000:01:00.0");
        for content in ["nvidia\n", "vfio-pci \n", "", "\n"] {
            std::fs::write(&path, content).unwrap();
            let expected = content.trim_end_matches('\n');
            assert_eq!(
                s.claims.read(addr(A)).unwrap(),
                BootOverride::Other(expected.to_owned())
            );
            for result in [
                s.claims.claim(addr(A)).map(drop),
                s.claims.release(addr(A)).map(drop),
            ] {
                match result {
                    Err(e @ PersistError::Foreign { .. }) => {
                        let message = e.to_string();
                        assert!(message.contains(&path.display().to_string()), "{message}");
                        assert!(message.contains("left as it is"), "{message}");
                    }
                    other => panic!("{content:?}: {other:?}"),
                }
            }
            assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
        }
        assert!(!s.record.exists(), "nothing was recorded");
    }

    #[test]
    fn a_symlink_or_other_non_file_is_refused_not_followed() {
        let s = setup();
        std::fs::create_dir_all(&s.dir).unwrap();
        let target = s._tmp.path().join("target");
        std::fs::write(&target, "vfio-pci\n").unwrap();
        let path = s.dir.join("pci-0000:01:00.0");
        symlink(&target, &path).unwrap();
        for result in [
            s.claims.read(addr(A)).map(drop),
            s.claims.claim(addr(A)).map(drop),
            s.claims.release(addr(A)).map(drop),
        ] {
            assert!(
                matches!(result, Err(PersistError::NotRegular { .. })),
                "{result:?}"
            );
        }
        assert!(std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "vfio-pci\n");

        // A dangling link (where a claim would be created) too.
        std::fs::remove_file(&path).unwrap();
        let nowhere = s._tmp.path().join("nowhere");
        symlink(&nowhere, &path).unwrap();
        assert!(matches!(
            s.claims.claim(addr(A)),
            Err(PersistError::NotRegular { .. })
        ));
        assert!(!nowhere.exists());

        // A directory in its place.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(matches!(
            s.claims.claim(addr(A)),
            Err(PersistError::NotRegular { .. })
        ));

        // The directory itself a symlink.
        let real = s._tmp.path().join("real.d");
        std::fs::create_dir(&real).unwrap();
        let linked = BootClaims::new(s._tmp.path().join("linked.d"), None);
        symlink(&real, s._tmp.path().join("linked.d")).unwrap();
        assert!(matches!(
            linked.claim(addr(A)),
            Err(PersistError::NotRegular { .. })
        ));
        assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);
    }

    /// A claim appears whole or not at all: the temp file is renamed into
    /// place without replacing anything, and a stale temp file from a
    /// crash (even a symlink) is cleared, never written through.
    #[test]
    fn the_write_is_atomic_and_replaces_nothing() {
        let s = setup();
        std::fs::create_dir_all(&s.dir).unwrap();
        let victim = s._tmp.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        symlink(&victim, s.dir.join(".pci-0000:01:00.0.vmmanager-new")).unwrap();
        assert_eq!(s.claims.claim(addr(A)).unwrap(), Claimed::Written);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(std::fs::read_dir(&s.dir).unwrap().count(), 1);

        // The name taken between the check and the rename: kept.
        let dir = s.claims.open_dir(false).unwrap().unwrap();
        std::fs::write(s.dir.join("pci-0000:01:00.1"), "nvidia\n").unwrap();
        let taken = s.claims.write_new(&dir, "pci-0000:01:00.1").unwrap_err();
        assert_eq!(taken.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(
            std::fs::read_to_string(s.dir.join("pci-0000:01:00.1")).unwrap(),
            "nvidia\n"
        );
        assert_eq!(
            std::fs::read_dir(&s.dir).unwrap().count(),
            2,
            "no temp file left"
        );
    }

    #[test]
    fn reads_are_bounded_and_the_record_is_tolerant() {
        let s = setup();
        std::fs::create_dir_all(&s.dir).unwrap();
        std::fs::write(s.dir.join("pci-0000:01:00.0"), "x".repeat(10_000)).unwrap();
        assert!(matches!(
            s.claims.read(addr(A)),
            Err(PersistError::Read { .. })
        ));

        let record = parse_record(
            b"# header\n0000:01:00.0 1:2:3:4\n0000:01:00.1 x:2:3:4\nbad 1:2:3:4\n\
              0000:02:00.0 1:2:3:4 5\n0000:03:00.0 1:2\n\xff\n",
        );
        assert_eq!(
            record.into_iter().collect::<Vec<_>>(),
            [(addr(A), (1, 2, 3, 4))]
        );
    }

    const CHILD_DIR: &str = "VMMANAGER_TEST_CLAIMS_DIR";

    /// Under the service's umask (its unit's UMask=0077) a claim is still
    /// 0644 and a directory made for it 0755, as driverctl's: the claim is
    /// made in a child process of this test binary with that umask (the
    /// umask is the whole process's, and other tests run beside this one).
    #[test]
    fn modes_do_not_depend_on_the_umask() {
        use std::os::unix::process::CommandExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("driverctl.d");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .args([
                "--exact",
                "devices::persistent::tests::claim_in_a_child",
                "--include-ignored",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, &dir);
        // SAFETY: umask is async-signal-safe.
        unsafe {
            child.pre_exec(|| {
                libc::umask(0o077);
                Ok(())
            });
        }
        let out = child.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o755);
        assert_eq!(mode(&dir.join("pci-0000:01:00.0")), 0o644);
    }

    #[test]
    #[ignore = "run by modes_do_not_depend_on_the_umask, in a child process with umask 0077"]
    fn claim_in_a_child() {
        let dir = std::env::var_os(CHILD_DIR).expect("run by modes_do_not_depend_on_the_umask");
        let claims = BootClaims::new(dir.into(), None);
        assert_eq!(claims.claim(addr(A)).unwrap(), Claimed::Written);
    }

    /// Claims made at once (a group's members, two callers) all end up in
    /// the record.
    #[test]
    fn claims_at_once_are_all_recorded() {
        let s = setup();
        let addresses: Vec<PciAddress> = (0..32u8)
            .map(|slot| PciAddress::new(0, 3, slot, 0).unwrap())
            .collect();
        std::thread::scope(|scope| {
            for &address in &addresses {
                let claims = s.claims.clone();
                scope.spawn(move || claims.claim(address).unwrap());
            }
        });
        for address in addresses {
            assert!(s.claims.read(address).unwrap().is_ours(), "{address}");
        }
    }

    /// Entries whose file is gone are dropped when the record is next
    /// written; a record that cannot be written takes the claim back.
    #[test]
    fn the_record_follows_the_files() {
        let s = setup();
        s.claims.claim(addr(A)).unwrap();
        s.claims.claim(addr(B)).unwrap();
        std::fs::remove_file(s.dir.join("pci-0000:01:00.0")).unwrap();
        s.claims.release(addr(B)).unwrap();
        let text = std::fs::read_to_string(&s.record).unwrap();
        assert_eq!(
            text.lines().filter(|l| !l.starts_with('#')).count(),
            0,
            "{text}"
        );

        let blocker = s._tmp.path().join("blocker");
        std::fs::write(&blocker, "").unwrap();
        let unwritable = BootClaims::new(s.dir.clone(), Some(blocker.join("boot-claims")));
        assert!(matches!(
            unwritable.claim(addr(A)),
            Err(PersistError::Record { .. })
        ));
        assert_eq!(unwritable.read(addr(A)).unwrap(), BootOverride::None);
    }
}
