//! The original drivers of detached devices, kept in a small file (normally
//! under /run/vmmanager) so a daemon restart does not forget them.
//!
//! One line per device: `0000:03:00.0 snd_hda_intel`, or `0000:03:00.0 -`
//! when it had no driver. Reading is bounded and skips anything else.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use crate::kernel_files::{self, AtLimit};
use vmmanager_client::PciAddress;

/// A few hundred devices at most on any host; bounds a hostile file.
const MAX_BYTES: u64 = 64 * 1024;
const MAX_ENTRIES: usize = 1024;
/// Kernel driver names are short (`snd_hda_intel`, `vfio-pci`).
const MAX_DRIVER_NAME: usize = 64;
const NO_DRIVER: &str = "-";

/// What `path` says; empty when missing or unreadable. Bad lines are skipped.
pub(super) fn load(path: &Path) -> BTreeMap<PciAddress, Option<String>> {
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
fn parse(raw: &[u8]) -> (BTreeMap<PciAddress, Option<String>>, usize) {
    let text = String::from_utf8_lossy(raw);
    let mut map = BTreeMap::new();
    let mut skipped = 0;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Some((addr, driver)) if map.len() < MAX_ENTRIES || map.contains_key(&addr) => {
                map.insert(addr, driver);
            }
            _ => skipped += 1,
        }
    }
    (map, skipped)
}

fn parse_line(line: &str) -> Option<(PciAddress, Option<String>)> {
    let mut words = line.split_ascii_whitespace();
    let addr: PciAddress = words.next()?.parse().ok()?;
    let driver = words.next()?;
    if words.next().is_some() {
        return None;
    }
    if driver == NO_DRIVER {
        return Some((addr, None));
    }
    valid_driver_name(driver).then(|| (addr, Some(driver.to_owned())))
}

/// A name that can only mean `bus/pci/drivers/<name>`: no `/`, no `..`.
fn valid_driver_name(name: &str) -> bool {
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
pub(super) fn save(path: &Path, map: &BTreeMap<PciAddress, Option<String>>) -> io::Result<()> {
    let mut text = String::from("# vmmanager: original drivers of devices detached to vfio-pci\n");
    for (addr, driver) in map {
        text.push_str(&format!(
            "{addr} {}\n",
            driver.as_deref().unwrap_or(NO_DRIVER)
        ));
    }
    crate::atomic_file::replace(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
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
            0000:04:00.0 nvidia\n";
        let (map, skipped) = parse(raw);
        assert_eq!(skipped, 5);
        assert_eq!(
            map.into_iter().collect::<Vec<_>>(),
            vec![
                (addr("0000:03:00.0"), Some("snd_hda_intel".to_owned())),
                (addr("0000:03:00.1"), None),
                (addr("0000:04:00.0"), Some("nvidia".to_owned())),
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
        map.insert(addr("0000:00:1f.3"), Some("snd_hda_intel".to_owned()));
        map.insert(addr("0000:01:00.0"), None);
        save(&path, &map).unwrap();
        assert_eq!(load(&path), map);
        save(&path, &BTreeMap::new()).unwrap();
        assert!(load(&path).is_empty());
        assert!(load(&dir.path().join("missing")).is_empty());
    }
}
