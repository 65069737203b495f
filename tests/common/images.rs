//! Test disk images (owned by another helper; placeholder).
