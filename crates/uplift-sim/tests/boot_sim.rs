//! Runs the real `uplift-boot-sim` binary with tiny shell-script agents.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use uplift_bootenv::{BootEnvFile, BootState};
use uplift_proto::names::SlotName;
use uplift_sim::KERNEL_HANG_MARKER;

const SIM: &str = env!("CARGO_BIN_EXE_uplift-boot-sim");

struct Device {
    dir: tempfile::TempDir,
}

impl Device {
    fn new(state: BootState) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = Device { dir };
        BootEnvFile::provision(d.bootenv(), state.default_slot).unwrap();
        let file = BootEnvFile::new(d.bootenv());
        let (env, _) = file.load_state().unwrap();
        file.store_state(env, &state).unwrap();
        d
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn bootenv(&self) -> PathBuf {
        self.path("grubenv")
    }
    fn cmdline(&self) -> PathBuf {
        self.path("cmdline")
    }
    fn log(&self) -> String {
        fs::read_to_string(self.path("log")).unwrap_or_default()
    }

    /// The simulator command with an agent that appends the slot it booted
    /// to `log`, then runs `script`.
    fn sim(&self, max_boots: u32, script: &str) -> Command {
        self.sim_with(max_boots, &[], script)
    }

    /// [`Device::sim`] with more simulator options; the script sees the
    /// booted slot in `$slot`.
    fn sim_with(&self, max_boots: u32, options: &[&str], script: &str) -> Command {
        let agent = format!(
            r#"read line < "$1"; slot="${{line#uplift.slot=}}"; echo "$slot" >> "$2"; {script}"#
        );
        let mut cmd = Command::new(SIM);
        cmd.args(options)
            .arg("--bootenv")
            .arg(self.bootenv())
            .arg("--cmdline")
            .arg(self.cmdline())
            .arg("--max-boots")
            .arg(max_boots.to_string())
            .arg("--")
            .args(["sh", "-c", &agent, "agent"])
            .arg(self.cmdline())
            .arg(self.path("log"))
            .arg(self.path("marker"));
        cmd
    }
}

fn run(mut cmd: Command) -> Output {
    let out = cmd.output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn trial_of_b(tries: u32) -> BootState {
    BootState::new(SlotName::A)
        .start_trial(SlotName::B, tries)
        .unwrap()
}

#[test]
fn reboot_during_a_one_try_trial_falls_back_to_the_default_slot() {
    let d = Device::new(trial_of_b(1));
    // First boot: ask for a reboot; second boot: exit for good.
    let out = run(d.sim(10, r#"if [ -e "$3" ]; then exit 0; fi; : > "$3"; exit 194"#));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(d.log(), "b\na\n");

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("boot #1: slot b (trial, 0 tries left)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("boot #2: slot a (fallback from b)"),
        "{stderr}"
    );

    let env = BootEnvFile::new(d.bootenv()).read().unwrap();
    assert_eq!(env.get("uplift_fallback"), Some("b"));
    assert_eq!(env.get("uplift_default"), Some("a"));
    assert_eq!(env.get("uplift_trial"), None);
}

#[test]
fn agent_exit_code_is_passed_through() {
    let d = Device::new(BootState::new(SlotName::B));
    let out = run(d.sim(10, "exit 7"));
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(d.log(), "b\n");

    let out = run(d.sim(10, "kill -KILL $$"));
    assert_eq!(out.status.code(), Some(128 + 9));
}

#[test]
fn endless_reboots_stop_at_max_boots_with_an_error() {
    let d = Device::new(BootState::new(SlotName::A));
    let out = run(d.sim(3, "exit 194"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(d.log(), "a\na\na\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("boot loop"), "{stderr}");
}

#[test]
fn broken_bootenv_is_a_clear_error() {
    let d = Device::new(BootState::new(SlotName::A));
    fs::write(d.bootenv(), "garbage").unwrap();
    let out = run(d.sim(3, "exit 0"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(d.log(), "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&d.bootenv().display().to_string()),
        "{stderr}"
    );
}

#[test]
fn sigterm_is_forwarded_to_the_agent_and_the_simulator_exits_0() {
    let d = Device::new(BootState::new(SlotName::A));
    // The agent records that it got SIGTERM, so we know it was forwarded
    // rather than the agent being left behind.
    let mut cmd = d.sim(
        3,
        r#"trap 'echo term >> "$2"; exit 143' TERM; : > "$3"; while :; do sleep 0.05; done"#,
    );
    let mut sim = cmd.stderr(Stdio::inherit()).spawn().unwrap();
    wait_for(&d.path("marker"));

    // The shell's built-in kill: no dependency on procps being installed.
    let killed = Command::new("sh")
        .args(["-c", r#"kill -TERM "$1""#, "sh", &sim.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = sim.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "simulator did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert_eq!(d.log(), "a\nterm\n");
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "agent did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_watchdog_resets_a_trial_boot_that_never_commits_until_the_bootloader_falls_back() {
    let d = Device::new(trial_of_b(2));
    // Slot b's OS hangs (never commits); slot a's comes up and powers off.
    let out = run(d.sim_with(
        10,
        &["--watchdog-secs", "2"],
        r#"if [ "$slot" = a ]; then exit 0; fi; sleep 30"#,
    ));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(d.log(), "b\nb\na\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr
            .matches("watchdog: slot b did not commit within 2.0 s; resetting")
            .count(),
        2,
        "{stderr}"
    );
    let env = BootEnvFile::new(d.bootenv()).read().unwrap();
    assert_eq!(env.get("uplift_fallback"), Some("b"));
    assert_eq!(env.get("uplift_default"), Some("a"));
}

#[test]
fn the_watchdog_leaves_a_trial_alone_once_it_is_committed() {
    let d = Device::new(trial_of_b(1));
    let mut cmd = d.sim_with(
        10,
        &["--watchdog-secs", "3"],
        r#": > "$3"; sleep 5; exit 0"#,
    );
    let sim = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_for(&d.path("marker"));
    // What the agent does after a good health check.
    let file = BootEnvFile::new(d.bootenv());
    let (env, state) = file.load_state().unwrap();
    file.store_state(env, &state.commit(SlotName::B).unwrap())
        .unwrap();

    let out = sim.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(d.log(), "b\n");
    assert!(!stderr.contains("watchdog"), "{stderr}");
}

#[test]
fn a_hung_kernel_is_reset_by_the_watchdog() {
    let d = Device::new(trial_of_b(1));
    let (a, b) = (d.path("slot-a.img"), d.path("slot-b.img"));
    fs::write(&a, [0u8; 4096]).unwrap();
    let mut hung = KERNEL_HANG_MARKER.to_vec();
    hung.resize(4096, 1);
    fs::write(&b, hung).unwrap();
    let (a, b) = (a.display().to_string(), b.display().to_string());
    let out = run(d.sim_with(
        10,
        &["--watchdog-secs", "0.3", "--slot-a", &a, "--slot-b", &b],
        "exit 0",
    ));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(d.log(), "a\n", "no agent ever started on slot b");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the kernel on slot b hangs before user space")
            && stderr.contains("watchdog: slot b did not commit within 0.3 s")
            && stderr.contains("slot a (fallback from b)"),
        "{stderr}"
    );
}
