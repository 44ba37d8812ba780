//! The entry point of each function: parse the trigger's payload, run the
//! lifecycle, shape the answer. `functions/*/main.rs` only wire these to the
//! Lambda runtime, so tests and the CLI run exactly the deployed code.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::connect::{ContactEventDetail, FlowEvent, ObjectCreatedDetail};
use crate::directory_sync::{DirectoryRetry, DirectorySync, WebhookRequest};
use crate::handoff::{DeadLetter, RetryMessage};
use crate::lifecycle::{HandoffFailed, Lifecycle};
use crate::observe;
use crate::outcome::{Outcome, Report};
use crate::store_error::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The payload is not an event this function takes (answered to the flow as an error).
    #[error("malformed event: {0}")]
    Malformed(String),
    /// The work could not be stored or handed off: deliver the event again.
    #[error(transparent)]
    Retry(#[from] HandoffFailed),
    /// The work stopped part way (Dynamics or AWS unavailable); the next run continues.
    #[error("{0}")]
    Unfinished(String),
}

/// Time the function keeps back after its Dynamics work to store state and hand off.
const RESERVE: Duration = Duration::from_millis(1500);

/// Past the flow's budget: time for the state save after the Dynamics work, and
/// then, if something still hangs, for handing the contact off. The flow answers
/// within budget + 2 x this.
const FLOW_GRACE: Duration = Duration::from_millis(500);

/// The Lambda deadline (Unix milliseconds, as the runtime reports it) as an `Instant`.
pub fn deadline_from(deadline: SystemTime) -> Instant {
    Instant::now()
        + deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default()
}

fn work_deadline(lambda_deadline: Instant) -> Instant {
    lambda_deadline
        .checked_sub(RESERVE)
        .unwrap_or_else(Instant::now)
}

fn finish(lifecycle: &Lifecycle, report: &Report, started: Instant) {
    observe::record(lifecycle.function, report, started.elapsed());
}

/// Dead-letters an event nobody can process and reports it handled.
async fn refuse(
    lifecycle: &Lifecycle,
    event: &Value,
    reason: String,
    started: Instant,
) -> Result<Value, HandlerError> {
    lifecycle
        .handoff
        .dead_letter(&DeadLetter {
            reason: reason.clone(),
            function: lifecycle.function.to_owned(),
            step: None,
            contact_id: None,
            record_id: None,
            transient: false,
            event: Some(event.clone()),
            column: None,
        })
        .await
        .map_err(HandoffFailed)?;
    let report = skipped(format!("malformed event: {reason}"));
    let report = Report {
        outcome: Outcome::DeadLettered { reason },
        ..report
    };
    finish(lifecycle, &report, started);
    Ok(Value::Null)
}

fn skipped(reason: String) -> Report {
    Report {
        contact_id: None,
        step: None,
        record_id: None,
        customer: None,
        outcome: Outcome::Skipped { reason },
        dataverse_requests: 0,
        dataverse_retries: 0,
        dataverse_throttled: 0,
        degraded: Vec::new(),
    }
}

/// Runs one event's facts through the lifecycle and logs its line.
async fn apply(
    lifecycle: &Lifecycle,
    facts: crate::connect::StepFacts,
    event: &Value,
    lambda_deadline: Instant,
    started: Instant,
) -> Result<Value, HandlerError> {
    let deadline = work_deadline(lambda_deadline);
    let report = lifecycle
        .process(RetryMessage::event(facts), deadline, Some(event))
        .await?;
    finish(lifecycle, &report, started);
    Ok(Value::Null)
}

/// Logs an event that is not ours to handle.
fn skip(lifecycle: &Lifecycle, reason: String, started: Instant) -> Value {
    finish(lifecycle, &skipped(reason), started);
    Value::Null
}

/// contact-created: the flow invocation, the `INITIATED` contact event, and the retry queue.
pub async fn contact_created(
    lifecycle: &Lifecycle,
    event: Value,
    lambda_deadline: Instant,
) -> Result<Value, HandlerError> {
    if event.get("Details").is_some() {
        let answer = flow(lifecycle, event, lambda_deadline).await?;
        return Ok(serde_json::to_value(answer).unwrap_or_default());
    }
    if event.get("Records").is_some() {
        return retries(lifecycle, event, lambda_deadline).await;
    }
    contact_event(lifecycle, event, lambda_deadline).await
}

/// Answers the flow within its budget: the record id is known before Dynamics
/// answers, so a slow or failing Dynamics defers the creation, never the caller.
pub async fn flow(
    lifecycle: &Lifecycle,
    event: Value,
    lambda_deadline: Instant,
) -> Result<BTreeMap<String, String>, HandlerError> {
    let started = Instant::now();
    let parsed: FlowEvent = serde_json::from_value(event.clone())
        .map_err(|e| HandlerError::Malformed(format!("not a contact flow event: {e}")))?;
    let facts = parsed
        .facts(OffsetDateTime::now_utc())
        .map_err(|e| HandlerError::Malformed(e.to_string()))?;
    let contact_id = facts.contact_id;
    let record = facts
        .instance_id
        .map(|instance| crate::connect::record_id(instance, contact_id));
    let budget = started + lifecycle.config.contact.flow_budget;
    let deadline = budget.min(work_deadline(lambda_deadline));
    // The budget bounds Dynamics inside `process`; this bounds everything else on the
    // flow path too (DynamoDB, the token endpoint, a lease), whatever hangs.
    let work = lifecycle.process(RetryMessage::event(facts.clone()), deadline, Some(&event));
    let report = match tokio::time::timeout_at((deadline + FLOW_GRACE).into(), work).await {
        Ok(report) => report?,
        Err(_) => {
            tracing::warn!(%contact_id, "a dependency outlasted the flow's budget; handing the contact off");
            let reason =
                "a dependency (DynamoDB, Entra ID or Dynamics) outlasted the flow's budget"
                    .to_owned();
            let handoff = lifecycle.defer_unfinished(facts, record, reason);
            tokio::time::timeout(FLOW_GRACE, handoff)
                .await
                .map_err(|_| {
                    HandoffFailed(StoreError::new(
                        "SQS",
                        "the hand-off outlasted the flow's budget",
                        true,
                    ))
                })??
        }
    };
    finish(lifecycle, &report, started);
    Ok(flow_answer(lifecycle, record.or(report.record_id), &report))
}

/// The flat string map the flow reads as `$.External.*`.
fn flow_answer(
    lifecycle: &Lifecycle,
    record: Option<uuid::Uuid>,
    report: &Report,
) -> BTreeMap<String, String> {
    let mut answer = BTreeMap::new();
    let status = match report.outcome {
        Outcome::Applied => "created",
        Outcome::Deferred { .. } => "pending",
        Outcome::DeadLettered { .. } => "failed",
        Outcome::Skipped { .. } => "skipped",
    };
    answer.insert("dynamics_status".into(), status.into());
    if let Some(record) = record {
        answer.insert("dynamics_record_id".into(), record.to_string());
        answer.insert(
            "dynamics_entity".into(),
            lifecycle.config.contact.logical_name.to_string(),
        );
        match lifecycle.screen_pop(record) {
            Ok(url) => {
                answer.insert("dynamics_screen_pop_url".into(), url);
            }
            Err(error) => tracing::warn!(%error, "screen-pop URL template failed"),
        }
    }
    answer.insert(
        "dynamics_customer_matched".into(),
        report.customer.is_some().to_string(),
    );
    if let Some(customer) = &report.customer {
        answer.insert("dynamics_customer_id".into(), customer.id.to_string());
        answer.insert("dynamics_customer_entity".into(), customer.entity.clone());
        let name: String = customer
            .name
            .clone()
            .unwrap_or_default()
            .chars()
            .take(256)
            .collect();
        answer.insert("dynamics_customer_name".into(), name);
    }
    answer
}

/// contact-answered and contact-ended (and `INITIATED` in contact-created): an
/// "Amazon Connect Contact Event" from EventBridge.
pub async fn contact_event(
    lifecycle: &Lifecycle,
    event: Value,
    lambda_deadline: Instant,
) -> Result<Value, HandlerError> {
    let started = Instant::now();
    let parsed: EventBridgeEvent<ContactEventDetail> = match serde_json::from_value(event.clone()) {
        Ok(parsed) => parsed,
        Err(error) => {
            return refuse(
                lifecycle,
                &event,
                format!("not an Amazon Connect contact event: {error}"),
                started,
            )
            .await;
        }
    };
    let facts = match parsed.detail.facts() {
        Ok(Some(facts)) => facts,
        Ok(None) => {
            let reason = format!("event type {:?} is not used", parsed.detail.event_type);
            return Ok(skip(lifecycle, reason, started));
        }
        Err(error) => return refuse(lifecycle, &event, error.to_string(), started).await,
    };
    apply(lifecycle, facts, &event, lambda_deadline, started).await
}

/// recording-available: S3 `Object Created` through EventBridge.
pub async fn recording_available(
    lifecycle: &Lifecycle,
    event: Value,
    lambda_deadline: Instant,
) -> Result<Value, HandlerError> {
    let started = Instant::now();
    let parsed: EventBridgeEvent<ObjectCreatedDetail> = match serde_json::from_value(event.clone())
    {
        Ok(parsed) => parsed,
        Err(error) => {
            return refuse(
                lifecycle,
                &event,
                format!("not an S3 Object Created event: {error}"),
                started,
            )
            .await;
        }
    };
    let facts = match lifecycle
        .recording_facts(&parsed.detail, parsed.region.as_deref())
        .await
        .map_err(HandoffFailed)?
    {
        Ok(facts) => facts,
        Err(reason) => {
            let reason = format!("{reason}: {}", parsed.detail.object.key);
            return Ok(skip(lifecycle, reason, started));
        }
    };
    apply(lifecycle, facts, &event, lambda_deadline, started).await
}

/// The retry queue (SQS): each message is a contact to bring up to date again.
pub async fn retries(
    lifecycle: &Lifecycle,
    event: Value,
    lambda_deadline: Instant,
) -> Result<Value, HandlerError> {
    let batch: SqsEvent = serde_json::from_value(event)
        .map_err(|e| HandlerError::Malformed(format!("not an SQS event: {e}")))?;
    let mut failures = Vec::new();
    for record in batch.records {
        let started = Instant::now();
        let id = record.message_id.clone().unwrap_or_default();
        let body = record.body.unwrap_or_default();
        let message: RetryMessage = match serde_json::from_str(&body) {
            Ok(message) => message,
            Err(error) => {
                let raw = Value::String(body.clone());
                refuse(
                    lifecycle,
                    &raw,
                    format!("retry message is not valid: {error}"),
                    started,
                )
                .await?;
                continue;
            }
        };
        let result = lifecycle
            .process(message, work_deadline(lambda_deadline), None)
            .await;
        match result {
            Ok(report) => finish(lifecycle, &report, started),
            Err(error) => {
                tracing::warn!(%error, message_id = id, "retry message handed back to the queue");
                failures.push(id);
            }
        }
    }
    Ok(batch_response(failures))
}

/// The SQS partial-batch answer: the messages to deliver again.
fn batch_response(failed_message_ids: Vec<String>) -> Value {
    let mut response = SqsBatchResponse::default();
    response.batch_item_failures = failed_message_ids
        .into_iter()
        .map(|id| {
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = id;
            failure
        })
        .collect();
    serde_json::to_value(response).unwrap_or_default()
}

/// record-saved: the Dynamics webhook through a Lambda function URL, and its retry queue.
pub async fn record_saved(
    sync: &DirectorySync,
    event: Value,
    lambda_deadline: Instant,
) -> Result<Value, HandlerError> {
    if event.get("Records").is_some() {
        return directory_retries(sync, event, lambda_deadline).await;
    }
    let header_name = sync
        .config
        .webhook
        .as_ref()
        .and_then(|w| w.header.as_deref())
        .map(str::to_ascii_lowercase);
    let text = |value: Option<&Value>| value.and_then(Value::as_str).map(str::to_owned);
    let headers = event.get("headers");
    let body = text(event.get("body")).unwrap_or_default();
    let body = if event.get("isBase64Encoded").and_then(Value::as_bool) == Some(true) {
        use base64::Engine as _;
        match base64::engine::general_purpose::STANDARD.decode(body.as_bytes()) {
            Ok(bytes) => bytes,
            Err(_) => {
                return Ok(url_response(
                    400,
                    &json!({"error": "body is not valid base64"}),
                ));
            }
        }
    } else {
        body.into_bytes()
    };
    let request = WebhookRequest {
        code: text(
            event
                .get("queryStringParameters")
                .and_then(|q| q.get("code")),
        ),
        header: header_name.and_then(|name| text(headers.and_then(|h| h.get(&name)))),
        body,
    };
    let answer = sync
        .record_saved(request, work_deadline(lambda_deadline))
        .await;
    Ok(url_response(answer.status, &answer.body))
}

/// A function URL answer: status, JSON body.
fn url_response(status: u16, body: &Value) -> Value {
    json!({
        "statusCode": status,
        "headers": {"content-type": "application/json"},
        "body": body.to_string(),
        "isBase64Encoded": false,
    })
}

async fn directory_retries(
    sync: &DirectorySync,
    event: Value,
    lambda_deadline: Instant,
) -> Result<Value, HandlerError> {
    let batch: SqsEvent = serde_json::from_value(event)
        .map_err(|e| HandlerError::Malformed(format!("not an SQS event: {e}")))?;
    let mut failures = Vec::new();
    for record in batch.records {
        let id = record.message_id.clone().unwrap_or_default();
        let Ok(message) =
            serde_json::from_str::<DirectoryRetry>(record.body.as_deref().unwrap_or_default())
        else {
            tracing::error!(
                message_id = id,
                "directory retry message is not valid; dropped"
            );
            continue;
        };
        if let Err(error) = sync.retry(message, work_deadline(lambda_deadline)).await {
            tracing::warn!(%error, message_id = id, "directory retry handed back to the queue");
            failures.push(id);
        }
    }
    Ok(batch_response(failures))
}

/// sync-sweep: the schedule. Every mapped entity, as far as the time allows; the
/// next run continues from the checkpoints.
pub async fn sync_sweep(
    sync: &DirectorySync,
    _event: Value,
    lambda_deadline: Instant,
) -> Result<Value, HandlerError> {
    let started = Instant::now();
    let result = sync.sweep(lambda_deadline).await;
    let reports = match &result {
        Ok(reports) => reports,
        Err(failed) => &failed.reports,
    };
    for report in reports {
        tracing::info!(
            function = sync.function,
            entity = report.entity,
            pages = report.pages,
            upserted = report.upserted,
            deleted = report.deleted,
            removed_unseen = report.removed_unseen,
            removed_orphan_phones = report.removed_orphan_phones,
            refused = report.refused,
            full_reconciliation = report.full_reconciliation,
            finished = report.finished,
            error = report.error.as_deref().unwrap_or_default(),
            latency_ms = started.elapsed().as_millis() as u64,
            "sweep"
        );
    }
    // A failed entity fails the run, so the function's Errors alarm sees it.
    match result {
        Ok(reports) => Ok(serde_json::to_value(reports).unwrap_or_default()),
        Err(failed) => Err(HandlerError::Unfinished(format!(
            "{failed}; the next run continues from the checkpoints"
        ))),
    }
}
