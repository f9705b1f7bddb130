//! SIGKILL in the middle of boot environment updates, for real: a child
//! process (this test binary, re-run as a writer) updates the environment
//! in a tight loop, exactly as the agent and the bootloader do, and is
//! killed at varying moments. After every kill the file must hold a
//! complete block with one of the states the writer was going between:
//! never a torn block, never a mix, never a state nobody wrote.

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use uplift_bootenv::{BootEnvFile, BootState, GRUBENV_SIZE};
use uplift_proto::names::SlotName::{A, B};

const WRITER_ENV: &str = "UPLIFT_BOOTENV_TORTURE_WRITER";

/// The two states the writer goes between: a trial of b starting, and
/// b committed; each write also moves the unrelated `counter` key, so a
/// block that mixed two writes would be seen.
fn states() -> [BootState; 2] {
    let trial = BootState::new(A).start_trial(B, 3).unwrap();
    let committed = trial.commit(B).unwrap();
    [trial, committed]
}

/// Not a test of its own: when run with `WRITER_ENV` set, this is the
/// child that writes until it is killed.
#[test]
fn writer_child() {
    let Ok(path) = std::env::var(WRITER_ENV) else {
        return;
    };
    let file = BootEnvFile::new(&path);
    let [trial, committed] = states();
    for n in 0u64.. {
        let (mut env, _) = file.load_state().unwrap();
        env.set("counter", &n.to_string()).unwrap();
        let next = if n & 1 == 0 { &trial } else { &committed };
        file.store_state(env, next).unwrap();
    }
}

fn check(path: &Path, round: u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len(), GRUBENV_SIZE, "round {round}: a whole block");
    let (env, state) = BootEnvFile::new(path)
        .load_state()
        .unwrap_or_else(|e| panic!("round {round}: unreadable after SIGKILL: {e}"));
    let counter: u64 = env
        .get("counter")
        .map_or(0, |c| c.parse().expect("counter is a number"));
    let [trial, committed] = states();
    // The counter and the state were written together: they must match.
    let expected = if env.get("counter").is_none() {
        BootState::new(A)
    } else if counter & 1 == 0 {
        trial
    } else {
        committed
    };
    assert_eq!(state, expected, "round {round}: counter {counter}");
}

#[test]
fn sigkill_during_updates_never_leaves_a_torn_or_mixed_boot_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    BootEnvFile::provision(&path, A).unwrap();
    let me = std::env::current_exe().unwrap();
    let mut writes_seen = 0u64;
    for round in 0..40u32 {
        let mut child = Command::new(&me)
            .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
            .env(WRITER_ENV, &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Spread the kills over the writer's start-up and its loop.
        let wait =
            Duration::from_micros(u64::from(round % 8) * 1500 + u64::from(round) * 250 + 20_000);
        std::thread::sleep(wait);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        check(&path, round);
        let (env, _) = BootEnvFile::new(&path).load_state().unwrap();
        writes_seen = writes_seen.max(env.get("counter").map_or(0, |c| c.parse().unwrap()));
    }
    assert!(
        writes_seen > 0,
        "the writer got to write before being killed (else this proves nothing)"
    );
}
