//! Who qemu-img runs as: the passwd/group lookup, and the credential switch
//! done in the forked child before exec.

use std::ffi::{CStr, c_char, c_int};
use std::io;

use tokio::process::Command;

use super::RunAs;

/// gid for a uid that has no passwd entry (`nogroup` on Debian).
const FALLBACK_GID: u32 = 65534;
/// Upper bound for the passwd entry buffer (entries are a few hundred bytes).
const MAX_PASSWD_BUF: usize = 1 << 20;
/// Linux's NGROUPS_MAX.
const MAX_GROUPS: usize = 65536;

#[derive(Debug, thiserror::Error)]
pub enum UserLookupError {
    #[error("cannot look up the passwd entry of uid {uid}: {source}")]
    Passwd {
        uid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot list the groups of uid {uid}: {reason}")]
    Groups { uid: u32, reason: String },
}

/// See [`RunAs::for_user`] and [`RunAs::for_user_with_groups`]: `known_groups`,
/// when given, are the groups, and the group database is not asked.
pub(super) fn lookup(uid: u32, known_groups: Option<Vec<u32>>) -> Result<RunAs, UserLookupError> {
    let mut buf: Vec<c_char> = vec![0; 1024];
    loop {
        // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids); it is
        // only read after getpwuid_r filled it.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `entry`, `buf` and `found` are valid for writes for the
        // given length; the strings in `entry` point into `buf`, which
        // outlives every use below.
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut found) };
        match rc {
            // Some NSS modules report "no such user" as an error.
            0 | libc::ENOENT | libc::ESRCH if found.is_null() => {
                return Ok(RunAs {
                    uid,
                    gid: FALLBACK_GID,
                    groups: known_groups.unwrap_or_default(),
                });
            }
            0 => {
                let groups = match known_groups {
                    Some(groups) => groups,
                    None => {
                        // SAFETY: on success `pw_name` is a NUL-terminated
                        // string in `buf`.
                        let name = unsafe { CStr::from_ptr(entry.pw_name) };
                        group_list(uid, name, entry.pw_gid)?
                    }
                };
                return Ok(RunAs {
                    uid,
                    gid: entry.pw_gid,
                    groups,
                });
            }
            libc::ERANGE if buf.len() < MAX_PASSWD_BUF => buf.resize(buf.len() * 2, 0),
            code => {
                return Err(UserLookupError::Passwd {
                    uid,
                    source: io::Error::from_raw_os_error(code),
                });
            }
        }
    }
}

/// Every group `name` is in, `gid` included.
fn group_list(uid: u32, name: &CStr, gid: u32) -> Result<Vec<u32>, UserLookupError> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut count = c_int::try_from(groups.len()).unwrap_or(c_int::MAX);
        // SAFETY: `name` is NUL-terminated; `groups` has room for `count`
        // entries; `count` is valid for writes.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        let count = usize::try_from(count).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        // -1: too small; `count` is the size needed (glibc).
        let wanted = count.max(groups.len() * 2);
        if wanted > MAX_GROUPS {
            return Err(UserLookupError::Groups {
                uid,
                reason: format!("more than {MAX_GROUPS} groups"),
            });
        }
        groups.resize(wanted, 0);
    }
}

/// What the child does between fork and exec.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct CredentialSwitch {
    /// None: keep the service's own credentials (non-root development run as
    /// the very uid requested).
    target: Option<RunAs>,
}

impl CredentialSwitch {
    /// Root switches to `run_as`, always. A non-root service can only run
    /// qemu-img as itself; asking for anyone else is refused rather than
    /// silently running with the wrong credentials.
    pub(super) fn plan(run_as: &RunAs) -> io::Result<CredentialSwitch> {
        // SAFETY: geteuid cannot fail and touches no memory.
        let euid = unsafe { libc::geteuid() };
        Self::plan_for(euid, run_as)
    }

    fn plan_for(euid: u32, run_as: &RunAs) -> io::Result<CredentialSwitch> {
        if euid == 0 {
            Ok(CredentialSwitch {
                target: Some(run_as.clone()),
            })
        } else if run_as.uid == euid {
            Ok(CredentialSwitch { target: None })
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the service runs as uid {euid}, not root, and cannot run qemu-img as uid {}",
                    run_as.uid
                ),
            ))
        }
    }

    /// Installs the `pre_exec` hook. std runs hooks after its own uid/gid
    /// handling, so the whole switch happens here, in the only safe order:
    /// groups and gid while still root, uid last. The death signal is set after
    /// setuid because changing credentials clears it. The death signal follows
    /// the forking *thread*, which is the spawner thread of
    /// [`QemuImgChildren`](super::QemuImgChildren): it outlives every
    /// qemu-img it forked, so this is a backstop for a crashed service, not
    /// the normal way qemu-img dies.
    pub(super) fn install(self, command: &mut Command) {
        // Prepared before fork: the hook must not allocate.
        let target = self.target.map(|r| {
            (
                r.uid,
                r.gid,
                r.groups.into_iter().collect::<Vec<libc::gid_t>>(),
            )
        });
        let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
        let hook = move || -> io::Result<()> {
            if let Some((uid, gid, groups)) = &target {
                // SAFETY: async-signal-safe syscalls; `groups` is valid for
                // `groups.len()` reads (an empty Vec's pointer is never read).
                unsafe {
                    if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(*gid) != 0
                        || libc::setuid(*uid) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            // SAFETY: async-signal-safe syscalls without memory arguments.
            unsafe {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The service died before the prctl: the signal will never come.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
            }
            Ok(())
        };
        // SAFETY: the hook only makes async-signal-safe syscalls and builds
        // io::Errors from OS codes, which does not allocate.
        unsafe {
            command.pre_exec(hook);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The test process's own credentials.
    pub(in super::super) fn current() -> RunAs {
        // SAFETY: these calls cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        RunAs {
            uid,
            gid,
            groups: vec![],
        }
    }

    fn nobody() -> RunAs {
        RunAs {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        }
    }

    #[test]
    fn root_always_switches() {
        let plan = CredentialSwitch::plan_for(0, &nobody()).unwrap();
        assert_eq!(plan.target, Some(nobody()));
        let root = RunAs {
            uid: 0,
            gid: 0,
            groups: vec![],
        };
        let plan = CredentialSwitch::plan_for(0, &root).unwrap();
        assert_eq!(plan.target, Some(root));
    }

    #[test]
    fn non_root_runs_as_itself_only() {
        let me = RunAs {
            uid: 1000,
            gid: 1000,
            groups: vec![],
        };
        assert_eq!(
            CredentialSwitch::plan_for(1000, &me).unwrap(),
            CredentialSwitch { target: None }
        );
        let err = CredentialSwitch::plan_for(1000, &nobody()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("uid 65534"), "{err}");
    }

    #[test]
    fn lookup_root() {
        let root = lookup(0, None).unwrap();
        assert_eq!(root.uid, 0);
        assert_eq!(root.gid, 0);
        assert!(root.groups.contains(&0), "{root:?}");
    }

    #[test]
    fn known_groups_replace_the_group_database() {
        assert_eq!(lookup(0, Some(vec![7, 8])).unwrap().groups, [7, 8]);
        assert_eq!(lookup(0, Some(vec![])).unwrap().groups, [] as [u32; 0]);
        let unknown = lookup(3_999_999_999, Some(vec![9])).unwrap();
        assert_eq!((unknown.gid, unknown.groups), (FALLBACK_GID, vec![9]));
    }

    #[test]
    fn lookup_unknown_uid_falls_back_to_nogroup() {
        // Far above any allocated uid range.
        let r = lookup(3_999_999_999, None).unwrap();
        assert_eq!(
            r,
            RunAs {
                uid: 3_999_999_999,
                gid: FALLBACK_GID,
                groups: vec![]
            }
        );
    }

    #[test]
    fn lookup_matches_id_command() {
        // Compare with `id` for the users this host has.
        for name in ["root", "nobody"] {
            let id = |flag: &str| {
                let out = std::process::Command::new("id")
                    .args([flag, name])
                    .output()
                    .unwrap();
                String::from_utf8(out.stdout).unwrap()
            };
            let Ok(uid) = id("-u").trim().parse::<u32>() else {
                continue;
            };
            let gid: u32 = id("-g").trim().parse().unwrap();
            let mut groups: Vec<u32> = id("-G")
                .split_whitespace()
                .map(|g| g.parse().unwrap())
                .collect();
            groups.sort_unstable();
            let mut r = lookup(uid, None).unwrap();
            r.groups.sort_unstable();
            r.groups.dedup();
            assert_eq!((r.uid, r.gid, r.groups), (uid, gid, groups), "{name}");
        }
    }
}
