//! PCI addresses (`0000:03:00.0`): the client crate's type, which also owns
//! the device object path codec (`pci_0000_03_00_0`), so the service and its
//! clients name device objects the same way.

pub use vmmanager_client::{AddressError, PciAddress};
