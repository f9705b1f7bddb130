//! The boot environment as the agent sees it, whichever the bootloader:
//! the same [`BootState`] transitions, stored in a GRUB environment block
//! or in a U-Boot environment.
//!
//! An enum rather than a trait object: there are exactly two bootloaders,
//! the agent clones the store into blocking tasks, and a `match` keeps each
//! backend's own types (and errors) visible.

use std::fmt;

use crate::error::BootEnvError;
use crate::file::BootEnvFile;
use crate::grubenv::GrubEnv;
use crate::state::BootState;
use crate::ubootenv::UBootEnv;
use crate::ubootfile::UBootEnvStore;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootEnv {
    Grub(BootEnvFile),
    UBoot(UBootEnvStore),
}

/// The variables read by [`BootEnv::load_state`], to be written back with
/// the new state so nobody else's variables are lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvSnapshot {
    Grub(GrubEnv),
    UBoot(UBootEnv),
}

impl BootEnv {
    pub fn load_state(&self) -> Result<(EnvSnapshot, BootState), BootEnvError> {
        match self {
            BootEnv::Grub(f) => f.load_state().map(|(e, s)| (EnvSnapshot::Grub(e), s)),
            BootEnv::UBoot(u) => u.load_state().map(|(e, s)| (EnvSnapshot::UBoot(e), s)),
        }
    }

    /// Reads the state, computes the next one with `change`, and stores it;
    /// nothing is written if `change` refuses.
    pub fn update(
        &self,
        change: impl FnOnce(&BootState) -> Result<BootState, BootEnvError>,
    ) -> Result<BootState, BootEnvError> {
        match self {
            BootEnv::Grub(f) => f.update(change),
            BootEnv::UBoot(u) => u.update(change),
        }
    }

    /// Stores `state` into `env`, which [`load_state`](Self::load_state) of
    /// this same store returned.
    pub fn store_state(&self, env: EnvSnapshot, state: &BootState) -> Result<(), BootEnvError> {
        match (self, env) {
            (BootEnv::Grub(f), EnvSnapshot::Grub(e)) => f.store_state(e, state),
            (BootEnv::UBoot(u), EnvSnapshot::UBoot(e)) => u.store_state(e, state),
            // A snapshot of the other bootloader cannot come from this
            // store; keep the variables on disk rather than guess.
            (store, _) => store.update(|_| Ok(*state)).map(|_| ()),
        }
    }
}

impl fmt::Display for BootEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootEnv::Grub(file) => write!(f, "GRUB environment block {}", file.path().display()),
            BootEnv::UBoot(u) => u.layout().fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ubootfile::{UBootCopy, UBootLayout};
    use uplift_proto::names::SlotName::{A, B};

    #[test]
    fn both_backends_run_the_same_transitions() {
        let dir = tempfile::tempdir().unwrap();
        let grubenv = dir.path().join("grubenv");
        BootEnvFile::provision(&grubenv, A).unwrap();
        let img = dir.path().join("uboot.env");
        std::fs::write(&img, vec![0; 0x4000]).unwrap();
        let layout = UBootLayout::new(
            vec![
                UBootCopy {
                    device: img.clone(),
                    offset: 0,
                },
                UBootCopy {
                    device: img.clone(),
                    offset: 0x2000,
                },
            ],
            0x2000,
        )
        .unwrap();
        let uboot = UBootEnvStore::new(layout);
        let mut env = UBootEnv::new();
        BootState::new(A).apply_to(&mut env);
        uboot.write(&env).unwrap();

        for store in [
            BootEnv::Grub(BootEnvFile::new(&grubenv)),
            BootEnv::UBoot(uboot),
        ] {
            store.update(|s| s.start_trial(B, 2)).unwrap();
            let (env, state) = store.load_state().unwrap();
            store.store_state(env, &state.withdraw_trial()).unwrap();
            assert_eq!(store.load_state().unwrap().1, BootState::new(A), "{store}");
            store.update(|s| s.start_trial(B, 1)).unwrap();
            assert_eq!(store.update(|s| s.commit(B)).unwrap(), BootState::new(B));
            assert_eq!(store.load_state().unwrap().1, BootState::new(B), "{store}");
        }
    }
}
