//! Boot-time claims without the service: the package's udev rule
//! (`udev/89-vmmanager-vfio.rules`), read by udev's own rules engine, and
//! the helper it runs (`udev/vmmanager-vfio-claim`), which binds a device
//! claimed in driverctl's format as `driverctl load-override` does. (The
//! service writing the claims, and driverctl reading them: `device_dbus`.)
//!
//! The rule is evaluated by `udevadm test` against one of this machine's
//! real PCI devices, read only: in a private mount namespace where the only
//! rules file is ours (so no other rule's assignment can touch the device),
//! `/etc/driverctl.d` is a temp dir and `/run` an empty tmpfs; `udevadm test`
//! runs no RUN program, it lists them. udevadm (systemd 252) refuses a
//! prepared tree ("outside of sysfs"), hence the real device. The helper
//! runs on a prepared tree, with vfio-pci "loaded" there so it never
//! modprobes.

use crate::common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::sysfs::FakeSysfs;
use common::udevd;
use common::util::{CmdOutput, in_private_mounts, run};

const RULE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/udev/89-vmmanager-vfio.rules");
const HELPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/udev/vmmanager-vfio-claim");
const DRIVERCTL: &str = "/usr/sbin/driverctl";

/// What udev runs for an `action` event of the real device `address` with
/// only our rule, the claims in `claims`, and driverctl hidden unless
/// `driverctl`: the `run: '…'` lines of `udevadm test`.
fn udev_runs(address: &str, action: &str, claims: &Path, driverctl: bool) -> Vec<String> {
    let rules = tempfile::tempdir().unwrap();
    let installed = fs::read_to_string(RULE)
        .unwrap()
        .replace("/usr/local/libexec/", "/usr/libexec/");
    fs::write(rules.path().join("89-vmmanager-vfio.rules"), installed).unwrap();
    let empty = tempfile::tempdir().unwrap();
    // $1 our rules, $2 an empty dir, $3 the claims, $4 whether to hide
    // driverctl, $5 the action, $6 the device.
    let script = r#"set -e
        mount -t tmpfs vmm-run /run
        mount --bind "$2" /usr/lib/udev/rules.d
        mount --bind "$1" /etc/udev/rules.d
        mount --bind "$3" /etc/driverctl.d
        if [ "$4" = hide ]; then mount -t tmpfs vmm-sbin /usr/sbin; fi
        exec udevadm test --action="$5" "/sys/bus/pci/devices/$6""#;
    let out = run(in_private_mounts(script)
        .arg(rules.path())
        .arg(empty.path())
        .arg(claims)
        .arg(if driverctl { "show" } else { "hide" })
        .args([action, address]));
    out.expect_success("udevadm test in a private mount namespace");
    // Our rule was read, and only ours.
    let all = format!("{}{}", out.stdout, out.stderr);
    let read: Vec<&str> = all
        .lines()
        .filter_map(|l| l.strip_prefix("Reading rules file: "))
        .collect();
    assert_eq!(
        read,
        ["/etc/udev/rules.d/89-vmmanager-vfio.rules"],
        "{out:?}"
    );
    all.lines()
        .filter_map(|l| l.strip_prefix("run: "))
        .map(|l| l.trim_matches('\'').to_owned())
        .collect()
}

#[test]
fn the_udev_rule_runs_the_helper_for_a_claim_only_without_driverctl() {
    assert!(
        Path::new(DRIVERCTL).exists(),
        "{DRIVERCTL} is missing: apt-get install driverctl (scripts/install-deps)"
    );
    let address = udevd::device().to_string();
    let claims = tempfile::tempdir().unwrap();
    let helper = format!("/usr/libexec/vmmanager-vfio-claim {address}");

    // No claim: nothing.
    assert_eq!(
        udev_runs(&address, "add", claims.path(), false),
        Vec::<String>::new()
    );
    fs::write(claims.path().join(format!("pci-{address}")), "vfio-pci\n").unwrap();
    assert_eq!(udev_runs(&address, "add", claims.path(), false), [helper]);
    // Only when the device is added (coldplug and hotplug).
    assert_eq!(
        udev_runs(&address, "change", claims.path(), false),
        Vec::<String>::new()
    );
    // driverctl's own rule and service apply the file: ours stays out.
    assert_eq!(
        udev_runs(&address, "add", claims.path(), true),
        Vec::<String>::new()
    );
}

/// A prepared tree with one device on `driver` (none: unbound) and
/// vfio-pci loaded, and a claims directory.
struct Bench {
    fs: FakeSysfs,
    claims: tempfile::TempDir,
}

const DEV: &str = "0000:01:00.1";

impl Bench {
    fn new(driver: Option<&str>) -> Bench {
        let fs = FakeSysfs::new();
        let device = fs.device(DEV, 0x10de, 0x10f8, 0x040300).iommu_group(1);
        if let Some(driver) = driver {
            device.driver(driver);
        }
        fs.driver_dir("vfio-pci");
        Bench {
            fs,
            claims: tempfile::tempdir().unwrap(),
        }
    }

    fn claim_file(&self) -> PathBuf {
        self.claims.path().join(format!("pci-{DEV}"))
    }

    fn helper(&self, address: &str) -> CmdOutput {
        run(Command::new(HELPER)
            .arg(address)
            .arg(self.fs.root())
            .arg(self.claims.path()))
    }

    /// What was written: (driver_override, the driver's unbind, drivers_probe).
    fn written(&self, driver: &str) -> (String, String, String) {
        let unbind = self.fs.driver_dir(driver).join("unbind");
        (
            self.fs.read_attr(DEV, "driver_override"),
            fs::read_to_string(unbind).unwrap(),
            fs::read_to_string(self.fs.root().join("bus/pci/drivers_probe")).unwrap(),
        )
    }
}

fn untouched() -> (String, String, String) {
    ("(null)\n".into(), String::new(), String::new())
}

#[test]
fn the_helper_binds_a_device_claimed_for_vfio_pci_and_nothing_else() {
    // Claimed: override, unbind from the kernel's pick, reprobe.
    let bench = Bench::new(Some("snd_hda_intel"));
    fs::write(bench.claim_file(), "vfio-pci\n").unwrap();
    bench.helper(DEV).expect_success("helper");
    assert_eq!(
        bench.written("snd_hda_intel"),
        ("vfio-pci".into(), DEV.into(), DEV.into())
    );

    // Unbound: no unbind, a probe.
    let bench = Bench::new(None);
    fs::write(bench.claim_file(), "vfio-pci\n").unwrap();
    bench.helper(DEV).expect_success("helper, unbound device");
    assert_eq!(
        bench.written("vfio-pci"),
        ("vfio-pci".into(), String::new(), DEV.into())
    );

    // Already on vfio-pci: the override only.
    let bench = Bench::new(Some("vfio-pci"));
    fs::write(bench.claim_file(), "vfio-pci\n").unwrap();
    bench.helper(DEV).expect_success("helper, on vfio-pci");
    assert_eq!(
        bench.written("vfio-pci"),
        ("vfio-pci".into(), String::new(), String::new())
    );

    // Another driver's file, none, or a symlink to a claim: nothing.
    let bench = Bench::new(Some("snd_hda_intel"));
    bench.helper(DEV).expect_success("helper, no claim");
    fs::write(bench.claim_file(), "snd_hda_intel\n").unwrap();
    bench.helper(DEV).expect_success("helper, another driver");
    fs::remove_file(bench.claim_file()).unwrap();
    let elsewhere = bench.claims.path().join("elsewhere");
    fs::write(&elsewhere, "vfio-pci\n").unwrap();
    symlink(&elsewhere, bench.claim_file()).unwrap();
    bench.helper(DEV).expect_success("helper, symlink");
    assert_eq!(bench.written("snd_hda_intel"), untouched());

    // Not an address: refused before any path is made of it.
    for bad in ["../../x", "0000:01:00.1/../x", ""] {
        let out = bench.helper(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
    assert_eq!(bench.written("snd_hda_intel"), untouched());
}
