//! Types shared by every Uplift component: validated names, the device
//! channel's messages, the admin REST API's bodies, and stable error kinds.
//!
//! This crate has no I/O and no crypto so that the agent, the server and the
//! CLI can all depend on it without pulling each other's dependencies.

pub mod api;
pub mod auth;
pub mod channel;
pub mod enrollment;
pub mod error;
pub mod events;
pub mod names;
pub mod pace;
pub mod policy;
pub mod trust;

pub use error::{ErrorKind, WireError};
pub use names::{
    ChunkHash, DeviceId, DeviceType, HardwareId, NameError, SlotName, Tag, TokenName, Version,
};
