//! Strict parsing of the `a{sv} options` every method takes: unknown keys
//! and values of the wrong type are errors, never ignored.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use zbus::{OwnedVariant, Variant};

use super::error::VmError;
use crate::disk::checker::CheckOptions;
use crate::disk::qemu_img::RepairMode;

/// Option shared by every method: do not let polkit prompt.
pub const NO_USER_INTERACTION: &str = "auth.no-user-interaction";

/// The longest `timeout-sec` a caller may ask for (a day).
const MAX_TIMEOUT_SEC: u32 = 86_400;

/// Reads options one key at a time and refuses whatever is left over.
pub struct OptionReader {
    method: &'static str,
    options: HashMap<String, OwnedVariant>,
}

impl OptionReader {
    pub fn new(method: &'static str, options: HashMap<String, OwnedVariant>) -> Self {
        OptionReader { method, options }
    }

    fn wrong_type(&self, key: &str, expected: &str, got: &Variant<'_>) -> VmError {
        VmError::InvalidArgument(format!(
            "{}: option {key:?} must be of type '{expected}', not '{}'",
            self.method,
            got.value_signature()
        ))
    }

    pub fn bool(&mut self, key: &str) -> Result<Option<bool>, VmError> {
        match self.options.remove(key) {
            None => Ok(None),
            Some(v) => match &*v {
                Variant::Bool(b) => Ok(Some(*b)),
                other => Err(self.wrong_type(key, "b", other)),
            },
        }
    }

    pub fn string(&mut self, key: &str) -> Result<Option<String>, VmError> {
        match self.options.remove(key) {
            None => Ok(None),
            Some(v) => match &*v {
                Variant::Str(s) => Ok(Some(s.as_str().to_owned())),
                other => Err(self.wrong_type(key, "s", other)),
            },
        }
    }

    pub fn u32(&mut self, key: &str) -> Result<Option<u32>, VmError> {
        match self.options.remove(key) {
            None => Ok(None),
            Some(v) => match &*v {
                Variant::U32(n) => Ok(Some(*n)),
                other => Err(self.wrong_type(key, "u", other)),
            },
        }
    }

    /// Call after reading every known key.
    pub fn finish(self) -> Result<(), VmError> {
        let mut unknown: Vec<&str> = self.options.keys().map(String::as_str).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort_unstable();
        Err(VmError::InvalidArgument(format!(
            "{}: unknown option(s): {}",
            self.method,
            unknown.join(", ")
        )))
    }
}

/// Options of CheckDisk and GetDiskUsers, validated.
#[derive(Debug, Default)]
pub struct DiskOptions {
    pub interactive: bool,
    pub check: CheckOptions,
}

fn parse_pidfile(reader: &mut OptionReader) -> Result<Option<PathBuf>, VmError> {
    let Some(pidfile) = reader.string("pidfile")? else {
        return Ok(None);
    };
    if !pidfile.starts_with('/') {
        return Err(VmError::InvalidArgument(format!(
            "option \"pidfile\" must be an absolute path, not {pidfile:?}"
        )));
    }
    if pidfile.len() > 4095 {
        return Err(VmError::InvalidArgument(
            "option \"pidfile\" is too long".into(),
        ));
    }
    Ok(Some(PathBuf::from(pidfile)))
}

pub fn parse_check_disk(options: HashMap<String, OwnedVariant>) -> Result<DiskOptions, VmError> {
    let mut reader = OptionReader::new("CheckDisk", options);
    let interactive = !reader.bool(NO_USER_INTERACTION)?.unwrap_or(false);
    let pidfile = parse_pidfile(&mut reader)?;
    let force_share = reader.bool("force-share")?.unwrap_or(false);
    let repair = match reader.string("repair")?.as_deref() {
        None => None,
        Some("leaks") => Some(RepairMode::Leaks),
        Some("all") => Some(RepairMode::All),
        Some(other) => {
            return Err(VmError::InvalidArgument(format!(
                "option \"repair\" must be \"leaks\" or \"all\", not {other:?}"
            )));
        }
    };
    let timeout = match reader.u32("timeout-sec")? {
        None => None,
        Some(n @ 1..=MAX_TIMEOUT_SEC) => Some(Duration::from_secs(n.into())),
        Some(n) => {
            return Err(VmError::InvalidArgument(format!(
                "option \"timeout-sec\" must be between 1 and {MAX_TIMEOUT_SEC}, not {n}"
            )));
        }
    };
    reader.finish()?;
    if repair.is_some() && force_share {
        return Err(VmError::InvalidArgument(
            "options \"repair\" and \"force-share\" cannot be combined: an image in use is never \
             repaired"
                .into(),
        ));
    }
    Ok(DiskOptions {
        interactive,
        check: CheckOptions {
            pidfile,
            force_share,
            repair,
            timeout,
        },
    })
}

pub fn parse_get_disk_users(
    options: HashMap<String, OwnedVariant>,
) -> Result<DiskOptions, VmError> {
    let mut reader = OptionReader::new("GetDiskUsers", options);
    let interactive = !reader.bool(NO_USER_INTERACTION)?.unwrap_or(false);
    let pidfile = parse_pidfile(&mut reader)?;
    reader.finish()?;
    Ok(DiskOptions {
        interactive,
        check: CheckOptions {
            pidfile,
            ..CheckOptions::default()
        },
    })
}

/// Methods whose only option is `auth.no-user-interaction`. Returns whether
/// polkit may prompt.
pub fn parse_interactive_only(
    method: &'static str,
    options: HashMap<String, OwnedVariant>,
) -> Result<bool, VmError> {
    let mut reader = OptionReader::new(method, options);
    let interactive = !reader.bool(NO_USER_INTERACTION)?.unwrap_or(false);
    reader.finish()?;
    Ok(interactive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::values::variant;

    fn opts(pairs: &[(&str, OwnedVariant)]) -> HashMap<String, OwnedVariant> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.try_clone().unwrap()))
            .collect()
    }

    fn invalid(r: Result<DiskOptions, VmError>) -> String {
        match r {
            Err(VmError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_all_options() {
        let o = parse_check_disk(HashMap::new()).unwrap();
        assert!(o.interactive && !o.check.force_share && o.check.repair.is_none());
        let o = parse_check_disk(opts(&[
            ("pidfile", variant("/run/vm.pid")),
            ("force-share", variant(true)),
            ("timeout-sec", variant(5u32)),
            ("auth.no-user-interaction", variant(true)),
        ]))
        .unwrap();
        assert!(!o.interactive && o.check.force_share);
        assert_eq!(o.check.timeout, Some(Duration::from_secs(5)));
        assert_eq!(
            o.check.pidfile.as_deref(),
            Some(std::path::Path::new("/run/vm.pid"))
        );
    }

    #[test]
    fn rejects_unknown_wrong_type_and_bad_values() {
        assert!(invalid(parse_check_disk(opts(&[("bogus", variant(1u32))]))).contains("bogus"));
        assert!(
            invalid(parse_check_disk(opts(&[("force-share", variant("yes"))])))
                .contains("type 'b'")
        );
        assert!(invalid(parse_check_disk(opts(&[("timeout-sec", variant(5i32))]))).contains("'u'"));
        assert!(
            invalid(parse_check_disk(opts(&[("timeout-sec", variant(0u32))]))).contains("between")
        );
        assert!(invalid(parse_check_disk(opts(&[("repair", variant("some"))]))).contains("leaks"));
        assert!(
            invalid(parse_check_disk(opts(&[("pidfile", variant("vm.pid"))]))).contains("absolute")
        );
        assert!(
            invalid(parse_check_disk(opts(&[
                ("repair", variant("leaks")),
                ("force-share", variant(true))
            ])))
            .contains("cannot be combined")
        );
        assert!(
            invalid(parse_get_disk_users(opts(&[(
                "force-share",
                variant(true)
            )])))
            .contains("unknown")
        );
    }
}
