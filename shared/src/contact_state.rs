//! Per-contact state in DynamoDB: what each step has told about the contact, what
//! has been written to Dynamics, and a short lock so one invocation at a time
//! works on a contact.
//!
//! Item: `contact_id` (S, key), `state` (S, JSON of [`ContactState`]), `ttl` (N),
//! and while an invocation works on it `lock_owner` (S) and `lock_until` (N, Unix ms).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::clock::{unix_millis, unix_now};
use crate::connect::{Source, Step, StepFacts};
use crate::directory::Customer;
use crate::store_error::{StoreError, is_condition_failure};

/// How long an item holding only a lock (its first attempt crashed before saving) is kept.
const LOCK_ONLY_TTL: Duration = Duration::from_secs(7 * 86_400);

/// Everything known about one contact.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContactState {
    pub created: Option<StepFacts>,
    pub answered: Option<StepFacts>,
    pub ended: Option<StepFacts>,
    /// Recording facts by S3 object key.
    pub recordings: BTreeMap<String, StepFacts>,
    /// The caller matched in the directory, once looked up.
    pub customer: Option<Customer>,
    pub customer_looked_up: bool,
    /// The answering agent, resolved once (username, Dynamics owner).
    #[serde(default)]
    pub agent: Option<crate::agents::Agent>,
    /// Columns as last written to the Dynamics record.
    pub written: Map<String, Value>,
    pub record_exists: bool,
    pub closed: bool,
    /// Object keys whose transcript note exists.
    pub notes: BTreeSet<String>,
    /// Steps whose template cannot render (dead-lettered once, then left out).
    pub failed_steps: BTreeMap<String, String>,
    /// Unix seconds of the first event seen for the contact.
    pub first_seen: u64,
    /// Optional parts Dataverse refused (`customer_link`, `owner`), with its answer:
    /// left out of every later write of the contact.
    #[serde(default)]
    pub dropped: BTreeMap<String, String>,
    /// Columns Dataverse refused (deleted, too long, an unknown option), with its
    /// answer: left out of every later write of the contact, the rest kept.
    #[serde(default)]
    pub refused_columns: BTreeMap<String, String>,
    /// The start time of a late `INITIATED` event, close to the flow's: it rides
    /// on the contact's next write rather than costing one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_start: Option<Value>,
    /// The close held for the contact's recording or transcript is due: its grace passed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub close_released: bool,
}

impl ContactState {
    /// Adds an event's facts; whether they tell something new. Duplicates change
    /// nothing; flow facts replace contact-event facts for the creation (the flow
    /// knows the caller's number). A late `INITIATED` start time within
    /// `start_tolerance` of the flow's waits for the next step's facts.
    pub fn merge(&mut self, facts: StepFacts, start_tolerance: Duration) -> bool {
        if let Some(start) = self.late_start_within(&facts, start_tolerance) {
            self.late_start = Some(start);
            return false;
        }
        let new = self.merge_facts(facts);
        if new && let (Some(start), Some(created)) = (self.late_start.take(), self.created.as_mut())
        {
            created.values.insert("InitiationTimestamp".into(), start);
        }
        new
    }

    /// The start time of an `INITIATED` event that corrects the flow's by less than `tolerance`.
    fn late_start_within(&self, facts: &StepFacts, tolerance: Duration) -> Option<Value> {
        let existing = self.created.as_ref()?;
        if facts.step != Step::Created
            || facts.source != Source::ContactEvent
            || existing.source != Source::Flow
        {
            return None;
        }
        let start = facts.values.get("InitiationTimestamp")?;
        let provisional = existing.values.get("InitiationTimestamp")?;
        let parse = |value: &Value| {
            time::OffsetDateTime::parse(
                value.as_str()?,
                &time::format_description::well_known::Rfc3339,
            )
            .ok()
        };
        let difference = (parse(start)? - parse(provisional)?).unsigned_abs();
        (start != provisional && difference < tolerance).then(|| start.clone())
    }

    fn merge_facts(&mut self, facts: StepFacts) -> bool {
        let slot = match facts.step {
            Step::Created => &mut self.created,
            Step::Answered => &mut self.answered,
            Step::Ended => &mut self.ended,
            Step::Recording => {
                let key = facts.object_key.clone().unwrap_or_default();
                let new = !self.recordings.contains_key(&key);
                self.recordings.entry(key).or_insert(facts);
                return new;
            }
        };
        match slot {
            Some(existing) if existing.source == facts.source => false,
            Some(existing) if facts.step == Step::Created && existing.source == Source::Flow => {
                // A late INITIATED event still knows the real start time.
                match facts.values.get("InitiationTimestamp") {
                    Some(initiated)
                        if existing.values.get("InitiationTimestamp") != Some(initiated) =>
                    {
                        existing
                            .values
                            .insert("InitiationTimestamp".into(), initiated.clone());
                        true
                    }
                    _ => false,
                }
            }
            Some(existing) if facts.step == Step::Created && facts.source == Source::Flow => {
                // The flow knows the caller; the INITIATED event knows when the contact
                // really started (the flow only knows when it ran).
                let initiated = existing.values.get("InitiationTimestamp").cloned();
                let mut values = std::mem::take(&mut existing.values);
                values.extend(facts.values.clone());
                if let Some(initiated) = initiated {
                    values.insert("InitiationTimestamp".into(), initiated);
                }
                *existing = StepFacts { values, ..facts };
                // The flow brings the caller's number: look the caller up again.
                self.customer_looked_up = false;
                true
            }
            Some(_) => false,
            None => {
                *slot = Some(facts);
                true
            }
        }
    }
}

/// Proof of holding a contact's lock.
#[derive(Debug, Clone)]
pub struct Lock {
    contact_id: Uuid,
    owner: String,
}

/// A contact's state and, while held, its lock (owner, expiry).
type MemoryItem = (ContactState, Option<(String, Instant)>);

pub enum ContactStateStore {
    DynamoDb {
        client: aws_sdk_dynamodb::Client,
        table: String,
    },
    /// For the local simulation: same behaviour, no AWS.
    Memory(Mutex<HashMap<Uuid, MemoryItem>>),
}

impl ContactStateStore {
    pub fn dynamodb(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self::DynamoDb {
            client,
            table: table.into(),
        }
    }

    pub fn memory() -> Self {
        Self::Memory(Mutex::new(HashMap::new()))
    }

    /// Takes the contact's lock for `hold` and reads its state, waiting for another
    /// holder until `wait_until`. `None` when the contact stayed locked.
    pub async fn lock(
        &self,
        contact_id: Uuid,
        hold: Duration,
        wait_until: Instant,
    ) -> Result<Option<(ContactState, Lock)>, StoreError> {
        let owner = Uuid::new_v4().to_string();
        loop {
            if let Some(state) = self.try_lock(contact_id, &owner, hold).await? {
                return Ok(Some((state, Lock { contact_id, owner })));
            }
            let pause = Duration::from_millis(50 + fastrand::u64(0..50));
            if Instant::now() + pause >= wait_until {
                return Ok(None);
            }
            tokio::time::sleep(pause).await;
        }
    }

    async fn try_lock(
        &self,
        contact_id: Uuid,
        owner: &str,
        hold: Duration,
    ) -> Result<Option<ContactState>, StoreError> {
        match self {
            Self::DynamoDb { client, table } => {
                let now = unix_millis();
                let result = client
                    .update_item()
                    .table_name(table)
                    .key("contact_id", AttributeValue::S(contact_id.to_string()))
                    // A first attempt that crashed leaves only the lock: it expires too.
                    .update_expression(
                        "SET lock_owner = :owner, lock_until = :until, #ttl = if_not_exists(#ttl, :ttl)",
                    )
                    .condition_expression("attribute_not_exists(lock_until) OR lock_until < :now")
                    .expression_attribute_names("#ttl", "ttl")
                    .expression_attribute_values(
                        ":ttl",
                        AttributeValue::N((now / 1000 + LOCK_ONLY_TTL.as_secs()).to_string()),
                    )
                    .expression_attribute_values(":owner", AttributeValue::S(owner.to_owned()))
                    .expression_attribute_values(
                        ":until",
                        AttributeValue::N((now + hold.as_millis() as u64).to_string()),
                    )
                    .expression_attribute_values(":now", AttributeValue::N(now.to_string()))
                    .return_values(ReturnValue::AllNew)
                    .send()
                    .await;
                match result {
                    Ok(output) => {
                        let state = output
                            .attributes
                            .as_ref()
                            .and_then(|item| item.get("state"))
                            .and_then(|v| v.as_s().ok())
                            .map(|json| serde_json::from_str(json))
                            .transpose()
                            .map_err(|e| {
                                StoreError::new(
                                    "DynamoDB",
                                    format!("contact state is not valid JSON: {e}"),
                                    false,
                                )
                            })?
                            .unwrap_or_default();
                        Ok(Some(state))
                    }
                    Err(error) if is_condition_failure(&error) => Ok(None),
                    Err(error) => Err(StoreError::from_sdk("DynamoDB", error)),
                }
            }
            Self::Memory(items) => {
                let mut items = items.lock().unwrap_or_else(|p| p.into_inner());
                let entry = items.entry(contact_id).or_default();
                if entry
                    .1
                    .as_ref()
                    .is_some_and(|(_, until)| *until > Instant::now())
                {
                    return Ok(None);
                }
                entry.1 = Some((owner.to_owned(), Instant::now() + hold));
                Ok(Some(entry.0.clone()))
            }
        }
    }

    /// Stores the state and releases the lock, if the lock is still ours.
    pub async fn save(
        &self,
        state: &ContactState,
        lock: Lock,
        ttl_days: u32,
    ) -> Result<(), StoreError> {
        match self {
            Self::DynamoDb { client, table } => {
                let json = serde_json::to_string(state)
                    .map_err(|e| StoreError::new("DynamoDB", e.to_string(), false))?;
                let ttl = unix_now() + u64::from(ttl_days) * 86_400;
                let result = client
                    .put_item()
                    .table_name(table)
                    .item("contact_id", AttributeValue::S(lock.contact_id.to_string()))
                    .item("state", AttributeValue::S(json))
                    .item("ttl", AttributeValue::N(ttl.to_string()))
                    .condition_expression("lock_owner = :owner")
                    .expression_attribute_values(":owner", AttributeValue::S(lock.owner))
                    .send()
                    .await;
                match result {
                    Ok(_) => Ok(()),
                    Err(error) if is_condition_failure(&error) => Err(StoreError::new(
                        "DynamoDB",
                        "the contact's lock expired before its state was saved",
                        true,
                    )),
                    Err(error) => Err(StoreError::from_sdk("DynamoDB", error)),
                }
            }
            Self::Memory(items) => {
                let mut items = items.lock().unwrap_or_else(|p| p.into_inner());
                let entry = items.entry(lock.contact_id).or_default();
                if entry.1.as_ref().map(|(owner, _)| owner) != Some(&lock.owner) {
                    return Err(StoreError::new(
                        "memory",
                        "the contact's lock expired before its state was saved",
                        true,
                    ));
                }
                *entry = (state.clone(), None);
                Ok(())
            }
        }
    }

    /// Reads a contact's state without locking (for the CLI and tests).
    pub async fn peek(&self, contact_id: Uuid) -> Result<Option<ContactState>, StoreError> {
        match self {
            Self::DynamoDb { client, table } => {
                let output = client
                    .get_item()
                    .table_name(table)
                    .key("contact_id", AttributeValue::S(contact_id.to_string()))
                    .consistent_read(true)
                    .send()
                    .await
                    .map_err(|e| StoreError::from_sdk("DynamoDB", e))?;
                output
                    .item
                    .as_ref()
                    .and_then(|item| item.get("state"))
                    .and_then(|v| v.as_s().ok())
                    .map(|json| {
                        serde_json::from_str(json)
                            .map_err(|e| StoreError::new("DynamoDB", e.to_string(), false))
                    })
                    .transpose()
            }
            Self::Memory(items) => Ok(items
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&contact_id)
                .map(|(s, _)| s.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(step: Step, source: Source, marker: &str) -> StepFacts {
        let mut values = Map::new();
        values.insert("marker".into(), Value::String(marker.into()));
        StepFacts {
            step,
            contact_id: Uuid::nil(),
            instance_id: None,
            source,
            object_key: (step == Step::Recording).then(|| marker.to_owned()),
            values,
            note: None,
            note_wanted: false,
        }
    }

    const TOLERANCE: Duration = Duration::from_secs(120);

    fn started(source: Source, at: &str) -> StepFacts {
        let mut facts = facts(Step::Created, source, "start");
        facts
            .values
            .insert("InitiationTimestamp".into(), Value::String(at.into()));
        facts
    }

    fn start_of(state: &ContactState) -> &Value {
        &state.created.as_ref().unwrap().values["InitiationTimestamp"]
    }

    #[test]
    fn a_late_start_within_the_tolerance_waits_for_the_next_step() {
        let mut state = ContactState::default();
        assert!(state.merge(started(Source::Flow, "2025-03-11T13:20:30Z"), TOLERANCE));
        assert!(!state.merge(
            started(Source::ContactEvent, "2025-03-11T13:20:15Z"),
            TOLERANCE
        ));
        assert_eq!(start_of(&state), "2025-03-11T13:20:30Z");
        // The next new facts carry it; a duplicate does not.
        assert!(!state.merge(
            started(Source::ContactEvent, "2025-03-11T13:20:15Z"),
            TOLERANCE
        ));
        assert!(state.merge(facts(Step::Answered, Source::ContactEvent, "a"), TOLERANCE));
        assert_eq!(start_of(&state), "2025-03-11T13:20:15Z");
        assert_eq!(state.late_start, None);
    }

    #[test]
    fn a_late_start_beyond_the_tolerance_is_new_at_once() {
        let mut state = ContactState::default();
        assert!(state.merge(started(Source::Flow, "2025-03-11T13:25:00Z"), TOLERANCE));
        assert!(state.merge(
            started(Source::ContactEvent, "2025-03-11T13:20:15Z"),
            TOLERANCE
        ));
        assert_eq!(start_of(&state), "2025-03-11T13:20:15Z");
        // The flow after the event keeps the event's start time.
        let mut state = ContactState::default();
        assert!(state.merge(
            started(Source::ContactEvent, "2025-03-11T13:20:15Z"),
            TOLERANCE
        ));
        assert!(state.merge(started(Source::Flow, "2025-03-11T13:20:30Z"), TOLERANCE));
        assert_eq!(start_of(&state), "2025-03-11T13:20:15Z");
    }

    #[test]
    fn flow_facts_win_over_event_facts_and_duplicates_change_nothing() {
        let mut state = ContactState::default();
        assert!(state.merge(
            facts(Step::Created, Source::ContactEvent, "event"),
            TOLERANCE
        ));
        assert!(!state.merge(
            facts(Step::Created, Source::ContactEvent, "event again"),
            TOLERANCE
        ));
        assert!(state.merge(facts(Step::Created, Source::Flow, "flow"), TOLERANCE));
        assert!(!state.merge(
            facts(Step::Created, Source::ContactEvent, "late event"),
            TOLERANCE
        ));
        assert_eq!(state.created.as_ref().unwrap().values["marker"], "flow");
        assert_eq!(state.created.as_ref().unwrap().source, Source::Flow);
        assert!(state.merge(
            facts(Step::Recording, Source::ContactEvent, "a.wav"),
            TOLERANCE
        ));
        assert!(!state.merge(
            facts(Step::Recording, Source::ContactEvent, "a.wav"),
            TOLERANCE
        ));
        assert!(state.merge(
            facts(Step::Recording, Source::ContactEvent, "b.json"),
            TOLERANCE
        ));
        assert_eq!(state.recordings.len(), 2);
    }
}
