//! One structured line per event, and CloudWatch metrics in embedded metric format.

use std::time::Duration;

use serde_json::json;

use crate::outcome::{Outcome, Report};

/// JSON logs in Lambda (CloudWatch parses them), readable text on a terminal.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some() {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .without_time()
            .init();
    } else {
        builder.with_writer(std::io::stderr).init();
    }
}

/// Logs the event's line (contact id, step, record id, attempts, latency, outcome)
/// and prints its metrics: processed, retried, throttled, dead-lettered.
pub fn record(function: &str, report: &Report, elapsed: Duration) {
    let reason = match &report.outcome {
        Outcome::Applied => None,
        Outcome::Deferred { reason }
        | Outcome::DeadLettered { reason }
        | Outcome::Skipped { reason } => Some(reason.as_str()),
    };
    tracing::info!(
        function,
        contact_id = report.contact_id.map(|c| c.to_string()).unwrap_or_default(),
        step = report.step.map(|s| s.name()).unwrap_or("retry"),
        record_id = report.record_id.map(|r| r.to_string()).unwrap_or_default(),
        attempts = report.dataverse_requests,
        retries = report.dataverse_retries,
        latency_ms = elapsed.as_millis() as u64,
        outcome = report.outcome.label(),
        reason = reason.unwrap_or_default(),
        degraded = report.degraded.join(","),
        "event"
    );
    if std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some() {
        println!("{}", metrics_document(function, report, elapsed));
    }
}

/// The embedded-metric-format document CloudWatch turns into metrics.
pub fn metrics_document(function: &str, report: &Report, elapsed: Duration) -> serde_json::Value {
    let timestamp = crate::clock::unix_millis();
    let count = |yes: bool| u64::from(yes);
    json!({
        "_aws": {
            "Timestamp": timestamp,
            "CloudWatchMetrics": [{
                "Namespace": "ConnectDynamics",
                "Dimensions": [["Function"]],
                "Metrics": [
                    {"Name": "Processed", "Unit": "Count"},
                    {"Name": "Retried", "Unit": "Count"},
                    {"Name": "Throttled", "Unit": "Count"},
                    {"Name": "Deferred", "Unit": "Count"},
                    {"Name": "DeadLettered", "Unit": "Count"},
                    {"Name": "Degraded", "Unit": "Count"},
                    {"Name": "Latency", "Unit": "Milliseconds"}
                ]
            }]
        },
        "Function": function,
        "Processed": count(report.outcome == Outcome::Applied),
        "Retried": report.dataverse_retries,
        "Throttled": report.dataverse_throttled,
        "Deferred": count(matches!(report.outcome, Outcome::Deferred { .. })),
        "DeadLettered": count(matches!(report.outcome, Outcome::DeadLettered { .. })),
        "Degraded": report.degraded.len(),
        "Latency": elapsed.as_millis() as u64,
        "ContactId": report.contact_id.map(|c| c.to_string()),
        "Outcome": report.outcome.label(),
    })
}
