//! `uplift-agent trial-guard`, the real binary: it reboots a trial boot
//! that nobody commits, and leaves committed or committing devices alone.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use uplift_bootenv::file::BootEnvFile;
use uplift_proto::SlotName;

const AGENT: &str = env!("CARGO_BIN_EXE_uplift-agent");

struct Device {
    dir: tempfile::TempDir,
}

impl Device {
    /// Booted from `booted`; slot b on trial when `trial` is set.
    fn new(booted: SlotName, trial: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = Device { dir };
        BootEnvFile::provision(d.path("grubenv"), SlotName::A).unwrap();
        if trial {
            d.update(|s| s.start_trial(SlotName::B, 3).unwrap());
        }
        std::fs::write(d.path("cmdline"), format!("quiet uplift.slot={booted}\n")).unwrap();
        let config = format!(
            r#"server_url = "https://127.0.0.1:9"
server_ca = "{ca}"
enrollment_token = "t"
device_type = "gateway"
state_dir = "{state}"
trusted_release_keys = ["ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="]
factory_version = "1.0"
trial_deadline_secs = 2
health_check_timeout_secs = 1
[slots]
a = "{a}"
b = "{b}"
[boot]
env_file = "{env}"
cmdline = "{cmdline}"
[reboot]
mode = "exit"
"#,
            ca = d.path("ca.pem").display(),
            state = d.path("state").display(),
            a = d.path("a.img").display(),
            b = d.path("b.img").display(),
            env = d.path("grubenv").display(),
            cmdline = d.path("cmdline").display(),
        );
        std::fs::write(d.path("agent.toml"), config).unwrap();
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn update(&self, change: impl FnOnce(&uplift_bootenv::BootState) -> uplift_bootenv::BootState) {
        let file = BootEnvFile::new(self.path("grubenv"));
        let (env, state) = file.load_state().unwrap();
        file.store_state(env, &change(&state)).unwrap();
    }

    fn guard(&self) -> Child {
        Command::new(AGENT)
            .arg("--config")
            .arg(self.path("agent.toml"))
            .arg("trial-guard")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

fn finish(child: Child, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let out = wait_with_limit(child, limit);
    (out, start.elapsed())
}

fn wait_with_limit(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("trial-guard still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_trial_boot_that_nobody_commits_is_rebooted_at_the_deadline() {
    let d = Device::new(SlotName::B, true);
    let env_before = std::fs::read(d.path("grubenv")).unwrap();
    let (out, took) = finish(d.guard(), Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(uplift_bootenv::REBOOT_REQUEST_EXIT_CODE),
        "{}",
        stderr(&out)
    );
    assert!(
        took >= Duration::from_secs(2),
        "waited for the deadline: {took:?}"
    );
    assert!(
        stderr(&out).contains("slot b is still on trial 2 s after the trial guard started"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(d.path("grubenv")).unwrap(),
        env_before,
        "the guard only reboots; counting tries is the bootloader's job"
    );
}

#[test]
fn a_committed_boot_is_left_alone() {
    let d = Device::new(SlotName::A, false);
    let (out, took) = finish(d.guard(), Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(
        stderr(&out).contains("nothing to guard"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_commit_before_the_deadline_ends_the_guard() {
    let d = Device::new(SlotName::B, true);
    let guard = d.guard();
    std::thread::sleep(Duration::from_millis(500));
    d.update(|s| s.commit(SlotName::B).unwrap());
    let (out, _) = finish(guard, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn a_device_without_a_slot_on_its_command_line_is_a_clear_error() {
    let d = Device::new(SlotName::B, true);
    std::fs::write(d.path("cmdline"), "quiet\n").unwrap();
    let (out, _) = finish(d.guard(), Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot tell which slot booted"),
        "{}",
        stderr(&out)
    );
}
