//! `deploy/uboot/boot.cmd` run by a real U-Boot: Debian's `u-boot-qemu`
//! build for `qemu-system-x86_64`, driven over its serial console. For each
//! trial state, the environment this crate encodes is imported with
//! `env import -c` (which checks its CRC), the script's decision part runs,
//! and the slot it picks and the variables it leaves must be exactly those
//! of `BootState::boot()`; `saveenv` must be called exactly when a trial
//! runs. What U-Boot itself writes (`env export -c`, the single-copy format
//! of `saveenv`) this crate reads and encodes to the same bytes. The full script, whose kernel cannot be loaded here, must reset
//! the board rather than stop at the prompt.
//!
//! That U-Boot build keeps its environment nowhere, so `saveenv` is not
//! there ("Unknown command"): the variables are checked in memory, at the
//! point where the script saves them; the saved format is what
//! `uboot_tools.rs` checks against `fw_printenv`.
//!
//! Needs `qemu-system-x86_64` (qemu-system-x86), `u-boot-qemu` and `mkimage`
//! (u-boot-tools); without them it prints a `NOTICE` and passes, unless `CI`
//! is set. About 3 s under TCG (KVM cannot run U-Boot's SPL).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use uplift_bootenv::state::Trial;
use uplift_bootenv::ubootenv::{decode_copy, encode_copy, Layout};
use uplift_bootenv::{BootState, UBootEnv};
use uplift_proto::names::SlotName::{self, A, B};

const UBOOT_ROM: &str = "/usr/lib/u-boot/qemu-x86_64/u-boot.rom";
const ENV_SIZE: usize = 0x2000;
const ENV_BASE: u64 = 0x0200_0000;
const DECISION_ADDR: u64 = 0x0300_0000;
const FULL_ADDR: u64 = 0x0310_0000;
const EXPORT_ADDR: u64 = 0x0400_0000;
const MARKER: &str = "# ---- end of the trial decision ----";

fn prerequisites() -> bool {
    let missing: Vec<&str> = [
        ("qemu-system-x86_64", which("qemu-system-x86_64")),
        (UBOOT_ROM, Path::new(UBOOT_ROM).exists()),
        ("mkimage", which("mkimage")),
    ]
    .into_iter()
    .filter(|(_, found)| !found)
    .map(|(name, _)| name)
    .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but {missing:?} are missing: .ci/run installs qemu-system-x86, u-boot-qemu and u-boot-tools");
    }
    eprintln!(
        "NOTICE: {missing:?} not found, skipping the U-Boot script test \
         (install Debian packages qemu-system-x86, u-boot-qemu and u-boot-tools to run it)"
    );
    false
}

fn which(name: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists())
}

/// The serial console of a U-Boot running in QEMU.
struct Console {
    child: Child,
    stdin: ChildStdin,
    rx: Receiver<Vec<u8>>,
    pending: String,
    transcript: String,
}

impl Console {
    fn start(loads: &[(PathBuf, u64)]) -> Console {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-bios", UBOOT_ROM, "-nographic", "-m", "256", "-no-reboot"])
            .args(["-net", "none"]);
        // QEMU's generic loader puts each file in guest memory at reset;
        // U-Boot leaves that memory alone.
        for (file, addr) in loads {
            cmd.arg("-device").arg(format!(
                "loader,file={},addr={addr:#x},force-raw=on",
                file.display()
            ));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-system-x86_64");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Console {
            child,
            stdin,
            rx,
            pending: String::new(),
            transcript: String::new(),
        }
    }

    /// Reads until `pattern`, returning everything before it. `None` if the
    /// console closed first (QEMU exited).
    fn until(&mut self, pattern: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self.pending.find(pattern) {
                let before = self.pending[..i].to_owned();
                self.pending.drain(..i + pattern.len());
                return Some(before);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes).replace('\r', "");
                    self.transcript.push_str(&text);
                    self.pending.push_str(&text);
                }
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no {pattern:?} from U-Boot within {limit:?}; console so far:\n{}",
                    self.transcript
                ),
            }
        }
    }

    fn send(&mut self, line: &str) {
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\r").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Runs one command at the prompt and returns its output.
    fn run(&mut self, line: &str) -> String {
        self.send(line);
        let out = self
            .until("=> ", Duration::from_secs(60))
            .unwrap_or_else(|| panic!("QEMU exited during {line:?}:\n{}", self.transcript));
        // Drop the echoed command line.
        out.split_once('\n')
            .map(|(_, rest)| rest.to_owned())
            .unwrap_or_default()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mkimage(source: &Path, image: &Path) {
    let out = Command::new("mkimage")
        .args(["-A", "arm", "-T", "script", "-C", "none", "-d"])
        .arg(source)
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "mkimage: {out:?}");
}

/// The bytes of `md.b` output: lines of `address: 16 hex bytes  ascii`.
fn parse_md(dump: &str) -> Vec<u8> {
    dump.lines()
        .filter_map(|l| l.split_once(": "))
        .flat_map(|(_, rest)| {
            rest.split_whitespace()
                .take(16)
                .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("{b:?} in {rest:?}")))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn trial(slot: SlotName, tries_left: u32) -> Option<Trial> {
    Some(Trial { slot, tries_left })
}

/// What the script left: the slot it chose and the Uplift variables.
fn parse_result(out: &str) -> (String, UBootEnv) {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("UPLIFT_RESULT "))
        .unwrap_or_else(|| panic!("no result line in:\n{out}"));
    let mut slot = String::new();
    let mut env = UBootEnv::new();
    for field in line.split_whitespace() {
        let (k, v) = field.split_once('=').unwrap();
        if k == "slot" {
            slot = v.to_owned();
        } else if !v.is_empty() {
            env.set(k, v).unwrap();
        }
    }
    (slot, env)
}

#[test]
fn boot_cmd_makes_the_decision_of_boot_state_in_a_real_uboot() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = std::fs::read_to_string(repo.join("deploy/uboot/boot.cmd")).unwrap();
    let (decision, _) = script
        .split_once(MARKER)
        .expect("boot.cmd marks the end of its trial decision");
    let probe = format!(
        "{decision}\necho UPLIFT_RESULT slot=${{uplift_boot}} uplift_default=${{uplift_default}} \
         uplift_trial=${{uplift_trial}} uplift_trial_tries=${{uplift_trial_tries}} \
         uplift_fallback=${{uplift_fallback}}\n"
    );
    std::fs::write(dir.path().join("decision.cmd"), probe).unwrap();
    mkimage(
        &dir.path().join("decision.cmd"),
        &dir.path().join("decision.scr"),
    );
    mkimage(
        &repo.join("deploy/uboot/boot.cmd"),
        &dir.path().join("boot.scr"),
    );

    let states = [
        BootState::new(A),
        BootState::new(B),
        BootState {
            trial: trial(B, 3),
            ..BootState::new(A)
        },
        BootState {
            trial: trial(B, 2),
            ..BootState::new(A)
        },
        BootState {
            trial: trial(B, 1),
            ..BootState::new(A)
        },
        BootState {
            trial: trial(B, 0),
            ..BootState::new(A)
        },
        BootState {
            trial: trial(A, 1),
            fallback_from: Some(A),
            ..BootState::new(B)
        },
        BootState {
            fallback_from: Some(B),
            ..BootState::new(A)
        },
    ];
    let mut loads = vec![
        (dir.path().join("decision.scr"), DECISION_ADDR),
        (dir.path().join("boot.scr"), FULL_ADDR),
    ];
    let mut envs = Vec::new();
    for state in &states {
        let mut env = UBootEnv::new();
        env.set("bootdelay", "2").unwrap();
        state.apply_to(&mut env);
        envs.push(env);
    }
    // Not written by the agent (it starts at most 3 tries), but the script
    // documents that any other count ends the trial.
    let mut odd = UBootEnv::new();
    for (k, v) in [
        ("uplift_default", "a"),
        ("uplift_trial", "b"),
        ("uplift_trial_tries", "7"),
    ] {
        odd.set(k, v).unwrap();
    }
    envs.push(odd);
    for (i, env) in envs.iter().enumerate() {
        let file = dir.path().join(format!("env{i}.bin"));
        std::fs::write(
            &file,
            encode_copy(env, Layout::Single, ENV_SIZE, 0).unwrap(),
        )
        .unwrap();
        loads.push((file, ENV_BASE + i as u64 * 0x10000));
    }

    let started = Instant::now();
    let mut console = Console::start(&loads);
    console
        .until("Hit any key to stop autoboot", Duration::from_secs(60))
        .expect("U-Boot starts");
    console.send("");
    console.until("=> ", Duration::from_secs(30)).unwrap();

    let import = |console: &mut Console, i: usize| {
        let out = console.run(
            "setenv uplift_default; setenv uplift_trial; setenv uplift_trial_tries; setenv uplift_fallback",
        );
        assert!(out.trim().is_empty(), "{out}");
        let out = console.run(&format!(
            "env import -c {:#x} {ENV_SIZE:#x}",
            ENV_BASE + i as u64 * 0x10000
        ));
        assert!(!out.contains("rror"), "env import of state {i}: {out}");
    };
    for (i, state) in states.iter().enumerate() {
        import(&mut console, i);
        let out = console.run(&format!("source {DECISION_ADDR:#x}"));
        let (slot, env) = parse_result(&out);
        let (want_slot, want_next) = state.boot();
        assert_eq!(slot, want_slot.as_str(), "slot booted from {state}:\n{out}");
        assert_eq!(
            BootState::from_env(&env).unwrap(),
            want_next,
            "state after booting {state}:\n{out}"
        );
        let saved = out.contains("saveenv");
        assert_eq!(
            saved,
            state.trial.is_some(),
            "saveenv called from {state}:\n{out}"
        );
    }
    let odd = states.len();
    import(&mut console, odd);
    let out = console.run(&format!("source {DECISION_ADDR:#x}"));
    let (slot, env) = parse_result(&out);
    assert_eq!(slot, "a", "{out}");
    assert_eq!(
        BootState::from_env(&env).unwrap(),
        BootState {
            fallback_from: Some(B),
            ..BootState::new(A)
        },
        "{out}"
    );

    // U-Boot's own writer (`env export -c`, the format `saveenv` stores in
    // a single copy): this crate reads it and writes the same bytes.
    import(&mut console, 2);
    let out = console.run(&format!("env export -c -s {ENV_SIZE:#x} {EXPORT_ADDR:#x}"));
    assert!(!out.contains("rror"), "{out}");
    let dump = console.run(&format!("md.b {EXPORT_ADDR:#x} {ENV_SIZE:#x}"));
    let bytes = parse_md(&dump);
    assert_eq!(bytes.len(), ENV_SIZE, "{dump}");
    let copy = decode_copy(&bytes, Layout::Single, 1, 0).expect("U-Boot's export parses");
    assert_eq!(BootState::from_env(&copy.env).unwrap(), states[2]);
    assert!(
        copy.env.get("bootcmd").is_some(),
        "U-Boot's defaults too: {:?}",
        copy.env
    );
    assert!(
        encode_copy(&copy.env, Layout::Single, ENV_SIZE, 0).unwrap() == bytes,
        "U-Boot's export and this crate's encoding differ:\n{dump}"
    );

    // The whole script, with a trial of b: it saves, tries to load b's
    // kernel from mmc (there is none here) and resets the board.
    import(&mut console, 2);
    console.send(&format!("source {FULL_ADDR:#x}"));
    let rest = console.until("=> ", Duration::from_secs(60));
    assert!(
        rest.is_none(),
        "the board reset (QEMU exits with -no-reboot), not a prompt:\n{}",
        console.transcript
    );
    assert!(
        console.transcript.contains("resetting"),
        "{}",
        console.transcript
    );
    eprintln!("U-Boot script checks took {:?}", started.elapsed());
}
