//! polkit authorization (owner: lead).
