//! qcow2 test images made with the real qemu-img/qemu-io, plus byte edits of
//! the refcount block for leaks and corruption. Each helper verifies its image
//! with `qemu-img check` and panics when qemu-img disagrees.
//!
//! Layout after `make_clean_qcow2` (64 KiB clusters, 16-bit refcounts):
//! cluster 0 header, 1 refcount table, 2 refcount block, 3 L1 table, 4 L2
//! table, 5–6 data. Offsets are read from the header, not assumed.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

/// Clusters `make_leaky_qcow2` leaks.
pub const LEAKED_CLUSTERS: u64 = 3;

/// Header fields the edits need.
struct Qcow2Layout {
    cluster_size: u64,
    l1_table_offset: u64,
    /// Offset of the first refcount block (covers the first
    /// cluster_size / 2 clusters with 16-bit refcounts).
    refcount_block: u64,
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn run_ok(cmd: &mut Command) {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Exit code and stdout of `qemu-img check --output=json -f qcow2`.
pub fn qemu_img_check(path: &Path) -> (i32, String) {
    let out = run(Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2", "--"])
        .arg(path));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn layout(path: &Path) -> Qcow2Layout {
    let mut f = std::fs::File::open(path).unwrap();
    let mut header = [0u8; 104];
    f.read_exact(&mut header).unwrap();
    assert_eq!(&header[..4], b"QFI\xfb", "not a qcow2 image");
    assert_eq!(be_u32(&header, 4), 3, "qcow2 version");
    assert_eq!(be_u32(&header, 96), 4, "refcount_order (16-bit refcounts)");
    let cluster_size = 1u64 << be_u32(&header, 20);
    let l1_table_offset = be_u64(&header, 40);
    let refcount_table = be_u64(&header, 48);
    let mut entry = [0u8; 8];
    f.seek(SeekFrom::Start(refcount_table)).unwrap();
    f.read_exact(&mut entry).unwrap();
    Qcow2Layout {
        cluster_size,
        l1_table_offset,
        refcount_block: u64::from_be_bytes(entry),
    }
}

fn set_refcount(path: &Path, layout: &Qcow2Layout, cluster: u64, refcount: u16) {
    assert!(
        cluster < layout.cluster_size / 2,
        "outside the first refcount block"
    );
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(layout.refcount_block + 2 * cluster))
        .unwrap();
    f.write_all(&refcount.to_be_bytes()).unwrap();
    f.sync_all().unwrap();
}

/// A consistent 64 MiB qcow2 with 128 KiB of data written through qemu-io.
pub fn make_clean_qcow2(path: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=65536,refcount_bits=16",
            ])
            .arg(path)
            .arg("64M"),
    );
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0xab 0 128k"])
            .arg(path),
    );
    let (code, json) = qemu_img_check(path);
    assert_eq!(code, 0, "clean image is not clean: {json}");
}

/// A qcow2 whose refcount block claims clusters nothing references: the file
/// is extended by [`LEAKED_CLUSTERS`] clusters whose refcounts are set to 1
/// (`qemu-img check` ignores refcounts past the end of the file). Returns the
/// number of leaked clusters.
pub fn make_leaky_qcow2(path: &Path) -> u64 {
    make_clean_qcow2(path);
    let layout = layout(path);
    let len = std::fs::metadata(path).unwrap().len();
    let first = len.div_ceil(layout.cluster_size);
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len((first + LEAKED_CLUSTERS) * layout.cluster_size)
        .unwrap();
    for cluster in first..first + LEAKED_CLUSTERS {
        set_refcount(path, &layout, cluster, 1);
    }
    let (code, json) = qemu_img_check(path);
    assert_eq!(code, 3, "leaky image: {json}");
    assert!(
        json.contains(&format!("\"leaks\": {LEAKED_CLUSTERS}")),
        "leaky image: {json}"
    );
    LEAKED_CLUSTERS
}

/// A qcow2 whose L1 table cluster has refcount 0 although the header points at
/// it: one corruption (`ERROR cluster 3 refcount=0 reference=1`). `-r all`
/// repairs it by rebuilding the refcount structures; `-r leaks` fails (exit 1).
pub fn make_corrupt_qcow2(path: &Path) {
    make_clean_qcow2(path);
    let layout = layout(path);
    set_refcount(
        path,
        &layout,
        layout.l1_table_offset / layout.cluster_size,
        0,
    );
    let (code, json) = qemu_img_check(path);
    assert_eq!(code, 2, "corrupt image: {json}");
    assert!(json.contains("\"corruptions\": 1"), "corrupt image: {json}");
}
