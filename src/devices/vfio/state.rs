//! The original drivers (and `driver_override`s) of detached devices, kept
//! in a small file (normally under /run/vmmanager) so a daemon restart does
//! not forget them.
//!
//! One line per device: `0000:03:00.0 snd_hda_intel`, or `0000:03:00.0 -`
//! when it had no driver, then ` override=pci-stub` when it had an
//! override, then ` auto-return` when it is to be given back after use
//! (` auto-return=in-use` once a VM was seen holding it).
//! A line without an override (every line of a file written before
//! overrides were kept) means none. Reading is bounded and skips
//! anything else.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use super::{Binding, ReturnMark};
use crate::kernel_files::{self, AtLimit};
use vmmanager_client::PciAddress;

/// A few hundred devices at most on any host; bounds a hostile file.
const MAX_BYTES: u64 = 64 * 1024;
const MAX_ENTRIES: usize = 1024;
/// Kernel driver names are short (`snd_hda_intel`, `vfio-pci`).
const MAX_DRIVER_NAME: usize = 64;
const NO_DRIVER: &str = "-";
const OVERRIDE: &str = "override=";
/// Last word of a device marked to be given back after use, and of one a
/// VM was seen holding since.
const AUTO_RETURN: &str = "auto-return";
const AUTO_RETURN_IN_USE: &str = "auto-return=in-use";

/// What `path` says; empty when missing or unreadable. Bad lines are skipped.
pub(super) fn load(path: &Path) -> BTreeMap<PciAddress, Binding> {
    // Cut at the bound rather than forget every device (as before; a cut
    // last line can name a wrong driver).
    let raw = match kernel_files::read_bounded(path, MAX_BYTES, AtLimit::Truncate) {
        Ok(raw) => raw,
        Err(e) => {
            if !e.is_not_found() {
                tracing::warn!("ignoring {}: {e}", path.display());
            }
            return BTreeMap::new();
        }
    };
    let (map, skipped) = parse(&raw);
    if skipped > 0 {
        tracing::warn!("{}: skipped {skipped} unreadable lines", path.display());
    }
    map
}

/// The entries and how many non-empty lines were not one.
fn parse(raw: &[u8]) -> (BTreeMap<PciAddress, Binding>, usize) {
    let text = String::from_utf8_lossy(raw);
    let mut map = BTreeMap::new();
    let mut skipped = 0;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Some((addr, binding)) if map.len() < MAX_ENTRIES || map.contains_key(&addr) => {
                map.insert(addr, binding);
            }
            _ => skipped += 1,
        }
    }
    (map, skipped)
}

fn parse_line(line: &str) -> Option<(PciAddress, Binding)> {
    let mut words = line.split_ascii_whitespace();
    let addr: PciAddress = words.next()?.parse().ok()?;
    let name = |word: &str| valid_driver_name(word).then(|| word.to_owned());
    let driver = match words.next()? {
        NO_DRIVER => None,
        word => Some(name(word)?),
    };
    let mut rest: Vec<&str> = words.collect();
    let auto_return = match rest.last() {
        Some(&AUTO_RETURN) => ReturnMark::Marked,
        Some(&AUTO_RETURN_IN_USE) => ReturnMark::InUse,
        _ => ReturnMark::Unmarked,
    };
    if auto_return.is_marked() {
        rest.pop();
    }
    let driver_override = match rest.as_slice() {
        [] => None,
        [word] => Some(name(word.strip_prefix(OVERRIDE)?)?),
        _ => return None,
    };
    Some((
        addr,
        Binding {
            driver,
            driver_override,
            auto_return,
        },
    ))
}

/// A name that can only mean `bus/pci/drivers/<name>`: no `/`, no `..`.
/// Also what a `driver_override` must look like to be kept (`none`,
/// `pci-stub`: overrides name drivers).
pub(super) fn valid_driver_name(name: &str) -> bool {
    name.len() <= MAX_DRIVER_NAME
        && name != NO_DRIVER
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'+'))
}

/// Replaces `path` atomically ([`crate::atomic_file::replace`]).
pub(super) fn save(path: &Path, map: &BTreeMap<PciAddress, Binding>) -> io::Result<()> {
    let mut text = String::from(
        "# vmmanager: original drivers (and overrides) of devices detached to vfio-pci\n",
    );
    for (addr, binding) in map {
        text.push_str(&format!(
            "{addr} {}",
            binding.driver.as_deref().unwrap_or(NO_DRIVER)
        ));
        if let Some(name) = &binding.driver_override {
            text.push_str(&format!(" {OVERRIDE}{name}"));
        }
        match binding.auto_return {
            ReturnMark::Unmarked => {}
            ReturnMark::Marked => text.push_str(&format!(" {AUTO_RETURN}")),
            ReturnMark::InUse => text.push_str(&format!(" {AUTO_RETURN_IN_USE}")),
        }
        text.push('\n');
    }
    crate::atomic_file::replace(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn binding(driver: Option<&str>, driver_override: Option<&str>) -> Binding {
        Binding {
            auto_return: ReturnMark::Unmarked,
            driver: driver.map(str::to_owned),
            driver_override: driver_override.map(str::to_owned),
        }
    }

    #[test]
    fn driver_names() {
        for ok in [
            "snd_hda_intel",
            "vfio-pci",
            "nvidia",
            "ehci-pci",
            "i801_smbus",
            "a.b",
        ] {
            assert!(valid_driver_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-",
            ".",
            "..",
            "../x",
            "a/b",
            "-x",
            ".hidden",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(!valid_driver_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn garbage_is_skipped() {
        let raw = b"# header\n\
            0000:03:00.0 snd_hda_intel\n\
            0000:03:00.1 -\n\
            0000:03:00.2 ../../../../etc\n\
            0000:03:00.3\n\
            0000:03:00.4 a b\n\
            ../x nvidia\n\
            \xff\xfe garbage\n\
            \n\
            0000:04:00.0 nvidia\n\
            0000:05:00.0 igb override=../../x\n\
            0000:05:00.1 igb pci-stub\n\
            0000:05:00.2 igb override=-\n\
            0000:05:00.3 igb override=none x\n\
            0000:06:00.0 igb override=pci-stub\n\
            0000:06:00.1 - override=none\n\
            0000:07:00.0 igb auto-return=later\n\
            0000:07:00.1 igb auto-return in-use\n";
        let (map, skipped) = parse(raw);
        assert_eq!(skipped, 11);
        assert_eq!(
            map.into_iter().collect::<Vec<_>>(),
            vec![
                (addr("0000:03:00.0"), binding(Some("snd_hda_intel"), None)),
                (addr("0000:03:00.1"), binding(None, None)),
                (addr("0000:04:00.0"), binding(Some("nvidia"), None)),
                (addr("0000:06:00.0"), binding(Some("igb"), Some("pci-stub"))),
                (addr("0000:06:00.1"), binding(None, Some("none"))),
            ]
        );
        assert_eq!(parse(&[0u8; 1000]).0.len(), 0);
    }

    #[test]
    fn entries_are_bounded() {
        let mut raw = String::new();
        for bus in 0..=255u32 {
            for slot in 0..8u32 {
                raw.push_str(&format!("0000:{bus:02x}:{slot:02x}.0 x\n"));
            }
        }
        let (map, skipped) = parse(raw.as_bytes());
        assert_eq!(map.len(), MAX_ENTRIES);
        assert_eq!(skipped, 256 * 8 - MAX_ENTRIES);
    }

    #[test]
    fn save_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/vmmanager/vfio-drivers");
        let mut map = BTreeMap::new();
        map.insert(addr("0000:00:1f.3"), binding(Some("snd_hda_intel"), None));
        map.insert(addr("0000:01:00.0"), binding(None, None));
        map.insert(addr("0000:02:00.0"), binding(Some("igb"), Some("pci-stub")));
        map.insert(addr("0000:02:00.1"), binding(None, Some("none")));
        for (address, mark) in [
            ("0000:03:00.0", ReturnMark::Marked),
            ("0000:03:00.1", ReturnMark::InUse),
        ] {
            let mut marked = binding(Some("e1000e"), Some("pci-stub"));
            marked.auto_return = mark;
            map.insert(addr(address), marked);
        }
        save(&path, &map).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("0000:03:00.1 e1000e override=pci-stub auto-return=in-use\n"),
            "{text}"
        );
        assert_eq!(load(&path), map);
        save(&path, &BTreeMap::new()).unwrap();
        assert!(load(&path).is_empty());
        assert!(load(&dir.path().join("missing")).is_empty());
    }

    /// A file from before overrides were kept, byte for byte as that
    /// version's `save` wrote it: every entry loads, with no override.
    #[test]
    fn a_file_without_overrides_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vfio-drivers");
        std::fs::write(
            &path,
            "# vmmanager: original drivers of devices detached to vfio-pci\n\
             0000:00:1f.3 snd_hda_intel\n\
             0000:01:00.0 -\n",
        )
        .unwrap();
        assert_eq!(
            load(&path).into_iter().collect::<Vec<_>>(),
            [
                (addr("0000:00:1f.3"), binding(Some("snd_hda_intel"), None)),
                (addr("0000:01:00.0"), binding(None, None)),
            ]
        );
    }
}
