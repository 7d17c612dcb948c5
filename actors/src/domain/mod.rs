//! Pure domain rules: plain data and functions, unit-tested, no I/O.

pub mod capabilities;
pub mod channel;
pub mod entity;
pub mod event;
pub mod message;
pub mod validation;
pub mod versioned;
