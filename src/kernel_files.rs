//! Reading kernel-provided files (/proc, /sys) safely: the one bounded read,
//! the one `/proc/PID/stat` parser and the one sysfs link-name read.
//!
//! A prepared test tree, or a hostile process, can put anything where a
//! kernel file is expected. So a read never blocks (O_NONBLOCK: a FIFO
//! cannot hang us), never follows a symlink (O_NOFOLLOW), reads only
//! regular files (every procfs and sysfs attribute is one) and never more
//! than a bound the caller names. What happens at the bound is the caller's
//! choice ([`AtLimit`]): a QEMU command line may be cut, a number must not
//! be. The service's other small untrusted files (PID files, the VFIO state
//! file) are read the same way.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// What a bounded read does with a file longer than its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtLimit {
    /// Return the first `limit` bytes: the caller only needs the start.
    Truncate,
    /// Fail with [`KernelFileError::TooLarge`]: a cut value could be misread.
    Refuse,
}

/// Why a kernel file (or link) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KernelFileError {
    /// Opening or reading failed; `NotFound` when the file is missing.
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a regular file")]
    NotRegularFile,
    #[error("larger than {limit} bytes")]
    TooLarge { limit: u64 },
    /// A link whose target's last component is empty, not UTF-8, or holds
    /// whitespace or control characters: no kernel name looks like that.
    #[error("link target {0:?} is not a name")]
    BadLinkName(String),
}

impl KernelFileError {
    /// The file (or link) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, KernelFileError::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }

    /// As an `io::Error` for callers whose errors carry one; the kinds this
    /// module adds become `InvalidData`.
    pub fn into_io(self) -> io::Error {
        match self {
            KernelFileError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// Reads at most `limit` bytes of the regular file at `path` (see the
/// module docs for the rules).
pub fn read_bounded(
    path: &Path,
    limit: u64,
    at_limit: AtLimit,
) -> Result<Vec<u8>, KernelFileError> {
    read_open_bounded(&open_regular(path)?, limit, at_limit)
}

/// Opens the regular file at `path` for reading by the module's rules,
/// for a caller that reads it piece by piece (a mount table too long to
/// hold at once).
pub fn open_regular(path: &Path) -> Result<File, KernelFileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(KernelFileError::NotRegularFile);
    }
    Ok(file)
}

/// [`read_bounded`] of a file the caller already opened (e.g. as another
/// user), from its current position.
pub fn read_open_bounded(
    file: &File,
    limit: u64,
    at_limit: AtLimit,
) -> Result<Vec<u8>, KernelFileError> {
    if !file.metadata()?.is_file() {
        return Err(KernelFileError::NotRegularFile);
    }
    // Sized for the common small file: one read fills it, one more sees
    // EOF (growing from empty costs extra reads).
    let mut buf = Vec::with_capacity(limit.saturating_add(1).min(4096) as usize);
    // One byte more tells "exactly at the bound" from "over it".
    file.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        match at_limit {
            AtLimit::Truncate => buf.truncate(limit as usize),
            AtLimit::Refuse => return Err(KernelFileError::TooLarge { limit }),
        }
    }
    Ok(buf)
}

/// The last component of a symlink's target (`../../../bus/pci/drivers/x`
/// → `x`, sysfs's `driver`, `iommu_group`, `physfn` links); the target need
/// not exist. The kernel bounds the target at PATH_MAX.
pub fn link_name(path: &Path) -> Result<String, KernelFileError> {
    let target = std::fs::read_link(path)?;
    let bad = || KernelFileError::BadLinkName(target.display().to_string());
    let name = target
        .file_name()
        .ok_or_else(bad)?
        .to_str()
        .ok_or_else(bad)?;
    if name.is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad());
    }
    Ok(name.to_owned())
}

/// `/proc/PID/stat` is one short line; the comm field is at most 64 bytes.
pub const MAX_STAT_BYTES: u64 = 4096;

/// The fields of a `/proc/PID/stat` line the service uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, `Z`, `X`, …
    pub state: u8,
    pub ppid: u32,
    pub pgrp: u32,
}

impl ProcStat {
    /// Alive for our purposes: neither a zombie nor dead.
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parses `PID (COMM) STATE PPID PGRP …`. COMM may hold spaces and `)`, so
/// the fields start after the last `)`. `None` for anything else.
pub fn parse_stat(line: &[u8]) -> Option<ProcStat> {
    let close = line.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&line[close + 1..]).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = match fields.next()?.as_bytes() {
        &[s] if s.is_ascii_alphabetic() => s,
        _ => return None,
    };
    let number = |field: Option<&str>| -> Option<u32> {
        let field = field?;
        // `str::parse` takes a leading '+'; the kernel never writes one.
        if !field.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        field.parse().ok()
    };
    let ppid = number(fields.next())?;
    let pgrp = number(fields.next())?;
    Some(ProcStat { state, ppid, pgrp })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(state: u8, ppid: u32, pgrp: u32) -> Option<ProcStat> {
        Some(ProcStat { state, ppid, pgrp })
    }

    #[test]
    fn stat_lines_with_odd_comm_names() {
        assert_eq!(parse_stat(b"42 (qemu) S 1 42 42 0 -1"), stat(b'S', 1, 42));
        assert_eq!(parse_stat(b"42 (a) b) Z 7 9 9"), stat(b'Z', 7, 9));
        assert_eq!(parse_stat(b"42 (x (y)) R 0 0 0"), stat(b'R', 0, 0));
        assert_eq!(parse_stat(b"42 (a b c) D 3 4 5\n"), stat(b'D', 3, 4));
        assert_eq!(parse_stat(b"42 () S 1 2 3"), stat(b'S', 1, 2));
        assert_eq!(parse_stat(b"42 (1 2) S 3 4 5) t 6 7 8"), stat(b't', 6, 7));
        // A comm that is not UTF-8 is before the fields: it does not matter.
        assert_eq!(parse_stat(b"42 (\xff\xfe) S 1 2 3"), stat(b'S', 1, 2));
    }

    #[test]
    fn truncated_or_garbage_stat_lines_are_none() {
        for bad in [
            &b""[..],
            b"42 (qemu",
            b"42 (qemu)",
            b"42 (qemu) S",
            b"42 (qemu) S 1",
            b"42 (qemu) 7 1 2",
            b"42 (qemu) SS 1 2",
            b"42 (qemu) S -1 2",
            b"42 (qemu) S +1 2",
            b"42 (qemu) S 1 -2",
            b"42 (qemu) S 99999999999 2",
            b"42 qemu S 1 2",
            b"42 (qemu) S 1 2\xff",
        ] {
            assert_eq!(parse_stat(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn zombies_and_dead_processes_are_not_alive() {
        assert!(stat(b'S', 1, 1).unwrap().is_alive());
        for state in [b'Z', b'X', b'x'] {
            assert!(!stat(state, 1, 1).unwrap().is_alive());
        }
    }

    #[test]
    fn bounded_read_at_and_over_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        for at_limit in [AtLimit::Truncate, AtLimit::Refuse] {
            assert_eq!(read_bounded(&path, 10, at_limit).unwrap(), b"0123456789");
            assert_eq!(read_bounded(&path, 11, at_limit).unwrap(), b"0123456789");
        }
        assert_eq!(
            read_bounded(&path, 9, AtLimit::Truncate).unwrap(),
            b"012345678"
        );
        assert!(matches!(
            read_bounded(&path, 9, AtLimit::Refuse),
            Err(KernelFileError::TooLarge { limit: 9 })
        ));
        assert!(
            read_bounded(&dir.path().join("none"), 9, AtLimit::Refuse)
                .unwrap_err()
                .is_not_found()
        );
    }

    #[test]
    fn bounded_read_refuses_a_fifo_without_blocking_and_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Without O_NONBLOCK the open waits for a writer forever.
        assert!(matches!(
            read_bounded(&fifo, 10, AtLimit::Truncate),
            Err(KernelFileError::NotRegularFile)
        ));
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let followed = read_bounded(&link, 10, AtLimit::Truncate).unwrap_err();
        assert_eq!(followed.into_io().raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn link_names() {
        let dir = tempfile::tempdir().unwrap();
        let link = |name: &str, target: &str| {
            let path = dir.path().join(name);
            std::os::unix::fs::symlink(target, &path).unwrap();
            link_name(&path)
        };
        assert_eq!(
            link("driver", "../../../bus/pci/drivers/vfio-pci").unwrap(),
            "vfio-pci"
        );
        assert_eq!(link("group", "../../kernel/iommu_groups/12").unwrap(), "12");
        for (name, target) in [("a", "../x y"), ("b", "/"), ("c", "../x\n"), ("d", "..")] {
            assert!(
                matches!(link(name, target), Err(KernelFileError::BadLinkName(_))),
                "{target:?}"
            );
        }
        assert!(
            link_name(&dir.path().join("none"))
                .unwrap_err()
                .is_not_found()
        );
    }
}
