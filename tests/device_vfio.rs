//! Detach/reattach against prepared sysfs trees (never the real /sys: an
//! unbind there could take this machine's disk or network away), and VFIO
//! group users with real processes holding stand-in group nodes.
//!
//! `FakeKernel` (`common::fake_kernel`) records every write and plays the
//! kernel's part in the tree: it moves the `driver` link on unbind, bind and
//! drivers_probe, so the binder's own checks see what they would on a real
//! host.

use crate::common;

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fake_kernel::FakeKernel;
use tokio_util::sync::CancellationToken;

use vmmanager::devices::vfio::{
    Binding, KernelSysfs, Outcome, ReturnMark, SysfsWrite, SysfsWriter, VfioBinder, VfioError,
    group_users, iommu_group_of,
};
use vmmanager_client::PciAddress;

const AUDIO: &str = "0000:00:1f.3";
const GPU: &str = "0000:01:00.0";

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

/// A minimal sysfs: `bus/pci/{devices,drivers,drivers_probe}` with device
/// directories under `devices/pci0000:00/` linked from `bus/pci/devices`,
/// as on a real host.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Tree {
        let tree = Tree {
            dir: tempfile::tempdir().unwrap(),
        };
        for d in ["bus/pci/devices", "bus/pci/drivers", "devices/pci0000:00"] {
            fs::create_dir_all(tree.root().join(d)).unwrap();
        }
        fs::write(tree.root().join("bus/pci/drivers_probe"), "").unwrap();
        tree
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn driver(&self, name: &str) -> &Self {
        let dir = self.root().join("bus/pci/drivers").join(name);
        fs::create_dir_all(&dir).unwrap();
        for f in ["bind", "unbind", "new_id"] {
            fs::write(dir.join(f), "").unwrap();
        }
        self
    }

    fn device(&self, address: &str, driver: Option<&str>, group: Option<u32>) -> &Self {
        let dir = self.root().join("devices/pci0000:00").join(address);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("driver_override"), "(null)\n").unwrap();
        symlink(
            format!("../../../devices/pci0000:00/{address}"),
            self.root().join("bus/pci/devices").join(address),
        )
        .unwrap();
        if let Some(name) = driver {
            self.link_driver(address, name);
        }
        if let Some(g) = group {
            let gdir = self.root().join("kernel/iommu_groups").join(g.to_string());
            fs::create_dir_all(&gdir).unwrap();
            symlink(&gdir, dir.join("iommu_group")).unwrap();
        }
        self
    }

    fn dev_dir(&self, address: &str) -> PathBuf {
        self.root().join("bus/pci/devices").join(address)
    }

    fn link_driver(&self, address: &str, name: &str) {
        symlink(
            format!("../../../bus/pci/drivers/{name}"),
            self.dev_dir(address).join("driver"),
        )
        .unwrap();
    }

    fn driver_of(&self, address: &str) -> Option<String> {
        fs::read_link(self.dev_dir(address).join("driver"))
            .ok()
            .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
    }

    /// An override someone set (`pci-stub`, `none`, driverctl's).
    fn set_override(&self, address: &str, value: &str) {
        fs::write(
            self.dev_dir(address).join("driver_override"),
            format!("{value}\n"),
        )
        .unwrap();
    }

    fn override_of(&self, address: &str) -> String {
        fs::read_to_string(self.dev_dir(address).join("driver_override")).unwrap()
    }

    /// A tree with snd_hda_intel and vfio-pci loaded and the audio device
    /// bound to snd_hda_intel.
    fn audio() -> Tree {
        let tree = Tree::new();
        tree.driver("snd_hda_intel").driver("vfio-pci").device(
            AUDIO,
            Some("snd_hda_intel"),
            Some(12),
        );
        tree
    }
}

fn w(path: &str, value: &str) -> (String, String) {
    (path.to_owned(), value.to_owned())
}

fn rel_writes(root: &Path, writes: &[SysfsWrite]) -> Vec<(String, String)> {
    writes
        .iter()
        .map(|x| {
            let rel = x.path.strip_prefix(root).unwrap().to_str().unwrap();
            w(rel, &x.value)
        })
        .collect()
}

/// `outcome` is `Done` on `driver`, and it and the kernel saw exactly `want`.
fn assert_done(
    kernel: &FakeKernel,
    outcome: Outcome,
    want: &[(String, String)],
    driver: Option<&str>,
) {
    assert_eq!(kernel.take_log(), want);
    let Outcome::Done {
        driver: now,
        writes,
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(now.as_deref(), driver);
    assert_eq!(rel_writes(&kernel.root, &writes), want);
}

#[test]
fn detach_then_reattach_bound_device() {
    let tree = Tree::audio();
    let kernel = FakeKernel::new(tree.root());
    let binder = kernel.binder();

    let outcome = binder.detach(addr(AUDIO)).unwrap();
    let want = [
        w("bus/pci/devices/0000:00:1f.3/driver_override", "vfio-pci"),
        w("bus/pci/devices/0000:00:1f.3/driver/unbind", AUDIO),
        w("bus/pci/drivers_probe", AUDIO),
    ];
    assert_done(&kernel, outcome, &want, Some("vfio-pci"));
    assert_eq!(tree.driver_of(AUDIO).as_deref(), Some("vfio-pci"));
    assert_eq!(
        binder.original_driver(addr(AUDIO)),
        Some(Some("snd_hda_intel".to_owned()))
    );

    let outcome = binder.reattach(addr(AUDIO)).unwrap();
    let want = [
        w("bus/pci/devices/0000:00:1f.3/driver_override", "\n"),
        w("bus/pci/drivers/vfio-pci/unbind", AUDIO),
        w("bus/pci/drivers/snd_hda_intel/bind", AUDIO),
    ];
    assert_done(&kernel, outcome, &want, Some("snd_hda_intel"));
    assert_eq!(tree.override_of(AUDIO), "(null)\n");
    assert_eq!(binder.original_driver(addr(AUDIO)), None);
}

#[test]
fn second_detach_and_needless_reattach_are_no_ops() {
    let tree = Tree::audio();
    let kernel = FakeKernel::new(tree.root());
    let binder = kernel.binder();

    assert_eq!(
        binder.reattach(addr(AUDIO)).unwrap(),
        Outcome::AlreadyDone {
            driver: Some("snd_hda_intel".to_owned())
        }
    );
    assert_eq!(kernel.take_log(), vec![]);

    binder.detach(addr(AUDIO)).unwrap();
    kernel.take_log();
    assert_eq!(
        binder.detach(addr(AUDIO)).unwrap(),
        Outcome::AlreadyDone {
            driver: Some("vfio-pci".to_owned())
        }
    );
    assert_eq!(kernel.take_log(), vec![]);
    // The second detach did not overwrite what the first remembered.
    assert_eq!(
        binder.original_driver(addr(AUDIO)),
        Some(Some("snd_hda_intel".to_owned()))
    );
}

#[test]
fn missing_vfio_pci_is_a_clear_error_without_writes() {
    let tree = Tree::new();
    tree.driver("snd_hda_intel")
        .device(AUDIO, Some("snd_hda_intel"), None);
    let kernel = FakeKernel::new(tree.root());
    let err = kernel.binder().detach(addr(AUDIO)).unwrap_err();
    assert!(matches!(err, VfioError::VfioUnavailable(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("modprobe vfio-pci"), "{msg}");
    assert!(msg.contains("bus/pci/drivers/vfio-pci"), "{msg}");
    assert_eq!(kernel.take_log(), vec![]);
    assert_eq!(tree.driver_of(AUDIO).as_deref(), Some("snd_hda_intel"));
}

#[test]
fn unknown_device_is_not_found() {
    let tree = Tree::audio();
    let kernel = FakeKernel::new(tree.root());
    let binder = kernel.binder();
    for result in [binder.detach(addr(GPU)), binder.reattach(addr(GPU))] {
        let err = result.unwrap_err();
        assert!(
            matches!(err, VfioError::NotFound(a) if a == addr(GPU)),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "PCI device 0000:01:00.0 not found");
    }
    assert_eq!(kernel.take_log(), vec![]);
}

#[test]
fn unbound_device_detaches_without_unbind_and_reattaches_by_probe() {
    let tree = Tree::audio();
    tree.device(GPU, None, Some(1));
    let kernel = FakeKernel::new(tree.root());
    let binder = kernel.binder();

    binder.detach(addr(GPU)).unwrap();
    assert_eq!(
        kernel.take_log(),
        vec![
            w("bus/pci/devices/0000:01:00.0/driver_override", "vfio-pci"),
            w("bus/pci/drivers_probe", GPU),
        ]
    );
    assert_eq!(binder.original_driver(addr(GPU)), Some(None));

    // Nothing to bind back to: the kernel probes (and here finds nothing).
    let outcome = binder.reattach(addr(GPU)).unwrap();
    let want = [
        w("bus/pci/devices/0000:01:00.0/driver_override", "\n"),
        w("bus/pci/drivers/vfio-pci/unbind", GPU),
        w("bus/pci/drivers_probe", GPU),
    ];
    assert_done(&kernel, outcome, &want, None);
    assert_eq!(tree.driver_of(GPU), None);
}

#[test]
fn reattach_of_a_device_found_on_vfio_probes() {
    // Bound to vfio-pci before the daemon ever saw it: nothing remembered.
    let tree = Tree::audio();
    tree.device(GPU, Some("vfio-pci"), Some(1))
        .driver("nouveau");
    let kernel = FakeKernel::new(tree.root());
    kernel.set(|s| {
        s.natural.insert(GPU.to_owned(), "nouveau".to_owned());
    });
    let outcome = kernel.binder().reattach(addr(GPU)).unwrap();
    let want = [
        w("bus/pci/devices/0000:01:00.0/driver_override", "\n"),
        w("bus/pci/drivers/vfio-pci/unbind", GPU),
        w("bus/pci/drivers_probe", GPU),
    ];
    assert_done(&kernel, outcome, &want, Some("nouveau"));
}

#[test]
fn failure_midway_reports_what_was_written_and_can_be_undone() {
    let tree = Tree::audio();
    let kernel = FakeKernel::new(tree.root());
    let binder = kernel.binder();
    let unbind = "bus/pci/devices/0000:00:1f.3/driver/unbind";
    kernel.set(|s| s.fail = Some(unbind.to_owned()));

    let err = binder.detach(addr(AUDIO)).unwrap_err();
    let VfioError::Write {
        path,
        value,
        source,
        done,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(path, &tree.root().join(unbind));
    assert_eq!(value, AUDIO);
    assert_eq!(source.raw_os_error(), Some(libc::EACCES));
    assert_eq!(
        rel_writes(tree.root(), &done.0),
        vec![w(
            "bus/pci/devices/0000:00:1f.3/driver_override",
            "vfio-pci"
        )]
    );
    let msg = err.to_string();
    assert!(msg.contains(unbind), "{msg}");
    assert!(msg.contains("already written: \"vfio-pci\" to "), "{msg}");
    assert!(msg.contains("driver_override"), "{msg}");
    // The partial state is visible and remembered...
    assert_eq!(tree.override_of(AUDIO), "vfio-pci\n");
    assert_eq!(tree.driver_of(AUDIO).as_deref(), Some("snd_hda_intel"));
    assert_eq!(
        binder.original_driver(addr(AUDIO)),
        Some(Some("snd_hda_intel".to_owned()))
    );
    kernel.take_log();

    // ...and Reattach undoes it: only the override needs clearing.
    kernel.set(|s| s.fail = None);
    let outcome = binder.reattach(addr(AUDIO)).unwrap();
    let want = [w("bus/pci/devices/0000:00:1f.3/driver_override", "\n")];
    assert_done(&kernel, outcome, &want, Some("snd_hda_intel"));
    assert_eq!(tree.override_of(AUDIO), "(null)\n");
    assert_eq!(binder.original_driver(addr(AUDIO)), None);
}

#[test]
fn failure_after_unbind_reattaches_to_the_original_driver() {
    let tree = Tree::audio();
    let kernel = FakeKernel::new(tree.root());
    let binder = kernel.binder();
    kernel.set(|s| s.fail = Some("bus/pci/drivers_probe".to_owned()));
    let err = binder.detach(addr(AUDIO)).unwrap_err();
    let VfioError::Write { done, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(done.0.len(), 2, "{err}");
    assert_eq!(tree.driver_of(AUDIO), None);
    kernel.take_log();

    // A second detach of the now unbound device keeps the real original.
    kernel.set(|s| s.fail = None);
    binder.detach(addr(AUDIO)).unwrap();
    assert_eq!(
        kernel.take_log(),
        vec![
            w("bus/pci/devices/0000:00:1f.3/driver_override", "vfio-pci"),
            w("bus/pci/drivers_probe", AUDIO),
        ]
    );
    binder.reattach(addr(AUDIO)).unwrap();
    assert_eq!(
        kernel.take_log().last(),
        Some(&w("bus/pci/drivers/snd_hda_intel/bind", AUDIO))
    );
    assert_eq!(tree.driver_of(AUDIO).as_deref(), Some("snd_hda_intel"));
}

#[test]
fn device_not_taken_by_vfio_is_an_error_listing_the_writes() {
    let tree = Tree::audio();
    let kernel = FakeKernel::new(tree.root());
    kernel.set(|s| s.probe_binds_nothing = true);
    let err = kernel.binder().detach(addr(AUDIO)).unwrap_err();
    let VfioError::WrongDriver {
        address,
        actual,
        done,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*address, addr(AUDIO));
    assert_eq!(*actual, None);
    assert_eq!(done.0.len(), 3);
    let msg = err.to_string();
    assert!(
        msg.starts_with("0000:00:1f.3 ended up bound to no driver instead of vfio-pci; written: "),
        "{msg}"
    );
    assert!(msg.contains("drivers_probe"), "{msg}");
}

#[test]
fn original_driver_gone_falls_back_to_probe() {
    let tree = Tree::audio();
    let kernel = FakeKernel::new(tree.root());
    let binder = kernel.binder();
    binder.detach(addr(AUDIO)).unwrap();
    kernel.take_log();
    fs::remove_dir_all(tree.root().join("bus/pci/drivers/snd_hda_intel")).unwrap();
    binder.reattach(addr(AUDIO)).unwrap();
    assert_eq!(
        kernel.take_log().last(),
        Some(&w("bus/pci/drivers_probe", AUDIO))
    );
}

#[test]
fn state_file_survives_a_restart_and_ignores_garbage() {
    let tree = Tree::audio();
    let kernel = FakeKernel::new(tree.root());
    let state = tree.root().join("run/vmmanager/vfio-drivers");
    let binder = |k: &FakeKernel| {
        VfioBinder::with_writer(k.root.clone(), Some(state.clone()), Box::new(k.clone()))
    };

    binder(&kernel).detach(addr(AUDIO)).unwrap();
    kernel.take_log();
    // A new daemon: it still knows where the device came from.
    let restarted = binder(&kernel);
    assert_eq!(
        restarted.original_driver(addr(AUDIO)),
        Some(Some("snd_hda_intel".to_owned()))
    );
    restarted.reattach(addr(AUDIO)).unwrap();
    assert_eq!(
        kernel.take_log().last(),
        Some(&w("bus/pci/drivers/snd_hda_intel/bind", AUDIO))
    );
    assert_eq!(binder(&kernel).original_driver(addr(AUDIO)), None);

    // Garbage, traversal attempts and a huge file: skipped, never followed.
    let mut junk = b"0000:00:1f.3 ../../../../tmp\n\xff\xfe\x00\n../../x snd\n".to_vec();
    junk.extend(std::iter::repeat_n(b'x', 1 << 20));
    fs::write(&state, &junk).unwrap();
    let b = binder(&kernel);
    assert_eq!(b.original_driver(addr(AUDIO)), None);
    b.detach(addr(AUDIO)).unwrap();
    assert_eq!(
        b.original_driver(addr(AUDIO)),
        Some(Some("snd_hda_intel".to_owned()))
    );

    // A symlink in place of the file is not followed.
    fs::remove_file(&state).unwrap();
    let elsewhere = tree.root().join("elsewhere");
    fs::write(&elsewhere, "0000:00:1f.3 nouveau\n").unwrap();
    symlink(&elsewhere, &state).unwrap();
    assert_eq!(binder(&kernel).original_driver(addr(AUDIO)), None);
}

fn binding(driver: Option<&str>, driver_override: Option<&str>) -> Binding {
    Binding {
        auto_return: ReturnMark::Unmarked,
        driver: driver.map(str::to_owned),
        driver_override: driver_override.map(str::to_owned),
    }
}

/// An override someone else set before the detach is remembered (across a
/// restart too) and written back by Reattach, so each device ends where it
/// was: on pci-stub with `pci-stub`; unbound with `none` (probed with it in
/// place, so nothing binds); on igb with a `pci-stub` set while it stayed
/// bound (written back after the bind, which the kernel would refuse with
/// it in place). A `vfio-pci` override is not given back: it would hand
/// the device to VFIO again at its next probe.
#[test]
fn reattach_gives_back_the_override_a_device_had() {
    const STUBBED: &str = "0000:02:00.0";
    const KEPT_OFF: &str = "0000:03:00.0";
    const PENDING: &str = "0000:04:00.0";
    const VFIO_PENDING: &str = "0000:05:00.0";
    let tree = Tree::audio();
    tree.driver("pci-stub")
        .driver("igb")
        .device(STUBBED, Some("pci-stub"), None)
        .device(KEPT_OFF, None, None)
        .device(PENDING, Some("igb"), None)
        .device(VFIO_PENDING, Some("igb"), None);
    for (device, value) in [
        (STUBBED, "pci-stub"),
        (KEPT_OFF, "none"),
        (PENDING, "pci-stub"),
        (VFIO_PENDING, "vfio-pci"),
    ] {
        tree.set_override(device, value);
    }
    let kernel = FakeKernel::new(tree.root());
    // A probe without its override would give it to igb.
    kernel.set(|s| {
        s.natural.insert(KEPT_OFF.to_owned(), "igb".to_owned());
    });
    let state = tree.root().join("run/vmmanager/vfio-drivers");
    let binder = || {
        let writer = Box::new(kernel.clone());
        VfioBinder::with_writer(kernel.root.clone(), Some(state.clone()), writer)
    };
    let first = binder();
    for device in [STUBBED, KEPT_OFF, PENDING, VFIO_PENDING] {
        first.detach(addr(device)).unwrap();
        assert_eq!(tree.driver_of(device).as_deref(), Some("vfio-pci"));
        assert_eq!(tree.override_of(device), "vfio-pci\n");
    }
    kernel.take_log();

    let restarted = binder();
    assert_eq!(
        restarted.remembered(addr(STUBBED)),
        Some(binding(Some("pci-stub"), Some("pci-stub")))
    );
    assert_eq!(
        restarted.remembered(addr(KEPT_OFF)),
        Some(binding(None, Some("none")))
    );
    let over = |device: &str| format!("bus/pci/devices/{device}/driver_override");
    let vfio_unbind = "bus/pci/drivers/vfio-pci/unbind";

    let bind = |driver: &str| format!("bus/pci/drivers/{driver}/bind");
    let probe = "bus/pci/drivers_probe".to_owned();
    // Each device: its writes (after the override's first write and the
    // unbind from vfio-pci), where it ends, and its override then.
    let cases = [
        (
            STUBBED,
            "pci-stub",
            vec![w(&bind("pci-stub"), STUBBED)],
            Some("pci-stub"),
            "pci-stub",
        ),
        (KEPT_OFF, "none", vec![w(&probe, KEPT_OFF)], None, "none"),
        (
            PENDING,
            "\n",
            vec![w(&bind("igb"), PENDING), w(&over(PENDING), "pci-stub")],
            Some("igb"),
            "pci-stub",
        ),
        (
            VFIO_PENDING,
            "\n",
            vec![w(&bind("igb"), VFIO_PENDING)],
            Some("igb"),
            "(null)",
        ),
    ];
    for (device, first, then, driver, last_override) in cases {
        let outcome = restarted.reattach(addr(device)).unwrap();
        let mut want = vec![w(&over(device), first), w(vfio_unbind, device)];
        want.extend(then);
        assert_done(&kernel, outcome, &want, driver);
        assert_eq!(tree.override_of(device), format!("{last_override}\n"));
    }

    for device in [STUBBED, KEPT_OFF, PENDING, VFIO_PENDING] {
        assert_eq!(restarted.remembered(addr(device)), None, "{device}");
    }
    assert_eq!(binder().remembered(addr(PENDING)), None);
}

/// A detach that failed after writing `vfio-pci` to the override, then
/// retried, still remembers the override from before the first one.
#[test]
fn a_retried_detach_keeps_the_override_from_before_the_first() {
    let tree = Tree::audio();
    tree.driver("pci-stub");
    tree.set_override(AUDIO, "pci-stub");
    let kernel = FakeKernel::new(tree.root());
    let binder = kernel.binder();
    kernel.set(|s| s.fail = Some(format!("bus/pci/devices/{AUDIO}/driver/unbind")));
    binder.detach(addr(AUDIO)).unwrap_err();
    assert_eq!(tree.override_of(AUDIO), "vfio-pci\n");
    kernel.set(|s| s.fail = None);
    binder.detach(addr(AUDIO)).unwrap();
    assert_eq!(
        binder.remembered(addr(AUDIO)),
        Some(binding(Some("snd_hda_intel"), Some("pci-stub")))
    );
}

/// An override that is not a driver name could not be kept in the state
/// file nor given back: the detach refuses before writing anything.
#[test]
fn an_override_that_could_not_be_given_back_refuses_the_detach() {
    let tree = Tree::audio();
    tree.set_override(AUDIO, "a b");
    let kernel = FakeKernel::new(tree.root());
    let err = kernel.binder().detach(addr(AUDIO)).unwrap_err();
    assert!(matches!(err, VfioError::Read { .. }), "{err:?}");
    assert!(
        err.to_string().ends_with(
            "driver_override: \"a b\" is not a driver name, so it could not be given back"
        ),
        "{err}"
    );
    assert_eq!(kernel.take_log(), vec![]);
}

#[test]
fn addresses_are_parsed_never_paths() {
    for bad in [
        "../../../etc",
        "0000:00:1f.3/../x",
        "0000:00:1f.3\n",
        "",
        "1f.3",
    ] {
        assert!(bad.parse::<PciAddress>().is_err(), "{bad:?}");
    }
}

#[test]
fn the_iommu_group_comes_from_the_device_link() {
    let tree = Tree::audio();
    tree.device(GPU, None, None);
    assert_eq!(iommu_group_of(tree.root(), addr(AUDIO)), Some(12));
    assert_eq!(iommu_group_of(tree.root(), addr(GPU)), None);
    assert_eq!(iommu_group_of(tree.root(), addr("0000:09:00.0")), None);
    symlink("../x/+7", tree.dev_dir(GPU).join("iommu_group")).unwrap();
    assert_eq!(iommu_group_of(tree.root(), addr(GPU)), None);
}

#[test]
fn real_writer_writes_once_and_never_creates() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("driver_override");
    fs::write(&file, "(null)\n").unwrap();
    KernelSysfs.write(&file, b"vfio-pci").unwrap();
    // Written in place from offset 0, as a sysfs store expects.
    assert_eq!(fs::read(&file).unwrap(), b"vfio-pci");
    let missing = dir.path().join("missing");
    let err = KernelSysfs.write(&missing, b"x").unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert!(!missing.exists());
}

#[test]
fn detach_in_a_tree_where_nothing_rebinds_writes_then_says_so() {
    // Nothing rebinds in a plain directory tree: detach writes the files and
    // then says the device did not end up on vfio-pci.
    let tree = Tree::audio();
    let binder = VfioBinder::new(tree.root().to_owned(), None);
    let err = binder.detach(addr(AUDIO)).unwrap_err();
    assert!(
        matches!(&err, VfioError::WrongDriver { actual: Some(d), done, .. }
            if d == "snd_hda_intel" && done.0.len() == 3),
        "{err:?}"
    );
    assert!(tree.override_of(AUDIO).starts_with("vfio-pci"));
    let unbind = tree.root().join("bus/pci/drivers/snd_hda_intel/unbind");
    assert_eq!(fs::read_to_string(unbind).unwrap(), AUDIO);

    // A failing write names the file.
    let probe = tree.root().join("bus/pci/drivers_probe");
    fs::remove_file(&probe).unwrap();
    fs::create_dir(&probe).unwrap();
    let err = binder.detach(addr(AUDIO)).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, VfioError::Write { path, .. } if *path == probe),
        "{err:?}"
    );
    assert!(msg.contains("drivers_probe failed"), "{msg}");
}

/// A shell holding `file` open on fd 3 until killed, with `args` in its
/// command line (`-name VM` makes it look like a named QEMU).
struct Holder(Child);

impl Holder {
    fn spawn(file: &Path, args: &[&str]) -> Holder {
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(r#"exec 3<"$0"; read x"#)
            .arg(file)
            .args(args)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        Holder(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Who holds `<dev>/vfio/<group>` in the real /proc.
fn users_of(dev: &Path, group: u32) -> Vec<vmmanager::devices::vfio::VfioUser> {
    group_users(Path::new("/proc"), dev, group, &CancellationToken::new()).unwrap()
}

/// Polls until `pids` all hold group `group` (the shells open it async).
fn wait_for_users(dev: &Path, group: u32, pids: &[u32]) -> Vec<vmmanager::devices::vfio::VfioUser> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let users = users_of(dev, group);
        if pids.iter().all(|p| users.iter().any(|u| u.pid == *p)) {
            return users;
        }
        assert!(
            Instant::now() < deadline,
            "{pids:?} never showed up: {users:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn group_users_of_a_regular_stand_in() {
    let dev = tempfile::tempdir().unwrap();
    fs::create_dir(dev.path().join("vfio")).unwrap();
    let node = dev.path().join("vfio/7");
    fs::write(&node, "").unwrap();
    assert_eq!(users_of(dev.path(), 7), vec![]);

    let vm = Holder::spawn(&node, &["-name", "guest=win11,debug-threads=on"]);
    let other = Holder::spawn(&node, &[]);
    let users = wait_for_users(dev.path(), 7, &[vm.pid(), other.pid()]);
    let mut pids = vec![vm.pid(), other.pid()];
    pids.sort();
    assert_eq!(users.iter().map(|u| u.pid).collect::<Vec<_>>(), pids);
    let sh = fs::canonicalize("/bin/sh").unwrap();
    for u in &users {
        assert_eq!(Path::new(&u.exe), sh);
        let want = if u.pid == vm.pid() { "win11" } else { "" };
        assert_eq!(u.vm_name, want);
    }

    // Other groups and missing nodes: nobody.
    assert_eq!(users_of(dev.path(), 8), vec![]);
    assert_eq!(users_of(Path::new("/nonexistent"), 7), vec![]);
    drop(vm);
    drop(other);
    assert_eq!(users_of(dev.path(), 7), vec![]);
}

/// A character device node at `node` with /dev/zero's number (1:5): a
/// stand-in any process can open without effect.
fn mknod_dev_zero(node: &Path) {
    mknod_char(node, "1:5");
}

/// A character device node at `node` with number `major:minor`. Holders
/// are matched by number, so tests that run at the same time each use a
/// number of their own (/dev/zero's, /dev/full's): one test's holder is
/// never another's user.
fn mknod_char(node: &Path, number: &str) {
    let (major, minor) = number.split_once(':').unwrap();
    let status = Command::new("mknod")
        .arg(node)
        .args(["c", major, minor])
        .status()
        .unwrap();
    assert!(status.success(), "mknod needs root");
}

#[test]
fn group_users_of_a_char_device_match_any_node_of_it() {
    // A node with /dev/zero's number stands in for /dev/vfio/9; a process
    // that opened /dev/zero itself is like a QEMU with its own /dev copy.
    let dev = tempfile::tempdir().unwrap();
    fs::create_dir(dev.path().join("vfio")).unwrap();
    let node = dev.path().join("vfio/9");
    mknod_dev_zero(&node);

    let here = Holder::spawn(&node, &["-name", "a"]);
    let private = Holder::spawn(Path::new("/dev/zero"), &["-name", "b"]);
    let users = wait_for_users(dev.path(), 9, &[here.pid(), private.pid()]);
    let name = |pid| users.iter().find(|u| u.pid == pid).unwrap().vm_name.clone();
    assert_eq!(name(here.pid()), "a");
    assert_eq!(name(private.pid()), "b");
}

/// A device bound to a vendor variant of vfio-pci (`mlx5_vfio_pci`, bound
/// through `driver_override` as the kernel requires) is already given to
/// VFIO: Detach leaves it there (rebinding it to plain vfio-pci would lose
/// what the variant adds, e.g. live migration), and Reattach takes it off
/// the variant and gives it back to a host driver.
#[test]
fn variant_vfio_driver_counts_as_detached() {
    const VARIANT: &str = "mlx5_vfio_pci";
    let tree = Tree::new();
    tree.driver("mlx5_core")
        .driver(VARIANT)
        .driver("vfio-pci")
        .device(GPU, Some(VARIANT), Some(3));
    tree.set_override(GPU, VARIANT);
    let kernel = FakeKernel::new(tree.root());
    kernel.set(|s| {
        s.natural.insert(GPU.to_owned(), "mlx5_core".to_owned());
    });
    let binder = kernel.binder();

    assert_eq!(
        binder.detach(addr(GPU)).unwrap(),
        Outcome::AlreadyDone {
            driver: Some(VARIANT.to_owned())
        }
    );
    assert_eq!(kernel.take_log(), vec![]);
    assert_eq!(tree.driver_of(GPU).as_deref(), Some(VARIANT));

    // Found on the variant with nothing remembered: the kernel probes, and
    // a variant driver only binds through driver_override, now cleared.
    let outcome = binder.reattach(addr(GPU)).unwrap();
    let want = [
        w("bus/pci/devices/0000:01:00.0/driver_override", "\n"),
        w(&format!("bus/pci/drivers/{VARIANT}/unbind"), GPU),
        w("bus/pci/drivers_probe", GPU),
    ];
    assert_done(&kernel, outcome, &want, Some("mlx5_core"));
    assert_eq!(tree.override_of(GPU), "(null)\n");

    // And back is a plain detach to vfio-pci that remembers mlx5_core.
    binder.detach(addr(GPU)).unwrap();
    assert_eq!(tree.driver_of(GPU).as_deref(), Some("vfio-pci"));
    assert_eq!(
        binder.original_driver(addr(GPU)),
        Some(Some("mlx5_core".to_owned()))
    );
}

/// `/dev/vfio/12` exists (the device is on vfio-pci) but /proc cannot be
/// read: who holds the group is unknown, so neither Detach nor Reattach
/// writes anything (fail closed); a process holding it is named.
#[tokio::test]
async fn passthrough_refuses_when_the_group_users_are_unknown_or_present() {
    use vmmanager::devices::passthrough::{Move, Passthrough, PassthroughError, Persistence};
    let tree = Tree::audio();
    let kernel = FakeKernel::new(tree.root());
    let dev = tempfile::tempdir().unwrap();
    fs::create_dir(dev.path().join("vfio")).unwrap();
    let node = dev.path().join("vfio/12");
    fs::write(&node, "").unwrap();
    let blind = Passthrough::new(
        kernel.binder(),
        tree.root().join("no-proc"),
        dev.path().to_owned(),
    );
    for action in [Move::Detach, Move::Reattach] {
        let err = blind
            .change(addr(AUDIO), Some(12), action, Persistence::UntilReboot)
            .await
            .unwrap_err();
        assert!(
            matches!(err, PassthroughError::UsersUnknown { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "could not find out whether a VM uses 0000:00:1f.3; nothing was changed"
        );
    }
    assert_eq!(kernel.take_log(), vec![]);

    let seeing = Passthrough::new(kernel.binder(), "/proc".into(), dev.path().to_owned());
    let vm = Holder::spawn(&node, &["-name", "win11"]);
    wait_for_users(dev.path(), 12, &[vm.pid()]);
    let err = seeing
        .change(
            addr(AUDIO),
            Some(12),
            Move::Detach,
            Persistence::UntilReboot,
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "0000:00:1f.3 is in use by VM \"win11\" (PID {}) through /dev/vfio/12; stop the VM first",
            vm.pid()
        )
    );
    assert_eq!(kernel.take_log(), vec![]);
    drop(vm);
    seeing
        .change(
            addr(AUDIO),
            Some(12),
            Move::Detach,
            Persistence::UntilReboot,
        )
        .await
        .unwrap();
    assert_eq!(tree.driver_of(AUDIO).as_deref(), Some("vfio-pci"));
}

/// A QEMU using iommufd opens the device's cdev `/dev/vfio/devices/vfioN`
/// (and `/dev/iommu`), never `/dev/vfio/<group>`: it is found through sysfs
/// `vfio-dev/vfioN/dev`, by number, so InUseBy names it and Reattach is
/// refused. The cdev stands in with /dev/zero's number, held through a node
/// of the test's own; only that holder's presence is asserted, so other
/// processes holding /dev/zero cannot disturb the test.
#[tokio::test]
async fn iommufd_holders_of_the_device_cdev_are_users() {
    use vmmanager::devices::passthrough::{Move, Passthrough, PassthroughError, Persistence};
    let tree = Tree::new();
    tree.driver("snd_hda_intel")
        .driver("vfio-pci")
        .device(AUDIO, Some("vfio-pci"), Some(12));
    let cdev = tree.dev_dir(AUDIO).join("vfio-dev/vfio3");
    fs::create_dir_all(&cdev).unwrap();
    // /dev/full's number: group_users_of_a_char_device_match_any_node_of_it
    // holds /dev/zero's at the same time.
    fs::write(cdev.join("dev"), "1:7\n").unwrap();
    // No /dev/vfio/12 here: only the cdev ties the holder to the device.
    let dev = tempfile::tempdir().unwrap();
    fs::create_dir_all(dev.path().join("vfio/devices")).unwrap();
    let node = dev.path().join("vfio/devices/vfio3");
    mknod_char(&node, "1:7");
    let kernel = FakeKernel::new(tree.root());
    let passthrough = Passthrough::new(kernel.binder(), "/proc".into(), dev.path().to_owned());
    let pids = || async {
        let users = passthrough
            .users_for_anyone(addr(AUDIO), Some(12))
            .await
            .unwrap();
        users
            .into_iter()
            .map(|u| (u.pid, u.vm_name))
            .collect::<Vec<_>>()
    };

    let vm = Holder::spawn(&node, &["-name", "iommufd-guest"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let held = (vm.pid(), "iommufd-guest".to_owned());
    while !pids().await.contains(&held) {
        assert!(
            Instant::now() < deadline,
            "the cdev's holder never showed up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = passthrough
        .change(
            addr(AUDIO),
            Some(12),
            Move::Reattach,
            Persistence::UntilReboot,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, PassthroughError::InUse { .. }), "{err:?}");
    // The refusal names what the VM holds, not the group it never opened.
    assert_eq!(
        err.to_string(),
        format!(
            "0000:00:1f.3 is in use by VM \"iommufd-guest\" (PID {}) through \
             /dev/vfio/devices/vfio3; stop the VM first",
            vm.pid()
        )
    );
    assert_eq!(kernel.take_log(), vec![]);
    drop(vm);
    assert!(!pids().await.iter().any(|(pid, _)| *pid == held.0));

    // A cdev number that cannot be read: unknown, so nothing moves.
    fs::write(cdev.join("dev"), "garbage\n").unwrap();
    let err = passthrough
        .change(
            addr(AUDIO),
            Some(12),
            Move::Reattach,
            Persistence::UntilReboot,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, PassthroughError::UsersUnknown { .. }),
        "{err:?}"
    );
    assert_eq!(kernel.take_log(), vec![]);

    // `vfio-dev/vfioN` without `dev`: a kernel without VFIO cdevs (Debian
    // 12's makes the directory for every vfio-pci device). No node, so no
    // holder, and nothing unknown: Reattach must not be refused for it.
    fs::remove_file(cdev.join("dev")).unwrap();
    assert_eq!(
        passthrough
            .users_for_anyone(addr(AUDIO), Some(12))
            .await
            .unwrap(),
        vec![]
    );
}

// ---------------------------------------------------------------------------
// Group operations
// ---------------------------------------------------------------------------

/// IOMMU group 5: a root port (a bridge, keeps pcieport), a GPU (amdgpu),
/// its audio function (snd_hda_intel), a USB controller (xhci_hcd) and a
/// function someone else put on vfio-pci (not detached by us).
const G_BRIDGE: &str = "0000:00:1c.0";
const G_GPU: &str = "0000:01:00.0";
const G_AUDIO: &str = "0000:01:00.1";
const G_USB: &str = "0000:01:00.2";
const G_PREBOUND: &str = "0000:01:00.3";

fn group_tree() -> common::sysfs::FakeSysfs {
    let fs = common::sysfs::FakeSysfs::new();
    fs.driver_dir("vfio-pci");
    for (address, class, driver) in [
        (G_BRIDGE, 0x060400, "pcieport"),
        (G_GPU, 0x030000, "amdgpu"),
        (G_AUDIO, 0x040300, "snd_hda_intel"),
        (G_USB, 0x0c0330, "xhci_hcd"),
        (G_PREBOUND, 0x0c8000, "vfio-pci"),
    ] {
        fs.device(address, 0x1002, 0x73bf, class)
            .driver(driver)
            .iommu_group(5);
    }
    fs
}

fn drivers(fs: &common::sysfs::FakeSysfs) -> Vec<(String, Option<String>)> {
    [G_BRIDGE, G_GPU, G_AUDIO, G_USB, G_PREBOUND]
        .iter()
        .map(|a| (a.to_string(), fs.driver_of(a)))
        .collect()
}

fn bound(pairs: &[(&str, &str)]) -> Vec<(String, Option<String>)> {
    pairs
        .iter()
        .map(|(a, d)| (a.to_string(), Some(d.to_string())))
        .collect()
}

fn addrs(list: &[&str]) -> Vec<PciAddress> {
    list.iter().map(|a| addr(a)).collect()
}

/// Group 5 as polkit is shown it: every member, the bridge included.
fn group5() -> Vec<PciAddress> {
    addrs(&[G_BRIDGE, G_GPU, G_AUDIO, G_USB, G_PREBOUND])
}

/// Group 5 of `fs` as it is now (a test added members to it).
fn group_now(fs: &common::sysfs::FakeSysfs) -> Vec<PciAddress> {
    let mut members: Vec<PciAddress> = fs::read_dir(fs.group_dir(5).join("devices"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    members.sort();
    members
}

#[test]
fn group_detach_binds_every_endpoint_and_reattach_gives_each_its_own_driver() {
    let fs = group_tree();
    let kernel = FakeKernel::new(&fs.root());
    let binder = kernel.binder();

    let outcome = binder.detach_group(addr(G_AUDIO), &group5()).unwrap();
    assert_eq!(outcome.moved, addrs(&[G_GPU, G_AUDIO, G_USB]));
    assert_eq!(outcome.unchanged, addrs(&[G_PREBOUND]));
    assert_eq!(
        drivers(&fs),
        bound(&[
            (G_BRIDGE, "pcieport"),
            (G_GPU, "vfio-pci"),
            (G_AUDIO, "vfio-pci"),
            (G_USB, "vfio-pci"),
            (G_PREBOUND, "vfio-pci"),
        ])
    );
    for (member, original) in [
        (G_GPU, "amdgpu"),
        (G_AUDIO, "snd_hda_intel"),
        (G_USB, "xhci_hcd"),
    ] {
        assert_eq!(
            binder.original_driver(addr(member)),
            Some(Some(original.to_owned())),
            "{member}"
        );
    }
    assert_eq!(binder.original_driver(addr(G_PREBOUND)), None);
    let log = kernel.take_log();
    assert!(
        log.iter()
            .all(|(path, value)| !path.contains(G_BRIDGE) && value != G_BRIDGE),
        "the bridge was written to: {log:?}"
    );
    // Three members, three writes each, in address order.
    assert_eq!(log.len(), 9, "{log:?}");
    assert_eq!(log[0].0, format!("bus/pci/devices/{G_GPU}/driver_override"));
    assert_eq!(log[8], w("bus/pci/drivers_probe", G_USB));

    let outcome = binder.reattach_group(addr(G_GPU), &group5(), &[]).unwrap();
    assert_eq!(outcome.moved, addrs(&[G_GPU, G_AUDIO, G_USB]));
    assert_eq!(
        drivers(&fs),
        bound(&[
            (G_BRIDGE, "pcieport"),
            (G_GPU, "amdgpu"),
            (G_AUDIO, "snd_hda_intel"),
            (G_USB, "xhci_hcd"),
            // Not ours: stays where someone else put it.
            (G_PREBOUND, "vfio-pci"),
        ])
    );
    for member in [G_GPU, G_AUDIO, G_USB] {
        assert_eq!(binder.original_driver(addr(member)), None, "{member}");
        assert_eq!(fs.read_attr(member, "driver_override"), "(null)\n");
    }
    assert!(
        kernel
            .take_log()
            .iter()
            .all(|(path, value)| !path.contains(G_PREBOUND) && value != G_PREBOUND)
    );
}

/// The second member's unbind fails: the call gives back what it did, the
/// failed member's half-done detach first, then the first member; the error
/// names the failure and the rollback.
#[test]
fn a_failure_at_the_second_member_rolls_back_in_reverse_order() {
    let fs = group_tree();
    let before = drivers(&fs);
    let kernel = FakeKernel::new(&fs.root());
    let binder = kernel.binder();
    kernel.set(|k| k.fail = Some(format!("bus/pci/devices/{G_AUDIO}/driver/unbind")));

    let err = binder.detach_group(addr(G_GPU), &group5()).unwrap_err();
    let VfioError::Group(failure) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(failure.failed, addr(G_AUDIO));
    assert_eq!(failure.rolled_back, addrs(&[G_AUDIO, G_GPU]));
    assert!(failure.rollback_failed.is_empty());
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "the group detach of {G_GPU} failed at {G_AUDIO}: writing \"{G_AUDIO}\" to "
        )),
        "{message}"
    );
    assert!(
        message.ends_with(&format!("; rolled back: {G_AUDIO}, {G_GPU}")),
        "{message}"
    );
    assert_eq!(drivers(&fs), before);
    for member in [G_GPU, G_AUDIO, G_USB] {
        assert_eq!(fs.read_attr(member, "driver_override"), "(null)\n");
    }

    let log = kernel.take_log();
    let at = |entry: (String, String)| {
        log.iter()
            .position(|e| *e == entry)
            .unwrap_or_else(|| panic!("{entry:?} not in {log:?}"))
    };
    let audio_undone = at(w(
        &format!("bus/pci/devices/{G_AUDIO}/driver_override"),
        "\n",
    ));
    let gpu_undone = at(w(&format!("bus/pci/devices/{G_GPU}/driver_override"), "\n"));
    let gpu_back = at(w("bus/pci/drivers/amdgpu/bind", G_GPU));
    assert!(
        audio_undone < gpu_undone && gpu_undone < gpu_back,
        "{log:?}"
    );
    // The third member was never touched.
    assert!(log.iter().all(|(p, v)| !p.contains(G_USB) && v != G_USB));
}

/// A rollback that fails itself names the device it left behind and where.
#[test]
fn a_failed_rollback_names_the_device_left_behind() {
    let fs = group_tree();
    let kernel = FakeKernel::new(&fs.root());
    let binder = kernel.binder();
    kernel.set(|k| {
        k.fail = Some(format!("bus/pci/devices/{G_AUDIO}/driver/unbind"));
        k.fail_also = vec!["bus/pci/drivers/amdgpu/bind".into()];
    });
    let message = binder
        .detach_group(addr(G_GPU), &group5())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(&format!(
            "; rolled back: {G_AUDIO}; rolling back {G_GPU} failed (writing \"{G_GPU}\" to "
        )),
        "{message}"
    );
    assert!(message.ends_with(", left on no driver"), "{message}");
    assert_eq!(fs.driver_of(G_GPU), None);
    // Still remembered, so a later Reattach can finish the job.
    assert_eq!(
        binder.original_driver(addr(G_GPU)),
        Some(Some("amdgpu".into()))
    );
    kernel.set(|k| {
        k.fail = None;
        k.fail_also.clear();
    });
    binder.reattach(addr(G_GPU)).unwrap();
    assert_eq!(fs.driver_of(G_GPU).as_deref(), Some("amdgpu"));
}

/// A VM holding /dev/vfio/5 keeps the whole group where it is: refused
/// before anything is written, for Detach and Reattach alike.
#[tokio::test]
async fn a_vm_holding_the_group_refuses_group_moves_without_writes() {
    use vmmanager::devices::passthrough::{Move, Passthrough, PassthroughError, Persistence};
    let fs = group_tree();
    let kernel = FakeKernel::new(&fs.root());
    let dev = tempfile::tempdir().unwrap();
    fs::create_dir(dev.path().join("vfio")).unwrap();
    let node = dev.path().join("vfio/5");
    fs::write(&node, "").unwrap();
    let passthrough = Passthrough::new(kernel.binder(), "/proc".into(), dev.path().to_owned());
    let vm = Holder::spawn(&node, &["-name", "gaming"]);
    wait_for_users(dev.path(), 5, &[vm.pid()]);
    for action in [Move::Detach, Move::Reattach] {
        let err = passthrough
            .change_group(
                addr(G_AUDIO),
                Some(5),
                action,
                &group5(),
                Persistence::UntilReboot,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, PassthroughError::InUse { .. }), "{err:?}");
    }
    assert_eq!(kernel.take_log(), vec![]);
    drop(vm);
    let outcome = passthrough
        .change_group(
            addr(G_AUDIO),
            Some(5),
            Move::Detach,
            &group5(),
            Persistence::UntilReboot,
        )
        .await
        .unwrap();
    assert_eq!(outcome.moved, addrs(&[G_GPU, G_AUDIO, G_USB]));
}

/// The safety gates of a group detach name, for each member that would
/// move, a sibling bound to a driver the host may run on (a chipset's LPC
/// bridge, its SMBus, a NIC) and a member with SR-IOV VFs enabled; the
/// other functions of a graphics card go with it whatever their class, and
/// the device asked for is the caller's choice.
#[test]
fn group_gates_name_siblings_the_host_may_run_on() {
    use vmmanager::devices::gate;
    use vmmanager::devices::host_use::{Network, NetworkSnapshot};
    let dev = tempfile::tempdir().unwrap();
    let blockers = |fs: &common::sysfs::FakeSysfs, asked: &str, members: &[&str]| {
        let roots = gate::roots(&fs.root(), Path::new("/proc"), dev.path());
        let network = Network::Given(NetworkSnapshot::default());
        let cancel = tokio_util::sync::CancellationToken::new();
        gate::blockers(&roots, &network, addr(asked), &addrs(members), &cancel)
            .sentences(addr(asked))
    };
    // A chipset group: audio asked for, LPC bridge and SMBus beside it.
    let fs = common::sysfs::FakeSysfs::new();
    fs.driver_dir("vfio-pci");
    for (address, class, driver) in [
        ("0000:00:1f.0", 0x060100, "lpc_ich"),
        ("0000:00:1f.3", 0x040300, "snd_hda_intel"),
        ("0000:00:1f.4", 0x0c0500, "i801_smbus"),
    ] {
        fs.device(address, 0x8086, 0xa348, class)
            .driver(driver)
            .iommu_group(9);
    }
    assert_eq!(
        blockers(
            &fs,
            "0000:00:1f.3",
            &["0000:00:1f.0", "0000:00:1f.3", "0000:00:1f.4"]
        ),
        [
            "0000:00:1f.0: (class 060100) is bound to lpc_ich and may be what the host runs on",
            "0000:00:1f.4: (class 0c0500) is bound to i801_smbus and may be what the host runs on",
        ]
    );

    // A graphics card's group: nothing to say about its functions; a NIC
    // with VFs beside it is named, whatever its class.
    let fs = group_tree();
    assert_eq!(
        blockers(&fs, G_GPU, &[G_GPU, G_AUDIO, G_USB, G_PREBOUND]),
        Vec::<String>::new()
    );
    fs.device("0000:02:00.0", 0x8086, 0x1521, 0x020000)
        .driver("igb")
        .iommu_group(5)
        .sriov(7, 2);
    assert_eq!(
        blockers(&fs, G_GPU, &[G_GPU, "0000:02:00.0"]),
        [
            "0000:02:00.0: has 2 SR-IOV virtual functions enabled (unbinding its driver destroys them)",
            "0000:02:00.0: (class 020000) is bound to igb and may be what the host runs on",
        ]
    );
}

/// A group that changed after it was authorized (a member hot-plugged or
/// removed) moves nothing.
#[test]
fn a_group_that_changed_since_it_was_authorized_moves_nothing() {
    let fs = group_tree();
    let kernel = FakeKernel::new(&fs.root());
    let binder = kernel.binder();
    let shown = addrs(&[G_BRIDGE, G_GPU, G_AUDIO, G_USB]);
    for result in [
        binder.detach_group(addr(G_GPU), &shown),
        binder.reattach_group(addr(G_GPU), &shown, &[]),
    ] {
        let err = result.unwrap_err();
        assert!(
            matches!(err, VfioError::GroupChanged { group: 5, .. }),
            "{err:?}"
        );
    }
    assert_eq!(kernel.take_log(), vec![]);
    // In another order, and with a duplicate, it is the same group.
    let mut shuffled = group5();
    shuffled.reverse();
    shuffled.push(addr(G_GPU));
    binder.detach_group(addr(G_GPU), &shuffled).unwrap();
}

/// The group option on a device without a group, or on the bridge itself,
/// writes nothing.
#[test]
fn group_moves_need_an_endpoint_with_a_group() {
    let fs = group_tree();
    fs.device("0000:02:00.0", 0x8086, 0x10ca, 0x020000)
        .driver("igb");
    let kernel = FakeKernel::new(&fs.root());
    let binder = kernel.binder();
    let err = binder.detach_group(addr("0000:02:00.0"), &[]).unwrap_err();
    assert_eq!(err.to_string(), "0000:02:00.0 has no IOMMU group");
    let err = binder.detach_group(addr(G_BRIDGE), &group5()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{G_BRIDGE} is not an endpoint of IOMMU group 5")
    );
    fs::remove_dir_all(fs.root().join("bus/pci/drivers/vfio-pci")).unwrap();
    let err = binder.detach_group(addr(G_GPU), &group5()).unwrap_err();
    assert!(matches!(err, VfioError::VfioUnavailable(_)), "{err:?}");
    assert_eq!(kernel.take_log(), vec![]);
}

/// The group's failure, unwrapped.
fn group_failure(err: &VfioError) -> &vmmanager::devices::vfio::GroupFailure {
    match err {
        VfioError::Group(failure) => failure,
        other => panic!("{other:?}"),
    }
}

/// A rollback whose back-move fails after writing part of its sequence (the
/// override cleared, then the unbind from vfio-pci refused) does not count
/// the member as rolled back: it is named, with where it started and where
/// it was left.
#[test]
fn a_rollback_that_fails_midway_names_where_the_member_was_left() {
    let fs = group_tree();
    let kernel = FakeKernel::new(&fs.root());
    let binder = kernel.binder();
    kernel.set(|k| {
        k.fail_at = vec![
            ("bus/pci/drivers_probe".into(), G_USB.into()),
            ("bus/pci/drivers/vfio-pci/unbind".into(), G_AUDIO.into()),
        ]
    });
    let err = binder
        .detach_group(addr(G_GPU), &group_now(&fs))
        .unwrap_err();
    let failure = group_failure(&err);
    assert_eq!(failure.failed, addr(G_USB));
    assert_eq!(failure.rolled_back, addrs(&[G_USB, G_GPU]));
    let [left_behind] = &failure.rollback_failed[..] else {
        panic!("{err}")
    };
    assert_eq!(left_behind.address, addr(G_AUDIO));
    assert!(
        matches!(&left_behind.error, Some(VfioError::Write { path, .. })
            if path.ends_with("bus/pci/drivers/vfio-pci/unbind")),
        "{err}"
    );
    assert_eq!(left_behind.was, binding(Some("snd_hda_intel"), None));
    assert_eq!(left_behind.left, Some(binding(Some("vfio-pci"), None)));
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "; rolled back: {G_USB}, {G_GPU}; rolling back {G_AUDIO} failed (writing \"{G_AUDIO}\" to "
        )),
        "{message}"
    );
    assert!(message.ends_with(", left on vfio-pci"), "{message}");
    assert_eq!(fs.driver_of(G_USB).as_deref(), Some("xhci_hcd"));
    assert_eq!(fs.driver_of(G_GPU).as_deref(), Some("amdgpu"));
}

/// A back-move that succeeds but leaves the member elsewhere is a failure
/// too: a reattach_group that cleared a member's override and then could
/// not unbind it is rolled back by a detach that finds it still on
/// vfio-pci (nothing to do), so the override stays cleared.
#[test]
fn a_rollback_that_leaves_a_member_elsewhere_is_a_failure() {
    let fs = group_tree();
    let kernel = FakeKernel::new(&fs.root());
    let binder = kernel.binder();
    binder.detach_group(addr(G_GPU), &group_now(&fs)).unwrap();
    kernel.set(|k| k.fail_at = vec![("bus/pci/drivers/vfio-pci/unbind".into(), G_AUDIO.into())]);
    let err = binder
        .reattach_group(addr(G_GPU), &group_now(&fs), &[])
        .unwrap_err();
    let failure = group_failure(&err);
    assert_eq!(failure.failed, addr(G_AUDIO));
    assert_eq!(failure.rolled_back, addrs(&[G_GPU]));
    let [left_behind] = &failure.rollback_failed[..] else {
        panic!("{err}")
    };
    assert_eq!(left_behind.address, addr(G_AUDIO));
    assert!(left_behind.error.is_none(), "{err}");
    assert_eq!(left_behind.was, binding(Some("vfio-pci"), Some("vfio-pci")));
    assert_eq!(left_behind.left, Some(binding(Some("vfio-pci"), None)));
    assert!(
        err.to_string().ends_with(&format!(
            "; rolled back: {G_GPU}; rolling back {G_AUDIO} left it on vfio-pci instead of \
             vfio-pci with driver_override vfio-pci"
        )),
        "{err}"
    );
    assert_eq!(fs.read_attr(G_GPU, "driver_override"), "vfio-pci\n");
}

/// A member that had no driver is rolled back to no driver (not probed
/// onto a host driver), and counts as rolled back.
#[test]
fn a_member_without_a_driver_is_rolled_back_to_none() {
    const UNBOUND: &str = "0000:01:00.4";
    const FAILS: &str = "0000:01:00.5";
    let fs = group_tree();
    for member in [UNBOUND, FAILS] {
        fs.device(member, 0x1002, 0xab28, 0x040300).iommu_group(5);
    }
    fs.driver_dir("snd_hda_intel");
    let kernel = FakeKernel::new(&fs.root());
    kernel.set(|k| {
        k.natural.insert(UNBOUND.into(), "snd_hda_intel".into());
        k.fail_at = vec![("bus/pci/drivers_probe".into(), FAILS.into())];
    });
    let err = kernel
        .binder()
        .detach_group(addr(G_GPU), &group_now(&fs))
        .unwrap_err();
    let failure = group_failure(&err);
    assert_eq!(failure.failed, addr(FAILS));
    assert_eq!(
        failure.rolled_back,
        addrs(&[FAILS, UNBOUND, G_USB, G_AUDIO, G_GPU])
    );
    assert!(failure.rollback_failed.is_empty(), "{err}");
    assert_eq!(fs.driver_of(UNBOUND), None);
    assert_eq!(fs.read_attr(UNBOUND, "driver_override"), "(null)\n");
}

/// The group is read whole or not at all: a listing that fails refuses the
/// call before any write, rather than moving (and checking) a part.
#[test]
fn an_unreadable_group_listing_refuses_without_writes() {
    let fs = group_tree();
    let listing = fs.group_dir(5).join("devices");
    fs::rename(&listing, fs.group_dir(5).join("moved")).unwrap();
    fs::write(&listing, "").unwrap();
    let kernel = FakeKernel::new(&fs.root());
    let err = kernel
        .binder()
        .detach_group(addr(G_GPU), &group5())
        .unwrap_err();
    assert!(
        matches!(&err, VfioError::Read { path, .. } if *path == listing),
        "{err:?}"
    );
    assert_eq!(kernel.take_log(), vec![]);
}

/// A member unplugged after the group was read is not written to: the
/// call fails at it with NotFound and gives back what it moved.
#[test]
fn a_member_that_vanished_midway_is_not_found_and_rolled_back() {
    let fs = group_tree();
    let kernel = FakeKernel::new(&fs.root());
    kernel.set(|k| {
        k.unplug_after = Some(("bus/pci/drivers_probe".into(), G_GPU.into(), G_USB.into()))
    });
    let before = drivers(&fs);
    let err = kernel
        .binder()
        .detach_group(addr(G_GPU), &group_now(&fs))
        .unwrap_err();
    let failure = group_failure(&err);
    assert_eq!(failure.failed, addr(G_USB));
    assert!(
        matches!(failure.source, VfioError::NotFound(a) if a == addr(G_USB)),
        "{err}"
    );
    assert_eq!(failure.rolled_back, addrs(&[G_AUDIO, G_GPU]));
    assert!(failure.rollback_failed.is_empty(), "{err}");
    assert!(
        err.to_string().contains(&format!(
            "failed at {G_USB}: PCI device {G_USB} not found; rolled back: {G_AUDIO}, {G_GPU}"
        )),
        "{err}"
    );
    assert!(!fs.device_dir(G_USB).exists());
    let after = drivers(&fs);
    assert_eq!(after[..3], before[..3]);
    assert!(
        kernel
            .take_log()
            .iter()
            .all(|(path, value)| !path.contains(G_USB) && value != G_USB)
    );
}

/// A give-back after use acts only on a device still marked and still on
/// vfio-pci, in one step under the binder's lock: a device someone gave
/// back meanwhile is never reset from under its host driver, and the mark
/// goes with the first attempt.
#[test]
fn a_give_back_never_resets_a_device_back_on_its_host_driver() {
    use vmmanager::devices::vfio::MarkedReturn;
    let fs = group_tree();
    fs.write_attr(G_AUDIO, "reset", "");
    let kernel = FakeKernel::new(&fs.root());
    let binder = kernel.binder();
    binder.detach(addr(G_AUDIO)).unwrap();
    binder.set_auto_return(addr(G_AUDIO), true).unwrap();
    assert_eq!(binder.auto_return_marks(), [addr(G_AUDIO)]);
    // Back on its driver by other means (the kernel, a script): the mark
    // is found stale and dropped, nothing is written.
    fs.rebind(G_AUDIO, "snd_hda_intel");
    kernel.take_log();
    assert!(matches!(
        binder.give_back_marked(addr(G_AUDIO)),
        MarkedReturn::NotOnVfio
    ));
    assert_eq!(kernel.take_log(), vec![]);
    assert!(!binder.is_marked(addr(G_AUDIO)));
    assert!(matches!(
        binder.give_back_marked(addr(G_AUDIO)),
        MarkedReturn::NotMarked
    ));
    // A Reattach takes the mark with it.
    fs.rebind(G_AUDIO, "vfio-pci");
    binder.set_auto_return(addr(G_AUDIO), true).unwrap();
    binder.reattach(addr(G_AUDIO)).unwrap();
    kernel.take_log();
    assert!(matches!(
        binder.give_back_marked(addr(G_AUDIO)),
        MarkedReturn::NotMarked
    ));
    assert_eq!(kernel.take_log(), vec![]);
    // Only a device this service detached can be marked.
    let err = binder.set_auto_return(addr(G_PREBOUND), true).unwrap_err();
    assert!(matches!(err, VfioError::NotDetachedByUs(_)), "{err:?}");
}

/// Saving a use never waits for a move under way (an unbind can wait for
/// seconds, and the auto-return watch must go on): it says "later".
#[test]
fn saving_a_use_does_not_wait_for_a_move() {
    /// Writes through `kernel`, but once armed the first unbind waits
    /// until released.
    struct StallingUnbind {
        kernel: FakeKernel,
        armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
        stalled: std::sync::mpsc::SyncSender<()>,
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }
    impl SysfsWriter for StallingUnbind {
        fn write(&self, path: &Path, value: &[u8]) -> std::io::Result<()> {
            if path.ends_with("unbind")
                && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                let _ = self.stalled.try_send(());
                let _ = self.release.lock().unwrap().recv();
            }
            self.kernel.write(path, value)
        }
    }
    let fs = group_tree();
    let kernel = FakeKernel::new(&fs.root());
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stalled_tx, stalled) = std::sync::mpsc::sync_channel(1);
    let (release, release_rx) = std::sync::mpsc::channel();
    let binder = std::sync::Arc::new(VfioBinder::with_writer(
        fs.root(),
        None,
        Box::new(StallingUnbind {
            kernel: kernel.clone(),
            armed: armed.clone(),
            stalled: stalled_tx,
            release: std::sync::Mutex::new(release_rx),
        }),
    ));
    binder.detach(addr(G_AUDIO)).unwrap();
    binder.set_auto_return(addr(G_AUDIO), true).unwrap();
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let moving = std::thread::spawn({
        let binder = binder.clone();
        move || binder.detach(addr(G_GPU))
    });
    stalled.recv().unwrap();
    assert!(
        !binder.try_set_in_use(&[addr(G_AUDIO)]),
        "it waited or saved under a move"
    );
    assert_eq!(binder.return_mark(addr(G_AUDIO)), ReturnMark::Marked);
    release.send(()).unwrap();
    moving.join().unwrap().unwrap();
    assert!(binder.try_set_in_use(&[addr(G_AUDIO)]));
    assert_eq!(binder.return_mark(addr(G_AUDIO)), ReturnMark::InUse);
}

/// A VM seen holding a marked device's group is remembered in the state
/// file, so that a restarted service knows the use has happened (and gives
/// the device back when nobody holds it) rather than waiting for another.
#[test]
fn a_use_seen_is_remembered_across_a_restart() {
    let fs = group_tree();
    let kernel = FakeKernel::new(&fs.root());
    let state = tempfile::tempdir().unwrap();
    // A binder as a (re)started service makes it: loading the state file.
    let start = || {
        VfioBinder::with_writer(
            fs.root(),
            Some(state.path().join("vfio-drivers")),
            Box::new(kernel.clone()),
        )
    };
    let binder = start();
    binder.detach(addr(G_AUDIO)).unwrap();
    binder.detach(addr(G_GPU)).unwrap();
    binder.set_auto_return(addr(G_AUDIO), true).unwrap();
    assert_eq!(binder.return_mark(addr(G_AUDIO)), ReturnMark::Marked);
    // Only marked devices take the use; the unmarked GPU stays unmarked.
    assert!(binder.try_set_in_use(&[addr(G_AUDIO), addr(G_GPU), addr(G_PREBOUND)]));
    assert_eq!(binder.return_mark(addr(G_AUDIO)), ReturnMark::InUse);
    assert_eq!(binder.return_mark(addr(G_GPU)), ReturnMark::Unmarked);
    let restarted = start();
    assert_eq!(restarted.return_mark(addr(G_AUDIO)), ReturnMark::InUse);
    assert_eq!(restarted.return_mark(addr(G_GPU)), ReturnMark::Unmarked);
    // Marked again (a second `detach --auto-return`, for the next VM): a
    // new use to wait for.
    restarted.set_auto_return(addr(G_AUDIO), true).unwrap();
    assert_eq!(start().return_mark(addr(G_AUDIO)), ReturnMark::Marked);
}
