//! An S3 object key (any text): a recording, transcript or analysis file, or a reason it is not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|key: &str| {
    let _ = shared::recording::classify(key);
    let _ = shared::agents::ids_from_agent_arn(key);
    let _ = shared::connect::instance_id_from_arn(key);
});
