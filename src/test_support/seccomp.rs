//! A thread where some system calls fail, as under a systemd unit's
//! seccomp filter (`RestrictSUIDSGID=` answers ENOSYS for `openat2`).

use std::io;

/// Runs `work` on a new thread whose calls to `syscalls` fail with `errno`,
/// and returns its result. The filter holds for that thread and the threads
/// it starts (a [`crate::disk::view::View`]'s lookup thread), never for the
/// rest of the test process.
pub fn with_failing_syscalls<T: Send>(
    syscalls: &[libc::c_long],
    errno: libc::c_int,
    work: impl FnOnce() -> T + Send,
) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                install_filter(syscalls, errno).expect("install the seccomp filter");
                work()
            })
            .join()
            .expect("the filtered thread panicked")
    })
}

/// A filter on the calling thread only (no TSYNC): `syscalls` fail with
/// `errno`, everything else is allowed. No architecture check: the thread
/// makes only native calls.
fn install_filter(syscalls: &[libc::c_long], errno: libc::c_int) -> io::Result<()> {
    const SYSCALL_NR: u32 = 0; // offsetof(struct seccomp_data, nr)
    let as_k = |value: i64| u32::try_from(value).expect("fits a BPF constant");
    let fail = libc::SECCOMP_RET_ERRNO | (as_k(errno.into()) & libc::SECCOMP_RET_DATA);
    let mut program = Vec::new();
    // SAFETY (all BPF_STMT/BPF_JUMP): they only build instructions.
    program.push(unsafe {
        libc::BPF_STMT(
            (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            SYSCALL_NR,
        )
    });
    for &nr in syscalls {
        // Equal: fall through to the refusal below; else skip it.
        program.push(unsafe {
            libc::BPF_JUMP(
                (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                as_k(nr),
                0,
                1,
            )
        });
        program.push(unsafe { libc::BPF_STMT((libc::BPF_RET | libc::BPF_K) as u16, fail) });
    }
    program.push(unsafe {
        libc::BPF_STMT(
            (libc::BPF_RET | libc::BPF_K) as u16,
            libc::SECCOMP_RET_ALLOW,
        )
    });
    let fprog = libc::sock_fprog {
        len: u16::try_from(program.len()).expect("a short program"),
        filter: program.as_mut_ptr(),
    };
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: prctl with integer arguments; no_new_privs only stops this
    // thread's (and its children's) execs from gaining privileges.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    // SAFETY: `fprog` points at `program`, alive for the call; the kernel copies it.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
        )
    })
}
