//! PCI addresses. OWNER: helper F. Placeholder until implemented.

use std::fmt;
use std::str::FromStr;

/// `DDDD:BB:SS.F`, e.g. `0000:03:00.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("not a PCI address (expected DDDD:BB:SS.F, e.g. 0000:03:00.0): {0:?}")]
pub struct AddressError(pub String);

impl FromStr for PciAddress {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Err(AddressError(s.to_owned()))
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }
}

impl PciAddress {
    /// The last component of the D-Bus object path: `pci_0000_03_00_0`.
    pub fn object_name(&self) -> String {
        format!(
            "pci_{:04x}_{:02x}_{:02x}_{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }
}
