//! A signed root arrives from the server (or a tampered network) and is the
//! one document that can change which keys a device trusts.
//!
//! Checks, on any bytes: `SignedRoot::from_json`, `parse_unverified`,
//! `TrustedRoot::initial` and `TrustedRoot::update` from a fixed first
//! root never panic; nothing is accepted as the next root unless it is
//! version 2 and a threshold of the first root's root keys signed it; the
//! envelope re-serializes to one that parses back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use uplift_release::keys::ReleaseSigningKey;
use uplift_release::root::{Role, Root, SignedRoot, TrustedRoot, ROOT_FORMAT};

/// Root keys are seeds 1, 2, 3 (2 of 3); the release key is seed 10 (see
/// examples/gen_seeds.rs, whose version-2 seed this first root accepts).
fn first() -> &'static TrustedRoot {
    static FIRST: OnceLock<TrustedRoot> = OnceLock::new();
    FIRST.get_or_init(|| {
        let key = |n: u8| ReleaseSigningKey::from_seed([n; 32]);
        let root = Root {
            format: ROOT_FORMAT,
            version: 1,
            expires_at: "2030-01-01T00:00:00Z".to_owned(),
            root: Role {
                keys: [1, 2, 3].map(|n| key(n).public_key()).to_vec(),
                threshold: 2,
            },
            release: Role {
                keys: vec![key(10).public_key()],
                threshold: 1,
            },
            freshness: None,
        };
        let signed = root.sign(&[&key(1), &key(2)]).unwrap();
        TrustedRoot::initial(&signed).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(signed) = SignedRoot::from_json(data) else {
        return;
    };
    assert_eq!(
        SignedRoot::from_json(&signed.to_json()).ok().as_ref(),
        Some(&signed)
    );
    let unverified = signed.parse_unverified();
    if let Ok(initial) = TrustedRoot::initial(&signed) {
        assert_eq!(unverified.as_ref().ok(), Some(initial.root()));
    }
    if let Ok(next) = first().update(&signed) {
        assert_eq!(next.root().version, 2);
        assert_eq!(unverified.as_ref().ok(), Some(next.root()));
    }
});
