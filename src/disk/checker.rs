//! Orchestration of a disk check (owner: lead).
