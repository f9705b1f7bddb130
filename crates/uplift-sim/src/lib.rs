//! The boot simulator: the one simulated part of an Uplift test fleet.
//!
//! Everything else in a simulated device is real (the agent, its downloads,
//! the GRUB environment file and the A/B rules in it); only the reboot is
//! played. `uplift-boot-sim` stands in for firmware and bootloader: at every
//! simulated power-on it does what a GRUB script does on a real device,
//! then runs the agent as "the booted OS". When the agent wants to reboot it
//! exits with [`REBOOT_REQUEST_EXIT_CODE`] and the simulator powers on again.
//!
//! The slot that was booted reaches the agent the way it does on hardware:
//! through a kernel command line (`uplift.slot=a|b`), here a file the
//! agent is told to read instead of `/proc/cmdline`.

pub mod postgres;
mod signals;

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use uplift_bootenv::{write_file_atomically, BootEnvError, BootEnvFile};
use uplift_proto::names::SlotName;

pub use signals::install_stop_handler;
pub use uplift_bootenv::REBOOT_REQUEST_EXIT_CODE;

/// The key the agent looks for on its kernel command line.
pub const CMDLINE_SLOT_KEY: &str = "uplift.slot";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    #[error(transparent)]
    BootEnv(#[from] BootEnvError),

    #[error("cannot start the agent {program:?}: {source}; check the command given after `--`")]
    Spawn {
        program: OsString,
        #[source]
        source: io::Error,
    },

    #[error("lost track of the agent process: {source}")]
    Wait {
        #[source]
        source: io::Error,
    },

    #[error("the agent asked for a reboot after each of {boots} boots, the --max-boots limit; a boot loop is a bug: see the agent's output above (raise --max-boots only if the scenario really needs more boots)")]
    BootLoop { boots: u32 },
}

/// What kind of boot a power-on turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootKind {
    /// The committed slot, with nothing on trial.
    Committed,
    /// The slot on trial, with `tries_left` attempts after this one.
    Trial { tries_left: u32 },
    /// The slot on trial ran out of attempts; this boot is the committed
    /// slot again.
    Fallback { from: SlotName },
}

/// One simulated power-on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootRecord {
    pub slot: SlotName,
    pub kind: BootKind,
}

impl fmt::Display for BootRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {} ", self.slot)?;
        match self.kind {
            BootKind::Committed => f.write_str("(committed)"),
            BootKind::Trial { tries_left: 1 } => f.write_str("(trial, 1 try left)"),
            BootKind::Trial { tries_left } => write!(f, "(trial, {tries_left} tries left)"),
            BootKind::Fallback { from } => write!(f, "(fallback from {from})"),
        }
    }
}

/// The kernel command line that tells the agent which slot it booted.
pub fn cmdline_for(slot: SlotName) -> String {
    format!("{CMDLINE_SLOT_KEY}={slot}\n")
}

/// One bootloader step: picks the slot by the A/B rules, stores the new
/// state, then writes the command line for the chosen slot.
///
/// The state is stored before anything is booted, as GRUB's `save_env`
/// does, so an agent that crashes or hangs has still used up its attempt.
pub fn power_on(bootenv: &Path, cmdline: &Path) -> Result<BootRecord, SimError> {
    let file = BootEnvFile::new(bootenv);
    let (env, state) = file.load_state()?;
    let (slot, next) = state.boot();
    file.store_state(env, &next)?;

    let kind = match (state.trial, next.trial) {
        (_, Some(t)) => BootKind::Trial {
            tries_left: t.tries_left,
        },
        (Some(t), None) => BootKind::Fallback { from: t.slot },
        (None, None) => BootKind::Committed,
    };
    write_file_atomically(cmdline, cmdline_for(slot).as_bytes())?;
    Ok(BootRecord { slot, kind })
}

/// What `uplift-boot-sim` runs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub bootenv: PathBuf,
    pub cmdline: PathBuf,
    /// Boots after which a further reboot request is a boot loop.
    pub max_boots: u32,
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Slot images, when known: an image that starts with
    /// [`KERNEL_PANIC_MARKER`] "panics" at boot instead of starting the
    /// agent, one that starts with [`KERNEL_HANG_MARKER`] hangs.
    pub slots: Option<[PathBuf; 2]>,
    /// The hardware watchdog: on a trial boot, the new OS must commit its
    /// slot within this time or the device is reset, as a watchdog that only
    /// a healthy system pets would. Committed boots are not watched.
    pub watchdog: Option<Duration>,
}

/// First bytes of an image that the simulated kernel cannot boot: the way a
/// test ships a release that never reaches user space,
/// so the bootloader's try counting and fallback are exercised for real.
pub const KERNEL_PANIC_MARKER: &[u8] = b"UPLIFT-SIM-KERNEL-PANIC";

/// First bytes of an image whose simulated kernel hangs before user space:
/// only the watchdog gets such a device going again.
pub const KERNEL_HANG_MARKER: &[u8] = b"UPLIFT-SIM-KERNEL-HANG";

/// What the simulated kernel does with a slot's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Boots,
    Panics,
    Hangs,
}

/// Looks at the first bytes of `image` for [`KERNEL_PANIC_MARKER`] or
/// [`KERNEL_HANG_MARKER`]; an unreadable image is not this check's business.
pub fn kernel_for(image: &Path) -> Kernel {
    use std::io::Read;
    let mut head = [0u8; 32];
    let Ok(mut file) = std::fs::File::open(image) else {
        return Kernel::Boots;
    };
    let mut len = 0;
    while len < head.len() {
        match file.read(&mut head[len..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
    }
    let head = &head[..len];
    if head.starts_with(KERNEL_PANIC_MARKER) {
        Kernel::Panics
    } else if head.starts_with(KERNEL_HANG_MARKER) {
        Kernel::Hangs
    } else {
        Kernel::Boots
    }
}

/// True if the slot's image carries [`KERNEL_PANIC_MARKER`].
pub fn image_panics(image: &Path) -> bool {
    kernel_for(image) == Kernel::Panics
}

/// How the simulation ended, when it ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimOutcome {
    /// The agent exited with something other than a reboot request; for a
    /// death by signal the code is 128 + the signal number, as in a shell.
    AgentExited { code: i32 },
    /// The simulator was asked to stop (SIGTERM/SIGINT) and the agent has
    /// been stopped too.
    Stopped,
}

impl SimOutcome {
    pub fn exit_code(self) -> i32 {
        match self {
            SimOutcome::AgentExited { code } => code,
            SimOutcome::Stopped => 0,
        }
    }
}

/// How often a running agent is checked for exit or a stop request; short
/// enough to feel immediate, long enough to cost nothing.
const POLL: Duration = Duration::from_millis(20);

/// Powers the device on, runs the agent, and powers on again whenever the
/// agent asks for a reboot, until the agent exits for good, `stop` is set
/// (by [`install_stop_handler`] or the caller) or `max_boots` is reached.
pub fn run(config: &SimConfig, stop: &AtomicBool) -> Result<SimOutcome, SimError> {
    for boot in 1..=config.max_boots {
        if stop.load(Ordering::SeqCst) {
            return Ok(SimOutcome::Stopped);
        }
        let record = power_on(&config.bootenv, &config.cmdline)?;
        eprintln!("boot-sim: boot #{boot}: {record}");
        let watchdog = match record.kind {
            BootKind::Trial { .. } => config.watchdog.map(|limit| Watchdog {
                deadline: Instant::now() + limit,
                limit,
                bootenv: &config.bootenv,
                slot: record.slot,
            }),
            BootKind::Committed | BootKind::Fallback { .. } => None,
        };
        let kernel = config.slots.as_ref().map_or(Kernel::Boots, |slots| {
            kernel_for(match record.slot {
                SlotName::A => &slots[0],
                SlotName::B => &slots[1],
            })
        });
        match kernel {
            Kernel::Boots => {}
            Kernel::Panics => {
                eprintln!("boot-sim: kernel panic on slot {} (the image cannot boot); the watchdog resets the device", record.slot);
                continue;
            }
            Kernel::Hangs => {
                eprintln!(
                    "boot-sim: the kernel on slot {} hangs before user space",
                    record.slot
                );
                // Nothing but a watchdog (or power) ends a hung boot; a
                // committed slot that hangs is not a scenario this models.
                let limit = watchdog.map(|w| w.limit);
                if sleep_or_stop(limit, stop) {
                    return Ok(SimOutcome::Stopped);
                }
                say_watchdog_reset(record.slot, limit.unwrap_or_default());
                continue;
            }
        }

        // Its own process group, so a watchdog reset can end everything
        // the "OS" started (a health check, say), as a real reset does.
        let child = Command::new(&config.program)
            .args(&config.args)
            .process_group(0)
            .spawn()
            .map_err(|source| SimError::Spawn {
                program: config.program.clone(),
                source,
            })?;
        match wait_or_stop(child, stop, watchdog)? {
            Waited::Stopped => {
                eprintln!("boot-sim: stopped by signal; agent terminated");
                return Ok(SimOutcome::Stopped);
            }
            Waited::WatchdogReset { limit } => {
                say_watchdog_reset(record.slot, limit);
            }
            Waited::Exited(status) => {
                let code = exit_code(status);
                if code != REBOOT_REQUEST_EXIT_CODE {
                    eprintln!("boot-sim: agent exited with code {code}; powering off");
                    return Ok(SimOutcome::AgentExited { code });
                }
                eprintln!("boot-sim: agent requested a reboot");
            }
        }
    }
    Err(SimError::BootLoop {
        boots: config.max_boots,
    })
}

fn say_watchdog_reset(slot: SlotName, limit: Duration) {
    eprintln!(
        "boot-sim: watchdog: slot {slot} did not commit within {:.1} s; resetting the device",
        limit.as_secs_f64()
    );
}

/// The watchdog of one trial boot.
#[derive(Debug, Clone, Copy)]
struct Watchdog<'a> {
    deadline: Instant,
    limit: Duration,
    bootenv: &'a Path,
    slot: SlotName,
}

impl Watchdog<'_> {
    /// Whether the booted slot is still on trial: the healthy OS would have
    /// committed it (and taken over petting the watchdog) by now. An
    /// unreadable environment counts as "still on trial": the real watchdog
    /// knows nothing of files, only that nobody petted it.
    fn still_on_trial(&self) -> bool {
        BootEnvFile::new(self.bootenv)
            .load_state()
            .map_or(true, |(_, state)| {
                state.trial.is_some_and(|t| t.slot == self.slot)
            })
    }
}

enum Waited {
    Exited(ExitStatus),
    Stopped,
    WatchdogReset { limit: Duration },
}

/// Sleeps for `limit` (for ever with `None`) or until a stop request;
/// returns true if stopped.
fn sleep_or_stop(limit: Option<Duration>, stop: &AtomicBool) -> bool {
    let start = Instant::now();
    while limit.is_none_or(|l| start.elapsed() < l) {
        if stop.load(Ordering::SeqCst) {
            return true;
        }
        std::thread::sleep(POLL);
    }
    false
}

/// Waits for the agent. On a stop request forwards SIGTERM and waits for it
/// to go; when the watchdog fires on a slot still on trial, SIGKILLs it (a
/// reset gives no warning).
fn wait_or_stop(
    mut child: Child,
    stop: &AtomicBool,
    mut watchdog: Option<Watchdog<'_>>,
) -> Result<Waited, SimError> {
    let wait_err = |source| SimError::Wait { source };
    loop {
        if let Some(status) = child.try_wait().map_err(wait_err)? {
            return Ok(Waited::Exited(status));
        }
        if stop.load(Ordering::SeqCst) {
            // Failing to signal means the child is already gone; the wait
            // below then returns at once.
            let _ = signals::terminate(&child);
            child.wait().map_err(wait_err)?;
            return Ok(Waited::Stopped);
        }
        if let Some(dog) = watchdog.filter(|d| Instant::now() >= d.deadline) {
            if dog.still_on_trial() {
                let _ = signals::reset(&child);
                child.wait().map_err(wait_err)?;
                return Ok(Waited::WatchdogReset { limit: dog.limit });
            }
            watchdog = None;
        }
        std::thread::sleep(POLL);
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signo)) => 128 + signo,
        // Neither exited nor killed cannot happen for a waited-for child.
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uplift_bootenv::{BootState, GrubEnv};
    use SlotName::{A, B};

    struct Device {
        _dir: tempfile::TempDir,
        bootenv: PathBuf,
        cmdline: PathBuf,
    }

    fn device(state: BootState) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let bootenv = dir.path().join("grubenv");
        let cmdline = dir.path().join("cmdline");
        let mut env = GrubEnv::new();
        env.set("saved_entry", "uplift").unwrap();
        BootEnvFile::new(&bootenv).store_state(env, &state).unwrap();
        Device {
            _dir: dir,
            bootenv,
            cmdline,
        }
    }

    fn boot(d: &Device) -> BootRecord {
        let record = power_on(&d.bootenv, &d.cmdline).unwrap();
        assert_eq!(
            std::fs::read_to_string(&d.cmdline).unwrap(),
            cmdline_for(record.slot)
        );
        record
    }

    fn state(d: &Device) -> BootState {
        BootEnvFile::new(&d.bootenv).load_state().unwrap().1
    }

    #[test]
    fn committed_boot_changes_nothing() {
        let d = device(BootState::new(B));
        for _ in 0..3 {
            let r = boot(&d);
            assert_eq!(
                r,
                BootRecord {
                    slot: B,
                    kind: BootKind::Committed
                }
            );
            assert_eq!(r.to_string(), "slot b (committed)");
        }
        assert_eq!(state(&d), BootState::new(B));
    }

    #[test]
    fn trial_boot_then_fallback() {
        let d = device(BootState::new(A).start_trial(B, 2).unwrap());

        let r = boot(&d);
        assert_eq!(
            r,
            BootRecord {
                slot: B,
                kind: BootKind::Trial { tries_left: 1 }
            }
        );
        assert_eq!(r.to_string(), "slot b (trial, 1 try left)");
        let r = boot(&d);
        assert_eq!(r.to_string(), "slot b (trial, 0 tries left)");
        // Stored before the boot: a crash now has used the attempt.
        assert_eq!(state(&d).trial.unwrap().tries_left, 0);

        let r = boot(&d);
        assert_eq!(
            r,
            BootRecord {
                slot: A,
                kind: BootKind::Fallback { from: B }
            }
        );
        assert_eq!(r.to_string(), "slot a (fallback from b)");
        let s = state(&d);
        assert_eq!(
            (s.default_slot, s.trial, s.fallback_from),
            (A, None, Some(B))
        );

        // Until reported, the fallback stays recorded; the boot is normal.
        assert_eq!(boot(&d).kind, BootKind::Committed);
        assert_eq!(state(&d).fallback_from, Some(B));
        let env = BootEnvFile::new(&d.bootenv).read().unwrap();
        assert_eq!(env.get("saved_entry"), Some("uplift"));
    }

    #[test]
    fn unprovisioned_env_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bootenv = dir.path().join("grubenv");
        let err = power_on(&bootenv, &dir.path().join("cmdline")).unwrap_err();
        assert!(err.to_string().contains("grubenv"), "{err}");

        BootEnvFile::new(&bootenv).write(&GrubEnv::new()).unwrap();
        let err = power_on(&bootenv, &dir.path().join("cmdline")).unwrap_err();
        assert!(err.to_string().contains("never provisioned"), "{err}");
    }

    #[test]
    fn cmdline_names_the_slot() {
        assert_eq!(cmdline_for(A), "uplift.slot=a\n");
        assert_eq!(cmdline_for(B), "uplift.slot=b\n");
    }
}

#[cfg(test)]
mod panic_marker_tests {
    use super::*;

    #[test]
    fn only_an_image_that_starts_with_the_marker_panics() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.img");
        let good = dir.path().join("good.img");
        let mut bytes = KERNEL_PANIC_MARKER.to_vec();
        bytes.extend_from_slice(&[0u8; 100]);
        std::fs::write(&bad, &bytes).unwrap();
        std::fs::write(&good, &bytes[1..]).unwrap();
        assert!(image_panics(&bad));
        assert!(!image_panics(&good));
        assert!(
            !image_panics(&dir.path().join("missing.img")),
            "an absent image is not this check's business"
        );
    }

    #[test]
    fn the_hang_marker_makes_a_hanging_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let hangs = dir.path().join("hangs.img");
        let short = dir.path().join("short.img");
        let mut bytes = KERNEL_HANG_MARKER.to_vec();
        bytes.extend_from_slice(&[7u8; 4096]);
        std::fs::write(&hangs, &bytes).unwrap();
        std::fs::write(&short, &KERNEL_HANG_MARKER[..5]).unwrap();
        assert_eq!(kernel_for(&hangs), Kernel::Hangs);
        assert_eq!(kernel_for(&short), Kernel::Boots, "a prefix is no marker");
        assert!(!image_panics(&hangs));
    }
}
