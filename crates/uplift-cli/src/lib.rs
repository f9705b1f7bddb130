//! The `uplift` command: release keys, building and uploading signed
//! releases, listing devices, starting and following rollouts, and the fleet
//! demo. Every server operation goes through the admin REST API
//! ([`client::AdminClient`]), exactly as the web page does.

pub mod cli;
pub mod client;
pub mod demo;
pub mod fleet;
pub mod output;
