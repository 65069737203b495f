//! A thread without some of root's capabilities, as under a systemd unit's
//! CapabilityBoundingSet= (or an LSM refusing what they would allow).

use std::io;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `<linux/capability.h>` numbers (libc has none).
pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_SYS_PTRACE: u32 = 19;

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Runs `work` on a new thread without `capabilities` (`CAP_*` numbers) in
/// its effective set, and returns its result. Capabilities are per thread:
/// the rest of the test process keeps them; threads `work` starts inherit
/// the reduced set.
pub fn without_capabilities<T: Send>(capabilities: &[u32], work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                drop_effective(capabilities).expect("drop the capabilities");
                work()
            })
            .join()
            .expect("the thread without capabilities panicked")
    })
}

fn drop_effective(capabilities: &[u32]) -> io::Result<()> {
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: a version-3 header and the two data structs it describes.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for &capability in capabilities {
        data[(capability / 32) as usize].effective &= !(1 << (capability % 32));
    }
    // SAFETY: as above; pid 0 is the calling thread.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
