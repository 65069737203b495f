//! The device table. OWNER: helper F. Placeholder.
