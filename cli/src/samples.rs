//! The sample events of one contact, shipped with the repository (`tests/fixtures`),
//! retargeted to a fresh contact id so every run makes a new record.

use std::collections::HashMap;

use serde_json::Value;
use shared::agents::Profile;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Flow,
    Initiated,
    Answered,
    Ended,
    Recording,
}

pub struct Event {
    pub kind: Kind,
    pub title: &'static str,
    pub payload: Value,
}

pub struct SampleAgent {
    pub id: &'static str,
    pub username: &'static str,
    pub email: &'static str,
    pub name: &'static str,
}

/// The agent of the sample contact events, as Amazon Connect's DescribeUser would describe them.
pub const AGENT: SampleAgent = SampleAgent {
    id: "72df775f-4bad-4e6a-a431-df2e1440a45c",
    username: "ana.silva",
    email: "ana.silva@example.com",
    name: "Ana Silva",
};

/// The agents a local run knows without asking Amazon Connect.
pub fn agents() -> HashMap<Uuid, Profile> {
    let (first, last) = AGENT.name.split_once(' ').unwrap_or((AGENT.name, ""));
    Uuid::parse_str(AGENT.id)
        .map(|id| {
            let profile = Profile {
                username: Some(AGENT.username.into()),
                email: Some(AGENT.email.into()),
                first_name: Some(first.into()),
                last_name: Some(last.into()),
            };
            HashMap::from([(id, profile)])
        })
        .unwrap_or_default()
}

const FIXTURE_CONTACTS: [&str; 2] = [
    "aee46de9-1e0c-428c-aa82-afe11b6ad2c5",
    "16d9dbc3-3863-4327-b67e-d0f31673139e",
];

/// The DISCONNECTED sample comes from another call; its times are moved onto the
/// answered sample's call (answered 09:41:44, six and a half minutes of talk), so the
/// simulated contact tells one consistent story.
const ONE_TIMELINE: [(&str, &str); 5] = [
    ("2025-03-11T13:20:15.034Z", "2025-03-11T09:41:06.208Z"),
    ("2025-03-11T13:20:15.410Z", "2025-03-11T09:41:44.902Z"),
    ("2025-03-11T13:20:21.871Z", "2025-03-11T09:41:06.911Z"),
    ("2025-03-11T13:26:48.390Z", "2025-03-11T09:48:17.880Z"),
    ("2025-03-11T13:26:49Z", "2025-03-11T09:48:18Z"),
];

fn retarget(text: &str, contact_id: &str) -> Value {
    let mut text = text.to_owned();
    for fixture in FIXTURE_CONTACTS {
        text = text.replace(fixture, contact_id);
    }
    let text = text.replace(
        "\"initiationMethod\": \"OUTBOUND\"",
        "\"initiationMethod\": \"INBOUND\"",
    );
    let text = ONE_TIMELINE
        .iter()
        .fold(text, |text, (from, to)| text.replace(from, to));
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// A voice contact: flow invocation, INITIATED, answered, ended, call recording.
pub fn contact() -> Vec<Event> {
    let contact_id = uuid::Uuid::new_v4().to_string();
    let event = |kind, title, text: &str| Event {
        kind,
        title,
        payload: retarget(text, &contact_id),
    };
    vec![
        event(
            Kind::Flow,
            "contact flow invokes contact-created",
            include_str!("../../tests/fixtures/connect-flow-event.json"),
        ),
        event(
            Kind::Initiated,
            "INITIATED contact event",
            include_str!("../../tests/fixtures/connect-contact-event-initiated.constructed.json"),
        ),
        event(
            Kind::Answered,
            "CONNECTED_TO_AGENT contact event",
            include_str!("../../tests/fixtures/connect-contact-event-connected-to-agent.json"),
        ),
        event(
            Kind::Ended,
            "DISCONNECTED contact event",
            include_str!("../../tests/fixtures/connect-contact-event-disconnected.json"),
        ),
        event(
            Kind::Recording,
            "call recording written to S3",
            include_str!(
                "../../tests/fixtures/s3-object-created-connect-recording.constructed.json"
            ),
        ),
    ]
}

/// A Dynamics webhook `Update` of a contact (`dynamics-webhook-update.json`) for the given record.
pub fn webhook_update(id: uuid::Uuid) -> Vec<u8> {
    let text = include_str!("../../tests/fixtures/dynamics-webhook-update.json")
        .replace("374cca32-b347-4e5a-8fa6-11098c82c9a5", &id.to_string());
    text.into_bytes()
}
