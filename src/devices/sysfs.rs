//! Reading PCI devices from sysfs. OWNER: helper F. Placeholder.
