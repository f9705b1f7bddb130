//! `uplift-agent status`: what the device itself knows, read from its own
//! files with no network: which slot booted, what each slot holds, the boot
//! environment, an install waiting for its reboot, an interrupted download's
//! resume point, and the last failure with its reason.

use crate::config::AgentConfig;
use crate::local::{Enrollment, InstallProgress, Journal, LocalState, SlotTable};
use crate::run::read_booted_slot;
use serde::Serialize;
use uplift_proto::SlotName;

#[derive(Debug, Serialize)]
pub struct Status {
    pub device_id: Option<String>,
    /// Before the device has its ID: whether its enrollment waits for an
    /// operator or was refused, in the server's words.
    pub enrollment: Option<Enrollment>,
    pub booted_slot: Option<String>,
    pub running_version: Option<String>,
    /// The version flashed into slot a at the factory (`factory_version` in
    /// the config): what slot a holds until Uplift first writes it.
    pub factory_version: String,
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
    let (boot_environment, boot_environment_error) = match config.boot.env.load_state() {
        Ok((_, state)) => (Some(state.to_string()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let device_id = local.device_id()?;
    Ok(Status {
        device_id: device_id.as_ref().map(|id| id.to_string()),
        // Only while the device has no ID: a note left by a crash at the
        // wrong moment says nothing once it has one.
        enrollment: match device_id {
            Some(_) => None,
            None => local.enrollment()?,
        },
        booted_slot: booted.map(|s| s.to_string()),
        running_version,
        factory_version: config.factory_version.to_string(),
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
        let slot = |name: SlotName| match self.slots.get(name) {
            Some(c) => c.version.to_string(),
            None if self
                .install_progress
                .as_ref()
                .is_some_and(|p| p.slot == name) =>
            {
                "being written (see interrupted below)".to_owned()
            }
            // Slot a is the factory-flashed one (the provisioning rule); the
            // agent treats an unrecorded slot a as the factory version too.
            None if name == SlotName::A => format!("{} (factory image)", self.factory_version),
            None => "not written by Uplift (empty, or being written)".to_owned(),
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
            slot(SlotName::A),
            slot(SlotName::B),
        );
        match &self.enrollment {
            Some(Enrollment::Pending { message }) => {
                out += &format!("enrollment:       waiting for an operator: {message}\n");
            }
            Some(Enrollment::Refused { message }) => {
                out += &format!("enrollment:       REFUSED: {message}\n");
            }
            None => {}
        }
        if let Some(p) = &self.journal.pending {
            out += &format!(
                "pending:          {} installed in slot {}, waiting for its trial boot\n",
                p.version, p.slot
            );
        }
        if let Some(p) = &self.journal.awaiting_reboot {
            out += &format!(
                "awaiting reboot:  {} written and verified in slot {}, waiting for the server's go \
                 (its reboot window); the boot environment does not point at it\n",
                p.version, p.slot
            );
        }
        // The resume point is kept while a verified slot waits for its
        // reboot (a withdrawn slot offered again is re-checked, not fetched).
        if let Some(p) = self.install_progress.as_ref().filter(|p| {
            self.journal
                .awaiting_reboot
                .as_ref()
                .is_none_or(|a| a.slot != p.slot)
        }) {
            out += &format!(
                "interrupted:      download into slot {} resumes after {:.1} MiB already verified\n",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::SlotContent;

    fn status(slots: SlotTable, install_progress: Option<InstallProgress>) -> Status {
        Status {
            device_id: Some("dev-1".into()),
            enrollment: None,
            booted_slot: Some("a".into()),
            running_version: Some("1.0".into()),
            factory_version: "1.0".into(),
            boot_environment: Some("default a, committed".into()),
            boot_environment_error: None,
            slots,
            journal: Journal::default(),
            install_progress,
        }
    }

    fn line<'a>(text: &'a str, label: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{text}"))
    }

    #[test]
    fn an_enrollment_waiting_or_refused_is_shown_in_the_servers_words() {
        let mut waiting = status(SlotTable::default(), None);
        waiting.device_id = None;
        waiting.enrollment = Some(Enrollment::Pending {
            message: "enrollment request 4 waits for an operator".into(),
        });
        assert_eq!(
            line(&waiting.render(), "enrollment:"),
            "enrollment:       waiting for an operator: enrollment request 4 waits for an operator"
        );
        waiting.enrollment = Some(Enrollment::Refused {
            message: "enrollment_rejected: not ours".into(),
        });
        assert_eq!(
            line(&waiting.render(), "enrollment:"),
            "enrollment:       REFUSED: enrollment_rejected: not ours"
        );
        assert!(!status(SlotTable::default(), None)
            .render()
            .contains("enrollment:"));
    }

    #[test]
    fn a_factory_flashed_slot_a_names_the_factory_version() {
        let text = status(SlotTable::default(), None).render();
        assert_eq!(
            line(&text, "slot a:"),
            "slot a:           1.0 (factory image)"
        );
        assert_eq!(
            line(&text, "slot b:"),
            "slot b:           not written by Uplift (empty, or being written)"
        );
    }

    #[test]
    fn a_slot_written_by_uplift_or_being_written_says_so() {
        let mut slots = SlotTable::default();
        slots.set(
            SlotName::B,
            Some(SlotContent {
                version: "1.1".parse().unwrap(),
                image_sha256: "00".into(),
            }),
        );
        let text = status(slots.clone(), None).render();
        assert_eq!(line(&text, "slot b:"), "slot b:           1.1");
        // Running b, installing into a: slot a no longer holds the factory image.
        let progress = InstallProgress {
            slot: SlotName::A,
            image_sha256: "11".into(),
            verified_bytes: 1024 * 1024,
            done: vec![[0, 16]],
        };
        let text = status(slots, Some(progress)).render();
        assert_eq!(
            line(&text, "slot a:"),
            "slot a:           being written (see interrupted below)"
        );
    }

    #[test]
    fn a_verified_slot_waiting_for_its_reboot_says_so_and_not_that_a_download_was_interrupted() {
        let mut slots = SlotTable::default();
        slots.set(
            SlotName::B,
            Some(SlotContent {
                version: "1.1".parse().unwrap(),
                image_sha256: "11".into(),
            }),
        );
        let progress = InstallProgress {
            slot: SlotName::B,
            image_sha256: "11".into(),
            verified_bytes: 0,
            done: vec![[0, 16]],
        };
        let mut waiting = status(slots, Some(progress));
        waiting.journal.awaiting_reboot = Some(crate::local::PendingInstall {
            slot: SlotName::B,
            version: "1.1".parse().unwrap(),
            rollout_id: 3,
        });
        let text = waiting.render();
        assert!(
            line(&text, "awaiting reboot:").contains("1.1 written and verified in slot b"),
            "{text}"
        );
        assert!(!text.contains("interrupted:"), "{text}");
    }

    #[test]
    fn gather_reads_the_factory_version_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let at = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(
            &path,
            format!(
                "server_url = \"https://127.0.0.1:8443\"\nserver_ca = \"/etc/uplift/ca.pem\"\n\
                 enrollment_token = \"t\"\ndevice_type = \"gw\"\nstate_dir = {state:?}\n\
                 trusted_release_keys = [\"ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\"]\n\
                 factory_version = \"2.5\"\n[slots]\na = {a:?}\nb = {b:?}\n[boot]\nenv_file = {env:?}\n",
                state = at("state"),
                a = at("slot-a"),
                b = at("slot-b"),
                env = at("grubenv"),
            ),
        )
        .unwrap();
        let config = crate::config::AgentConfig::load(&path).unwrap();
        let status = gather(&config).unwrap();
        assert_eq!(status.factory_version, "2.5");
        assert!(status
            .render()
            .contains("slot a:           2.5 (factory image)"));
    }
}
