//! Strict parsing of the `a{sv} options` every method takes: unknown keys
//! and values of the wrong type are errors, never ignored.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use zbus::{OwnedVariant, Variant};

use super::error::VmError;
use crate::disk::checker::CheckOptions;
use crate::disk::image::{MAX_NAME_LEN, MAX_PATH_LEN, over_long_name};
use crate::disk::qemu_img::RepairMode;

use vmmanager_client::names::option::{
    AUTO_RETURN, FORCE, FORCE_SHARE, GROUP, NO_USER_INTERACTION, PERSISTENT, PIDFILE, REPAIR,
    TIMEOUT_SEC,
};
use vmmanager_client::options::Repair;

/// The longest `timeout-sec` a caller may ask for (a day).
const MAX_TIMEOUT_SEC: u32 = 86_400;

/// Most keys an options dictionary may have. No method knows more than five;
/// anything far beyond that is refused whole, before authorization, so a
/// caller cannot make the service build (and send back) a huge answer.
pub const MAX_OPTION_KEYS: usize = 16;

/// Longest option key in bytes (the longest real one has 24).
pub const MAX_OPTION_KEY_LEN: usize = 64;

/// Most bytes of a caller's text an error message quotes, so an answer stays
/// short however long the text was.
const MAX_QUOTED_LEN: usize = 40;

/// `text` quoted and escaped for an error message, cut after about
/// [`MAX_QUOTED_LEN`] bytes (marked with `…`).
fn quote(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        let escaped = c.escape_debug().to_string();
        if out.len() + escaped.len() > MAX_QUOTED_LEN {
            out.push_str("\"…");
            return out;
        }
        out.push_str(&escaped);
    }
    out.push('"');
    out
}

/// Reads options one key at a time and refuses whatever is left over.
pub struct OptionReader {
    method: &'static str,
    options: HashMap<String, OwnedVariant>,
}

impl OptionReader {
    /// Refuses a dictionary with too many or too long keys before anything
    /// else looks at it; the message names neither keys nor values.
    pub fn new(
        method: &'static str,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<Self, VmError> {
        if options.len() > MAX_OPTION_KEYS {
            return Err(VmError::InvalidArgument(format!(
                "{method}: too many options ({}; at most {MAX_OPTION_KEYS})",
                options.len()
            )));
        }
        if options.keys().any(|k| k.len() > MAX_OPTION_KEY_LEN) {
            return Err(VmError::InvalidArgument(format!(
                "{method}: an option name is longer than {MAX_OPTION_KEY_LEN} bytes"
            )));
        }
        Ok(OptionReader { method, options })
    }

    fn wrong_type(&self, key: &str, expected: &str, got: &Variant<'_>) -> VmError {
        VmError::InvalidArgument(format!(
            "{}: option {key:?} must be of type '{expected}', not {}",
            self.method,
            quote(got.value_signature().to_string().as_str())
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
        // Few and short (see `new`), so they may be named.
        let mut unknown: Vec<String> = self.options.keys().map(|k| quote(k)).collect();
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
    let Some(pidfile) = reader.string(PIDFILE)? else {
        return Ok(None);
    };
    if pidfile.len() > MAX_PATH_LEN {
        return Err(VmError::InvalidArgument(format!(
            "option \"pidfile\" is too long ({} bytes; at most {MAX_PATH_LEN})",
            pidfile.len()
        )));
    }
    if let Some(len) = over_long_name(&pidfile) {
        return Err(VmError::InvalidArgument(format!(
            "option \"pidfile\" has a name of {len} bytes (at most {MAX_NAME_LEN})"
        )));
    }
    if !pidfile.starts_with('/') {
        return Err(VmError::InvalidArgument(format!(
            "option \"pidfile\" must be an absolute path, not {}",
            quote(&pidfile)
        )));
    }
    Ok(Some(PathBuf::from(pidfile)))
}

pub fn parse_check_disk(options: HashMap<String, OwnedVariant>) -> Result<DiskOptions, VmError> {
    let mut reader = OptionReader::new("CheckDisk", options)?;
    let interactive = !reader.bool(NO_USER_INTERACTION)?.unwrap_or(false);
    let pidfile = parse_pidfile(&mut reader)?;
    let force_share = reader.bool(FORCE_SHARE)?.unwrap_or(false);
    let repair = match reader.string(REPAIR)? {
        None => None,
        Some(text) => match text.parse() {
            Ok(Repair::Leaks) => Some(RepairMode::Leaks),
            Ok(Repair::All) => Some(RepairMode::All),
            Err(()) => {
                return Err(VmError::InvalidArgument(format!(
                    "option \"repair\" must be \"leaks\" or \"all\", not {}",
                    quote(&text)
                )));
            }
        },
    };
    let timeout = match reader.u32(TIMEOUT_SEC)? {
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
    let mut reader = OptionReader::new("GetDiskUsers", options)?;
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
    let mut reader = OptionReader::new(method, options)?;
    let interactive = !reader.bool(NO_USER_INTERACTION)?.unwrap_or(false);
    reader.finish()?;
    Ok(interactive)
}

/// Options of PciDevice.Detach and Reattach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingOptions {
    pub interactive: bool,
    /// `group`: the whole IOMMU group, not the device alone.
    pub group: bool,
    /// `force` (Detach only): detach although the host uses it.
    pub force: bool,
    /// `auto-return` (Detach only): give it back after its last VM user.
    pub auto_return: bool,
    /// `persistent`: the boot-time claim follows the move.
    pub persistent: bool,
}

pub fn parse_binding(
    method: &'static str,
    options: HashMap<String, OwnedVariant>,
) -> Result<BindingOptions, VmError> {
    let mut reader = OptionReader::new(method, options)?;
    let interactive = !reader.bool(NO_USER_INTERACTION)?.unwrap_or(false);
    let group = reader.bool(GROUP)?.unwrap_or(false);
    // Reattach has no `force`: left in the dictionary, `finish` refuses it
    // as unknown there.
    let detach_only = |reader: &mut OptionReader, key| -> Result<bool, VmError> {
        match method {
            "Detach" => Ok(reader.bool(key)?.unwrap_or(false)),
            _ => Ok(false),
        }
    };
    let force = detach_only(&mut reader, FORCE)?;
    let auto_return = detach_only(&mut reader, AUTO_RETURN)?;
    let persistent = reader.bool(PERSISTENT)?.unwrap_or(false);
    reader.finish()?;
    Ok(BindingOptions {
        interactive,
        group,
        force,
        auto_return,
        persistent,
    })
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

    fn many(n: usize, key_len: usize) -> HashMap<String, OwnedVariant> {
        (0..n)
            .map(|i| (format!("{i:0key_len$}"), variant(true)))
            .collect()
    }

    #[test]
    fn absurd_dictionaries_are_refused_without_echo() {
        let too_many = invalid(parse_check_disk(many(MAX_OPTION_KEYS + 1, 8)));
        assert!(
            too_many.contains("too many options (17; at most 16)"),
            "{too_many}"
        );
        let flood = invalid(parse_get_disk_users(many(20_000, 12)));
        assert!(flood.len() < 100 && !flood.contains("000000"), "{flood}");
        let long_key = invalid(parse_check_disk(many(1, MAX_OPTION_KEY_LEN + 1)));
        assert!(long_key.contains("longer than 64 bytes"), "{long_key}");
        assert!(!long_key.contains("000000"), "{long_key}");
        // The limits come before any other check, for every method.
        let mut mixed = many(MAX_OPTION_KEYS, 8);
        mixed.insert(NO_USER_INTERACTION.into(), variant("not a bool"));
        assert!(invalid(parse_check_disk(mixed)).contains("too many"));
        match parse_interactive_only("Cancel", many(MAX_OPTION_KEYS + 1, 8)) {
            Err(VmError::InvalidArgument(m)) => assert!(m.starts_with("Cancel: too many")),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
        // Up to the limits, unknown keys are still named, escaped.
        let named = invalid(parse_check_disk(many(MAX_OPTION_KEYS, MAX_OPTION_KEY_LEN)));
        assert!(named.contains("unknown option(s)"), "{named}");
        let odd = invalid(parse_check_disk(opts(&[("a\"b\nc", variant(true))])));
        assert!(odd.ends_with(r#"unknown option(s): "a\"b\nc""#), "{odd}");
    }

    #[test]
    fn binding_options() {
        assert_eq!(
            parse_binding("Detach", HashMap::new()).unwrap(),
            BindingOptions {
                interactive: true,
                group: false,
                force: false,
                auto_return: false,
                persistent: false,
            }
        );
        let all = opts(&[
            (GROUP, variant(true)),
            (NO_USER_INTERACTION, variant(true)),
            (FORCE, variant(true)),
            (AUTO_RETURN, variant(true)),
            (PERSISTENT, variant(true)),
        ]);
        assert_eq!(
            parse_binding("Detach", all).unwrap(),
            BindingOptions {
                interactive: false,
                group: true,
                force: true,
                auto_return: true,
                persistent: true,
            }
        );
        assert!(
            parse_binding("Reattach", opts(&[(PERSISTENT, variant(true))]))
                .unwrap()
                .persistent
        );
        // Reattach has nothing to force.
        match parse_binding("Reattach", opts(&[(FORCE, variant(true))])) {
            Err(VmError::InvalidArgument(m)) => {
                assert!(m.ends_with("unknown option(s): \"force\""), "{m}")
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
        match parse_binding("Reattach", opts(&[(GROUP, variant("yes"))])) {
            Err(VmError::InvalidArgument(m)) => assert!(m.contains("\"group\""), "{m}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn echoed_values_are_bounded_and_escaped() {
        // The relative pidfile is quoted; the huge one only measured.
        for n in [300, 10_000] {
            let long = "\u{1b}[31m".repeat(n);
            for key in ["repair", "pidfile"] {
                let m = invalid(parse_check_disk(opts(&[(key, variant(long.as_str()))])));
                assert!(m.len() < 150, "{key}: {m}");
                assert!(!m.contains('\u{1b}'), "{key}: {m}");
            }
        }
        assert_eq!(quote("leaks"), "\"leaks\"");
        assert_eq!(quote("a\"\n"), r#""a\"\n""#);
        let cut = quote(&"é".repeat(100));
        assert!(
            cut.ends_with("\"…") && cut.len() <= MAX_QUOTED_LEN + 4,
            "{cut}"
        );
    }

    #[test]
    fn pidfile_names_longer_than_name_max_are_refused() {
        let pidfile = |name_len: usize| format!("/run/{}", "p".repeat(name_len));
        let m = invalid(parse_check_disk(opts(&[(
            "pidfile",
            variant(pidfile(MAX_NAME_LEN + 1).as_str()),
        )])));
        assert!(m.contains("name of 256 bytes (at most 255)"), "{m}");
        let ok = parse_get_disk_users(opts(&[(
            "pidfile",
            variant(pidfile(MAX_NAME_LEN).as_str()),
        )]))
        .unwrap();
        assert_eq!(ok.check.pidfile, Some(PathBuf::from(pidfile(MAX_NAME_LEN))));
        let m = invalid(parse_check_disk(opts(&[(
            "pidfile",
            variant(format!("/{}", "a/".repeat(2100)).as_str()),
        )])));
        assert!(m.contains("too long (4201 bytes; at most 4095)"), "{m}");
    }
}
