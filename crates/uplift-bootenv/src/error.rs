//! The one error type of this crate. Every variant says what was found and
//! what to do about it, because these errors surface on a device's console
//! or in a fleet report where nobody can read the code.

use std::io;
use std::path::PathBuf;

use uplift_proto::names::SlotName;

use crate::grubenv::GRUBENV_SIZE;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootEnvError {
    #[error("GRUB environment block is {len} bytes, but must be exactly {GRUBENV_SIZE}: it is truncated or not a grubenv file; restore it or re-provision the boot environment")]
    WrongSize { len: u64 },

    #[error("GRUB environment block does not start with \"# GRUB Environment Block\": it is not a grubenv file; restore it or re-provision the boot environment")]
    MissingHeader,

    #[error("GRUB environment block is malformed at byte {offset}: {reason}; recreate it with grub-editenv or re-provision the boot environment")]
    Malformed { offset: usize, reason: &'static str },

    #[error("GRUB environment block sets {name:?} more than once, so it is ambiguous which value the bootloader uses; remove the duplicate with grub-editenv")]
    DuplicateVariable { name: String },

    #[error("GRUB environment variables need {needed} bytes but the block holds only {GRUBENV_SIZE}; remove or shorten variables")]
    TooLarge { needed: usize },

    #[error("invalid boot environment variable name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    #[error("invalid value for boot environment variable {name:?}: {reason}")]
    InvalidValue { name: String, reason: &'static str },

    #[error("the boot environment was never provisioned: it has no uplift_default variable; provision it with the slot the device currently runs")]
    NotProvisioned,

    #[error("boot environment variable {key}={value:?} is invalid: {reason}; repair it with grub-editenv (GRUB) or fw_setenv (U-Boot), or re-provision the boot environment")]
    InvalidState {
        key: &'static str,
        value: String,
        reason: String,
    },

    #[error("cannot put slot {slot} on trial: it is the committed slot the device falls back to; install the update into slot {} instead", slot.other())]
    TrialOfDefaultSlot { slot: SlotName },

    #[error("cannot start a trial with 0 boot attempts: the slot would never be booted; give it at least 1")]
    ZeroTries,

    #[error("cannot start a trial with {tries} boot attempts: the GRUB script counts at most {}; use 1 to {}", crate::state::MAX_TRIAL_TRIES, crate::state::MAX_TRIAL_TRIES)]
    TooManyTries { tries: u32 },

    #[error("cannot commit slot {booted}: {}", match trial {
        Some(t) => format!("the slot on trial is {t}; only a booted trial slot can be committed"),
        None => "no slot is on trial (it may have fallen back); report the failed update instead".to_owned(),
    })]
    NotOnTrial {
        booted: SlotName,
        trial: Option<SlotName>,
    },

    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "read the boot environment file".
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("boot environment file {path} does not exist; provision it first with the slot the device currently runs")]
    NotFound { path: PathBuf },

    #[error("boot environment file {path}: {source}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<BootEnvError>,
    },

    #[error("U-Boot environment copy {copy} (offset {offset:#x}): the stored CRC32 is {stored:#010x} but the data hashes to {computed:#010x}, so the copy is torn or was never written; {}", if *.redundant { "the other copy is used if it is valid" } else { "write it again with fw_setenv or re-provision the boot environment" })]
    UBootBadCrc {
        /// 1 for the first line of fw_env.config, 2 for the second.
        copy: u8,
        offset: u64,
        stored: u32,
        computed: u32,
        redundant: bool,
    },

    #[error("U-Boot environment copy {copy} (offset {offset:#x}) is malformed at data byte {at}: {reason}; rewrite it with fw_setenv or re-provision the boot environment")]
    UBootMalformed {
        copy: u8,
        offset: u64,
        /// Offset into the copy's data area (after the CRC and flag byte).
        at: usize,
        reason: String,
    },

    #[error("neither copy of the redundant U-Boot environment is usable ({first}; {second}), so U-Boot boots with its built-in default environment; re-provision the boot environment")]
    UBootNoValidCopy {
        first: Box<BootEnvError>,
        second: Box<BootEnvError>,
    },

    #[error("U-Boot environment variables need {needed} bytes but the environment's data area holds only {capacity}; remove or shorten variables, or configure a larger environment (it must match U-Boot's CONFIG_ENV_SIZE)")]
    UBootTooLarge { needed: usize, capacity: usize },

    #[error("U-Boot environment configuration: {reason}")]
    UBootConfig { reason: String },

    #[error("U-Boot environment copy {copy}: {path} holds {len} bytes but the copy ends at byte {end}; check the offset and size against U-Boot's CONFIG_ENV_OFFSET and CONFIG_ENV_SIZE")]
    UBootShortDevice {
        copy: u8,
        path: PathBuf,
        len: u64,
        end: u64,
    },

    #[error("refusing to provision {path}: the file already exists and may hold the state of a pending update; move it away first if it really is stale")]
    AlreadyExists { path: PathBuf },
}

impl BootEnvError {
    /// The error without any [`BootEnvError::InFile`] wrapping, for callers
    /// that match on the cause rather than print it.
    pub fn root(&self) -> &BootEnvError {
        match self {
            BootEnvError::InFile { source, .. } => source.root(),
            other => other,
        }
    }
}
