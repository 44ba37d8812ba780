//! The README's run command and the preview command, run as an operator runs them.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_connect-dynamics"))
        .args(args)
        .output()
        .expect("the CLI binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Every `Authorization: Bearer` printed is followed by the redaction, never a token
/// (the emulator's tokens start `emu.`).
fn assert_tokens_redacted(output: &str) {
    let bearers = output.matches("Bearer ").count();
    assert!(bearers > 0, "no Authorization header printed:\n{output}");
    assert_eq!(
        output.matches("Bearer <redacted>").count(),
        bearers,
        "a token was printed:\n{output}"
    );
    assert!(!output.contains("emu."), "a token was printed:\n{output}");
}

#[test]
fn simulate_runs_a_whole_contact_against_the_embedded_emulator() {
    let (ok, output) = run(&["simulate"]);
    assert!(ok, "{output}");
    for step in [
        "the webhook calls record-saved",
        "== sync-sweep",
        "== contact flow invokes contact-created",
        "== CONNECTED_TO_AGENT contact event",
        "== DISCONNECTED contact event",
        "== call recording written to S3",
        "== the Dynamics record ==",
    ] {
        assert!(output.contains(step), "missing `{step}` in:\n{output}");
    }
    assert!(output.contains("\"dynamics_customer_matched\":\"true\""));
    assert!(output.contains("Answered by agent ana.silva at 2025-03-11T09:41:44Z"));
    assert!(output.contains("\"ownerid@odata.bind\": \"/systemusers("));
    assert!(output.contains("5 events, 1 token request(s)"), "{output}");
    // The final record is closed, and no token is ever shown.
    let record = output
        .split("== the Dynamics record ==")
        .nth(1)
        .expect("the record is printed");
    assert!(record.contains("\"statecode\": 1"), "{record}");
    assert_tokens_redacted(&output);
}

#[test]
fn preview_prints_the_request_with_the_token_redacted() {
    let (ok, output) = run(&["preview", "ended"]);
    assert!(ok, "{output}");
    assert!(output.contains("PATCH "), "{output}");
    assert!(output.contains("the close waits up to 300 s"), "{output}");
    assert!(output.contains("\"statecode\": 1"), "{output}");
    assert_tokens_redacted(&output);
}
