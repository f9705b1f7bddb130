//! `uplift-agent status`: what the device itself knows, read from its own
//! files with no network: which slot booted, what each slot holds, the boot
//! environment, an install waiting for its reboot, an interrupted download's
//! resume point, and the last failure with its reason.

use crate::config::AgentConfig;
use crate::local::{InstallProgress, Journal, LocalState, SlotTable};
use crate::run::read_booted_slot;
use serde::Serialize;
use uplift_bootenv::file::BootEnvFile;

#[derive(Debug, Serialize)]
pub struct Status {
    pub device_id: Option<String>,
    pub booted_slot: Option<String>,
    pub running_version: Option<String>,
    /// The boot environment in words, or why it cannot be read.
    pub boot_environment: Option<String>,
    pub boot_environment_error: Option<String>,
    pub slots: SlotTable,
    pub journal: Journal,
    pub install_progress: Option<InstallProgress>,
}

pub fn gather(config: &AgentConfig) -> anyhow::Result<Status> {
    let local = LocalState::open(&config.state_dir)?;
    let slots = local.slots()?;
    let journal = local.journal()?;
    let booted = read_booted_slot(&config.boot.cmdline).ok();
    // The same rule as the state machine: what the slot records, else the
    // install pending for it, else the factory version.
    let running_version = booted.map(|slot| {
        slots
            .get(slot)
            .map(|c| c.version.to_string())
            .or_else(|| {
                journal
                    .pending
                    .as_ref()
                    .filter(|p| p.slot == slot)
                    .map(|p| p.version.to_string())
            })
            .unwrap_or_else(|| config.factory_version.to_string())
    });
    let (boot_environment, boot_environment_error) =
        match BootEnvFile::new(config.boot.env_file.clone()).load_state() {
            Ok((_, state)) => (Some(state.to_string()), None),
            Err(e) => (None, Some(e.to_string())),
        };
    Ok(Status {
        device_id: local.device_id()?.map(|id| id.to_string()),
        booted_slot: booted.map(|s| s.to_string()),
        running_version,
        boot_environment,
        boot_environment_error,
        slots,
        journal,
        install_progress: local.install_progress()?,
    })
}

impl Status {
    pub fn render(&self) -> String {
        let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let slot = |s: &Option<crate::local::SlotContent>| {
            s.as_ref()
                .map(|c| c.version.to_string())
                .unwrap_or_else(|| "not written by Uplift (factory image, or being written)".into())
        };
        let mut out = format!(
            "device id:        {}\nbooted slot:      {}\nrunning version:  {}\nboot environment: {}\nslot a:           {}\nslot b:           {}\n",
            or_dash(&self.device_id),
            or_dash(&self.booted_slot),
            or_dash(&self.running_version),
            match (&self.boot_environment, &self.boot_environment_error) {
                (Some(s), _) => s.clone(),
                (None, Some(e)) => format!("UNREADABLE: {e}"),
                (None, None) => "-".to_owned(),
            },
            slot(&self.slots.a),
            slot(&self.slots.b),
        );
        if let Some(p) = &self.journal.pending {
            out += &format!(
                "pending:          {} installed in slot {}, waiting for its trial boot\n",
                p.version, p.slot
            );
        }
        if let Some(p) = &self.install_progress {
            out += &format!(
                "interrupted:      download into slot {} resumes after {:.1} MiB\n",
                p.slot,
                p.verified_bytes as f64 / 1048576.0
            );
        }
        if let Some(f) = &self.journal.last_failure {
            out += &format!(
                "last failure:     {} ({}): {}\n",
                f.version, f.error.kind, f.error.message
            );
        }
        if !self.journal.rolled_back.is_empty() {
            let versions: Vec<String> = self
                .journal
                .rolled_back
                .iter()
                .map(ToString::to_string)
                .collect();
            out += &format!(
                "rolled back:      {} (not installed again automatically)\n",
                versions.join(", ")
            );
        }
        out
    }
}
