//! Who uses an image a running QEMU holds: GetDiskUsers over D-Bus and the
//! in-process scan against `fuser -v` (and `lsof` while it is cheap), on
//! this machine as it is, with +1,000, +5,000 and +10,000 sleeping
//! processes, and with 50,000 fds in three processes.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use vmmanager::disk::image::ImageFile;
use vmmanager::disk::usage::UsageScanner;
use vmmanager::disk::view::View;
use vmmanager::procfs::{self, Target};
use vmmanager_client::{DiskUser, ManagerProxy};
use zbus::Variant;

use crate::Mode;
use crate::common::util::{public_tempdir, run};
use crate::common::{DaemonConfig, Polkit, Stack, Vm};
use crate::crowd::Crowd;
use crate::disk::make_image;
use crate::measure::{interleave, process_count};
use crate::report::{Condition, Figure, Group, Unit, millis};

/// lsof joins a level's contenders only while one run takes less than this
/// (it takes seconds at 10,000 processes).
const LSOF_CHEAP_MS: f64 = 1000.0;
/// The fd load: this many fds split over [`FD_HOLDERS`] processes.
const HELD_FDS: usize = 50_000;
const FD_HOLDERS: usize = 3;

/// One load the contenders are timed under.
struct Level {
    label: String,
    /// Processes on the machine while measured.
    processes: usize,
    /// Target for GetDiskUsers relative to fuser, if any.
    ratio_target: Option<f64>,
    times: Contenders,
}

/// Median-bearing samples of each contender at one level.
struct Contenders {
    fuser: Vec<f64>,
    lsof: Option<Vec<f64>>,
    get_disk_users: Vec<f64>,
    scanner: Vec<f64>,
    holders: Vec<f64>,
}

pub fn group(mode: Mode, rt: &Runtime) -> Group {
    let stack = Stack::start(Polkit::builder(), &DaemonConfig::default());
    let dir = public_tempdir("vmm-bench-scan-");
    let image = dir.path().join("disk.qcow2");
    make_image(&image);
    // Writable, with its PID file beside the image (Quickemu's layout).
    let vm = Vm::start("bench", &image);
    let connection = rt.block_on(stack.bus.connect());
    let manager = rt
        .block_on(ManagerProxy::new(&connection))
        .expect("manager proxy");
    let bench = Bench {
        image: &image,
        qemu_pid: vm.pid(),
        manager: &manager,
        rt,
        // The daemon's own configuration of the scan (see DaemonConfig).
        scanner: UsageScanner::new("/proc".into(), vec!["{image_dir}/*.pid".into()]),
    };

    let mut lsof_cheap = Command::new("lsof").arg("-v").output().is_ok();
    let mut levels = Vec::new();
    let mut crowds = Vec::new();
    let mut extra = 0;
    // Processes added at each step, and GetDiskUsers' target there. The
    // quick mode stops at +1,000: fuser alone takes seconds beyond.
    let steps: &[(usize, Option<f64>)] = if mode.quick() {
        &[(0, None), (1_000, Some(0.3))]
    } else {
        &[
            (0, None),
            (1_000, Some(0.3)),
            (4_000, Some(0.3)),
            (5_000, Some(0.3)),
        ]
    };
    for &(more, target) in steps {
        extra += more;
        if more > 0 {
            crowds.push(Crowd::sleepers(more));
        }
        let rounds = match extra {
            0 => mode.pick(100, 5),
            1_000 => mode.pick(50, 3),
            _ => mode.pick(15, 3),
        };
        let label = if extra == 0 {
            "as is".to_owned()
        } else {
            format!("+{extra} processes")
        };
        levels.push(bench.level(label, target, rounds, &mut lsof_cheap));
    }
    drop(crowds);
    let holders: Vec<Crowd> = (0..FD_HOLDERS)
        .map(|i| Crowd::fds(HELD_FDS / FD_HOLDERS + usize::from(i < HELD_FDS % FD_HOLDERS)))
        .collect();
    let label = format!("{HELD_FDS} fds in {FD_HOLDERS} processes");
    levels.push(bench.level(label, Some(0.7), mode.pick(20, 3), &mut lsof_cheap));
    drop(holders);
    drop(vm);

    Group {
        name: "scan",
        title: "Who uses an image a running QEMU holds (GetDiskUsers, the in-process scan, fuser, lsof)",
        figures: figures(&levels),
    }
}

/// What every contender needs.
struct Bench<'a> {
    image: &'a Path,
    qemu_pid: u32,
    manager: &'a ManagerProxy<'a>,
    rt: &'a Runtime,
    scanner: UsageScanner,
}

impl Bench<'_> {
    fn level(
        &self,
        label: String,
        target: Option<f64>,
        rounds: usize,
        lsof_cheap: &mut bool,
    ) -> Level {
        let processes = process_count();
        eprintln!("scan: {label} ({processes} processes), {rounds} rounds");
        let image = self.image;
        let qemu_pid = self.qemu_pid.to_string();
        let fuser = || {
            let out = run(Command::new("fuser").arg("-v").arg(image));
            // The PIDs go to stdout, the verbose table to stderr.
            assert!(
                out.stdout.split_whitespace().any(|p| p == qemu_pid),
                "fuser -v: {out:#?}"
            );
        };
        let lsof = || {
            let out = run(Command::new("lsof").args(["-w", "-t", "--"]).arg(image));
            assert!(out.stdout.lines().any(|p| p == qemu_pid), "lsof: {out:#?}");
        };
        let get_disk_users = || self.expect_qemu(&self.rt.block_on(self.get_disk_users()));
        let scanner = || {
            let file = ImageFile::open(self.path()).expect("open the image");
            let usage = self
                .scanner
                .scan(&file, None, &View::Service, &CancellationToken::new())
                .expect("scan");
            let pids: Vec<u32> = usage.users.iter().map(|u| u.pid).collect();
            assert_eq!(pids, [self.qemu_pid], "UsageScanner::scan: {usage:?}");
        };
        let holders = || {
            let meta = std::fs::metadata(image).expect("stat the image");
            let found = procfs::holders(
                Path::new("/proc"),
                Target::of(&meta),
                std::process::id(),
                &CancellationToken::new(),
            )
            .expect("procfs::holders");
            let pids: Vec<u32> = found.iter().map(|h| h.pid).collect();
            assert_eq!(pids, [self.qemu_pid], "procfs::holders: {found:?}");
        };
        if *lsof_cheap {
            let start = Instant::now();
            lsof();
            let took = millis(start.elapsed());
            if took > LSOF_CHEAP_MS {
                eprintln!("scan: lsof took {took:.0} ms: left out from here on");
                *lsof_cheap = false;
            }
        }
        let mut contenders: Vec<&dyn Fn()> = vec![&fuser, &get_disk_users, &scanner, &holders];
        if *lsof_cheap {
            contenders.push(&lsof);
        }
        let mut times = interleave(2, rounds, &contenders).into_iter();
        let mut next = || times.next().expect("one series per contender");
        Level {
            label,
            processes,
            ratio_target: target,
            times: Contenders {
                fuser: next(),
                get_disk_users: next(),
                scanner: next(),
                holders: next(),
                lsof: times.next(),
            },
        }
    }

    fn path(&self) -> &str {
        self.image.to_str().expect("UTF-8 image path")
    }

    async fn get_disk_users(&self) -> Vec<DiskUser> {
        let users = self
            .manager
            .get_disk_users(self.path(), HashMap::<&str, Variant<'_>>::new())
            .await
            .unwrap_or_else(|e| panic!("GetDiskUsers: {e}"));
        users.iter().map(DiskUser::from_dict).collect()
    }

    fn expect_qemu(&self, users: &[DiskUser]) {
        let pids: Vec<u32> = users.iter().map(|u| u.pid).collect();
        assert_eq!(pids, [self.qemu_pid], "GetDiskUsers: {users:?}");
    }
}

fn figures(levels: &[Level]) -> Vec<Figure> {
    let fuser = "`fuser -v IMAGE` (process)";
    let mut figures = Vec::new();
    for level in levels {
        let t = &level.times;
        let at = format!("{}, {} processes", level.label, level.processes);
        let mut gdu = Figure::new(
            format!("`GetDiskUsers` over D-Bus, {at}"),
            Unit::Millis,
            t.get_disk_users.clone(),
        )
        .against(fuser, t.fuser.clone());
        if let Some(ratio) = level.ratio_target {
            gdu = gdu.target(Condition::RatioAtMost(ratio));
        }
        figures.push(gdu);
        let informational = [
            ("`UsageScanner::scan` in-process", &t.scanner),
            ("`procfs::holders` in-process", &t.holders),
        ]
        .into_iter()
        .chain(t.lsof.as_ref().map(|lsof| ("`lsof -t IMAGE`", lsof)));
        for (what, samples) in informational {
            figures.push(
                Figure::new(format!("{what}, {at}"), Unit::Millis, samples.clone())
                    .against(fuser, t.fuser.clone()),
            );
        }
    }
    figures.extend(per_unit_costs(levels));
    figures
}

/// Cost per extra process (from the unloaded level to the most loaded
/// one) and per held fd, from medians: how each scales.
fn per_unit_costs(levels: &[Level]) -> Vec<Figure> {
    let median = |v: &[f64]| crate::report::Summary::of(v).median;
    let (idle, busiest, fds) = (
        &levels[0],
        &levels[levels.len() - 2],
        &levels[levels.len() - 1],
    );
    let per_process = (busiest.processes - idle.processes) as f64;
    // ms per unit → µs per unit.
    let slope = |pick: fn(&Contenders) -> &Vec<f64>, to: &Level, units: f64| {
        vec![(median(pick(&to.times)) - median(pick(&idle.times))) * 1e3 / units]
    };
    let fds_added = HELD_FDS as f64;
    let fuser: fn(&Contenders) -> &Vec<f64> = |c| &c.fuser;
    let scanner: fn(&Contenders) -> &Vec<f64> = |c| &c.scanner;
    let gdu: fn(&Contenders) -> &Vec<f64> = |c| &c.get_disk_users;
    vec![
        Figure::new("in-process scan: cost per extra process", Unit::Micros, slope(scanner, busiest, per_process))
            .against("`fuser -v`: cost per extra process", slope(fuser, busiest, per_process))
            .target(Condition::MedianAtMost(14.0))
            .note("target: half of the 27–30 µs per process issue 10 measured before; from the medians at the unloaded and the most loaded level"),
        Figure::new("`GetDiskUsers`: cost per extra process", Unit::Micros, slope(gdu, busiest, per_process))
            .against("`fuser -v`: cost per extra process", slope(fuser, busiest, per_process)),
        Figure::new("in-process scan: cost per held fd", Unit::Micros, slope(scanner, fds, fds_added))
            .against("`fuser -v`: cost per held fd", slope(fuser, fds, fds_added))
            .note("from the medians at the unloaded level and with the fds held"),
    ]
}
