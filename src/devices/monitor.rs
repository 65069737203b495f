//! The udev monitor thread. OWNER: helper G. Placeholder.
