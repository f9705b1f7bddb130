//! Phased rollouts: which device is in which phase ([`phases`]) and the
//! engine's pure decisions — offers, outcomes, phase changes, automatic
//! pauses and operator commands — with time passed in ([`engine`]); and
//! maintenance windows ([`window`]). The
//! [`scheduler`] runs the engine against the database.

pub mod engine;
pub mod phases;
pub mod scheduler;
pub mod window;
