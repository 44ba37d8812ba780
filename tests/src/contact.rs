//! One contact's sample events, delivered to the handlers, and the record they leave.

use std::time::Instant;

use dataverse_emulator::Emulator;
use serde_json::{Map, Value, json};
use shared::handlers::{self, HandlerError};
use shared::lifecycle::Lifecycle;

use crate::{AwsResources, deadline, drain_retries, emulator, fixture, lifecycle};

const FIXTURE_CONTACTS: [&str; 3] = [
    "aee46de9-1e0c-428c-aa82-afe11b6ad2c5",
    "16d9dbc3-3863-4327-b67e-d0f31673139e",
    "8677c433-2692-4adf-985d-803bd5cd55e1",
];

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Flow,
    Initiated,
    Answered,
    Ended,
    Recording,
}

/// One contact's events, all naming the same contact.
pub struct Scenario {
    pub contact_id: String,
    pub events: Vec<(Kind, Value)>,
}

pub fn retarget(event: Value, contact_id: &str, bucket: &str) -> Value {
    let mut text = event.to_string();
    for fixture_contact in FIXTURE_CONTACTS {
        text = text.replace(fixture_contact, contact_id);
    }
    text = text.replace("example-connect-transcripts", bucket).replace(
        "\"initiationMethod\":\"OUTBOUND\"",
        "\"initiationMethod\":\"INBOUND\"",
    );
    serde_json::from_str(&text).unwrap()
}

/// The `INITIATED` event of `contact_id`, started a few seconds before its flow runs
/// (now), as in Amazon Connect; its start time, as Dataverse stores it.
pub fn initiated_before_the_flow(contact_id: &str, bucket: &str) -> (Value, String) {
    let mut initiated = retarget(
        fixture("connect-contact-event-initiated.constructed.json"),
        contact_id,
        bucket,
    );
    let started = time::OffsetDateTime::now_utc() - time::Duration::seconds(5);
    let started = started
        .replace_nanosecond(0)
        .unwrap_or(started)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    initiated["detail"]["initiationTimestamp"] = json!(started);
    (initiated, started)
}

pub async fn scenario(aws: &AwsResources) -> Scenario {
    let contact_id = uuid::Uuid::new_v4().to_string();
    let recording = retarget(fixture("s3-object-created.json"), &contact_id, &aws.bucket);
    let key = recording["detail"]["object"]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let transcript = json!({"Transcript": [
        {"Content": "Hello, my luggage is lost", "ParticipantRole": "CUSTOMER", "DisplayName": "Nadia"},
        {"Content": "Let me check that for you", "ParticipantRole": "AGENT", "DisplayName": "Sam"}
    ]});
    aws.s3
        .put_object()
        .bucket(&aws.bucket)
        .key(&key)
        .body(transcript.to_string().into_bytes().into())
        .send()
        .await
        .unwrap();
    let events = vec![
        (
            Kind::Flow,
            retarget(fixture("connect-flow-event.json"), &contact_id, &aws.bucket),
        ),
        (
            Kind::Initiated,
            retarget(
                fixture("connect-contact-event-initiated.constructed.json"),
                &contact_id,
                &aws.bucket,
            ),
        ),
        (
            Kind::Answered,
            retarget(
                fixture("connect-contact-event-connected-to-agent.json"),
                &contact_id,
                &aws.bucket,
            ),
        ),
        (
            Kind::Ended,
            retarget(
                fixture("connect-contact-event-disconnected.json"),
                &contact_id,
                &aws.bucket,
            ),
        ),
        (Kind::Recording, recording),
    ];
    Scenario { contact_id, events }
}

/// One event through the handler its trigger invokes, with `deadline` as the
/// invocation's remaining time.
pub async fn handle(
    lifecycle: &Lifecycle,
    kind: Kind,
    event: Value,
    deadline: Instant,
) -> Result<Value, HandlerError> {
    match kind {
        Kind::Flow | Kind::Initiated => handlers::contact_created(lifecycle, event, deadline).await,
        Kind::Answered | Kind::Ended => handlers::contact_event(lifecycle, event, deadline).await,
        Kind::Recording => handlers::recording_available(lifecycle, event, deadline).await,
    }
}

/// One event with the time its function has in Lambda (the flow 8 s); it must succeed.
pub async fn deliver(lifecycle: &Lifecycle, kind: Kind, event: Value) -> Value {
    let seconds = if matches!(kind, Kind::Flow | Kind::Initiated) {
        8
    } else {
        30
    };
    handle(lifecycle, kind, event, deadline(seconds))
        .await
        .unwrap_or_else(|e| panic!("{kind:?} failed: {e}"))
}

/// The activity records, without the columns Dataverse stamps on every write.
pub fn phonecalls(emulator: &Emulator) -> Vec<Map<String, Value>> {
    emulator
        .records("phonecalls")
        .into_iter()
        .map(|record| {
            let mut record = record.as_object().unwrap().clone();
            for volatile in ["createdon", "modifiedon", "versionnumber"] {
                record.remove(volatile);
            }
            record
        })
        .collect()
}

pub fn notes(emulator: &Emulator) -> Vec<String> {
    emulator
        .records("annotations")
        .iter()
        .map(|n| n["notetext"].as_str().unwrap_or_default().to_owned())
        .collect()
}

pub async fn reference_record(
    scenario_events: &[(Kind, Value)],
) -> (Vec<Map<String, Value>>, Vec<String>) {
    let emulator = emulator().await;
    let aws = AwsResources::create().await;
    let lifecycle = lifecycle(&emulator, &aws, "");
    for (kind, event) in scenario_events {
        deliver(&lifecycle, *kind, event.clone()).await;
    }
    drain_retries(&lifecycle, &aws).await;
    (phonecalls(&emulator), notes(&emulator))
}

/// The Connect instance and agent of the sample events.
pub const SAMPLE_INSTANCE: &str = "c714775e-f05f-4186-ad82-fe2ec415473e";
pub const SAMPLE_AGENT: &str = "72df775f-4bad-4e6a-a431-df2e1440a45c";

/// Makes the sample events' agent known to Connect's `DescribeUser`.
pub fn sample_agent_is(emulator: &Emulator, username: &str, email: Option<&str>) {
    emulator.add_connect_user(
        SAMPLE_INSTANCE.parse().expect("a GUID"),
        SAMPLE_AGENT.parse().expect("a GUID"),
        username,
        email,
    );
}

/// A lifecycle that makes the agent's Dynamics user (matched by `column`) the owner.
pub fn owner_lifecycle(emulator: &Emulator, aws: &AwsResources, column: &str) -> Lifecycle {
    lifecycle(
        emulator,
        aws,
        &format!("contact:\n  owner_from_agent: {column}\n"),
    )
}

/// Every event of a fresh contact in order, then the retry queue until it is empty:
/// the flow's answer and how many retries there were.
pub async fn run_contact(lifecycle: &Lifecycle, aws: &AwsResources) -> (Value, usize) {
    let mut answer = Value::Null;
    for (kind, event) in scenario(aws).await.events {
        let result = deliver(lifecycle, kind, event).await;
        if kind == Kind::Flow {
            answer = result;
        }
    }
    (answer, drain_retries(lifecycle, aws).await)
}

/// A tiny deterministic generator (xorshift), so a failing seed replays.
pub struct Rng(u64);
pub fn fastrand_like(seed: u64) -> Rng {
    Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
}
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
