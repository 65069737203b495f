//! Configuration (owner: lead).
