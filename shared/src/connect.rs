//! Amazon Connect's events, parsed leniently where Connect is loose (chats and
//! tasks have no endpoints; unknown event types and channels appear over time)
//! and strictly where ids enter URLs and keys.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::dataverse::odata::parse_guid;
use crate::template::format_dataverse_datetime;

/// Namespace of record ids: UUID v5 of `<instance id>/<contact id>` in it is the
/// Dynamics record of that contact, the same on every retry and in every function.
pub const RECORD_NAMESPACE: Uuid = Uuid::from_u128(0x6c0e_5d1a_3b7f_4e2a_9c84_d2f1_a0b3_c5e7);

pub fn record_id(instance_id: Uuid, contact_id: Uuid) -> Uuid {
    Uuid::new_v5(
        &RECORD_NAMESPACE,
        format!("{instance_id}/{contact_id}").as_bytes(),
    )
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EventError(pub String);

// ---------------------------------------------------------------------------
// The contact flow's "Invoke AWS Lambda function" event.
// ---------------------------------------------------------------------------

/// The flow event. `aws_lambda_events`' `ConnectEvent` refuses a null or missing
/// `CustomerEndpoint`, which every chat and task has; this type does not.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct FlowEvent {
    pub details: FlowDetails,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct FlowDetails {
    pub contact_data: FlowContactData,
    #[serde(default)]
    pub parameters: Option<HashMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct FlowContactData {
    pub contact_id: String,
    #[serde(default)]
    pub initial_contact_id: Option<String>,
    #[serde(default)]
    pub previous_contact_id: Option<String>,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub initiation_method: Option<String>,
    #[serde(default, rename = "InstanceARN")]
    pub instance_arn: Option<String>,
    #[serde(default)]
    pub customer_endpoint: Option<Endpoint>,
    #[serde(default)]
    pub system_endpoint: Option<Endpoint>,
    #[serde(default)]
    pub queue: Option<FlowQueue>,
    #[serde(default)]
    pub attributes: Option<HashMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Endpoint {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default, rename = "Type")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FlowQueue {
    #[serde(default, rename = "ARN")]
    pub arn: Option<String>,
    #[serde(default, rename = "Name")]
    pub name: Option<String>,
}

// ---------------------------------------------------------------------------
// "Amazon Connect Contact Event" through EventBridge.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ContactEventType {
    Initiated,
    ConnectedToAgent,
    Disconnected,
    ContactDataUpdated,
    #[serde(other)]
    Other,
}

/// `detail` of a contact event. Captured events are camelCase; AWS's samples mix in PascalCase.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContactEventDetail {
    #[serde(alias = "EventType")]
    pub event_type: ContactEventType,
    #[serde(alias = "ContactId")]
    pub contact_id: String,
    #[serde(default, alias = "InitialContactId")]
    pub initial_contact_id: Option<String>,
    #[serde(default, alias = "Channel")]
    pub channel: Option<String>,
    #[serde(default, alias = "InstanceArn")]
    pub instance_arn: Option<String>,
    #[serde(default, alias = "InitiationMethod")]
    pub initiation_method: Option<String>,
    #[serde(default, alias = "InitiationTimestamp")]
    pub initiation_timestamp: Option<String>,
    #[serde(default, alias = "DisconnectTimestamp")]
    pub disconnect_timestamp: Option<String>,
    #[serde(default, alias = "DisconnectReason")]
    pub disconnect_reason: Option<String>,
    #[serde(default, alias = "AgentInfo")]
    pub agent_info: Option<AgentInfo>,
    #[serde(default, alias = "QueueInfo")]
    pub queue_info: Option<QueueInfo>,
    #[serde(default, alias = "Tags")]
    pub tags: Option<HashMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    #[serde(default, alias = "AgentArn")]
    pub agent_arn: Option<String>,
    #[serde(default, alias = "ConnectedToAgentTimestamp")]
    pub connected_to_agent_timestamp: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueInfo {
    #[serde(default, alias = "QueueArn")]
    pub queue_arn: Option<String>,
}

// ---------------------------------------------------------------------------
// S3 "Object Created" through EventBridge.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ObjectCreatedDetail {
    pub bucket: S3Bucket,
    pub object: S3Object,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct S3Bucket {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct S3Object {
    pub key: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub version_id: Option<String>,
}

// ---------------------------------------------------------------------------
// From events to the facts a step contributes to a contact's record.
// ---------------------------------------------------------------------------

/// The ordered steps of a contact's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Created,
    Answered,
    Ended,
    Recording,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Answered => "answered",
            Self::Ended => "ended",
            Self::Recording => "recording",
        }
    }
}

/// Where the creation facts came from: the flow knows the caller's number, the
/// `INITIATED` event may not, so flow facts replace event facts and never the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    ContactEvent,
    Flow,
}

/// What one event tells about a contact: template variables for one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepFacts {
    pub step: Step,
    pub contact_id: Uuid,
    pub instance_id: Option<Uuid>,
    pub source: Source,
    /// For recordings, the S3 object key (one contact can have several files).
    pub object_key: Option<String>,
    pub values: Map<String, Value>,
    /// Transcript text to attach as a note, while this invocation holds it. Never
    /// stored or queued (a transcript can outgrow a state item or an SQS message):
    /// read from S3 again while `note_wanted`. Still read from older states.
    #[serde(default, skip_serializing)]
    pub note: Option<String>,
    /// The file's transcript is to become a note that does not exist yet.
    #[serde(default)]
    pub note_wanted: bool,
}

/// Connect's "not set" timestamp parses as a real date: treat it as absent.
const NOT_SET: &str = "1970-01-01T00:00:00.001Z";

fn timestamp(value: Option<&str>) -> Option<OffsetDateTime> {
    let text = value?.trim();
    if text.is_empty() || text == NOT_SET {
        return None;
    }
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

fn contact_id(text: &str) -> Result<Uuid, EventError> {
    parse_guid(text).map_err(|_| EventError(format!("contact id `{text}` is not a UUID")))
}

/// The instance id inside `arn:aws:connect:<region>:<account>:instance/<id>[/...]`.
pub fn instance_id_from_arn(arn: &str) -> Option<Uuid> {
    let rest = arn.split_once(":instance/")?.1;
    parse_guid(rest.split('/').next()?).ok()
}

fn insert_text(values: &mut Map<String, Value>, key: &str, text: Option<&str>) {
    if let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) {
        values.insert(key.to_owned(), Value::String(text.to_owned()));
    }
}

fn insert_time(values: &mut Map<String, Value>, key: &str, at: Option<OffsetDateTime>) {
    if let Some(at) = at {
        values.insert(key.to_owned(), Value::String(format_dataverse_datetime(at)));
    }
}

impl FlowEvent {
    /// Creation facts from the flow: everything the flow knows about the contact.
    pub fn facts(&self, now: OffsetDateTime) -> Result<StepFacts, EventError> {
        let data = &self.details.contact_data;
        let contact = contact_id(&data.contact_id)?;
        let instance = data
            .instance_arn
            .as_deref()
            .and_then(instance_id_from_arn)
            .ok_or_else(|| EventError("flow event has no valid InstanceARN".into()))?;
        let mut values = Map::new();
        values.insert("ContactId".into(), Value::String(contact.to_string()));
        values.insert("InstanceId".into(), Value::String(instance.to_string()));
        insert_text(
            &mut values,
            "InitialContactId",
            data.initial_contact_id.as_deref(),
        );
        insert_text(
            &mut values,
            "PreviousContactId",
            data.previous_contact_id.as_deref(),
        );
        insert_text(&mut values, "Channel", data.channel.as_deref());
        insert_text(
            &mut values,
            "InitiationMethod",
            data.initiation_method.as_deref(),
        );
        insert_text(
            &mut values,
            "CustomerEndpoint",
            data.customer_endpoint
                .as_ref()
                .and_then(|e| e.address.as_deref()),
        );
        insert_text(
            &mut values,
            "SystemEndpoint",
            data.system_endpoint
                .as_ref()
                .and_then(|e| e.address.as_deref()),
        );
        insert_text(
            &mut values,
            "Queue",
            data.queue.as_ref().and_then(|q| q.name.as_deref()),
        );
        insert_text(
            &mut values,
            "QueueArn",
            data.queue.as_ref().and_then(|q| q.arn.as_deref()),
        );
        insert_time(&mut values, "InitiationTimestamp", Some(now));
        values.insert(
            "Attributes".into(),
            json!(data.attributes.clone().unwrap_or_default()),
        );
        values.insert(
            "Parameters".into(),
            json!(self.details.parameters.clone().unwrap_or_default()),
        );
        Ok(StepFacts {
            step: Step::Created,
            contact_id: contact,
            instance_id: Some(instance),
            source: Source::Flow,
            object_key: None,
            values,
            note: None,
            note_wanted: false,
        })
    }

    /// The caller's number, when the channel has one.
    pub fn customer_number(&self) -> Option<&str> {
        self.details
            .contact_data
            .customer_endpoint
            .as_ref()
            .and_then(|e| e.address.as_deref())
            .filter(|a| !a.trim().is_empty())
    }
}

impl ContactEventDetail {
    /// The step this event drives, or `None` for events the product does not use.
    pub fn step(&self) -> Option<Step> {
        match self.event_type {
            ContactEventType::Initiated => Some(Step::Created),
            ContactEventType::ConnectedToAgent => Some(Step::Answered),
            ContactEventType::Disconnected => Some(Step::Ended),
            ContactEventType::ContactDataUpdated | ContactEventType::Other => None,
        }
    }

    pub fn facts(&self) -> Result<Option<StepFacts>, EventError> {
        let Some(step) = self.step() else {
            return Ok(None);
        };
        let contact = contact_id(&self.contact_id)?;
        let instance = self
            .instance_arn
            .as_deref()
            .and_then(instance_id_from_arn)
            .or_else(|| {
                self.tags
                    .as_ref()
                    .and_then(|t| t.get("aws:connect:instanceId"))
                    .and_then(|id| parse_guid(id).ok())
            });
        let mut values = Map::new();
        values.insert("ContactId".into(), Value::String(contact.to_string()));
        if let Some(instance) = instance {
            values.insert("InstanceId".into(), Value::String(instance.to_string()));
        }
        insert_text(&mut values, "Channel", self.channel.as_deref());
        insert_text(
            &mut values,
            "InitiationMethod",
            self.initiation_method.as_deref(),
        );
        insert_text(
            &mut values,
            "InitialContactId",
            self.initial_contact_id.as_deref(),
        );
        let initiated = timestamp(self.initiation_timestamp.as_deref());
        insert_time(&mut values, "InitiationTimestamp", initiated);
        if step == Step::Created {
            values.insert("Attributes".into(), json!({}));
            values.insert("Parameters".into(), json!({}));
            insert_text(
                &mut values,
                "SystemEndpoint",
                self.tags
                    .as_ref()
                    .and_then(|t| t.get("aws:connect:systemEndpoint"))
                    .map(String::as_str),
            );
        }
        let agent_answered = self
            .agent_info
            .as_ref()
            .and_then(|a| timestamp(a.connected_to_agent_timestamp.as_deref()));
        if let Some(agent) = &self.agent_info
            && let Some(arn) = agent.agent_arn.as_deref()
        {
            let id = arn
                .rsplit_once("/agent/")
                .map(|(_, id)| id.to_owned())
                .unwrap_or_default();
            values.insert("agent".into(), json!({"arn": arn, "id": id}));
        }
        insert_time(&mut values, "ConnectedToAgentTimestamp", agent_answered);
        insert_text(
            &mut values,
            "QueueArn",
            self.queue_info
                .as_ref()
                .and_then(|q| q.queue_arn.as_deref()),
        );
        if step == Step::Ended {
            let ended = timestamp(self.disconnect_timestamp.as_deref());
            insert_time(&mut values, "DisconnectTimestamp", ended);
            insert_text(
                &mut values,
                "DisconnectReason",
                self.disconnect_reason.as_deref(),
            );
            if let (Some(start), Some(end)) = (initiated, ended) {
                let seconds = (end - start).whole_seconds().max(0);
                // Dataverse stores whole minutes; a started minute counts.
                values.insert("DurationMinutes".into(), json!((seconds + 59) / 60));
                values.insert("DurationSeconds".into(), json!(seconds));
            }
        }
        Ok(Some(StepFacts {
            step,
            contact_id: contact,
            instance_id: instance,
            source: Source::ContactEvent,
            object_key: None,
            values,
            note: None,
            note_wanted: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn flow_events_parse_for_voice_and_chat() {
        let now = OffsetDateTime::from_unix_timestamp(1_762_875_391).unwrap();
        for name in [
            "connect-flow-event.json",
            "connect-flow-event-full.json",
            "connect-flow-event-chat.json",
        ] {
            let event: FlowEvent = serde_json::from_value(fixture(name)).unwrap();
            let facts = event.facts(now).unwrap();
            assert_eq!(facts.step, Step::Created);
            assert_eq!(
                facts.values["InstanceId"],
                "c714775e-f05f-4186-ad82-fe2ec415473e"
            );
        }
        let chat: FlowEvent =
            serde_json::from_value(fixture("connect-flow-event-chat.json")).unwrap();
        assert!(chat.customer_number().is_none());
        assert!(
            !chat
                .facts(now)
                .unwrap()
                .values
                .contains_key("CustomerEndpoint")
        );
        assert_eq!(
            chat.facts(now).unwrap().values["Attributes"]["customerName"],
            "Nadia Okafor"
        );
    }

    #[test]
    fn contact_events_give_their_steps() {
        let detail = |name: &str| -> ContactEventDetail {
            serde_json::from_value(fixture(name)["detail"].clone()).unwrap()
        };
        let initiated = detail("connect-contact-event-initiated.constructed.json")
            .facts()
            .unwrap()
            .unwrap();
        assert_eq!(initiated.step, Step::Created);
        assert_eq!(initiated.source, Source::ContactEvent);
        let answered = detail("connect-contact-event-connected-to-agent.json")
            .facts()
            .unwrap()
            .unwrap();
        assert_eq!(answered.step, Step::Answered);
        assert_eq!(
            answered.values["agent"]["id"],
            "72df775f-4bad-4e6a-a431-df2e1440a45c"
        );
        assert_eq!(
            answered.values["ConnectedToAgentTimestamp"],
            "2025-03-11T09:41:44Z"
        );
        let ended = detail("connect-contact-event-disconnected.json")
            .facts()
            .unwrap()
            .unwrap();
        assert_eq!(ended.step, Step::Ended);
        assert_eq!(ended.values["DisconnectTimestamp"], "2025-03-11T13:26:48Z");
        assert_eq!(ended.values["DurationMinutes"], 7);
        assert!(
            detail("connect-contact-event-contact-data-updated.json")
                .facts()
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn not_set_timestamps_are_absent() {
        assert!(timestamp(Some(NOT_SET)).is_none());
        assert!(timestamp(Some("garbage")).is_none());
        assert!(timestamp(Some("2025-03-11T13:26:48.390Z")).is_some());
    }

    #[test]
    fn record_ids_are_deterministic() {
        let instance = Uuid::parse_str("c714775e-f05f-4186-ad82-fe2ec415473e").unwrap();
        let contact = Uuid::parse_str("aee46de9-1e0c-428c-aa82-afe11b6ad2c5").unwrap();
        assert_eq!(record_id(instance, contact), record_id(instance, contact));
        assert_ne!(
            record_id(instance, contact),
            record_id(instance, Uuid::nil())
        );
        assert_eq!(record_id(instance, contact).get_version_num(), 5);
    }
}
