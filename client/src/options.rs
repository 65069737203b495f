//! Typed builders of the `a{sv} options` argument. Each builds only the
//! keys that were set, so the service's defaults apply to the rest.
//!
//! ```
//! use vmmanager_client::options::{CheckDiskOptions, Repair};
//!
//! let options = CheckDiskOptions::new()
//!     .pidfile("/vms/win11/win11.pid")
//!     .repair(Repair::Leaks)
//!     .timeout_sec(60)
//!     .build();
//! assert_eq!(options.len(), 3);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use zbus::Variant;

use crate::names::option;

/// An options dictionary as the proxies' methods take it.
pub type Options = HashMap<&'static str, Variant<'static>>;

/// What CheckDisk's `repair` option repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Only leaked clusters: frees wasted space, never risks data.
    Leaks,
    /// Corruptions too; may lose data.
    All,
}

impl Repair {
    /// Every value, mildest first.
    pub const ALL: [Repair; 2] = [Repair::Leaks, Repair::All];

    /// The option's value: `"leaks"` or `"all"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Repair::Leaks => "leaks",
            Repair::All => "all",
        }
    }
}

impl fmt::Display for Repair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Repair {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Repair::ALL.into_iter().find(|r| r.as_str() == s).ok_or(())
    }
}

/// Adds `auth.no-user-interaction` when asked for.
fn with_interaction(mut options: Options, no_user_interaction: bool) -> Options {
    if no_user_interaction {
        options.insert(option::NO_USER_INTERACTION, Variant::from(true));
    }
    options
}

/// Options of `Job.Cancel`, `PciDevice.Detach` and `PciDevice.Reattach`.
#[derive(Debug, Clone, Default)]
pub struct AuthOptions {
    no_user_interaction: bool,
}

impl AuthOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Do not let polkit prompt for a password: fail with NotAuthorized.
    pub fn no_user_interaction(mut self, yes: bool) -> Self {
        self.no_user_interaction = yes;
        self
    }

    pub fn build(&self) -> Options {
        with_interaction(Options::new(), self.no_user_interaction)
    }
}

/// Options of `GetDiskUsers`.
#[derive(Debug, Clone, Default)]
pub struct GetDiskUsersOptions {
    pidfile: Option<String>,
    no_user_interaction: bool,
}

impl GetDiskUsersOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// The VM's PID file (an absolute path).
    pub fn pidfile(mut self, path: impl Into<String>) -> Self {
        self.pidfile = Some(path.into());
        self
    }

    /// Do not let polkit prompt for a password: fail with NotAuthorized.
    pub fn no_user_interaction(mut self, yes: bool) -> Self {
        self.no_user_interaction = yes;
        self
    }

    pub fn build(&self) -> Options {
        let mut options = Options::new();
        if let Some(pidfile) = &self.pidfile {
            options.insert(option::PIDFILE, Variant::from(pidfile.clone()));
        }
        with_interaction(options, self.no_user_interaction)
    }
}

/// Options of `CheckDisk`.
#[derive(Debug, Clone, Default)]
pub struct CheckDiskOptions {
    users: GetDiskUsersOptions,
    force_share: bool,
    repair: Option<Repair>,
    timeout_sec: Option<u32>,
}

impl CheckDiskOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// The VM's PID file (an absolute path).
    pub fn pidfile(mut self, path: impl Into<String>) -> Self {
        self.users = self.users.pidfile(path);
        self
    }

    /// Check even while in use, read-only (`qemu-img check -U`); the report
    /// then says `consistent: false`. Cannot be combined with a repair.
    pub fn force_share(mut self, yes: bool) -> Self {
        self.force_share = yes;
        self
    }

    /// Repair the image; refused while it is in use.
    pub fn repair(mut self, what: Repair) -> Self {
        self.repair = Some(what);
        self
    }

    /// Upper bound for the whole check, waiting for a slot included.
    pub fn timeout_sec(mut self, seconds: u32) -> Self {
        self.timeout_sec = Some(seconds);
        self
    }

    /// Do not let polkit prompt for a password: fail with NotAuthorized.
    pub fn no_user_interaction(mut self, yes: bool) -> Self {
        self.users = self.users.no_user_interaction(yes);
        self
    }

    pub fn build(&self) -> Options {
        let mut options = self.users.build();
        if self.force_share {
            options.insert(option::FORCE_SHARE, Variant::from(true));
        }
        if let Some(repair) = self.repair {
            options.insert(option::REPAIR, Variant::from(repair.as_str()));
        }
        if let Some(seconds) = self.timeout_sec {
            options.insert(option::TIMEOUT_SEC, Variant::from(seconds));
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_set_keys_are_built() {
        assert!(CheckDiskOptions::new().build().is_empty());
        let all = CheckDiskOptions::new()
            .pidfile("/p")
            .force_share(true)
            .repair(Repair::All)
            .timeout_sec(5)
            .no_user_interaction(true)
            .build();
        assert_eq!(all.len(), 5);
        assert_eq!(all[option::REPAIR], Variant::from("all"));
        assert_eq!(
            AuthOptions::new().no_user_interaction(true).build()[option::NO_USER_INTERACTION],
            Variant::from(true)
        );
        assert_eq!("leaks".parse(), Ok(Repair::Leaks));
        assert!("some".parse::<Repair>().is_err());
    }
}
