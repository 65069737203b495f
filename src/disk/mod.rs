//! Disk images: validation, in-use detection, `qemu-img check`.

pub mod checker;
pub mod image;
pub mod qemu_img;
pub mod usage;
pub mod view;
pub mod writable;
