//! Writes the checked-in seed corpora under fuzz/corpus/<target>/seed-*.
//! Run from fuzz/: `cargo run --example gen_seeds` (a plain build: no
//! sanitizer, no nightly flags). The output is deterministic, so re-running
//! it changes no file unless the formats changed.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use uplift_bootenv::ubootenv::{encode_copy, Layout};
use uplift_bootenv::{BootState, GrubEnv, Trial, UBootEnv};
use uplift_proto::channel::{
    encode, AgentMsg, AgentState, Offer, Progress, Report, ServerMsg, FEATURES,
};
use uplift_proto::{ErrorKind, SlotName, WireError};
use uplift_release::chunk::{encode_chunk, sha256};
use uplift_release::keys::ReleaseSigningKey;
use uplift_release::freshness::{Freshness, FRESHNESS_FORMAT};
use uplift_release::root::{Role, Root, TrustedRoot, ROOT_FORMAT};
use uplift_release::manifest::{
    sign_manifest, ChunkEntry, Compression, ImageInfo, Manifest, MANIFEST_FORMAT, MAX_CHUNK_SIZE,
};

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let path = corpus(target).join(format!("seed-{name}"));
    fs::write(&path, bytes).unwrap();
    println!("{} ({} bytes)", path.display(), bytes.len());
}

fn channel() {
    let t = "channel_decode";
    let error = WireError::new(ErrorKind::ChunkHashMismatch, "chunk 3 does not match");
    let server = [
        (
            "challenge",
            ServerMsg::Challenge {
                nonce: "00ff".repeat(8),
            },
        ),
        (
            "welcome",
            ServerMsg::Welcome {
                device_id: "dev-1".parse().unwrap(),
                session_token: "tok".to_owned(),
                enrolled: true,
                features: FEATURES.to_vec(),
                private_addresses: vec!["10.77.0.5/16".to_owned(), "fd77::5/64".to_owned()],
            },
        ),
        (
            "offer",
            ServerMsg::Offer(Offer {
                rollout_id: 7,
                version: "1.2.3".parse().unwrap(),
                manifest_path: "/v1/device/releases/1.2.3/manifest".to_owned(),
                allow_downgrade: false,
                max_bytes_per_sec: Some(1 << 20),
                hold_reboot: true,
                freshness: None,
            }),
        ),
        ("no_update", ServerMsg::NoUpdate),
        ("error", ServerMsg::Error(error.clone())),
    ];
    for (name, msg) in server {
        write(t, &format!("server-{name}"), encode(&msg).as_bytes());
    }
    let agent = [
        (
            "enroll",
            AgentMsg::Enroll {
                device_type: "gateway-x86".parse().unwrap(),
                hardware_id: "00:11:22:33:44:55".parse().unwrap(),
                token: "enroll-token".to_owned(),
                public_key: "AAAA".to_owned(),
                signature: "BBBB".to_owned(),
                features: FEATURES.to_vec(),
            },
        ),
        (
            "authenticate",
            AgentMsg::Authenticate {
                device_id: "dev-1".parse().unwrap(),
                signature: "BBBB".to_owned(),
                features: FEATURES.to_vec(),
            },
        ),
        (
            "report",
            AgentMsg::Report(Report {
                state: AgentState::Downloading,
                running_version: "1.2.2".parse().unwrap(),
                booted_slot: SlotName::A,
                target_version: Some("1.2.3".parse().unwrap()),
                progress: Some(Progress {
                    done_bytes: 10,
                    total_bytes: 100,
                    fetched_bytes: 5,
                }),
                error: Some(error),
            }),
        ),
    ];
    for (name, msg) in agent {
        write(t, &format!("agent-{name}"), encode(&msg).as_bytes());
    }
}

fn manifest() {
    let t = "manifest_parse";
    // The key the fuzz target trusts.
    let key = ReleaseSigningKey::from_seed([42; 32]);
    let a = vec![1u8; 1000];
    let b = vec![2u8; 500];
    let entry = |data: &[u8]| ChunkEntry {
        hash: sha256(data),
        size: data.len() as u32,
        stored_size: encode_chunk(data).unwrap().len() as u32,
    };
    let image: Vec<u8> = a.iter().chain(&b).copied().collect();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        version: "1.2.3".parse().unwrap(),
        device_type: "gateway-x86".parse().unwrap(),
        created_at: "2025-01-01T00:00:00Z".to_owned(),
        expires_at: "2026-01-01T00:00:00Z".to_owned(),
        image: ImageInfo {
            size: image.len() as u64,
            sha256: sha256(&image),
        },
        compression: Compression::Zstd,
        chunks: vec![entry(&a), entry(&b)],
        chunk_index: None,
        patches: Vec::new(),
        may_replace_up_to: None,
    };
    let signed = sign_manifest(&manifest, &key).unwrap();
    // The seed must take the fuzz target down the accepting path.
    let mid_2025 = time::OffsetDateTime::from_unix_timestamp(1_748_736_000).unwrap();
    assert_eq!(
        signed.verify(&[key.public_key()], mid_2025).unwrap(),
        manifest
    );
    write(t, "signed", &signed.to_json());
    write(t, "bare", signed.signed.as_bytes());
}

fn grubenv() {
    let t = "grubenv_parse";
    write(t, "empty", &GrubEnv::new().to_bytes().unwrap());

    let mut env = GrubEnv::new();
    env.set("saved_entry", "0").unwrap();
    BootState {
        default_slot: SlotName::A,
        trial: Some(Trial {
            slot: SlotName::B,
            tries_left: 3,
        }),
        fallback_from: Some(SlotName::B),
    }
    .apply_to(&mut env);
    env.set("note", "back\\slash and\nnewline").unwrap();
    let bytes = env.to_bytes().unwrap();
    BootState::from_env(&GrubEnv::parse(&bytes).unwrap()).unwrap();
    write(t, "trial", &bytes);

    // A comment line (with an escaped newline) as grub-editenv leaves them.
    let mut block =
        b"# GRUB Environment Block\n# WARNING: edited \\\n by hand\nuplift_default=b\n".to_vec();
    block.resize(1024, b'#');
    BootState::from_env(&GrubEnv::parse(&block).unwrap()).unwrap();
    write(t, "comment", &block);
}

/// chunk_decode input: size (u32 LE), flags, 32-byte hash, stored bytes.
fn chunk_input(size: u32, flags: u8, hash: [u8; 32], stored: &[u8]) -> Vec<u8> {
    let mut out = size.to_le_bytes().to_vec();
    out.push(flags);
    out.extend_from_slice(&hash);
    out.extend_from_slice(stored);
    out
}

fn chunk() {
    let t = "chunk_decode";
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    let stored = encode_chunk(&data).unwrap();
    let hash = *sha256(&data).as_bytes();
    let entry = ChunkEntry {
        hash: sha256(&data),
        size: 3000,
        stored_size: stored.len() as u32,
    };
    assert_eq!(
        uplift_release::chunk::decode_chunk(&entry, &stored).unwrap(),
        data
    );
    write(t, "valid", &chunk_input(3000, 0, hash, &stored));
    write(
        t,
        "valid-derived-hash",
        &chunk_input(3000, 1, [0; 32], &stored),
    );

    // Bombs: 4 MiB of zeros, with and without the content size in the
    // frame header, declared as a (legal) 1 MiB chunk.
    let zeros = vec![0u8; 4 * MAX_CHUNK_SIZE as usize];
    let bomb = encode_chunk(&zeros).unwrap();
    write(
        t,
        "bomb-sized",
        &chunk_input(MAX_CHUNK_SIZE, 1, [0; 32], &bomb),
    );
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
    enc.include_contentsize(false).unwrap();
    enc.write_all(&zeros).unwrap();
    let bomb = enc.finish().unwrap();
    write(
        t,
        "bomb-streamed",
        &chunk_input(MAX_CHUNK_SIZE, 1, [0; 32], &bomb),
    );
}

fn ubootenv() {
    let t = "ubootenv_parse";
    let mut env = UBootEnv::new();
    env.set("bootcmd", "run uplift_boot").unwrap();
    env.set("uplift_default", "a").unwrap();
    env.set("uplift_trial", "b").unwrap();
    env.set("bootcount", "1").unwrap();
    write(t, "data", &env.encode_data(256).unwrap());
    write(t, "single", &encode_copy(&env, Layout::Single, 256, 0).unwrap());
    write(t, "redundant", &encode_copy(&env, Layout::Redundant, 256, 7).unwrap());
    write(t, "empty", &encode_copy(&UBootEnv::new(), Layout::Single, 64, 0).unwrap());
}

fn root() {
    let t = "root_parse";
    let key = |n: u8| ReleaseSigningKey::from_seed([n; 32]);
    let role = |keys: &[u8], threshold| Role {
        keys: keys.iter().map(|n| key(*n).public_key()).collect(),
        threshold,
    };
    // The fuzz target's first root: root keys 1, 2, 3 (2 of 3), release 10.
    let first = Root {
        format: ROOT_FORMAT,
        version: 1,
        expires_at: "2030-01-01T00:00:00Z".to_owned(),
        root: role(&[1, 2, 3], 2),
        release: role(&[10], 1),
        freshness: None,
    };
    let v1 = first.sign(&[&key(1), &key(2)]).unwrap();
    // Its successor rotates root key 1 out and the release key to 11.
    let second = Root {
        version: 2,
        root: role(&[2, 3, 4], 2),
        release: role(&[11], 1),
        ..first
    };
    let v2 = second.sign(&[&key(2), &key(3), &key(4)]).unwrap();
    // The seed must take the fuzz target down the accepting path.
    TrustedRoot::initial(&v1).unwrap().update(&v2).unwrap();
    write(t, "first", &v1.to_json());
    write(t, "next", &v2.to_json());
}

fn freshness() {
    let t = "freshness_check";
    // What the fuzz target expects, signed by its online key (seed 40).
    let record = Freshness {
        format: FRESHNESS_FORMAT,
        device_id: "dev-1".to_owned(),
        version: "1.2.3".to_owned(),
        manifest_sha256: "5d41402abc4b2a76b9719d911017c592ae4f4e0b1f8c0a7c3b8d0e1f2a3b4c5d"
            .to_owned(),
        issued_at: "2027-01-01T00:20:00.250Z".to_owned(),
        expires_at: "2027-01-01T01:20:00.250Z".to_owned(),
    };
    let signed = record.sign(&ReleaseSigningKey::from_seed([40; 32]));
    write(t, "current", serde_json::to_string(&signed).unwrap().as_bytes());
    let stale = Freshness {
        issued_at: "2027-01-01T00:00:00Z".to_owned(),
        ..record
    };
    let signed = stale.sign(&ReleaseSigningKey::from_seed([40; 32]));
    write(t, "replayed", serde_json::to_string(&signed).unwrap().as_bytes());
}

fn main() {
    channel();
    manifest();
    grubenv();
    chunk();
    ubootenv();
    root();
    freshness();
}
