//! The A/B trial-boot scheme as pure state transitions, so every rule can be
//! tested without a disk or a reboot.
//!
//! A new OS is never made the default directly. It is put *on trial* with a
//! small number of boot attempts; the bootloader spends one attempt before
//! each boot of it. Only the agent, once the new OS has proved healthy,
//! commits it. If the trial slot keeps failing (crash, hang, power cut
//! before the health check) the attempts run out and the bootloader goes
//! back to the committed slot by itself, which always still works because
//! the update was written to the *other* slot.
//!
//! Stored under the same keys in the GRUB environment block and in the
//! U-Boot environment (every other key is left alone), through
//! [`EnvVars`], which both formats implement:
//!
//! | key                  | meaning                                          |
//! |----------------------|--------------------------------------------------|
//! | `uplift_default`     | the committed slot, `a` or `b`                   |
//! | `uplift_trial`       | the slot on trial; absent when there is none     |
//! | `uplift_trial_tries` | boot attempts the trial slot has left            |
//! | `uplift_fallback`    | a trial slot that failed; absent once reported   |

use std::fmt;
use std::str::FromStr;

use uplift_proto::names::SlotName;

use crate::error::BootEnvError;
use crate::grubenv::GrubEnv;
use crate::ubootenv::UBootEnv;

pub const KEY_DEFAULT: &str = "uplift_default";
pub const KEY_TRIAL: &str = "uplift_trial";
pub const KEY_TRIAL_TRIES: &str = "uplift_trial_tries";
pub const KEY_FALLBACK: &str = "uplift_fallback";

/// Most boot attempts a trial may get: the GRUB script
/// (deploy/grub.cfg.snippet) and the U-Boot script (deploy/uboot/boot.cmd)
/// count down by string comparison and know the values 3, 2 and 1 only.
pub const MAX_TRIAL_TRIES: u32 = 3;

/// The variables of a bootloader environment, as the trial-boot rules see
/// them: the same four keys whatever the bootloader.
pub trait EnvVars {
    fn get(&self, name: &str) -> Option<&str>;
    fn set(&mut self, name: &str, value: &str) -> Result<(), BootEnvError>;
    fn remove(&mut self, name: &str) -> Option<String>;
}

impl EnvVars for GrubEnv {
    fn get(&self, name: &str) -> Option<&str> {
        GrubEnv::get(self, name)
    }
    fn set(&mut self, name: &str, value: &str) -> Result<(), BootEnvError> {
        GrubEnv::set(self, name, value)
    }
    fn remove(&mut self, name: &str) -> Option<String> {
        GrubEnv::remove(self, name)
    }
}

impl EnvVars for UBootEnv {
    fn get(&self, name: &str) -> Option<&str> {
        UBootEnv::get(self, name)
    }
    fn set(&mut self, name: &str, value: &str) -> Result<(), BootEnvError> {
        UBootEnv::set(self, name, value)
    }
    fn remove(&mut self, name: &str) -> Option<String> {
        UBootEnv::remove(self, name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootState {
    /// The committed slot: booted whenever no trial is running, and the one
    /// a failed trial falls back to.
    pub default_slot: SlotName,
    pub trial: Option<Trial>,
    /// A trial slot that failed (ran out of tries or was abandoned) and that
    /// the agent has not yet reported to the server.
    pub fallback_from: Option<SlotName>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trial {
    pub slot: SlotName,
    /// Boots the slot may still get. The bootloader decrements before
    /// booting, so 0 means the last attempt is in progress or used up.
    pub tries_left: u32,
}

impl BootState {
    /// A freshly provisioned device: `default_slot` committed, nothing
    /// pending.
    pub fn new(default_slot: SlotName) -> Self {
        Self {
            default_slot,
            trial: None,
            fallback_from: None,
        }
    }

    pub fn from_env(env: &impl EnvVars) -> Result<Self, BootEnvError> {
        let default_slot = match env.get(KEY_DEFAULT) {
            None => return Err(BootEnvError::NotProvisioned),
            Some(v) => parse_key::<SlotName>(KEY_DEFAULT, v)?,
        };
        let trial = match (env.get(KEY_TRIAL), env.get(KEY_TRIAL_TRIES)) {
            // A count without a trial is a harmless leftover; the next
            // `apply_to` removes it.
            (None, _) => None,
            (Some(slot), Some(tries)) => {
                let slot = parse_key::<SlotName>(KEY_TRIAL, slot)?;
                if slot == default_slot {
                    return Err(invalid(
                        KEY_TRIAL,
                        slot.as_str(),
                        format!("the slot on trial must not be the committed slot ({KEY_DEFAULT}={default_slot})"),
                    ));
                }
                Some(Trial {
                    slot,
                    tries_left: parse_key::<u32>(KEY_TRIAL_TRIES, tries)?,
                })
            }
            // Guessing a count here could boot an unproven slot forever or
            // never; refuse and let a person look.
            (Some(slot), None) => {
                return Err(invalid(
                    KEY_TRIAL,
                    slot,
                    format!("a trial needs {KEY_TRIAL_TRIES}, which is missing"),
                ))
            }
        };
        let fallback_from = env
            .get(KEY_FALLBACK)
            .map(|v| parse_key::<SlotName>(KEY_FALLBACK, v))
            .transpose()?;
        Ok(Self {
            default_slot,
            trial,
            fallback_from,
        })
    }

    /// Writes exactly the `uplift_*` keys, removing those that are unset, and
    /// leaves every other key as it was.
    pub fn apply_to(&self, env: &mut impl EnvVars) {
        put(env, KEY_DEFAULT, self.default_slot.as_str());
        match self.trial {
            Some(t) => {
                put(env, KEY_TRIAL, t.slot.as_str());
                put(env, KEY_TRIAL_TRIES, &t.tries_left.to_string());
            }
            None => {
                env.remove(KEY_TRIAL);
                env.remove(KEY_TRIAL_TRIES);
            }
        }
        match self.fallback_from {
            Some(slot) => put(env, KEY_FALLBACK, slot.as_str()),
            None => {
                env.remove(KEY_FALLBACK);
            }
        }
    }

    /// What the bootloader does at power-on: the slot to boot, and the state
    /// to save *before* booting it, so a crash during the boot has already
    /// been paid for with one attempt.
    pub fn boot(&self) -> (SlotName, BootState) {
        match self.trial {
            Some(t) if t.tries_left > 0 => {
                let next = BootState {
                    trial: Some(Trial {
                        slot: t.slot,
                        tries_left: t.tries_left - 1,
                    }),
                    ..*self
                };
                (t.slot, next)
            }
            Some(t) => {
                let next = BootState {
                    trial: None,
                    fallback_from: Some(t.slot),
                    ..*self
                };
                (self.default_slot, next)
            }
            // The committed slot has no counter, so power cuts during normal
            // operation can never make a healthy device fall back.
            None => (self.default_slot, *self),
        }
    }

    /// Puts a freshly written slot on trial for `tries` boots (1 to
    /// [`MAX_TRIAL_TRIES`]).
    pub fn start_trial(&self, slot: SlotName, tries: u32) -> Result<BootState, BootEnvError> {
        if slot == self.default_slot {
            return Err(BootEnvError::TrialOfDefaultSlot { slot });
        }
        if tries == 0 {
            return Err(BootEnvError::ZeroTries);
        }
        if tries > MAX_TRIAL_TRIES {
            return Err(BootEnvError::TooManyTries { tries });
        }
        Ok(BootState {
            trial: Some(Trial {
                slot,
                tries_left: tries,
            }),
            ..*self
        })
    }

    /// Makes the trial slot the default after the agent, running from it,
    /// found it healthy.
    pub fn commit(&self, booted: SlotName) -> Result<BootState, BootEnvError> {
        match self.trial {
            Some(t) if t.slot == booted => Ok(BootState::new(booted)),
            other => Err(BootEnvError::NotOnTrial {
                booted,
                trial: other.map(|t| t.slot),
            }),
        }
    }

    /// The health check of the trial slot failed: stop trying it. The next
    /// boot is the default slot, and the failure stays recorded until
    /// reported.
    pub fn abandon_trial(&self) -> BootState {
        match self.trial {
            Some(t) => BootState {
                trial: None,
                fallback_from: Some(t.slot),
                ..*self
            },
            None => *self,
        }
    }

    /// A trial is withdrawn before it was ever booted, because its slot is
    /// about to be overwritten: no failure to record.
    pub fn withdraw_trial(&self) -> BootState {
        BootState {
            trial: None,
            ..*self
        }
    }

    /// The agent has reported the fallback to the server.
    pub fn acknowledge_fallback(&self) -> BootState {
        BootState {
            fallback_from: None,
            ..*self
        }
    }
}

impl fmt::Display for BootState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "default {}", self.default_slot)?;
        if let Some(t) = self.trial {
            write!(f, ", trial {} ({} tries left)", t.slot, t.tries_left)?;
        }
        if let Some(s) = self.fallback_from {
            write!(f, ", fell back from {s}")?;
        }
        Ok(())
    }
}

fn parse_key<T: FromStr>(key: &'static str, value: &str) -> Result<T, BootEnvError>
where
    T::Err: fmt::Display,
{
    value
        .parse()
        .map_err(|e: T::Err| invalid(key, value, e.to_string()))
}

fn invalid(key: &'static str, value: &str, reason: String) -> BootEnvError {
    BootEnvError::InvalidState {
        key,
        value: value.to_owned(),
        reason,
    }
}

fn put(env: &mut impl EnvVars, key: &str, value: &str) {
    // Our keys and values are fixed ASCII words and digits, which `set`
    // always accepts.
    let result = env.set(key, value);
    debug_assert!(result.is_ok(), "{key}={value}: {result:?}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use SlotName::{A, B};

    fn trial(slot: SlotName, tries_left: u32) -> Option<Trial> {
        Some(Trial { slot, tries_left })
    }

    #[test]
    fn committed_slot_survives_any_number_of_boots() {
        let mut s = BootState::new(A);
        for _ in 0..1000 {
            let (slot, next) = s.boot();
            assert_eq!(slot, A);
            assert_eq!(next, s);
            s = next;
        }
    }

    #[test]
    fn trial_with_one_try_boots_once_then_falls_back() {
        let s = BootState::new(A).start_trial(B, 1).unwrap();
        let (slot, s) = s.boot();
        assert_eq!(slot, B);
        assert_eq!(s.trial, trial(B, 0));
        assert_eq!(s.fallback_from, None);

        let (slot, s) = s.boot();
        assert_eq!(slot, A);
        assert_eq!(
            s,
            BootState {
                default_slot: A,
                trial: None,
                fallback_from: Some(B)
            }
        );

        // Falling back is final: later boots stay on the default slot.
        let (slot, again) = s.boot();
        assert_eq!((slot, again), (A, s));
    }

    #[test]
    fn trial_counts_down_each_boot() {
        let mut s = BootState::new(A).start_trial(B, 3).unwrap();
        for left in [2, 1, 0] {
            let (slot, next) = s.boot();
            assert_eq!(slot, B);
            assert_eq!(next.trial, trial(B, left));
            s = next;
        }
        assert_eq!(s.boot().0, A);
    }

    #[test]
    fn start_trial_refuses_default_slot_and_zero_tries() {
        let s = BootState::new(A);
        assert!(matches!(
            s.start_trial(A, 3),
            Err(BootEnvError::TrialOfDefaultSlot { slot: A })
        ));
        assert!(matches!(s.start_trial(B, 0), Err(BootEnvError::ZeroTries)));
        assert_eq!(s.start_trial(B, 3).unwrap().trial, trial(B, 3));
    }

    #[test]
    fn start_trial_replaces_a_previous_trial_and_keeps_an_unreported_fallback() {
        let s = BootState {
            default_slot: A,
            trial: trial(B, 1),
            fallback_from: Some(B),
        };
        let s = s.start_trial(B, 3).unwrap();
        assert_eq!(s.trial, trial(B, 3));
        assert_eq!(s.fallback_from, Some(B));
    }

    #[test]
    fn more_tries_than_the_grub_script_counts_are_refused() {
        let s = BootState::new(A);
        assert!(s.start_trial(B, MAX_TRIAL_TRIES).is_ok());
        assert!(matches!(
            s.start_trial(B, MAX_TRIAL_TRIES + 1),
            Err(BootEnvError::TooManyTries { tries: 4 })
        ));
    }

    #[test]
    fn commit_makes_the_trial_slot_default_and_clears_everything() {
        let s = BootState {
            default_slot: A,
            trial: trial(B, 0),
            fallback_from: Some(B),
        };
        let c = s.commit(B).unwrap();
        assert_eq!(c, BootState::new(B));
        assert_eq!(c.boot().0, B);
    }

    #[test]
    fn commit_of_a_slot_not_on_trial_is_refused() {
        let s = BootState::new(A).start_trial(B, 2).unwrap();
        assert!(matches!(
            s.commit(A),
            Err(BootEnvError::NotOnTrial {
                booted: A,
                trial: Some(B)
            })
        ));
        // After a fallback there is no trial left to commit.
        let fell_back = s.boot().1.boot().1.boot().1;
        assert_eq!(fell_back.trial, None);
        let err = fell_back.commit(B).unwrap_err();
        assert!(matches!(
            err,
            BootEnvError::NotOnTrial {
                booted: B,
                trial: None
            }
        ));
        assert!(err.to_string().contains("no slot is on trial"), "{err}");
    }

    #[test]
    fn abandon_trial_falls_back_without_touching_default() {
        let s = BootState::new(A).start_trial(B, 3).unwrap();
        let s = s.abandon_trial();
        assert_eq!(
            s,
            BootState {
                default_slot: A,
                trial: None,
                fallback_from: Some(B)
            }
        );
        assert_eq!(s.boot().0, A);
        // Nothing on trial: nothing to abandon.
        assert_eq!(BootState::new(A).abandon_trial(), BootState::new(A));
    }

    #[test]
    fn acknowledge_fallback_clears_only_the_fallback() {
        let s = BootState {
            default_slot: A,
            trial: trial(B, 2),
            fallback_from: Some(B),
        };
        assert_eq!(
            s.acknowledge_fallback(),
            BootState {
                fallback_from: None,
                ..s
            }
        );
    }

    #[test]
    fn env_round_trip_touches_only_uplift_keys() {
        let mut env = GrubEnv::new();
        env.set("saved_entry", "linux").unwrap();
        let s = BootState {
            default_slot: B,
            trial: trial(A, 2),
            fallback_from: Some(A),
        };
        s.apply_to(&mut env);
        env.set("next_entry", "").unwrap();
        assert_eq!(BootState::from_env(&env).unwrap(), s);
        assert_eq!(
            env.iter().collect::<Vec<_>>(),
            [
                ("saved_entry", "linux"),
                ("uplift_default", "b"),
                ("uplift_trial", "a"),
                ("uplift_trial_tries", "2"),
                ("uplift_fallback", "a"),
                ("next_entry", ""),
            ]
        );

        BootState::new(A).apply_to(&mut env);
        assert_eq!(
            env.iter().collect::<Vec<_>>(),
            [
                ("saved_entry", "linux"),
                ("uplift_default", "a"),
                ("next_entry", "")
            ]
        );
        assert_eq!(BootState::from_env(&env).unwrap(), BootState::new(A));
    }

    #[test]
    fn unprovisioned_env_is_an_error() {
        let err = BootState::from_env(&GrubEnv::new()).unwrap_err();
        assert!(matches!(err, BootEnvError::NotProvisioned));
        assert!(err.to_string().contains("never provisioned"), "{err}");
    }

    #[test]
    fn invalid_stored_values_are_errors() {
        let cases: &[&[(&str, &str)]] = &[
            &[("uplift_default", "c")],
            &[("uplift_default", "a"), ("uplift_trial", "b")],
            &[
                ("uplift_default", "a"),
                ("uplift_trial", "b"),
                ("uplift_trial_tries", "-1"),
            ],
            &[
                ("uplift_default", "a"),
                ("uplift_trial", "a"),
                ("uplift_trial_tries", "1"),
            ],
            &[("uplift_default", "a"), ("uplift_fallback", "")],
        ];
        for vars in cases {
            let mut env = GrubEnv::new();
            for (k, v) in *vars {
                env.set(k, v).unwrap();
            }
            let err = BootState::from_env(&env).unwrap_err();
            assert!(
                matches!(err, BootEnvError::InvalidState { .. }),
                "{vars:?}: {err}"
            );
        }
    }

    /// The same rules on a U-Boot environment: every step goes through the
    /// bytes a redundant copy holds, as U-Boot and the agent hand it over.
    #[test]
    fn trial_rules_on_uboot_keys() {
        use crate::ubootenv::{decode_copy, encode_copy, Layout};
        let through_copy = |s: &BootState, env: &mut UBootEnv| {
            s.apply_to(env);
            let bytes = encode_copy(env, Layout::Redundant, 256, 1).unwrap();
            *env = decode_copy(&bytes, Layout::Redundant, 1, 0).unwrap().env;
            BootState::from_env(env).unwrap()
        };
        let mut env = UBootEnv::new();
        env.set("bootcmd", "source ${scriptaddr}").unwrap();
        let mut s = through_copy(&BootState::new(A), &mut env);
        s = through_copy(&s.start_trial(B, 2).unwrap(), &mut env);
        assert_eq!(
            env.iter().collect::<Vec<_>>(),
            [
                ("bootcmd", "source ${scriptaddr}"),
                ("uplift_default", "a"),
                ("uplift_trial", "b"),
                ("uplift_trial_tries", "2"),
            ]
        );
        // Two boots of b, then the tries are spent and a boots.
        for (want_slot, want_tries) in [(B, Some(1)), (B, Some(0)), (A, None)] {
            let (slot, next) = s.boot();
            assert_eq!(slot, want_slot);
            s = through_copy(&next, &mut env);
            assert_eq!(
                env.get(KEY_TRIAL_TRIES),
                want_tries.map(|t: u32| t.to_string()).as_deref()
            );
        }
        assert_eq!(env.get(KEY_FALLBACK), Some("b"));
        assert_eq!(env.get(KEY_TRIAL), None);
        s = through_copy(&s.acknowledge_fallback(), &mut env);
        // A new trial that passes its health check is committed.
        s = through_copy(&s.start_trial(B, 3).unwrap(), &mut env);
        let (slot, next) = s.boot();
        assert_eq!(slot, B);
        s = through_copy(&next.commit(B).unwrap(), &mut env);
        assert_eq!(s, BootState::new(B));
        assert_eq!(
            env.iter().collect::<Vec<_>>(),
            [("bootcmd", "source ${scriptaddr}"), ("uplift_default", "b")]
        );
        // A stored value U-Boot's script would not understand is refused.
        env.set(KEY_TRIAL, "a").unwrap();
        env.set(KEY_TRIAL_TRIES, "many").unwrap();
        assert!(matches!(
            BootState::from_env(&env),
            Err(BootEnvError::InvalidState {
                key: KEY_TRIAL_TRIES,
                ..
            })
        ));
    }
}
