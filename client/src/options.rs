//! Typed builders of the `a{sv} options` argument that every method takes
//! last: [`CheckDiskOptions`] for [`ManagerProxy::check_disk`],
//! [`GetDiskUsersOptions`] for [`ManagerProxy::get_disk_users`], and
//! [`AuthOptions`] for [`JobProxy::cancel`], and [`BindingOptions`] for
//! [`PciDeviceProxy::detach`] and [`PciDeviceProxy::reattach`].
//!
//! Each builds only the keys that were set, so the service's defaults apply
//! to the rest. The service answers an unknown key or a value of the wrong
//! type with [`Error::InvalidArgument`]; the builders write only known keys
//! ([`names::option`]) with the right types. The keys and values are those
//! of `dbus/org.example.VmManager1.xml`.
//!
//! ```
//! use vmmanager_client::options::{AuthOptions, CheckDiskOptions, Repair};
//!
//! let options = CheckDiskOptions::new()
//!     .pidfile("/vms/win11/win11.pid")
//!     .repair(Repair::Leaks)
//!     .timeout_sec(60)
//!     .build();
//! assert_eq!(options.len(), 3);
//!
//! // Nothing set: the service's defaults, polkit may ask for a password.
//! assert!(AuthOptions::new().build().is_empty());
//! ```
//!
//! [`ManagerProxy::check_disk`]: crate::ManagerProxy::check_disk
//! [`ManagerProxy::get_disk_users`]: crate::ManagerProxy::get_disk_users
//! [`JobProxy::cancel`]: crate::JobProxy::cancel
//! [`PciDeviceProxy::detach`]: crate::PciDeviceProxy::detach
//! [`PciDeviceProxy::reattach`]: crate::PciDeviceProxy::reattach
//! [`Error::InvalidArgument`]: crate::Error::InvalidArgument
//! [`names::option`]: crate::names::option

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use zbus::Variant;

use crate::names::option;

/// An options dictionary as the proxies' methods take it; the builders'
/// `build` makes one.
pub type Options = HashMap<&'static str, Variant<'static>>;

/// What CheckDisk's `repair` option repairs ([`CheckDiskOptions::repair`]).
///
/// Parses from and displays as the option's value, `"leaks"` or `"all"`.
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

/// Options of `Job.Cancel` (and the authorization part of
/// [`BindingOptions`]): only [`no_user_interaction`](Self::no_user_interaction).
#[derive(Debug, Clone, Default)]
pub struct AuthOptions {
    no_user_interaction: bool,
}

impl AuthOptions {
    /// No option set: polkit may ask the user for a password.
    pub fn new() -> Self {
        Self::default()
    }

    /// `auth.no-user-interaction`: do not let polkit prompt for a password;
    /// without an authorization that needs none, the call fails with
    /// [`Error::NotAuthorized`](crate::Error::NotAuthorized).
    pub fn no_user_interaction(mut self, yes: bool) -> Self {
        self.no_user_interaction = yes;
        self
    }

    /// The options dictionary, with only the keys that were set.
    pub fn build(&self) -> Options {
        with_interaction(Options::new(), self.no_user_interaction)
    }
}

/// Options of `PciDevice.Detach` and `PciDevice.Reattach`.
///
/// ```
/// use vmmanager_client::options::BindingOptions;
///
/// let options = BindingOptions::new().group(true).build();
/// assert_eq!(options.len(), 1);
/// ```
#[derive(Debug, Clone, Default)]
pub struct BindingOptions {
    auth: AuthOptions,
    group: bool,
    force: bool,
    auto_return: bool,
    persistent: bool,
}

impl BindingOptions {
    /// No option set: the device alone; polkit may ask for a password.
    pub fn new() -> Self {
        Self::default()
    }

    /// `group`: move every non-bridge endpoint of the device's IOMMU group
    /// (each given back to its own driver on Reattach); a failure midway
    /// rolls back what the call did and says so.
    pub fn group(mut self, yes: bool) -> Self {
        self.group = yes;
        self
    }

    /// `force` (Detach only): detach even though the host uses the device
    /// (the uses `HostInUse` would name); polkit asks for
    /// [`FORCE_DETACH`](crate::names::action::FORCE_DETACH) as well, with
    /// an administrator's password every time.
    pub fn force(mut self, yes: bool) -> Self {
        self.force = yes;
        self
    }

    /// `auto-return` (Detach only): give it back to its host driver once
    /// the last VM holding it exits (reset, reattach, verified; the device
    /// emits `ReturnFinished`).
    pub fn auto_return(mut self, yes: bool) -> Self {
        self.auto_return = yes;
        self
    }

    /// `persistent`: Detach also claims the device (with
    /// [`group`](Self::group), every endpoint) for vfio-pci at every boot,
    /// in driverctl's format; Reattach removes that claim.
    pub fn persistent(mut self, yes: bool) -> Self {
        self.persistent = yes;
        self
    }

    /// `auth.no-user-interaction`, as [`AuthOptions::no_user_interaction`].
    pub fn no_user_interaction(mut self, yes: bool) -> Self {
        self.auth = self.auth.no_user_interaction(yes);
        self
    }

    /// The options dictionary, with only the keys that were set.
    pub fn build(&self) -> Options {
        let mut options = self.auth.build();
        for (set, key) in [
            (self.group, option::GROUP),
            (self.force, option::FORCE),
            (self.persistent, option::PERSISTENT),
            (self.auto_return, option::AUTO_RETURN),
        ] {
            if set {
                options.insert(key, Variant::from(true));
            }
        }
        options
    }
}

/// Options of `GetDiskUsers`.
#[derive(Debug, Clone, Default)]
pub struct GetDiskUsersOptions {
    pidfile: Option<String>,
    no_user_interaction: bool,
}

impl GetDiskUsersOptions {
    /// No option set: the service finds users through /proc and QEMU's
    /// image locks only; polkit may ask for a password.
    pub fn new() -> Self {
        Self::default()
    }

    /// `pidfile`: the VM's PID file (an absolute path, at most 4095
    /// bytes), so the process it names counts as a user.
    pub fn pidfile(mut self, path: impl Into<String>) -> Self {
        self.pidfile = Some(path.into());
        self
    }

    /// `auth.no-user-interaction`: do not let polkit prompt for a password;
    /// without an authorization that needs none, the call fails with
    /// [`Error::NotAuthorized`](crate::Error::NotAuthorized).
    pub fn no_user_interaction(mut self, yes: bool) -> Self {
        self.no_user_interaction = yes;
        self
    }

    /// The options dictionary, with only the keys that were set.
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
    /// No option set: no PID file, no repair, not while in use, the
    /// service's own timeout; polkit may ask for a password.
    pub fn new() -> Self {
        Self::default()
    }

    /// `pidfile`: the VM's PID file (an absolute path, at most 4095
    /// bytes), so the process it names counts as a user.
    pub fn pidfile(mut self, path: impl Into<String>) -> Self {
        self.users = self.users.pidfile(path);
        self
    }

    /// `force-share`: check even while in use, read-only (`qemu-img check
    /// -U`); the report then says `consistent: false`. The service refuses
    /// it together with a repair.
    pub fn force_share(mut self, yes: bool) -> Self {
        self.force_share = yes;
        self
    }

    /// `repair`: repair the image; refused while it is in use. Needs the
    /// polkit action [`REPAIR_DISK`](crate::names::action::REPAIR_DISK).
    pub fn repair(mut self, what: Repair) -> Self {
        self.repair = Some(what);
        self
    }

    /// `timeout-sec`: upper bound for the whole check in seconds, waiting
    /// for a free check slot included; 1 to 86400, and the service's
    /// configured `disk.timeout-sec` caps it. A check that takes longer
    /// fails with [`Error::Timeout`](crate::Error::Timeout).
    pub fn timeout_sec(mut self, seconds: u32) -> Self {
        self.timeout_sec = Some(seconds);
        self
    }

    /// `auth.no-user-interaction`: do not let polkit prompt for a password;
    /// without an authorization that needs none, the call fails with
    /// [`Error::NotAuthorized`](crate::Error::NotAuthorized).
    pub fn no_user_interaction(mut self, yes: bool) -> Self {
        self.users = self.users.no_user_interaction(yes);
        self
    }

    /// The options dictionary, with only the keys that were set.
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
        assert!(BindingOptions::new().build().is_empty());
        let binding = BindingOptions::new()
            .group(true)
            .persistent(true)
            .no_user_interaction(true)
            .build();
        assert_eq!(binding.len(), 3);
        assert_eq!(binding[option::GROUP], Variant::from(true));
        assert_eq!(binding[option::PERSISTENT], Variant::from(true));
        assert_eq!("leaks".parse(), Ok(Repair::Leaks));
        assert!("some".parse::<Repair>().is_err());
    }
}
