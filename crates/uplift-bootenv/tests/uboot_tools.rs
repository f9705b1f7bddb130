//! The U-Boot environment against the real tools: what `fw_setenv` writes
//! this crate reads, what this crate writes `fw_printenv` reads, in both
//! layouts, on files and on a loop block device; and writes cut at random
//! bytes, after which both read the old or the new environment, never a mix
//! and never nothing.
//!
//! Needs `fw_printenv` / `fw_setenv` from Debian's `libubootenv-tool`:
//! without them the tests print a `NOTICE` and pass, unless `CI` is set
//! (`.ci/run` installs the package). The loop-device test also needs root
//! and `losetup`, and prints `SKIPPED` and passes without them.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use uplift_bootenv::state::Trial;
use uplift_bootenv::ubootenv::{decode_copy, encode_copy, Layout};
use uplift_bootenv::{BootEnvError, BootState, UBootCopy, UBootEnv, UBootEnvStore, UBootLayout};
use uplift_proto::names::SlotName::{A, B};

/// A temporary directory with an image file, the layout on it, and the
/// `fw_env.config` describing the same layout for the tools.
struct Env {
    dir: tempfile::TempDir,
    image: PathBuf,
    store: UBootEnvStore,
}

const SIZE: usize = 0x2000;

impl Env {
    fn new(layout: Layout) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        // Bytes around the copies that no write may touch.
        fs::write(&image, vec![0x5a; 0x8000]).unwrap();
        Env::on(dir, image.clone(), &image, layout)
    }

    fn on(dir: tempfile::TempDir, image: PathBuf, device: &Path, layout: Layout) -> Env {
        let mut copies = vec![UBootCopy {
            device: device.to_owned(),
            offset: 0x2000,
        }];
        if layout == Layout::Redundant {
            copies.push(UBootCopy {
                device: device.to_owned(),
                offset: 0x5000,
            });
        }
        let layout = UBootLayout::new(copies, SIZE).unwrap();
        fs::write(dir.path().join("fw_env.config"), layout.fw_env_config()).unwrap();
        // fw_setenv refuses to start from an environment with no valid copy
        // unless given defaults to start from: none.
        fs::write(dir.path().join("defaults.txt"), "").unwrap();
        Env {
            dir,
            image,
            store: UBootEnvStore::new(layout),
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("fw_env.config")
    }

    fn fw_setenv(&self, name: &str, value: &str) {
        let out = Command::new(tool("fw_setenv"))
            .arg("-c")
            .arg(self.config())
            .arg("-f")
            .arg(self.dir.path().join("defaults.txt"))
            .args([name, value])
            .output()
            .unwrap();
        assert!(out.status.success(), "fw_setenv {name} {value}: {out:?}");
    }

    /// `fw_printenv`'s view: `None` if it cannot read a valid environment.
    fn fw_printenv(&self) -> Option<BTreeMap<String, String>> {
        let out = Command::new(tool("fw_printenv"))
            .arg("-c")
            .arg(self.config())
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8(out.stdout).unwrap();
        Some(
            text.lines()
                .map(|l| {
                    let (k, v) = l.split_once('=').expect("name=value");
                    (k.to_owned(), v.to_owned())
                })
                .collect(),
        )
    }

    fn copy_bytes(&self, copy: usize) -> Vec<u8> {
        let c = &self.store.layout().copies()[copy];
        let mut buf = vec![0; SIZE];
        fs::File::open(&c.device)
            .unwrap()
            .read_exact_at(&mut buf, c.offset)
            .unwrap();
        buf
    }
}

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("{name} not found: install Debian's libubootenv-tool");
}

/// Whether the real tools are there; without them (outside CI) the tests
/// say so and pass, as the GRUB compatibility tests do.
fn have_tools(test: &str) -> bool {
    let found =
        Path::new("/usr/bin/fw_printenv").exists() && Path::new("/usr/bin/fw_setenv").exists();
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but fw_printenv/fw_setenv are missing: .ci/run installs libubootenv-tool");
        }
        eprintln!(
            "NOTICE: fw_printenv/fw_setenv not found, skipping {test} \
             (install Debian package libubootenv-tool to run it)"
        );
    }
    found
}

fn vars(env: &UBootEnv) -> BTreeMap<String, String> {
    env.iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn bytes_outside_copies_untouched(e: &Env) {
    let bytes = fs::read(&e.image).unwrap();
    let mut inside = vec![false; bytes.len()];
    for c in e.store.layout().copies() {
        let o = c.offset as usize;
        inside[o..o + SIZE].iter_mut().for_each(|b| *b = true);
    }
    for (i, b) in bytes.iter().enumerate() {
        assert!(
            inside[i] || *b == 0x5a,
            "byte {i:#x} outside the copies changed"
        );
    }
}

#[test]
fn what_fw_setenv_writes_is_read_byte_for_byte() {
    if !have_tools("what_fw_setenv_writes_is_read_byte_for_byte") {
        return;
    }
    for layout in [Layout::Single, Layout::Redundant] {
        let e = Env::new(layout);
        e.fw_setenv("uplift_default", "a");
        e.fw_setenv("bootcmd", "run distro_bootcmd; echo done");
        e.fw_setenv("uplift_trial", "b");
        e.fw_setenv("uplift_trial_tries", "3");
        let env = e.store.read().unwrap();
        assert_eq!(
            vars(&env),
            e.fw_printenv().unwrap(),
            "{layout:?}: both read the same variables"
        );
        assert_eq!(
            e.store.load_state().unwrap().1,
            BootState {
                default_slot: A,
                trial: Some(Trial {
                    slot: B,
                    tries_left: 3
                }),
                fallback_from: None
            }
        );

        // Four writes from blank: the redundant layout alternates copy 2,
        // 1, 2, 1, counting on from the first copy's flag byte (0x5a, the
        // image's filler), so copy 1 with flag 0x5e is current.
        let (current, flag) = match layout {
            Layout::Single => (0, 0),
            Layout::Redundant => (0, 0x5e),
        };
        let written = e.copy_bytes(current);
        let ours = encode_copy(&env, layout, SIZE, flag).unwrap();
        // libubootenv 0.3.2 pads with whatever malloc returned (zeros as a
        // rule) and hashes that too, so compare through the end of the
        // variables and check the CRC over the rest.
        let end = layout.header_len() + env.encoded_len();
        assert_eq!(
            written[CRC_END..end],
            ours[CRC_END..end],
            "{layout:?}: the same flag and variables, in the same order"
        );
        let decoded = decode_copy(&written, layout, 1, 0).unwrap();
        assert_eq!((decoded.env, decoded.flag), (env, flag));
        bytes_outside_copies_untouched(&e);
    }
}

const CRC_END: usize = 4;

#[test]
fn what_we_write_fw_printenv_reads_and_fw_setenv_continues() {
    if !have_tools("what_we_write_fw_printenv_reads_and_fw_setenv_continues") {
        return;
    }
    for layout in [Layout::Single, Layout::Redundant] {
        let e = Env::new(layout);
        let mut env = UBootEnv::new();
        env.set("bootcmd", "run uplift").unwrap();
        BootState::new(A).apply_to(&mut env);
        e.store.write(&env).unwrap();
        assert_eq!(e.fw_printenv().unwrap(), vars(&env), "{layout:?}");

        // Turns of the agent and of an operator's fw_setenv: each sees the
        // other's last write, so both count the redundant flag the same way.
        for round in 0..6u32 {
            let tries = round % 3 + 1;
            e.store.update(|s| s.start_trial(B, tries)).unwrap();
            let printed = e.fw_printenv().unwrap();
            assert_eq!(
                printed["uplift_trial_tries"],
                tries.to_string(),
                "{layout:?}"
            );
            assert_eq!(printed["uplift_trial"], "b");
            e.fw_setenv("operator_note", &format!("round {round}"));
            let env = e.store.read().unwrap();
            assert_eq!(env.get("operator_note"), Some(&*format!("round {round}")));
            assert_eq!(vars(&env), e.fw_printenv().unwrap());
        }
        let committed = e.store.update(|s| s.commit(B)).unwrap();
        assert_eq!(committed, BootState::new(B));
        let printed = e.fw_printenv().unwrap();
        assert_eq!(printed.get("uplift_default").map(String::as_str), Some("b"));
        assert!(!printed.contains_key("uplift_trial"), "{printed:?}");
        assert_eq!(printed["bootcmd"], "run uplift");
        bytes_outside_copies_untouched(&e);
    }
}

/// Cuts each write at random bytes (the copy written holds a prefix of the
/// new image and the rest of what was there) and checks that this crate and
/// `fw_printenv` both read the complete old or the complete new state.
#[test]
fn a_write_cut_at_any_byte_leaves_the_old_or_the_new_environment() {
    if !have_tools("a_write_cut_at_any_byte_leaves_the_old_or_the_new_environment") {
        return;
    }
    let e = Env::new(Layout::Redundant);
    let mut env = UBootEnv::new();
    env.set("bootcmd", "run uplift").unwrap();
    BootState::new(A).apply_to(&mut env);
    e.store.write(&env).unwrap();

    let mut seed: u64 = 0x853C_49E6_748F_EA9B;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let transitions: [fn(&BootState) -> BootState; 6] = [
        |s| s.start_trial(B, 3).unwrap(),
        |s| s.boot().1,
        |s| s.boot().1,
        |s| s.abandon_trial(),
        |s| s.acknowledge_fallback(),
        |s| s.start_trial(B, 1).unwrap(),
    ];
    let mut cuts = 0;
    let mut old_seen = 0;
    let mut new_seen = 0;
    for change in transitions {
        let (old_env, old_state) = e.store.load_state().unwrap();
        let mut new_env = old_env.clone();
        let new_state = change(&old_state);
        new_state.apply_to(&mut new_env);
        let plan = e.store.plan_write(&new_env).unwrap();
        let before = fs::read(&e.image).unwrap();
        let target = plan.offset as usize;
        let len = plan.image.len();

        let mut offsets: Vec<usize> = vec![0, 1, 3, 4, 5, 6, 64, len - 1, len];
        offsets.extend((0..40).map(|_| (rand() as usize) % (len + 1)));
        // Where the variables end: cuts around there are the interesting ones.
        let end = Layout::Redundant.header_len() + new_env.encoded_len();
        offsets.extend([end - 2, end - 1, end, end + 1]);
        for n in offsets {
            fs::write(&e.image, &before).unwrap();
            let file = fs::OpenOptions::new().write(true).open(&e.image).unwrap();
            file.write_all_at(&plan.image[..n], target as u64).unwrap();
            drop(file);

            // Complete once every byte of the copy is the new one: a cut in
            // padding that was already zero loses nothing.
            let complete = before[target + n..target + len] == plan.image[n..];
            let (want_env, want_state) = if complete {
                (&new_env, new_state)
            } else {
                (&old_env, old_state)
            };
            let (read_env, read_state) = e
                .store
                .load_state()
                .unwrap_or_else(|err| panic!("cut at byte {n} of copy {}: {err}", plan.copy));
            assert_eq!(
                (&read_env, read_state),
                (want_env, want_state),
                "cut at byte {n} of {len} (copy {}, complete: {complete})",
                plan.copy
            );
            assert_eq!(
                e.fw_printenv().as_ref(),
                Some(&vars(want_env)),
                "fw_printenv after a cut at byte {n} of copy {}",
                plan.copy
            );
            cuts += 1;
            if complete {
                new_seen += 1;
            } else {
                old_seen += 1;
            }
        }
        // Then the write goes through, and the next transition starts from it.
        fs::write(&e.image, &before).unwrap();
        plan.apply().unwrap();
        assert_eq!(e.store.load_state().unwrap().1, new_state);
    }
    assert!(cuts >= 6 * 50, "{cuts} cuts");
    assert!(
        old_seen > 0 && new_seen > 0,
        "old {old_seen}, new {new_seen}"
    );
}

/// With a single copy a cut cannot be survived, only detected: both this
/// crate and fw_printenv refuse the torn copy rather than misread it.
#[test]
fn a_cut_single_copy_is_detected_by_both() {
    if !have_tools("a_cut_single_copy_is_detected_by_both") {
        return;
    }
    let e = Env::new(Layout::Single);
    let mut env = UBootEnv::new();
    BootState::new(A).apply_to(&mut env);
    e.store.write(&env).unwrap();
    let mut next = env.clone();
    BootState::new(A)
        .start_trial(B, 3)
        .unwrap()
        .apply_to(&mut next);
    let plan = e.store.plan_write(&next).unwrap();
    let file = fs::OpenOptions::new().write(true).open(&e.image).unwrap();
    file.write_all_at(&plan.image[..10], plan.offset).unwrap();
    let err = e.store.read().unwrap_err();
    assert!(
        matches!(
            err.root(),
            BootEnvError::UBootBadCrc {
                copy: 1,
                offset: 0x2000,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(e.fw_printenv(), None);
}

/// The environment on a real block device: a loop device over a file.
#[test]
fn on_a_loop_block_device() {
    if !have_tools("on_a_loop_block_device") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    fs::write(&backing, vec![0x5a; 0x8000]).unwrap();
    let out = match Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output()
    {
        Ok(out) if out.status.success() => out,
        other => {
            eprintln!(
                "SKIPPED on_a_loop_block_device: cannot set up a loop device (needs root and losetup): {other:?}"
            );
            return;
        }
    };
    let loopdev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    struct Detach(PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(loopdev.clone());

    let e = Env::on(dir, backing.clone(), &loopdev, Layout::Redundant);
    e.fw_setenv("uplift_default", "a");
    assert_eq!(e.store.load_state().unwrap().1, BootState::new(A));
    e.store.update(|s| s.start_trial(B, 2)).unwrap();
    assert_eq!(e.fw_printenv().unwrap()["uplift_trial_tries"], "2");
    e.store.update(|s| s.commit(B)).unwrap();
    assert_eq!(e.fw_printenv().unwrap()["uplift_default"], "b");

    // What the block device was given reached the backing file: fsync on
    // the device flushed it (the loop driver writes through to the file).
    drop(_detach);
    let bytes = fs::read(&backing).unwrap();
    let copies: Vec<_> = [0x2000usize, 0x5000]
        .iter()
        .enumerate()
        .map(|(i, &o)| {
            decode_copy(
                &bytes[o..o + SIZE],
                Layout::Redundant,
                i as u8 + 1,
                o as u64,
            )
        })
        .collect();
    let newest = copies
        .iter()
        .filter_map(|c| c.as_ref().ok())
        .max_by_key(|c| c.flag)
        .expect("a valid copy in the backing file");
    assert_eq!(BootState::from_env(&newest.env).unwrap(), BootState::new(B));
    assert!(bytes[..0x2000].iter().all(|&b| b == 0x5a));
}
