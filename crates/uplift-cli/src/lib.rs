//! The `uplift` command: release keys, building and uploading signed
//! releases, listing devices, starting and following rollouts, and the fleet
//! demo (a thin call into [`uplift_fleet::demo`], where the harness lives).
//! Every server operation goes through the admin REST API
//! ([`uplift_client::AdminClient`]), the same API a web page would use.

pub mod access;
pub mod cli;
pub mod events;
pub mod output;
pub mod root;
pub mod watch;
