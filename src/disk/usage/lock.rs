//! Probing QEMU's image lock bytes without ever taking a lock.
//!
//! QEMU's file-posix driver holds OFD read locks on byte 100 + permission
//! (permissions it holds) and 200 + permission (permissions it refuses to
//! share): 0 consistent read, 1 write, 2 write-unchanged, 3 resize. A running
//! writable VM locks 100/101/103 and 201/203; a read-only one 100, 201, 203.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
/// Permission bit 1 is "write": byte 101 locked means some holder writes.
const PERM_WRITE: i64 = 1;
const NUM_PERMS: i64 = 4;

/// What the lock bytes say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct LockState {
    /// Some other open file description holds a QEMU lock byte.
    pub locked: bool,
    /// The write-permission byte is held.
    pub writer: bool,
}

/// Probes bytes 100–103 and 200–203 with `F_OFD_GETLK`. Locks held through
/// `file`'s own open file description are invisible, which is fine: the
/// service never locks. Probe errors (e.g. a filesystem without locks) count
/// as "not locked" for that byte.
pub(super) fn probe(file: &File) -> LockState {
    let mut state = LockState::default();
    for base in [PERM_BASE, SHARED_BASE] {
        for perm in 0..NUM_PERMS {
            let offset = base + perm;
            if matches!(ofd_getlk(file.as_fd(), offset), Ok(true)) {
                state.locked = true;
                if offset == PERM_BASE + PERM_WRITE {
                    state.writer = true;
                }
            }
        }
    }
    state
}

/// Whether a write lock on the single byte at `offset` would conflict with a
/// lock held by another open file description. Never takes a lock.
fn ofd_getlk(fd: BorrowedFd<'_>, offset: i64) -> std::io::Result<bool> {
    // SAFETY: `flock` is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = offset as libc::off_t;
    fl.l_len = 1;
    fl.l_pid = 0; // required to be 0 for OFD commands
    // SAFETY: `fd` is a valid open descriptor for the duration of the call,
    // and `fl` is a valid, exclusively borrowed `flock` the kernel writes to.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::fs::OpenOptions;

    /// Takes an OFD lock on one byte through `file`'s own open file
    /// description (test helper: the service itself never locks).
    pub(crate) fn ofd_lock(file: &File, offset: i64, write: bool) {
        // SAFETY: `flock` is plain old data; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = if write { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = offset as libc::off_t;
        fl.l_len = 1;
        // SAFETY: valid fd and a valid, exclusively borrowed `flock`.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }

    fn open_pair() -> (tempfile::TempDir, File, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 1024]).unwrap();
        let holder = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let prober = File::open(&path).unwrap();
        (dir, holder, prober)
    }

    #[test]
    fn unlocked_file() {
        let (_dir, _holder, prober) = open_pair();
        assert_eq!(probe(&prober), LockState::default());
    }

    #[test]
    fn read_only_qemu_pattern() {
        let (_dir, holder, prober) = open_pair();
        for b in [100, 201, 203] {
            ofd_lock(&holder, b, false);
        }
        assert_eq!(
            probe(&prober),
            LockState {
                locked: true,
                writer: false
            }
        );
    }

    #[test]
    fn writable_qemu_pattern() {
        let (_dir, holder, prober) = open_pair();
        for b in [100, 101, 103, 201, 203] {
            ofd_lock(&holder, b, false);
        }
        assert_eq!(
            probe(&prober),
            LockState {
                locked: true,
                writer: true
            }
        );
    }

    #[test]
    fn unrelated_bytes_and_own_description_are_ignored() {
        let (_dir, holder, prober) = open_pair();
        for b in [0, 99, 104, 199, 204, 300] {
            ofd_lock(&holder, b, true);
        }
        assert_eq!(probe(&prober), LockState::default());
        // Locks through the prober's own description never conflict with it.
        let (_dir2, _holder2, prober2) = open_pair();
        ofd_lock(&prober2, 100, false);
        assert_eq!(probe(&prober2), LockState::default());
    }

    #[test]
    fn probing_takes_no_lock() {
        let (_dir, holder, prober) = open_pair();
        let _ = probe(&prober);
        // Had the probe locked anything, this exclusive lock would fail.
        for b in 100..104 {
            ofd_lock(&holder, b, true);
            ofd_lock(&holder, b + 100, true);
        }
    }
}
