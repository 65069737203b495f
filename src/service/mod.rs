//! D-Bus boundary (owner: lead).
