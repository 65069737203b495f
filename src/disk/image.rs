//! A caller-supplied image path, validated and opened once.
//!
//! The path comes from an unprivileged D-Bus caller, so nothing here may block
//! or touch a device, and the name is looked up exactly once (see
//! [`crate::safe_open`]): everything the service decides and does afterwards
//! (authorization, the in-use scan, qemu-img) works on the one open file.
//! The lookup runs in a [`View`]: with the caller's own permissions unless
//! polkit authorized it to act on other users' files.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::view::{View, ViewError};
use crate::safe_open::{MagicLinks, Opened, Pinned, SafeOpenError, Symlinks, open_regular};

/// Longest accepted path in bytes (PATH_MAX minus the terminating NUL).
pub const MAX_PATH_LEN: usize = 4095;

/// Longest file name (path component) in bytes: Linux's NAME_MAX. A longer
/// one is the caller's mistake, not a failed check (ENAMETOOLONG).
pub const MAX_NAME_LEN: usize = 255;

/// The length of the first component of `path` longer than [`MAX_NAME_LEN`].
pub fn over_long_name(path: &str) -> Option<usize> {
    path.split('/')
        .map(str::len)
        .find(|&len| len > MAX_NAME_LEN)
}

/// Bytes of header read for format detection; enough for every magic below.
const HEADER_LEN: usize = 512;

/// Image format, detected from the header magic (never by letting qemu-img probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Qcow2,
    Qed,
    Vdi,
    Vhdx,
    Vmdk,
    Parallels,
    Raw,
}

impl ImageFormat {
    /// The name used in reports and passed to `qemu-img -f`.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Qed => "qed",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Parallels => "parallels",
            ImageFormat::Raw => "raw",
        }
    }

    /// Detects the format from the first bytes of an image (any length; a
    /// short header simply matches fewer magics). Anything unknown is raw.
    pub fn detect(header: &[u8]) -> ImageFormat {
        const VDI_MAGIC_OFFSET: usize = 0x40;
        const VDI_MAGIC: u32 = 0xbeda_107f;
        let vdi = header
            .get(VDI_MAGIC_OFFSET..VDI_MAGIC_OFFSET + 4)
            .is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == VDI_MAGIC);

        if header.starts_with(b"QFI\xfb") {
            ImageFormat::Qcow2
        } else if header.starts_with(b"QED\0") {
            ImageFormat::Qed
        } else if header.starts_with(b"vhdxfile") {
            ImageFormat::Vhdx
        } else if header.starts_with(b"KDMV")
            || header.starts_with(b"COWD")
            || header.starts_with(b"# Disk DescriptorFile")
        {
            // KDMV: sparse extent; COWD: VMware 3 extent; text: descriptor file.
            ImageFormat::Vmdk
        } else if header.starts_with(b"WithoutFreeSpace") || header.starts_with(b"WithouFreSpacExt")
        {
            ImageFormat::Parallels
        } else if vdi {
            ImageFormat::Vdi
        } else {
            ImageFormat::Raw
        }
    }
}

/// A validated, opened image: canonical path, identity, owner, format.
#[derive(Debug)]
pub struct ImageFile {
    /// Canonical absolute path (symlinks resolved).
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub uid: u32,
    pub gid: u32,
    pub format: ImageFormat,
    /// Why qemu-img could not check this file on its own: it names other
    /// files that the service would have to open by name (see
    /// [`ImageFile::other_files`]).
    pub other_files: Option<&'static str>,
    /// Opened `O_RDONLY|O_NONBLOCK|O_NOCTTY|O_CLOEXEC`; the lock probe reads
    /// it and qemu-img inherits it.
    pub file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image path is empty")]
    Empty,
    #[error("image path must be absolute: {0:?}")]
    Relative(String),
    #[error("image path is too long ({0} bytes)")]
    TooLong(usize),
    #[error("image path has a name of {0} bytes (at most {MAX_NAME_LEN})")]
    NameTooLong(usize),
    #[error("image path contains a NUL byte")]
    ContainsNul,
    #[error("{0}: no such file")]
    NotFound(PathBuf),
    #[error("{path}: not a regular file (it is a {kind})")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{0}")]
    View(#[from] ViewError),
    /// A regular file the caller's lookup found but the caller may not
    /// read, pinned for [`ImageFile::open_pinned`].
    #[error("{}: {source}", pinned.canonical().display())]
    Unreadable {
        pinned: Box<Pinned>,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// The service's own trouble (out of descriptors or memory, credentials
    /// it could not take, a system call the lookup needs refused as missing
    /// by the kernel or a seccomp filter): it says nothing about the path,
    /// so it may be told to anyone — and must not pass for a refusal.
    pub fn is_service_fault(&self) -> bool {
        match self {
            ImageError::View(_) => true,
            ImageError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::ENOSYS)
            ),
            _ => false,
        }
    }

    /// Errors found from the text of the path alone, before touching the
    /// file system.
    pub fn is_about_the_text(&self) -> bool {
        matches!(
            self,
            ImageError::Empty
                | ImageError::Relative(_)
                | ImageError::TooLong(_)
                | ImageError::NameTooLong(_)
                | ImageError::ContainsNul
        )
    }
}

impl ImageFile {
    /// Validates `path` (absolute, non-empty, bounded, a regular file reached
    /// without opening anything that could block) and opens it with the
    /// service's own permissions.
    pub fn open(path: &str) -> Result<ImageFile, ImageError> {
        Self::open_in(path, &View::Service)
    }

    /// [`ImageFile::open`] with `view`'s permissions: a caller's view fails
    /// exactly where that caller's own `open` would. Blocking.
    pub fn open_in(path: &str, view: &View) -> Result<ImageFile, ImageError> {
        validate_path(path)?;
        let magic_links = view.magic_links();
        view.run(|| Self::open_validated(Path::new(path), magic_links))?
    }

    fn open_validated(path: &Path, magic_links: MagicLinks) -> Result<ImageFile, ImageError> {
        let opened = open_regular(path, Symlinks::Follow, magic_links).map_err(|e| match e {
            SafeOpenError::NotRegular { kind } => ImageError::NotRegular {
                path: path.to_owned(),
                kind,
            },
            SafeOpenError::Unreadable { pinned, source } => {
                ImageError::Unreadable { pinned, source }
            }
            SafeOpenError::Io(e) => io_error(path, e),
        })?;
        Self::from_opened(opened)
    }

    /// Opens, with the service's permissions, the image a caller's lookup
    /// found but could not read ([`ImageError::Unreadable`]): exactly that
    /// inode, no name looked up again. Blocking.
    pub fn open_pinned(pinned: Pinned) -> Result<ImageFile, ImageError> {
        let path = pinned.canonical().to_owned();
        Self::from_opened(pinned.open().map_err(|e| io_error(&path, e))?)
    }

    /// The user libvirt remembers as the image's owner: with
    /// `remember_owner` (its default), libvirt's dynamic ownership records
    /// the owner it found in the `trusted.libvirt.security.dac` attribute
    /// (`+UID:+GID`) when it chowns an image to `libvirt-qemu` for a
    /// running VM, and removes it when it gives the file back. Only root
    /// can write `trusted.*` attributes, so no user can forge one; only a
    /// thread with CAP_SYS_ADMIN can read them (call this as the service).
    pub fn libvirt_owner(&self) -> Option<u32> {
        let value = read_xattr(&self.file, c"trusted.libvirt.security.dac")?;
        let value = std::str::from_utf8(&value).ok()?;
        let (uid, _gid) = value.split_once(':')?;
        uid.strip_prefix('+')?.parse().ok()
    }

    fn from_opened(opened: Opened) -> Result<ImageFile, ImageError> {
        let canonical = opened.canonical;
        let header = read_header(&opened.file).map_err(|e| io_error(&canonical, e))?;
        let meta = opened.metadata;
        Ok(ImageFile {
            path: canonical,
            dev: meta.dev(),
            ino: meta.ino(),
            uid: meta.uid(),
            gid: meta.gid(),
            format: ImageFormat::detect(&header),
            other_files: other_files(&header),
            file: opened.file,
        })
    }
}

/// Whether an image's header says it depends on files named inside it that
/// qemu-img would open by name: a VMDK descriptor (its extents) or a qcow2
/// image with an external data file. Backing files do not count: qemu-img
/// never opens them here (see [`super::qemu_img`]).
fn other_files(header: &[u8]) -> Option<&'static str> {
    const QCOW2_INCOMPAT_OFFSET: usize = 72;
    const QCOW2_INCOMPAT_DATA_FILE: u64 = 1 << 2;
    if header.starts_with(b"# Disk DescriptorFile") {
        return Some("it is a VMDK descriptor file whose data is in other files (its extents)");
    }
    // A sparse VMDK with no capacity of its own but an embedded descriptor
    // is read by QEMU as a descriptor too: its extents are opened by name.
    const KDMV_CAPACITY: usize = 12;
    const KDMV_DESCRIPTOR_OFFSET: usize = 28;
    let le64 = |at: usize| {
        header
            .get(at..at + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if header.starts_with(b"KDMV") && le64(KDMV_CAPACITY) == 0 && le64(KDMV_DESCRIPTOR_OFFSET) != 0
    {
        return Some("it is a VMDK whose embedded descriptor names other files (its extents)");
    }
    if header.starts_with(b"QFI\xfb") {
        let version = header
            .get(4..8)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        let incompatible = header
            .get(QCOW2_INCOMPAT_OFFSET..QCOW2_INCOMPAT_OFFSET + 8)
            .map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
        if version >= 3 && incompatible & QCOW2_INCOMPAT_DATA_FILE != 0 {
            return Some("it is a qcow2 image whose data is in an external data file");
        }
    }
    None
}

/// Checks the text of a caller's path alone, touching no file: what is
/// wrong here may be said before any authorization.
pub fn validate_path(path: &str) -> Result<(), ImageError> {
    if path.is_empty() {
        return Err(ImageError::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(ImageError::TooLong(path.len()));
    }
    if path.contains('\0') {
        return Err(ImageError::ContainsNul);
    }
    if !path.starts_with('/') {
        return Err(ImageError::Relative(path.to_owned()));
    }
    if let Some(len) = over_long_name(path) {
        return Err(ImageError::NameTooLong(len));
    }
    Ok(())
}

/// An extended attribute of an open file, if it has one of at most 64 bytes.
fn read_xattr(file: &File, name: &std::ffi::CStr) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 64];
    // SAFETY: `name` is NUL-terminated and `buf` is writable for its length.
    let len = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let len = usize::try_from(len).ok()?;
    Some(buf[..len].to_vec())
}

fn io_error(path: &Path, source: std::io::Error) -> ImageError {
    // ENOTDIR: a path component is a file, so the image cannot exist either.
    if source.kind() == ErrorKind::NotFound || source.raw_os_error() == Some(libc::ENOTDIR) {
        ImageError::NotFound(path.to_owned())
    } else {
        ImageError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Reads up to [`HEADER_LEN`] bytes from offset 0 (short images give less).
fn read_header(file: &File) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::process::Command;

    fn path_str(p: &Path) -> &str {
        p.to_str().expect("temp paths are UTF-8")
    }

    #[test]
    fn libvirts_record_of_the_owner_is_read_only_when_well_formed() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        std::fs::write(&path, b"QFI\xfb").unwrap();
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let record = |value: &str| {
            // SAFETY: NUL-terminated path and name; `value` is readable.
            let rc = unsafe {
                libc::setxattr(
                    c_path.as_ptr(),
                    c"trusted.libvirt.security.dac".as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            // trusted.* needs CAP_SYS_ADMIN: the tests run as root.
            assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
            ImageFile::open(path_str(&path)).unwrap().libvirt_owner()
        };
        assert_eq!(
            ImageFile::open(path_str(&path)).unwrap().libvirt_owner(),
            None
        );
        assert_eq!(record("+1000:+1000"), Some(1000));
        for bad in ["1000:1000", "+1000", "+x:+1", "", &"9".repeat(80)] {
            assert_eq!(record(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rejects_bad_paths() {
        assert!(matches!(ImageFile::open(""), Err(ImageError::Empty)));
        assert!(matches!(
            ImageFile::open("disk.qcow2"),
            Err(ImageError::Relative(p)) if p == "disk.qcow2"
        ));
        assert!(matches!(
            ImageFile::open("./x"),
            Err(ImageError::Relative(_))
        ));
        let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        assert!(
            matches!(ImageFile::open(&long), Err(ImageError::TooLong(n)) if n == MAX_PATH_LEN + 1)
        );
        assert!(matches!(
            ImageFile::open("/tmp/a\0b"),
            Err(ImageError::ContainsNul)
        ));
    }

    #[test]
    fn names_longer_than_name_max_are_about_the_text() {
        let name = |n: usize| "n".repeat(n);
        let long = format!("/tmp/{}/disk.qcow2", name(MAX_NAME_LEN + 1));
        match ImageFile::open(&long) {
            Err(e @ ImageError::NameTooLong(n)) => {
                assert_eq!(n, MAX_NAME_LEN + 1);
                assert!(e.is_about_the_text());
            }
            other => panic!("expected NameTooLong, got {other:?}"),
        }
        assert_eq!(over_long_name(&format!("/{}", name(300))), Some(300));
        assert_eq!(over_long_name(&format!("/a/{}", name(MAX_NAME_LEN))), None);
        // A name of exactly NAME_MAX bytes is a name: not found, not refused.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name(MAX_NAME_LEN));
        assert!(matches!(
            ImageFile::open(path_str(&p)),
            Err(ImageError::NotFound(_))
        ));
    }

    #[test]
    fn missing_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope.qcow2");
        assert!(matches!(
            ImageFile::open(path_str(&p)),
            Err(ImageError::NotFound(_))
        ));
        // A component that is a file, not a directory.
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let p = dir.path().join("f/disk");
        assert!(matches!(
            ImageFile::open(path_str(&p)),
            Err(ImageError::NotFound(_))
        ));
        // A dangling symlink.
        let link = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("gone"), &link).unwrap();
        assert!(matches!(
            ImageFile::open(path_str(&link)),
            Err(ImageError::NotFound(_))
        ));
    }

    fn assert_not_regular(path: &Path, want: &str) {
        match ImageFile::open(path_str(path)) {
            Err(ImageError::NotRegular { kind, .. }) => assert_eq!(kind, want),
            other => panic!("{path:?}: expected NotRegular({want}), got {other:?}"),
        }
    }

    #[test]
    fn rejects_special_files_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        assert_not_regular(dir.path(), "directory");

        let fifo = dir.path().join("fifo");
        let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(status.success());
        // Opening a FIFO for reading without a writer would block forever.
        assert_not_regular(&fifo, "FIFO");

        let sock = dir.path().join("sock");
        let _listener = UnixListener::bind(&sock).unwrap();
        assert_not_regular(&sock, "socket");

        assert_not_regular(Path::new("/dev/null"), "character device");

        // A symlink to a device is resolved first and still refused.
        let link = dir.path().join("null-link");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        assert_not_regular(&link, "character device");
    }

    #[test]
    fn resolves_symlinks_and_records_identity() {
        let dir = tempfile::tempdir().unwrap();
        let real_dir = dir.path().join("real");
        std::fs::create_dir(&real_dir).unwrap();
        let img = real_dir.join("disk.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        std::os::unix::fs::symlink(&real_dir, dir.path().join("dirlink")).unwrap();
        std::os::unix::fs::symlink("real/disk.img", dir.path().join("filelink")).unwrap();

        let canonical = std::fs::canonicalize(&img).unwrap();
        let meta = std::fs::metadata(&img).unwrap();
        for p in [
            img.clone(),
            dir.path().join("dirlink/disk.img"),
            dir.path().join("filelink"),
            dir.path().join("real/../real/./disk.img"),
        ] {
            let image = ImageFile::open(path_str(&p)).unwrap();
            assert_eq!(image.path, canonical, "{p:?}");
            assert!(image.path.is_absolute());
            assert_eq!((image.dev, image.ino), (meta.dev(), meta.ino()));
            assert_eq!((image.uid, image.gid), (meta.uid(), meta.gid()));
            assert_eq!(image.format, ImageFormat::Raw);
        }
    }

    #[test]
    fn empty_and_short_files_are_raw() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(
            ImageFile::open(path_str(&empty)).unwrap().format,
            ImageFormat::Raw
        );
        let short = dir.path().join("short");
        std::fs::write(&short, b"QF").unwrap();
        assert_eq!(
            ImageFile::open(path_str(&short)).unwrap().format,
            ImageFormat::Raw
        );
    }

    #[test]
    fn images_that_name_other_files_are_recognised() {
        let kdmv = |capacity: u64, descriptor: u64| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(b"KDMV");
            h[12..20].copy_from_slice(&capacity.to_le_bytes());
            h[28..36].copy_from_slice(&descriptor.to_le_bytes());
            h
        };
        assert!(other_files(&kdmv(0, 1)).is_some());
        assert!(other_files(&kdmv(2048, 1)).is_none());
        assert!(other_files(&kdmv(0, 0)).is_none());
        assert!(other_files(b"# Disk DescriptorFile\nversion=1\n").is_some());
        let mut qcow2 = vec![0u8; 104];
        qcow2[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        assert!(other_files(&qcow2).is_none());
        qcow2[79] = 4; // incompatible feature bit 2: external data file
        assert!(other_files(&qcow2).is_some());
    }

    #[test]
    fn detect_magics() {
        let mut vdi = vec![0u8; 0x48];
        vdi[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        let cases: &[(&[u8], ImageFormat)] = &[
            (b"QFI\xfb\0\0\0\x03", ImageFormat::Qcow2),
            (b"QED\0", ImageFormat::Qed),
            (&vdi, ImageFormat::Vdi),
            (b"vhdxfile", ImageFormat::Vhdx),
            (b"KDMV\x01\0\0\0", ImageFormat::Vmdk),
            (b"COWD", ImageFormat::Vmdk),
            (b"# Disk DescriptorFile\nversion=1\n", ImageFormat::Vmdk),
            (b"WithoutFreeSpace\x02\0\0\0", ImageFormat::Parallels),
            (b"WithouFreSpacExt", ImageFormat::Parallels),
            (b"", ImageFormat::Raw),
            (b"QFI", ImageFormat::Raw),
            (b"QED", ImageFormat::Raw),
            (b"vhdxfil", ImageFormat::Raw),
            (&vdi[..0x43], ImageFormat::Raw),
            (b"\xeb\x63\x90 boot sector", ImageFormat::Raw),
        ];
        for (header, want) in cases {
            assert_eq!(ImageFormat::detect(header), *want, "{header:?}");
        }
        // The VDI magic is little-endian.
        let mut be = vec![0u8; 0x44];
        be[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_be_bytes());
        assert_eq!(ImageFormat::detect(&be), ImageFormat::Raw);
    }

    /// Every format as the real `qemu-img create` writes it.
    #[test]
    fn detects_qemu_img_created_formats() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&str, &[&str], ImageFormat)] = &[
            ("qcow2", &[], ImageFormat::Qcow2),
            ("qed", &[], ImageFormat::Qed),
            ("vdi", &[], ImageFormat::Vdi),
            ("vhdx", &[], ImageFormat::Vhdx),
            ("vmdk", &[], ImageFormat::Vmdk),
            (
                "vmdk",
                &["-o", "subformat=monolithicFlat"],
                ImageFormat::Vmdk,
            ),
            ("parallels", &[], ImageFormat::Parallels),
            ("raw", &[], ImageFormat::Raw),
        ];
        for (i, (fmt, extra, want)) in cases.iter().enumerate() {
            let img = dir.path().join(format!("img{i}.{fmt}"));
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", fmt])
                .args(*extra)
                .arg(&img)
                .arg("16M")
                .output()
                .expect("qemu-img is installed");
            assert!(
                out.status.success(),
                "qemu-img create -f {fmt}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let image = ImageFile::open(path_str(&img)).unwrap();
            assert_eq!(image.format, *want, "{fmt} {extra:?}");
            let descriptor = extra.contains(&"subformat=monolithicFlat");
            assert_eq!(image.other_files.is_some(), descriptor, "{fmt} {extra:?}");
            assert_eq!(image.format.as_str(), want.as_str());
        }
        // The flat VMDK's data extent itself is plain raw data.
        let flat = dir.path().join("img5-flat.vmdk");
        assert_eq!(
            ImageFile::open(path_str(&flat)).unwrap().format,
            ImageFormat::Raw
        );
    }
}
