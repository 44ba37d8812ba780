//! A Dynamics webhook body (any bytes): a notification or a refusal, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let _ = shared::webhook::parse(body);
    if let Ok(text) = std::str::from_utf8(body) {
        let _ = shared::webhook::parse_wcf_date(text);
    }
});
