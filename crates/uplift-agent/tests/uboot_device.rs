//! The real agent binary on a device that boots with U-Boot
//! (`bootloader = "uboot"`): it reads the trial state from a redundant
//! U-Boot environment at fw_env.config-style offsets in a disk image, for
//! `status` and for the trial guard, and says which copy is torn.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use uplift_bootenv::{BootState, UBootCopy, UBootEnv, UBootEnvStore, UBootLayout};
use uplift_proto::SlotName::{A, B};

const AGENT: &str = env!("CARGO_BIN_EXE_uplift-agent");
const SIZE: usize = 0x2000;
const OFFSETS: [u64; 2] = [0x4000, 0x6000];

struct Device {
    dir: tempfile::TempDir,
    store: UBootEnvStore,
}

impl Device {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("mmcblk0.img");
        std::fs::write(&disk, vec![0u8; 0x10000]).unwrap();
        let copies = OFFSETS
            .iter()
            .map(|&offset| UBootCopy {
                device: disk.clone(),
                offset,
            })
            .collect();
        let store = UBootEnvStore::new(UBootLayout::new(copies, SIZE).unwrap());
        let mut env = UBootEnv::new();
        env.set(
            "bootcmd",
            "load mmc 0:1 ${scriptaddr} boot.scr; source ${scriptaddr}",
        )
        .unwrap();
        BootState::new(A).apply_to(&mut env);
        store.write(&env).unwrap();

        let d = Device { dir, store };
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
bootloader = "uboot"
cmdline = "{cmdline}"
[boot.uboot]
env_size = {SIZE:#x}
copies = [
  {{ device = "{disk}", offset = {o1:#x} }},
  {{ device = "{disk}", offset = {o2:#x} }},
]
[reboot]
mode = "exit"
"#,
            ca = d.path("ca.pem").display(),
            state = d.path("state").display(),
            a = d.path("a.img").display(),
            b = d.path("b.img").display(),
            cmdline = d.path("cmdline").display(),
            disk = disk.display(),
            o1 = OFFSETS[0],
            o2 = OFFSETS[1],
        );
        std::fs::write(d.path("agent.toml"), config).unwrap();
        d.boot_from(A);
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn boot_from(&self, slot: uplift_proto::SlotName) {
        std::fs::write(
            self.path("cmdline"),
            format!("console=ttyS0 uplift.slot={slot}\n"),
        )
        .unwrap();
    }

    fn agent(&self, args: &[&str]) -> Output {
        let mut child = Command::new(AGENT)
            .arg("--config")
            .arg(self.path("agent.toml"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("uplift-agent {args:?} still running after 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    fn status(&self) -> serde_json::Value {
        let out = self.agent(&["status", "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

#[test]
fn status_and_trial_guard_read_the_uboot_environment() {
    let d = Device::new();
    let status = d.status();
    assert_eq!(status["boot_environment"], "default a", "{status}");

    // The bootloader spent one of three tries booting slot b, which nobody
    // commits: the guard reboots it at the deadline.
    d.store
        .update(|s| Ok(s.start_trial(B, 3)?.boot().1))
        .unwrap();
    d.boot_from(B);
    assert_eq!(
        d.status()["boot_environment"],
        "default a, trial b (2 tries left)"
    );
    let out = d.agent(&["trial-guard"]);
    assert_eq!(
        out.status.code(),
        Some(uplift_bootenv::REBOOT_REQUEST_EXIT_CODE),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Committed: the guard has nothing to do, and U-Boot's own variables
    // are still there.
    d.store.update(|s| s.commit(B)).unwrap();
    let out = d.agent(&["trial-guard"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.store.read().unwrap().get("bootcmd").is_some());
}

#[test]
fn torn_copies_are_named_in_status() {
    let d = Device::new();
    d.store.update(|s| s.start_trial(B, 2)).unwrap();
    let disk = d.path("mmcblk0.img");
    let mut bytes = std::fs::read(&disk).unwrap();
    // The newest copy (the first: the second write of a blank disk) torn
    // by a cut: the agent reads the other, older one.
    bytes[OFFSETS[0] as usize + 20] ^= 0x55;
    std::fs::write(&disk, &bytes).unwrap();
    assert_eq!(d.status()["boot_environment"], "default a");

    bytes[OFFSETS[1] as usize + 20] ^= 0x55;
    std::fs::write(&disk, &bytes).unwrap();
    let status = d.status();
    let error = status["boot_environment_error"].as_str().unwrap();
    assert!(
        error.contains("neither copy")
            && error.contains("copy 1 (offset 0x4000)")
            && error.contains("copy 2 (offset 0x6000)"),
        "{error}"
    );
}
