//! Detach/reattach and VFIO group users. OWNER: helper H. Placeholder.
