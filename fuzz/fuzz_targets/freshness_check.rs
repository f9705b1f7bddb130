//! An offer's signed freshness comes over the device channel from a server
//! that may be compromised, or through a network that replays old frames.
//!
//! Checks, on any bytes: a `SignedFreshness` parsed from them goes through
//! `freshness::check` without panicking; a record accepted is signed by the
//! role's key, names exactly the expected device, version and manifest, has
//! not expired at `now`, and was not issued before the newest one accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uplift_proto::trust::SignedFreshness;
use uplift_release::freshness::{check, Expected};
use uplift_release::keys::ReleaseSigningKey;
use uplift_release::root::Role;

/// The server's online key is seed 40 (see examples/gen_seeds.rs).
fn role() -> &'static Role {
    static ROLE: OnceLock<Role> = OnceLock::new();
    ROLE.get_or_init(|| Role {
        keys: vec![ReleaseSigningKey::from_seed([40; 32]).public_key()],
        threshold: 1,
    })
}

const EXPECTED: Expected<'static> = Expected {
    device_id: "dev-1",
    version: "1.2.3",
    manifest_sha256: "5d41402abc4b2a76b9719d911017c592ae4f4e0b1f8c0a7c3b8d0e1f2a3b4c5d",
};

fn time(text: &str) -> OffsetDateTime {
    OffsetDateTime::parse(text, &Rfc3339).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Ok(offered) = serde_json::from_slice::<SignedFreshness>(data) else {
        return;
    };
    let now = time("2027-01-01T00:30:00Z");
    let newest = time("2027-01-01T00:10:00Z");
    for newest_accepted in [None, Some(newest)] {
        let Ok((record, issued_at)) = check(Some(&offered), role(), EXPECTED, newest_accepted, now)
        else {
            continue;
        };
        assert_eq!(record.device_id, EXPECTED.device_id);
        assert_eq!(record.version, EXPECTED.version);
        assert_eq!(record.manifest_sha256, EXPECTED.manifest_sha256);
        assert!(now < time(&record.expires_at), "{record:?}");
        if let Some(newest) = newest_accepted {
            assert!(issued_at >= newest, "{record:?}");
        }
        // Accepted means signed: the same text under no signature is not.
        let unsigned = SignedFreshness {
            signed: offered.signed.clone(),
            signatures: Vec::new(),
        };
        assert!(check(Some(&unsigned), role(), EXPECTED, newest_accepted, now).is_err());
    }
});
