//! The Uplift device agent. It keeps one private channel to the upgrade
//! server, compares each offered version with its own, installs a different
//! one into the inactive A/B slot with every byte verified, switches the boot
//! environment to try it for a few boots, and after the reboot commits or rolls back.
//!
//! Decisions live in [`machine`] (pure, unit-tested); so is the chunk planner [`plan`];
//! I/O lives in [`run`], [`install`], [`download`], [`slot`], [`net`], [`local`]
//! and [`systemd`].

pub mod address;
pub mod config;
pub mod download;
pub mod guard;
pub mod health;
pub mod install;
pub mod local;
pub mod machine;
pub mod net;
pub mod plan;
pub mod run;
pub mod slot;
pub mod status;
pub mod systemd;
pub mod trust;
