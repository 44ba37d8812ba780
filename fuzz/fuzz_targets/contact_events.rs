//! Contact-flow and contact-event payloads (any bytes): facts or a clear error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::connect::{ContactEventDetail, FlowEvent};

fuzz_target!(|body: &[u8]| {
    if let Ok(flow) = serde_json::from_slice::<FlowEvent>(body) {
        let _ = flow.facts(time::OffsetDateTime::UNIX_EPOCH);
    }
    if let Ok(detail) = serde_json::from_slice::<ContactEventDetail>(body) {
        let _ = detail.facts();
    }
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        let _ = shared::recording::transcript_text(&json);
    }
});
