//! A caller-supplied image path, validated and opened once.
//!
//! OWNER: helper A (disk inspection). Placeholder bodies until implemented.

use std::fs::File;
use std::path::PathBuf;

/// Image format, detected from the header magic (never by letting qemu-img probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Qcow2,
    Qed,
    Vdi,
    Vhdx,
    Vmdk,
    Parallels,
    Raw,
}

impl ImageFormat {
    /// The name used in reports and passed to `qemu-img -f`.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Qed => "qed",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Parallels => "parallels",
            ImageFormat::Raw => "raw",
        }
    }
}

/// A validated, opened image: canonical path, identity, owner, format.
#[derive(Debug)]
pub struct ImageFile {
    /// Canonical absolute path (symlinks resolved).
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub uid: u32,
    pub gid: u32,
    pub format: ImageFormat,
    /// Opened `O_RDONLY|O_NONBLOCK|O_NOCTTY|O_CLOEXEC`; used for the lock probe.
    pub file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image path is empty")]
    Empty,
    #[error("image path must be absolute: {0:?}")]
    Relative(String),
    #[error("image path is too long ({0} bytes)")]
    TooLong(usize),
    #[error("{0}: no such file")]
    NotFound(PathBuf),
    #[error("{path}: not a regular file (it is a {kind})")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ImageFile {
    /// Validates `path` (absolute, non-empty, bounded, a regular file reached
    /// without opening anything that could block) and opens it.
    pub fn open(path: &str) -> Result<ImageFile, ImageError> {
        Err(ImageError::Relative(path.to_owned()))
    }
}
