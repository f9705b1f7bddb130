//! A U-Boot environment is read from flash that U-Boot, `fw_setenv` or a
//! power cut may have left in any state.
//!
//! Checks, on any bytes: `decode_copy` in both layouts and
//! `UBootEnv::parse_data` never panic; whatever parses encodes into a data
//! area of the same length and parses back equal (the path every agent
//! write takes); a decoded copy re-encodes to a copy that decodes equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uplift_bootenv::ubootenv::{current_copy, decode_copy, encode_copy, Layout};
use uplift_bootenv::UBootEnv;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = UBootEnv::parse_data(data) {
        assert!(env.encoded_len() <= data.len(), "{env:?}");
        let encoded = env
            .encode_data(data.len())
            .expect("what parsed fits where it came from");
        assert_eq!(UBootEnv::parse_data(&encoded).ok(), Some(env));
    }
    for layout in [Layout::Single, Layout::Redundant] {
        if let Ok(copy) = decode_copy(data, layout, 1, 0) {
            let again = encode_copy(&copy.env, layout, data.len(), copy.flag)
                .expect("a decoded copy re-encodes at its size");
            assert_eq!(decode_copy(&again, layout, 1, 0).ok(), Some(copy));
        }
    }
    // The copy picked from two flags is always one that is valid.
    if let [a, b, ..] = data {
        let flags = [Some(*a).filter(|f| f % 3 != 0), Some(*b).filter(|f| f % 5 != 0)];
        if let Some(i) = current_copy(flags) {
            assert!(flags[i].is_some(), "{flags:?} picked {i}");
        } else {
            assert_eq!(flags, [None, None]);
        }
    }
});
