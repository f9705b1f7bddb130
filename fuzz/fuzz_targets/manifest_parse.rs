//! Signed manifests are downloaded by agents and uploaded to the server.
//!
//! Checks, on any bytes: `SignedManifest::from_json`, `parse_unverified` and
//! `verify` never panic; a bare `Manifest` parses, validates and yields its
//! chunk offsets without panicking. Whatever validates must also sign,
//! serialize, and verify again to the same manifest (the path a release
//! build takes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uplift_release::keys::{ReleasePublicKey, ReleaseSigningKey};
use uplift_release::manifest::{sign_manifest, Manifest, SignedManifest};

/// The key the seed manifests are signed with (see examples/gen_seeds.rs).
pub fn key() -> &'static ReleaseSigningKey {
    static KEY: OnceLock<ReleaseSigningKey> = OnceLock::new();
    KEY.get_or_init(|| ReleaseSigningKey::from_seed([42; 32]))
}

fn trusted() -> &'static [ReleasePublicKey] {
    static TRUSTED: OnceLock<Vec<ReleasePublicKey>> = OnceLock::new();
    TRUSTED.get_or_init(|| {
        vec![
            ReleaseSigningKey::from_seed([7; 32]).public_key(),
            key().public_key(),
        ]
    })
}

/// Mid-2025: the seed manifests are valid then.
const NOW: i64 = 1_748_736_000;

fuzz_target!(|data: &[u8]| {
    let now = OffsetDateTime::from_unix_timestamp(NOW).unwrap();

    if let Ok(signed) = SignedManifest::from_json(data) {
        let unverified = signed.parse_unverified();
        if let Ok(m) = &unverified {
            let _ = m.chunk_offsets().count();
        }
        if let Ok(verified) = signed.verify(trusted(), now) {
            // A verified manifest is also a well-formed one.
            assert_eq!(unverified.as_ref().ok(), Some(&verified));
        }
        // The envelope re-serializes to something that parses back equal.
        assert_eq!(
            SignedManifest::from_json(&signed.to_json()).ok(),
            Some(signed)
        );
    }

    if let Ok(manifest) = serde_json::from_slice::<Manifest>(data) {
        let mut end = 0u64;
        for (offset, chunk) in manifest.chunk_offsets() {
            assert_eq!(offset, end);
            end = offset + u64::from(chunk.size);
        }
        let _ = manifest.stored_bytes();
        if manifest.validate().is_ok() {
            assert_eq!(end, manifest.image.size);
            let signed = sign_manifest(&manifest, key()).expect("a valid manifest signs");
            let created = OffsetDateTime::parse(&manifest.created_at, &Rfc3339).unwrap();
            let back = SignedManifest::from_json(&signed.to_json()).expect("own output parses");
            assert_eq!(
                back.verify(trusted(), created).as_ref().ok(),
                Some(&manifest)
            );
        }
    }
});
