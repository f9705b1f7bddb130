//! Boot environment of an Uplift device: the small piece of state that the
//! bootloader and the agent share to run A/B trial boots.
//!
//! The state lives where the bootloader can both read and write it before
//! any OS is running: a GRUB environment block (`grubenv`) or a U-Boot
//! environment. This crate is split so that each layer can be checked on
//! its own:
//!
//! - [`grubenv`]: the GRUB format, byte-compatible with `grub-editenv`;
//! - [`ubootenv`]: the U-Boot format (CRC32, single and redundant copies),
//!   byte-compatible with `fw_printenv` / `fw_setenv`;
//! - [`state`]: the trial-boot rules as pure functions over a [`BootState`],
//!   stored under the same keys in both formats;
//! - [`file`]: crash-safe reading and writing of the GRUB env file;
//! - [`ubootfile`]: crash-safe reading and writing of the U-Boot
//!   environment on a file or block device, at `fw_env.config` offsets;
//! - [`store`]: [`BootEnv`], the one the agent's configuration selects.
//!
//! The agent only ever changes the state through [`BootState`] transitions
//! and stores it with [`BootEnv::store_state`], so a power cut at any moment
//! leaves a state the bootloader can act on.

pub mod error;
pub mod file;
pub mod grubenv;
pub mod state;
pub mod store;
pub mod ubootenv;
pub mod ubootfile;

pub use error::BootEnvError;
pub use file::{write_file_atomically, BootEnvFile};
pub use grubenv::{GrubEnv, GRUBENV_SIZE};
pub use state::{BootState, EnvVars, Trial};
pub use store::{BootEnv, EnvSnapshot};
pub use ubootenv::UBootEnv;
pub use ubootfile::{UBootCopy, UBootEnvStore, UBootLayout};

/// The exit code with which the agent, configured for a supervised
/// (simulated) reboot, asks its supervisor to reboot the device.
///
/// A real device reboots itself; in the simulation the agent instead exits
/// with this code and the boot simulator (`uplift-boot-sim`) plays the
/// firmware and bootloader and starts it again. 194 lies above every code a
/// shell reports for a failed command or a signal death (126, 127 and
/// 128+signal, at most 192 on Linux), so a crash is never taken for a reboot
/// request.
pub const REBOOT_REQUEST_EXIT_CODE: i32 = 194;
