//! Device-channel frames arrive from the network on both ends: the server
//! decodes `AgentMsg`, the agent decodes `ServerMsg`.
//!
//! Checks: `decode` never panics, and whatever it accepts re-encodes to a
//! frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uplift_proto::channel::{decode, encode, AgentMsg, ServerMsg};

fuzz_target!(|data: &[u8]| {
    // Frames are WebSocket text frames, which are UTF-8 by definition.
    let Ok(frame) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(msg) = decode::<AgentMsg>(frame) {
        let again = encode(&msg);
        assert_eq!(decode::<AgentMsg>(&again).as_ref(), Ok(&msg), "{again}");
    }
    if let Ok(msg) = decode::<ServerMsg>(frame) {
        let again = encode(&msg);
        assert_eq!(decode::<ServerMsg>(&again).as_ref(), Ok(&msg), "{again}");
    }
});
