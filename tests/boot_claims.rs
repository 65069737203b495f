//! Boot-time claims without the service: the package's udev rule
//! (`udev/89-vmmanager-vfio.rules`), read by udev's own rules engine, and
//! the helper it runs (`udev/vmmanager-vfio-claim`), which binds a device
//! claimed in driverctl's format as `driverctl load-override` does. (The
//! service writing the claims, and driverctl reading them: `device_dbus`.)
//!
//! The rule is evaluated by `udevadm test` against one of this machine's
//! real PCI devices, in a private mount namespace where the only rules are
//! ours (and driverctl's, when it is "installed"), so no other rule's
//! assignment can touch the device, `/etc/driverctl.d` is a temp dir, `/run`
//! an empty tmpfs, and the device's `driver_override` an empty temp file
//! bound over the real one: udevadm 252 applies ATTR assignments for real
//! (and runs PROGRAM, here the source tree's helper), but runs no RUN
//! program, it lists them. udevadm refuses a prepared tree ("outside of
//! sysfs"), hence the real device. The helper runs on a prepared tree,
//! with vfio-pci "loaded" there so it never modprobes.

use crate::common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::sysfs::FakeSysfs;
use common::udevd;
use common::util::{CmdOutput, in_private_mounts, run};

const RULE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/udev/89-vmmanager-vfio.rules");
const HELPER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/udev/");
const HELPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/udev/vmmanager-vfio-claim");
const DRIVERCTL: &str = "/usr/sbin/driverctl";
const DRIVERCTL_RULE: &str = "/usr/lib/udev/rules.d/05-driverctl.rules";

/// What udev did for one event of a real device.
#[derive(Debug, PartialEq)]
struct UdevOutcome {
    /// The `run: '…'` lines of `udevadm test`.
    runs: Vec<String>,
    /// What the rules wrote to its `driver_override` ("": nothing).
    driver_override: String,
    /// The units the event asks systemd for (`SYSTEMD_WANTS`).
    wants: Option<String>,
}

impl UdevOutcome {
    fn untouched() -> UdevOutcome {
        UdevOutcome {
            runs: vec![],
            driver_override: String::new(),
            wants: None,
        }
    }
}

/// What udev does for an `action` event of the real device `address` with
/// our rule (naming the source tree's helper), the claims in `claims`, and
/// driverctl hidden unless `driverctl` (then with its own rule too).
fn udev_event(address: &str, action: &str, claims: &Path, driverctl: bool) -> UdevOutcome {
    let rules = tempfile::tempdir().unwrap();
    let ours = fs::read_to_string(RULE)
        .unwrap()
        .replace("/usr/local/libexec/", HELPER_DIR);
    fs::write(rules.path().join("89-vmmanager-vfio.rules"), ours).unwrap();
    if driverctl {
        fs::copy(DRIVERCTL_RULE, rules.path().join("05-driverctl.rules")).unwrap();
    }
    let empty = tempfile::tempdir().unwrap();
    let written = tempfile::NamedTempFile::new().unwrap();
    let syspath = fs::canonicalize(udevd::sysfs(&address.parse().unwrap())).unwrap();
    // $1 our rules, $2 an empty dir, $3 the claims, $4 whether to hide
    // driverctl, $5 the action, $6 the device, $7 the file standing in for
    // its driver_override. A failed bind stops before udevadm runs.
    let script = r#"set -e
        mount -t tmpfs vmm-run /run
        mount --bind "$2" /usr/lib/udev/rules.d
        mount --bind "$1" /etc/udev/rules.d
        mount --bind "$3" /etc/driverctl.d
        mount --bind "$7" "$6/driver_override"
        if [ "$4" = hide ]; then mount -t tmpfs vmm-sbin /usr/sbin; fi
        exec udevadm test --action="$5" "$6""#;
    let out = run(in_private_mounts(script)
        .arg(rules.path())
        .arg(empty.path())
        .arg(claims)
        .arg(if driverctl { "show" } else { "hide" })
        .arg(action)
        .arg(&syspath)
        .arg(written.path()));
    out.expect_success("udevadm test in a private mount namespace");
    // Our rule was read, and only ours (and driverctl's).
    let all = format!("{}{}", out.stdout, out.stderr);
    let read: Vec<&str> = all
        .lines()
        .filter_map(|l| l.strip_prefix("Reading rules file: "))
        .collect();
    let mut expected = vec!["/etc/udev/rules.d/89-vmmanager-vfio.rules"];
    if driverctl {
        expected.insert(0, "/etc/udev/rules.d/05-driverctl.rules");
    }
    assert_eq!(read, expected, "{out:?}");
    UdevOutcome {
        runs: all
            .lines()
            .filter_map(|l| l.strip_prefix("run: "))
            .map(|l| l.trim_matches('\'').to_owned())
            .collect(),
        driver_override: fs::read_to_string(written.path()).unwrap(),
        wants: all
            .lines()
            .find_map(|l| l.strip_prefix("SYSTEMD_WANTS="))
            .map(str::to_owned),
    }
}

#[test]
fn the_udev_rule_overrides_a_claimed_device_and_runs_the_helper_only_without_driverctl() {
    assert!(
        Path::new(DRIVERCTL).exists() && Path::new(DRIVERCTL_RULE).exists(),
        "{DRIVERCTL} is missing: apt-get install driverctl (scripts/install-deps)"
    );
    let address = udevd::device().to_string();
    let claims = tempfile::tempdir().unwrap();
    let claim = claims.path().join(format!("pci-{address}"));
    let event = |action, driverctl| udev_event(&address, action, claims.path(), driverctl);

    // No claim: nothing.
    assert_eq!(event("add", false), UdevOutcome::untouched());
    // Claimed: the override while the rules are read, before any RUN
    // (80-drivers.rules' `kmod load` of the host driver), then the helper.
    fs::write(&claim, "vfio-pci\n").unwrap();
    let claimed = UdevOutcome {
        runs: vec![format!("{HELPER} {address}")],
        driver_override: "vfio-pci".into(),
        wants: None,
    };
    assert_eq!(event("add", false), claimed);
    // Only when the device is added (coldplug and hotplug).
    assert_eq!(event("change", false), UdevOutcome::untouched());
    // driverctl installed: its rule wants its service, which binds the
    // device after the event; ours writes the override first and runs
    // nothing.
    assert_eq!(
        event("add", true),
        UdevOutcome {
            runs: vec![],
            driver_override: "vfio-pci".into(),
            wants: Some(format!("driverctl@pci-{address}.service")),
        }
    );
    // Trailing newlines are dropped, as driverctl's $(< file) does.
    fs::write(&claim, "vfio-pci\n\n").unwrap();
    assert_eq!(event("add", false), claimed);

    // Another driver's claim (driverctl's alone), a near miss, or a
    // symlink to a claim: nothing of ours.
    for other in ["snd_hda_intel\n", "vfio-pci \n", "vfio-pci-x\n", ""] {
        fs::write(&claim, other).unwrap();
        assert_eq!(event("add", false), UdevOutcome::untouched(), "{other:?}");
    }
    let wants_only = UdevOutcome {
        wants: Some(format!("driverctl@pci-{address}.service")),
        ..UdevOutcome::untouched()
    };
    fs::write(&claim, "snd_hda_intel\n").unwrap();
    assert_eq!(event("add", true), wants_only);
    fs::remove_file(&claim).unwrap();
    let elsewhere = claims.path().join("elsewhere");
    fs::write(&elsewhere, "vfio-pci\n").unwrap();
    symlink(&elsewhere, &claim).unwrap();
    assert_eq!(event("add", false), UdevOutcome::untouched());
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
        self.run_helper(&[address])
    }

    /// The exit status of `--claimed` (the rule's PROGRAM): 0 claimed, 1 not.
    fn claimed(&self, address: &str) -> Option<i32> {
        self.run_helper(&["--claimed", address]).status.code()
    }

    fn run_helper(&self, args: &[&str]) -> CmdOutput {
        run(Command::new(HELPER)
            .args(args)
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
    // The rule's test writes nothing.
    assert_eq!(bench.claimed(DEV), Some(0));
    assert_eq!(bench.written("snd_hda_intel"), untouched());
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
    assert_eq!(bench.claimed(DEV), Some(1), "no claim");
    fs::write(bench.claim_file(), "snd_hda_intel\n").unwrap();
    bench.helper(DEV).expect_success("helper, another driver");
    assert_eq!(bench.claimed(DEV), Some(1), "another driver");
    fs::remove_file(bench.claim_file()).unwrap();
    let elsewhere = bench.claims.path().join("elsewhere");
    fs::write(&elsewhere, "vfio-pci\n").unwrap();
    symlink(&elsewhere, bench.claim_file()).unwrap();
    bench.helper(DEV).expect_success("helper, symlink");
    assert_eq!(bench.claimed(DEV), Some(1), "symlink");
    assert_eq!(bench.written("snd_hda_intel"), untouched());

    // Not an address: refused before any path is made of it.
    for bad in ["../../x", "0000:01:00.1/../x", ""] {
        let out = bench.helper(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
        assert_eq!(bench.claimed(bad), Some(2), "--claimed {bad:?}");
    }
    assert_eq!(bench.written("snd_hda_intel"), untouched());
}
