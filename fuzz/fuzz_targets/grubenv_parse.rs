//! The GRUB environment block is written by GRUB scripts, operators and a
//! bootloader that may have been cut off mid-write.
//!
//! Checks: `GrubEnv::parse` never panics; whatever parses serializes with
//! `to_bytes` (it came from a block of the same size, so it fits) and
//! re-parses to an equal env; `BootState::from_env` never panics, and a
//! state it reads survives `apply_to` and reading back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uplift_bootenv::{BootState, GrubEnv, GRUBENV_SIZE};

fn check(block: &[u8]) {
    let Ok(env) = GrubEnv::parse(block) else {
        return;
    };
    assert!(env.encoded_len() <= GRUBENV_SIZE, "{env:?}");
    let bytes = env.to_bytes().expect("a parsed block serializes");
    assert_eq!(GrubEnv::parse(&bytes).as_ref().ok(), Some(&env));

    if let Ok(state) = BootState::from_env(&env) {
        let _ = state.boot();
        let _ = state.abandon_trial();
        let mut applied = env.clone();
        state.apply_to(&mut applied);
        assert_eq!(
            BootState::from_env(&applied).ok(),
            Some(state),
            "{applied:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // Nearly every mutation changes the length, and only 1024-byte blocks
    // get past the size check: also try the input cut or padded to size,
    // padded with '#' like a real block.
    if data.len() != GRUBENV_SIZE {
        let mut block = data[..data.len().min(GRUBENV_SIZE)].to_vec();
        block.resize(GRUBENV_SIZE, b'#');
        check(&block);
    }
});
