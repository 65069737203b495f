//! A FUSE file system whose server never answers, for tests of work that
//! gets stuck in the kernel. Shared by the unit tests (`crate::test_support`)
//! and the integration tests (`tests/common/mod.rs` includes this file).

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Any lookup under [`DeadFuse::path`] blocks its thread (uninterruptibly,
/// bar a fatal signal) until the connection is aborted, which dropping this
/// does, panics included. What a local user gets with `fusermount` and a
/// server that just stops reading. Needs root.
pub struct DeadFuse {
    mountpoint: tempfile::TempDir,
    /// The server's end of the connection, which nobody reads.
    device: Option<std::fs::File>,
}

impl DeadFuse {
    pub fn mount() -> DeadFuse {
        let mountpoint = tempfile::tempdir().unwrap();
        let perms = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(mountpoint.path(), perms).unwrap();
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .expect("/dev/fuse (the tests run as root)");
        let target = CString::new(mountpoint.path().as_os_str().as_bytes()).unwrap();
        let options = format!(
            "fd={},rootmode=40755,user_id=0,group_id=0,allow_other",
            device.as_raw_fd()
        );
        let options = CString::new(options).unwrap();
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"vmm-dead-fuse".as_ptr(),
                target.as_ptr(),
                c"fuse".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                options.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount fuse: {}", std::io::Error::last_os_error());
        DeadFuse {
            mountpoint,
            device: Some(device),
        }
    }

    /// The mount point: every name under it hangs.
    pub fn path(&self) -> &Path {
        self.mountpoint.path()
    }
}

impl Drop for DeadFuse {
    fn drop(&mut self) {
        // Closing the server's end aborts the connection: every blocked
        // lookup fails with ENOTCONN. (Opened with O_CLOEXEC, so no child
        // keeps it.)
        drop(self.device.take());
        let target = CString::new(self.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated string that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}
