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
/// The writer's first counter value: distinct per round, so the parent can
/// tell this round's writes from the last round's.
const FIRST_ENV: &str = "UPLIFT_BOOTENV_TORTURE_FIRST";

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
    let first: u64 = std::env::var(FIRST_ENV).unwrap().parse().unwrap();
    for n in first.. {
        let (mut env, _) = file.load_state().unwrap();
        env.set("counter", &n.to_string()).unwrap();
        let next = if n & 1 == 0 { &trial } else { &committed };
        file.store_state(env, next).unwrap();
    }
}

/// The counter in the file now; 0 where it cannot be read (a reader may
/// race the writer's rename, which is fine: the check after the kill is
/// the one that counts).
fn counter_of(path: &Path) -> u64 {
    BootEnvFile::new(path)
        .read()
        .ok()
        .and_then(|env| env.get("counter").and_then(|c| c.parse().ok()))
        .unwrap_or(0)
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
    for round in 0..40u32 {
        let first = u64::from(round) * 1_000_000;
        let mut child = Command::new(&me)
            .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
            .env(WRITER_ENV, &path)
            .env(FIRST_ENV, first.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill only once this round's writer is in its loop (it has written
        // twice), then at a moment that varies from round to round.
        let started = std::time::Instant::now();
        while counter_of(&path) < first + 1 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "round {round}: the writer never wrote"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_micros(u64::from(round % 10) * 500));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        check(&path, round);
    }
    // The next write clears the temporary files the killed writers left.
    let file = BootEnvFile::new(&path);
    file.update(|s| Ok(*s)).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "grubenv")
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}
