//! A contact's Dynamics record, kept equal to what one in-order delivery of its
//! events would produce, whatever the duplicates, the order and the failures.
//!
//! Every event adds its facts to the contact's state (under a short per-contact
//! lock) and then brings the record up to date: the step templates are rendered in
//! their canonical order (created, answered, ended, recordings) over everything
//! known, and only the columns that differ from what was last written are sent.
//! The record id is derived from the contact, and the first write is an upsert,
//! so no retry, duplicate or crash can make a second record. The close is written
//! last; a step that arrives after it reopens the activity, writes, and closes it
//! again, so Dataverse's rule that a closed activity cannot be edited holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::agents::AgentResolver;
use crate::clock::unix_now;
use crate::config::{Config, CustomerBinding};
use crate::connect::{ObjectCreatedDetail, Source, Step, StepFacts, record_id};
use crate::contact_state::{ContactState, ContactStateStore};
use crate::dataverse::odata::EntitySet;
use crate::dataverse::{DataverseClient, DataverseError};
use crate::directory::{CallerDirectory, Customer, best_match};
use crate::handoff::{DeadLetter, Handoff, RefusedColumn, RetryMessage};
use crate::on_demand::OnDemand;
use crate::outcome::{Outcome, Report};
use crate::recording::{self, RecordingKind};
use crate::store_error::StoreError;

/// The services one container builds once and every event uses.
pub struct Lifecycle {
    pub config: Arc<Config>,
    pub dataverse: DataverseClient,
    pub state: ContactStateStore,
    pub directory: Arc<CallerDirectory>,
    pub handoff: Handoff,
    pub s3: Option<OnDemand<aws_sdk_s3::Client>>,
    pub agents: AgentResolver,
    pub function: &'static str,
    /// First retry delay; doubles per attempt up to SQS's 15 minutes.
    pub retry_base_delay: Duration,
}

/// Failure to even hand the work off: the trigger must deliver the event again.
#[derive(Debug, thiserror::Error)]
#[error("could not store or hand off the contact's work: {0}")]
pub struct HandoffFailed(#[from] pub StoreError);

enum ApplyError {
    /// Waiting for something (the creation); retry later.
    Pending(String),
    Transient(String),
    Permanent(String),
}

impl From<DataverseError> for ApplyError {
    fn from(error: DataverseError) -> Self {
        if error.is_transient() {
            Self::Transient(error.to_string())
        } else {
            Self::Permanent(error.to_string())
        }
    }
}

/// Dataverse's `notetext` holds at most this many characters; the contact state
/// keeps no more of a transcript than that, and only until its note exists.
const NOTE_MAX_CHARS: usize = 100_000;

/// The default first retry delay.
pub const RETRY_BASE_DELAY: Duration = Duration::from_secs(10);

/// Delay before retry `attempt`: `base` doubling, at most SQS's 15 minutes.
pub fn retry_delay(base: Duration, attempt: u32) -> Duration {
    (base * (1u32 << attempt.min(7))).min(Duration::from_secs(900))
}

/// What the product adds to a record on its own, and gives up when Dataverse refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OptionalPart {
    /// The customer as regarding object or activity party.
    CustomerLink,
    /// `ownerid` from the agent.
    Owner,
}

impl OptionalPart {
    fn name(self) -> &'static str {
        match self {
            Self::CustomerLink => "customer_link",
            Self::Owner => "owner",
        }
    }
}

/// Dataverse's codes for an owner it will not assign: no role, no privilege, no access.
const OWNER_REFUSALS: [&str; 4] = ["0x80042f09", "0x80040231", "0x80040220", "0x80048306"];

/// The optional part a refused write is about, when it carried one: a 404 naming the
/// linked customer, or an owner refusal on a write that set the owner.
fn refused_part(
    state: &ContactState,
    rendered: &Rendered,
    error: &DataverseError,
) -> Option<OptionalPart> {
    let DataverseError::Rejected {
        status,
        code,
        message,
    } = error
    else {
        return None;
    };
    let sent = |key: &str| {
        rendered
            .desired
            .get(key)
            .is_some_and(|value| is_sent(state, key, value))
    };
    match status {
        404 => {
            let customer = state.customer.as_ref()?;
            let named = message
                .to_ascii_lowercase()
                .contains(&customer.id.to_string());
            (named && rendered.customer_key.as_deref().is_some_and(sent))
                .then_some(OptionalPart::CustomerLink)
        }
        403 if OWNER_REFUSALS.contains(&code.to_ascii_lowercase().as_str())
            && sent("ownerid@odata.bind") =>
        {
            Some(OptionalPart::Owner)
        }
        _ => None,
    }
}

/// Whether the next write of the record carries `key` with `value`: everything when
/// it creates or reopens the record, otherwise what changed.
fn is_sent(state: &ContactState, key: &str, value: &Value) -> bool {
    !state.record_exists || state.closed || state.written.get(key) != Some(value)
}

/// The column a refused write is about, among those it carried (the step columns
/// and the close), with the value it carried.
fn refused_column(
    state: &ContactState,
    rendered: &Rendered,
    error: &DataverseError,
) -> Option<(String, Value)> {
    let mut sent: Map<String, Value> = rendered
        .desired
        .iter()
        .filter(|(key, value)| is_sent(state, key, value))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    if let Some(close) = rendered.close.as_ref().filter(|_| !state.closed) {
        sent.extend(close.clone());
    }
    let column = error.refused_column(&sent)?;
    Some((column.to_owned(), sent.get(column)?.clone()))
}

/// Leaves a refused column out of the contact's writes from now on, and says so;
/// returns what its dead letter carries.
fn leave_column_out(
    state: &mut ContactState,
    rendered: &Rendered,
    column: String,
    value: Value,
    error: &DataverseError,
) -> (Step, RefusedColumn) {
    let step = rendered
        .origins
        .get(&column)
        .copied()
        .unwrap_or(Step::Created);
    let message = match error {
        DataverseError::Rejected { message, .. } => message.clone(),
        other => other.to_string(),
    };
    tracing::warn!(
        contact_id = ?state.created.as_ref().map(|c| c.contact_id.to_string()),
        column,
        step = step.name(),
        reason = message,
        "column refused by Dynamics; left out of the contact's writes"
    );
    state
        .refused_columns
        .insert(column.clone(), message.clone());
    let refused = RefusedColumn {
        name: column,
        value,
        message,
    };
    (step, refused)
}

/// Whether a file is a redacted copy (Contact Lens with redaction on; redacted
/// audio is never a recording, so this is a redacted transcript).
fn is_redacted(facts: &StepFacts) -> bool {
    facts.values.get("recording").map(|r| &r["redacted"]) == Some(&Value::Bool(true))
}

/// The note of a file: derived from the record and the object key, so it is made once.
fn note_id(record: Uuid, key: &str) -> Uuid {
    Uuid::new_v5(&record, key.as_bytes())
}

/// Columns of `desired` whose value differs from what was written.
fn changed(written: &Map<String, Value>, desired: &Map<String, Value>) -> Map<String, Value> {
    desired
        .iter()
        .filter(|(key, value)| written.get(*key) != Some(value))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

struct Rendered {
    desired: Map<String, Value>,
    /// The column of `desired` that links the customer, when one is linked.
    customer_key: Option<String>,
    close: Option<Map<String, Value>>,
    notes: Vec<(String, Map<String, Value>)>,
    /// Notes of original transcripts to delete now that a redacted one exists.
    withdrawn_notes: Vec<String>,
    /// Steps whose template failed now (dead-lettered once, then left out).
    failed: Vec<(Step, String)>,
    /// The step whose template gave each column (the close's are the end's).
    origins: BTreeMap<String, Step>,
}

impl Lifecycle {
    fn activity_set(&self) -> &EntitySet {
        &self.config.contact.entity_set
    }

    /// The record id a contact's creation facts give.
    pub fn record_id_of(state: &ContactState) -> Option<Uuid> {
        let created = state.created.as_ref()?;
        Some(record_id(created.instance_id?, created.contact_id))
    }

    /// The screen-pop URL and flow attributes for a contact's record.
    pub fn screen_pop(&self, record: Uuid) -> Result<String, crate::template::TemplateError> {
        let context = self.base_context(record, None);
        self.config
            .templates
            .render_text(&self.config.contact.screen_pop_url, &Value::Object(context))
    }

    fn base_context(&self, record: Uuid, customer: Option<&Customer>) -> Map<String, Value> {
        let dynamics = &self.config.dynamics;
        let mut context = Map::new();
        context.insert(
            "record".into(),
            json!({
                "id": record.to_string(),
                "entity": self.config.contact.logical_name.as_str(),
                "entity_set": self.config.contact.entity_set.as_str(),
            }),
        );
        context.insert("customer".into(), Customer::context(customer));
        context.insert("org_url".into(), Value::String(dynamics.org_url.clone()));
        context.insert(
            "app_id".into(),
            dynamics.app_id.map_or(Value::String(String::new()), |id| {
                Value::String(id.to_string())
            }),
        );
        context
    }

    /// Handles one event's facts (or, from the retry queue, none) for a contact.
    /// `deadline` bounds the Dynamics work; storing and handing off come after it.
    pub async fn process(
        &self,
        work: RetryMessage,
        deadline: Instant,
        event: Option<&Value>,
    ) -> Result<Report, HandoffFailed> {
        let before = self.dataverse.stats();
        let RetryMessage {
            contact_id,
            facts,
            attempt,
            first_seen,
            close_due,
            ..
        } = work;
        let step = facts.as_ref().map(|f| f.step);
        let mut report = Report {
            contact_id: Some(contact_id),
            step,
            record_id: None,
            customer: None,
            outcome: Outcome::Applied,
            dataverse_requests: 0,
            dataverse_retries: 0,
            dataverse_throttled: 0,
            degraded: Vec::new(),
        };
        let hold = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_secs(5), Duration::from_secs(60))
            + Duration::from_secs(5);
        let lock_wait = deadline.min(Instant::now() + Duration::from_secs(2));
        let Some((mut state, lock)) = self.state.lock(contact_id, hold, lock_wait).await? else {
            let reason = "another invocation was working on the contact";
            // Counted like any retry: a contact that stays locked is given up, not re-queued forever.
            if self.past_retry_window(first_seen) {
                let reason = format!(
                    "{reason} for the whole {} minute retry window",
                    self.config.contact.retry_window.as_secs() / 60
                );
                // From the retry queue the facts travel in the message: they are what to replay.
                let replay = event
                    .cloned()
                    .or_else(|| facts.as_ref().and_then(|f| serde_json::to_value(f).ok()));
                self.dead_letter(&report, step, &reason, true, replay.as_ref(), None)
                    .await?;
                report.outcome = Outcome::DeadLettered { reason };
                return Ok(report);
            }
            let message = RetryMessage {
                contact_id,
                facts,
                attempt: attempt + 1,
                first_seen,
                reason: reason.into(),
                close_due,
            };
            self.handoff
                .retry_later(&message, Duration::from_secs(2))
                .await?;
            report.outcome = Outcome::Deferred {
                reason: message.reason,
            };
            return Ok(report);
        };
        // The retry window runs from the earliest sighting of the contact's work.
        if state.first_seen == 0 || first_seen < state.first_seen {
            state.first_seen = first_seen;
        }
        if let Some(facts) = facts.clone() {
            state.merge(facts, self.config.contact.start_tolerance);
        }
        state.close_released |= close_due;
        self.look_up_caller(&mut state).await;
        report.record_id = Self::record_id_of(&state);

        let dropped_before = state.dropped.clone();
        let mut refused_now = Vec::new();
        let unread_transcript = self.read_transcripts(&mut state).await;
        let result = match self.resolve_agent(&mut state, deadline).await {
            Ok(()) => self.apply(&mut state, &mut refused_now, deadline).await,
            Err(error) => Err(ApplyError::Transient(error.to_string())),
        };
        // After the write: a customer found gone from Dynamics is no match.
        report.customer = state.customer.clone();
        report.degraded = state
            .dropped
            .keys()
            .filter(|part| !dropped_before.contains_key(*part))
            .cloned()
            .chain(
                refused_now
                    .iter()
                    .map(|(_, column)| format!("column:{}", column.name)),
            )
            .collect();
        let after = self.dataverse.stats();
        report.dataverse_requests = after.requests - before.requests;
        report.dataverse_retries = after.retries - before.retries;
        report.dataverse_throttled = after.throttled - before.throttled;

        let newly_failed = match &result {
            Ok(failed) => failed.clone(),
            Err(_) => Vec::new(),
        };
        // A note still to be made because S3 did not answer: the contact comes back.
        let result = match (result, unread_transcript) {
            (Ok(_), Some(reason)) => Err(ApplyError::Transient(reason)),
            (result, _) => result,
        };
        if let Err(error) = self
            .state
            .save(&state, lock, self.config.contact.state_ttl_days)
            .await
        {
            let reason = format!("the contact's state could not be saved: {error}");
            // One that can never succeed (an item over DynamoDB's size limit) or that
            // outlasts the retry window is given up, with the event to replay.
            if !error.is_transient() || self.past_retry_window(state.first_seen) {
                self.dead_letter(&report, step, &reason, error.is_transient(), event, None)
                    .await?;
                report.outcome = Outcome::DeadLettered { reason };
                return Ok(report);
            }
            // The facts must not be lost: they travel with the retry message instead.
            tracing::warn!(%error, %contact_id, "contact state not saved; handing the event off");
            let message = RetryMessage {
                contact_id,
                facts,
                attempt: attempt + 1,
                first_seen: state.first_seen,
                reason,
                close_due,
            };
            self.handoff
                .retry_later(&message, retry_delay(self.retry_base_delay, attempt))
                .await?;
            report.outcome = Outcome::Deferred {
                reason: message.reason,
            };
            return Ok(report);
        }
        for (failed_step, reason) in newly_failed {
            self.dead_letter(&report, Some(failed_step), &reason, false, event, None)
                .await?;
        }
        // Once the state remembers a refused column, its value is dead-lettered once.
        for (column_step, column) in refused_now {
            let reason = format!(
                "Dynamics refused the column `{}` of the {} step; the record was written without it: {}",
                column.name,
                column_step.name(),
                column.message
            );
            self.dead_letter(
                &report,
                Some(column_step),
                &reason,
                false,
                None,
                Some(column),
            )
            .await?;
        }
        // The ended step holds the close for the recording: a delayed hand-off closes
        // the record alone if no file comes within the grace. Duplicates of the
        // event send duplicates of it, which find the record closed.
        if step == Some(Step::Ended) && self.holds_close(&state) {
            let message = RetryMessage {
                contact_id,
                facts: None,
                attempt: 0,
                first_seen: state.first_seen,
                reason: "the close waited for the contact's recording or transcript".into(),
                close_due: true,
            };
            self.handoff
                .retry_later(&message, self.config.contact.close_grace)
                .await?;
            tracing::info!(%contact_id, grace_seconds = self.config.contact.close_grace.as_secs(), "close held for the recording");
        }
        report.outcome = match result {
            Ok(_) => Outcome::Applied,
            Err(ApplyError::Permanent(reason)) => {
                self.dead_letter(&report, step, &reason, false, event, None)
                    .await?;
                Outcome::DeadLettered { reason }
            }
            Err(ApplyError::Pending(reason) | ApplyError::Transient(reason)) => {
                if self.past_retry_window(state.first_seen) {
                    let reason = format!(
                        "{reason}; gave up after the {} minute retry window",
                        self.config.contact.retry_window.as_secs() / 60
                    );
                    if step == Some(Step::Recording) {
                        tracing::warn!(%contact_id, %reason, "recording skipped");
                        Outcome::Skipped { reason }
                    } else {
                        self.dead_letter(&report, step, &reason, true, event, None)
                            .await?;
                        Outcome::DeadLettered { reason }
                    }
                } else {
                    let message = RetryMessage {
                        contact_id,
                        facts: None,
                        attempt: attempt + 1,
                        first_seen: state.first_seen,
                        reason: reason.clone(),
                        close_due: false,
                    };
                    self.handoff
                        .retry_later(&message, retry_delay(self.retry_base_delay, attempt))
                        .await?;
                    Outcome::Deferred { reason }
                }
            }
        };
        Ok(report)
    }

    /// Whether work first seen at `first_seen` (Unix seconds) has outlasted the retry window.
    fn past_retry_window(&self, first_seen: u64) -> bool {
        Duration::from_secs(unix_now().saturating_sub(first_seen))
            >= self.config.contact.retry_window
    }

    /// Hands a contact's facts to the retry queue without touching its state: the
    /// flow's budget ran out on a slow dependency (DynamoDB, the token endpoint).
    pub async fn defer_unfinished(
        &self,
        facts: StepFacts,
        record_id: Option<Uuid>,
        reason: String,
    ) -> Result<Report, HandoffFailed> {
        let message = RetryMessage {
            reason,
            ..RetryMessage::event(facts.clone())
        };
        self.handoff
            .retry_later(&message, self.retry_base_delay)
            .await?;
        Ok(Report {
            contact_id: Some(facts.contact_id),
            step: Some(facts.step),
            record_id,
            customer: None,
            outcome: Outcome::Deferred {
                reason: message.reason,
            },
            dataverse_requests: 0,
            dataverse_retries: 0,
            dataverse_throttled: 0,
            degraded: Vec::new(),
        })
    }

    async fn dead_letter(
        &self,
        report: &Report,
        step: Option<Step>,
        reason: &str,
        transient: bool,
        event: Option<&Value>,
        column: Option<RefusedColumn>,
    ) -> Result<(), StoreError> {
        let letter = DeadLetter {
            reason: reason.to_owned(),
            function: self.function.to_owned(),
            step: step.map(|s| s.name().to_owned()),
            contact_id: report.contact_id.map(|c| c.to_string()),
            record_id: report.record_id.map(|r| r.to_string()),
            transient,
            event: event.cloned(),
            column,
        };
        tracing::error!(
            contact_id = letter.contact_id,
            step = letter.step,
            record_id = letter.record_id,
            column = letter.column.as_ref().map(|c| c.name.as_str()),
            reason = letter.reason,
            "dead-lettered"
        );
        self.handoff.dead_letter(&letter).await
    }

    /// Looks the caller's number up once the creation facts carry one. A directory
    /// outage leaves the contact unmatched rather than failing it.
    async fn look_up_caller(&self, state: &mut ContactState) {
        if state.customer_looked_up {
            return;
        }
        let Some(number) = state
            .created
            .as_ref()
            .and_then(|c| c.values.get("CustomerEndpoint"))
            .and_then(Value::as_str)
        else {
            return;
        };
        let Ok(e164) = self.config.phones.normalize(number) else {
            state.customer_looked_up = true;
            return;
        };
        match self.directory.lookup(&e164).await {
            Ok(matches) => {
                state.customer = best_match(matches);
                state.customer_looked_up = true;
            }
            Err(error) => {
                tracing::warn!(%error, "caller directory lookup failed; the contact stays unmatched for now")
            }
        }
    }

    /// Resolves the agent who answered (username, Dynamics owner) once per contact;
    /// only a passing failure (Connect throttling, Dynamics unavailable) is an error.
    async fn resolve_agent(
        &self,
        state: &mut ContactState,
        deadline: Instant,
    ) -> Result<(), crate::agents::AgentError> {
        // A missed CONNECTED_TO_AGENT event still leaves the agent on DISCONNECTED.
        let Some(arn) = [&state.answered, &state.ended]
            .into_iter()
            .flatten()
            .find_map(|facts| facts.values.get("agent")?.get("arn")?.as_str())
        else {
            return Ok(());
        };
        let known = crate::agents::ids_from_agent_arn(arn).map(|(_, user)| user);
        if known.is_none() || state.agent.as_ref().map(|a| a.id) == known {
            return Ok(());
        }
        let owner = self.config.contact.owner_from_agent;
        state.agent = self
            .agents
            .resolve(arn, owner, &self.dataverse, deadline)
            .await?;
        Ok(())
    }

    fn render(&self, state: &ContactState, record: Uuid) -> Result<Rendered, ApplyError> {
        let contact = &self.config.contact;
        let templates = &self.config.templates;
        let mut context = self.base_context(record, state.customer.as_ref());
        let mut desired = Map::new();
        let mut origins = BTreeMap::new();
        let mut failed = Vec::new();
        let steps = [
            (Step::Created, state.created.as_ref(), &contact.created),
            (Step::Answered, state.answered.as_ref(), &contact.answered),
            (Step::Ended, state.ended.as_ref(), &contact.ended),
        ];
        for (step, facts, template) in steps {
            let Some(facts) = facts else { continue };
            context.extend(facts.values.clone());
            if let (Some(agent), Some(Value::Object(agent_context))) =
                (&state.agent, context.get_mut("agent"))
                && agent_context.get("id").and_then(Value::as_str) == Some(&agent.id.to_string())
            {
                agent.extend_context(agent_context);
            }
            if state.failed_steps.contains_key(step.name()) {
                continue;
            }
            match templates.render(template, &Value::Object(context.clone())) {
                Ok(Value::Object(body)) => {
                    origins.extend(body.keys().map(|column| (column.clone(), step)));
                    desired.extend(body);
                }
                Ok(_) => {
                    return Err(ApplyError::Permanent(format!(
                        "the {} template must produce an object",
                        step.name()
                    )));
                }
                Err(error) if step == Step::Created => {
                    return Err(ApplyError::Permanent(error.to_string()));
                }
                Err(error) => failed.push((step, error.to_string())),
            }
        }
        let mut customer_key = None;
        if let Some(customer) = state.customer.as_ref().filter(|_| {
            !state
                .dropped
                .contains_key(OptionalPart::CustomerLink.name())
        }) {
            let target = Value::String(format!("/{}({})", customer.entity_set, customer.id));
            match contact.bind_customer_as {
                CustomerBinding::Regarding => {
                    let bind = format!(
                        "regardingobjectid_{}_{}@odata.bind",
                        customer.entity, contact.logical_name
                    );
                    desired.entry(bind.clone()).or_insert(target);
                    customer_key = Some(bind);
                }
                CustomerBinding::ActivityParty => {
                    // The caller sends an inbound call (1, From) and receives an outbound one (2, To).
                    let outbound = desired.get("directioncode") == Some(&Value::Bool(true));
                    let parties = format!("{}_activity_parties", contact.logical_name);
                    desired.entry(parties.clone()).or_insert_with(|| {
                        json!([{
                            format!("partyid_{}@odata.bind", customer.entity): target,
                            "participationtypemask": if outbound { 2 } else { 1 },
                        }])
                    });
                    customer_key = Some(parties);
                }
                CustomerBinding::None => {}
            }
        }
        if contact.owner_from_agent.is_some()
            && !state.dropped.contains_key(OptionalPart::Owner.name())
            && let Some(owner) = state.agent.as_ref().and_then(|a| a.owner_id)
        {
            desired
                .entry("ownerid@odata.bind")
                .or_insert_with(|| Value::String(format!("/systemusers({owner})")));
        }
        let ended_ok = state.ended.is_some()
            && !state.failed_steps.contains_key(Step::Ended.name())
            && !failed.iter().any(|(s, _)| *s == Step::Ended);
        let close = match (&contact.close, ended_ok && !self.holds_close(state)) {
            (Some(template), true) => {
                match templates.render(template, &Value::Object(context.clone())) {
                    Ok(Value::Object(body)) => Some(body),
                    Ok(_) => {
                        return Err(ApplyError::Permanent(
                            "the close template must produce an object".into(),
                        ));
                    }
                    Err(error) => {
                        failed.push((Step::Ended, error.to_string()));
                        None
                    }
                }
            }
            _ => None,
        };
        let mut notes = Vec::new();
        let mut withdrawn_notes = Vec::new();
        // Each file's template sees them all, so every file keeps its link.
        let files = state.recordings.values();
        let files = files.filter_map(|f| f.values.get("recording").cloned());
        context.insert("recordings".into(), Value::Array(files.collect()));
        let withhold_originals = self.withholds_original_notes(state);
        if !state.failed_steps.contains_key(Step::Recording.name()) {
            for (key, facts) in &state.recordings {
                let withheld = withhold_originals && !is_redacted(facts);
                if withheld && state.notes.contains(key) {
                    withdrawn_notes.push(key.clone());
                }
                let mut recording_context = context.clone();
                recording_context.extend(facts.values.clone());
                match templates.render(&contact.recording, &Value::Object(recording_context)) {
                    Ok(Value::Object(body)) => {
                        origins.extend(body.keys().map(|column| (column.clone(), Step::Recording)));
                        desired.extend(body);
                    }
                    Ok(_) => {
                        return Err(ApplyError::Permanent(
                            "the recording template must produce an object".into(),
                        ));
                    }
                    Err(error) => {
                        failed.push((Step::Recording, error.to_string()));
                        break;
                    }
                }
                if let Some(text) = &facts.note
                    && !state.notes.contains(key)
                    && !withheld
                {
                    let kind = facts
                        .values
                        .get("recording")
                        .and_then(|r| r["kind"].as_str())
                        .unwrap_or("transcript");
                    let mut note = Map::new();
                    note.insert(
                        "subject".into(),
                        Value::String(format!("Amazon Connect {kind}")),
                    );
                    note.insert(
                        "notetext".into(),
                        Value::String(text.chars().take(NOTE_MAX_CHARS).collect()),
                    );
                    note.insert(
                        format!("objectid_{}@odata.bind", contact.logical_name),
                        Value::String(format!("/{}({record})", contact.entity_set)),
                    );
                    notes.push((key.clone(), note));
                }
            }
        }
        // Columns Dynamics refused for this contact are left out of every write.
        let mut close = close;
        for column in state.refused_columns.keys() {
            desired.remove(column);
            if let Some(close) = close.as_mut() {
                close.remove(column);
            }
        }
        if let Some(close) = &close {
            origins.extend(close.keys().map(|column| (column.clone(), Step::Ended)));
        }
        Ok(Rendered {
            desired,
            customer_key,
            close,
            notes,
            withdrawn_notes,
            failed,
            origins,
        })
    }

    /// Whether the ended contact's close waits for its file (`contact.close_grace_seconds`),
    /// so that the recording's link and the close are one write.
    fn holds_close(&self, state: &ContactState) -> bool {
        let contact = &self.config.contact;
        let Some(ended) = &state.ended else {
            return false;
        };
        if contact.close_grace.is_zero()
            || state.close_released
            || state.closed
            || !state.recordings.is_empty()
        {
            return false;
        }
        let channel = [state.created.as_ref(), Some(ended)]
            .into_iter()
            .flatten()
            .find_map(|facts| facts.values.get("Channel").and_then(Value::as_str))
            .map(str::to_ascii_uppercase);
        let Some(channel) = channel.filter(|c| contact.close_grace_channels.contains(c)) else {
            return false;
        };
        // Amazon Connect records a call while an agent is on it: no agent, no file.
        channel != "VOICE"
            || state.answered.is_some()
            || ended.values.contains_key("ConnectedToAgentTimestamp")
    }

    /// Whether original transcripts stay out of notes: Contact Lens wrote a redacted
    /// one and the configuration does not ask for both.
    fn withholds_original_notes(&self, state: &ContactState) -> bool {
        !self.config.contact.original_transcript_notes && state.recordings.values().any(is_redacted)
    }

    /// Brings the record up to date; returns steps that failed to render this time,
    /// and adds to `refused_now` the columns Dataverse refused this time.
    async fn apply(
        &self,
        state: &mut ContactState,
        refused_now: &mut Vec<(Step, RefusedColumn)>,
        deadline: Instant,
    ) -> Result<Vec<(Step, String)>, ApplyError> {
        if state.created.is_none() {
            return Err(ApplyError::Pending(
                "the contact's creation has not been seen yet".into(),
            ));
        }
        let Some(record) = Self::record_id_of(state) else {
            return Err(ApplyError::Permanent(
                "the contact's creation facts name no Amazon Connect instance".into(),
            ));
        };
        let mut rendered = self.render(state, record)?;
        for (step, reason) in &rendered.failed {
            state
                .failed_steps
                .insert(step.name().to_owned(), reason.clone());
        }
        let newly_failed = std::mem::take(&mut rendered.failed);
        let mut checked_closed = false;
        loop {
            let was_closed = state.closed;
            let error = match self.write(state, record, &rendered, deadline).await {
                Ok(()) => {
                    // A written note needs only its key (its id derives from it); a
                    // withheld one is not wanted.
                    let withhold_originals = self.withholds_original_notes(state);
                    for (key, facts) in &mut state.recordings {
                        if state.notes.contains(key) || (withhold_originals && !is_redacted(facts))
                        {
                            facts.note = None;
                            facts.note_wanted = false;
                        }
                    }
                    return Ok(newly_failed);
                }
                Err(error) => error,
            };
            if let Some(part) = refused_part(state, &rendered, &error) {
                self.leave_out(state, part, &error, deadline).await;
                rendered = self.render(state, record)?;
                continue;
            }
            // One refused column costs that column, not the step or the ones after it.
            if let Some((column, value)) = refused_column(state, &rendered, &error) {
                refused_now.push(leave_column_out(state, &rendered, column, value, &error));
                rendered = self.render(state, record)?;
                continue;
            }
            // A record closed behind our back (a crash after the close, or a user):
            // learn it once and take the reopen path.
            if matches!(error, DataverseError::Rejected { status: 400, .. })
                && !state.closed
                && !checked_closed
            {
                checked_closed = true;
                let current = self
                    .dataverse
                    .get(
                        self.activity_set(),
                        record,
                        &["statecode".to_owned()],
                        deadline,
                    )
                    .await?;
                if let Some(code) = current.and_then(|r| r.get("statecode").and_then(Value::as_i64))
                    && code != 0
                {
                    state.closed = true;
                    state.record_exists = true;
                    state.written.clear();
                    continue;
                }
            }
            if was_closed && !state.closed && !error.is_transient() {
                return Err(ApplyError::Permanent(
                    self.close_again(state, record, &rendered, error, deadline)
                        .await,
                ));
            }
            return Err(error.into());
        }
    }

    /// Leaves an optional part out of the contact's writes from now on, and says so.
    /// A customer link to a row that is gone also removes its directory entry, so
    /// the next call from that number does not match it again.
    async fn leave_out(
        &self,
        state: &mut ContactState,
        part: OptionalPart,
        error: &DataverseError,
        deadline: Instant,
    ) {
        let reason = error.to_string();
        match part {
            OptionalPart::CustomerLink => {
                if let Some(customer) = state.customer.clone() {
                    self.verify_customer(state, &customer, deadline).await;
                }
            }
            OptionalPart::Owner => {
                if let Some(agent) = state.agent.as_mut()
                    && let Some(owner) = agent.owner_id.take()
                {
                    self.agents.owner_refused(owner);
                }
            }
        }
        tracing::warn!(
            contact_id = ?state.created.as_ref().map(|c| c.contact_id.to_string()),
            part = part.name(),
            reason,
            "optional part left out of the record"
        );
        state.dropped.insert(part.name().to_owned(), reason);
    }

    async fn verify_customer(
        &self,
        state: &mut ContactState,
        customer: &Customer,
        deadline: Instant,
    ) {
        let Ok(set) = EntitySet::new(customer.entity_set.clone()) else {
            return;
        };
        let key = format!("{}id", customer.entity);
        match self
            .dataverse
            .get(&set, customer.id, &[key], deadline)
            .await
        {
            Ok(Some(_)) => {}
            Ok(None) => {
                state.customer = None;
                match self.directory.remove(&customer.entity, customer.id).await {
                    Ok(_) => tracing::warn!(
                        entity = customer.entity,
                        id = %customer.id,
                        "the matched customer is gone from Dynamics; removed from the directory"
                    ),
                    Err(error) => tracing::warn!(
                        %error,
                        "the matched customer is gone from Dynamics; its directory entry stays until the next sweep"
                    ),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "could not check whether the matched customer still exists")
            }
        }
    }

    /// A write refused after the reopen would leave a closed record open: close it again.
    async fn close_again(
        &self,
        state: &mut ContactState,
        record: Uuid,
        rendered: &Rendered,
        error: DataverseError,
        deadline: Instant,
    ) -> String {
        let Some(close) = &rendered.close else {
            return format!("{error}; the record was reopened and is left open");
        };
        match self
            .dataverse
            .update(
                self.activity_set(),
                record,
                &Value::Object(close.clone()),
                deadline,
            )
            .await
        {
            Ok(()) => {
                state.closed = true;
                format!("{error}; the record was closed again")
            }
            Err(close_error) => format!(
                "{error}; the record was reopened and is left open (closing it again failed: {close_error})"
            ),
        }
    }

    async fn write(
        &self,
        state: &mut ContactState,
        record: Uuid,
        rendered: &Rendered,
        deadline: Instant,
    ) -> Result<(), DataverseError> {
        let set = self.activity_set();
        if !state.record_exists {
            self.dataverse
                .upsert(
                    set,
                    record,
                    &Value::Object(rendered.desired.clone()),
                    deadline,
                )
                .await?;
            state.record_exists = true;
            state.written = rendered.desired.clone();
        }
        let changes = changed(&state.written, &rendered.desired);
        if !changes.is_empty() && state.closed {
            // A closed activity takes no edits but its reopening.
            self.dataverse
                .update(
                    set,
                    record,
                    &json!({"statecode": 0, "statuscode": 1}),
                    deadline,
                )
                .await?;
            state.closed = false;
        }
        // The close rides on the last write: one PATCH sets the fields, then the
        // state, so nothing can land after it.
        let close = rendered.close.as_ref().filter(|_| !state.closed);
        if !changes.is_empty() || close.is_some() {
            let mut body = changes.clone();
            if let Some(close) = close {
                body.extend(close.clone());
            }
            self.dataverse
                .update(set, record, &Value::Object(body), deadline)
                .await?;
            state.written.extend(changes);
            state.closed = close.is_some();
        }
        let annotations = EntitySet::new("annotations").expect("a literal entity set");
        for (key, note) in &rendered.notes {
            let id = note_id(record, key);
            self.dataverse
                .create_with_id(&annotations, id, &Value::Object(note.clone()), deadline)
                .await?;
            state.notes.insert(key.clone());
        }
        for key in &rendered.withdrawn_notes {
            let id = note_id(record, key);
            self.dataverse.delete(&annotations, id, deadline).await?;
            state.notes.remove(key);
            tracing::info!(
                record_id = %record,
                key,
                "original transcript's note deleted: a redacted transcript exists"
            );
        }
        Ok(())
    }

    /// Facts of an S3 `Object Created` event: the link, and the transcript text when
    /// wanted; `Ok(Err)` for a key that is not ours to handle.
    pub async fn recording_facts(
        &self,
        detail: &ObjectCreatedDetail,
        region: Option<&str>,
    ) -> Result<Result<StepFacts, recording::KeyError>, StoreError> {
        let key = match recording::classify(&detail.object.key) {
            Ok(key) => key,
            Err(reason) => return Ok(Err(reason)),
        };
        let mut values = Map::new();
        values.insert(
            "ContactId".into(),
            Value::String(key.contact_id.to_string()),
        );
        let recording = json!({
            "kind": key.kind.label(),
            "bucket": detail.bucket.name,
            "key": detail.object.key,
            "region": region.unwrap_or_default(),
            "redacted": key.redacted,
        });
        values.insert("recording".into(), recording);
        let link = self
            .config
            .templates
            .render_text(
                &self.config.contact.recording_link,
                &Value::Object(values.clone()),
            )
            .map_err(|e| StoreError::new("template", e.to_string(), false))?;
        let link = match (self.config.contact.recording_presign, &self.s3) {
            (Some(expiry), Some(s3)) => {
                let presigning = aws_sdk_s3::presigning::PresigningConfig::expires_in(expiry)
                    .map_err(|e| StoreError::new("S3", e.to_string(), false))?;
                s3.get()
                    .get_object()
                    .bucket(&detail.bucket.name)
                    .key(&detail.object.key)
                    .presigned(presigning)
                    .await
                    .map_err(|e| StoreError::from_sdk("S3", e))?
                    .uri()
                    .to_owned()
            }
            _ => link,
        };
        values["recording"]["url"] = Value::String(link);
        let contact = &self.config.contact;
        let small_enough = detail
            .object
            .size
            .is_none_or(|size| size <= contact.transcript_max_bytes);
        // The text is read when the note is made, never carried in the state.
        let note_wanted = self.s3.is_some()
            && contact.transcript_notes
            && key.kind.has_transcript()
            && small_enough;
        Ok(Ok(StepFacts {
            step: Step::Recording,
            contact_id: key.contact_id,
            instance_id: None,
            source: Source::ContactEvent,
            object_key: Some(detail.object.key.clone()),
            values,
            note: None,
            note_wanted,
        }))
    }

    /// Reads the transcripts whose note is still to be made (their text is never
    /// stored); a file without text is linked only. `Some(reason)` when S3 could not
    /// answer, so the contact is tried again.
    async fn read_transcripts(&self, state: &mut ContactState) -> Option<String> {
        let withhold_originals = self.withholds_original_notes(state);
        let mut unread = None;
        for (key, facts) in &mut state.recordings {
            if state.notes.contains(key) || (withhold_originals && !is_redacted(facts)) {
                continue;
            }
            // A state from before texts were left out still carries its text.
            if facts.note.is_some() {
                facts.note_wanted = true;
                continue;
            }
            if !facts.note_wanted {
                continue;
            }
            let bucket = facts
                .values
                .get("recording")
                .and_then(|r| r.get("bucket"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let text = match recording::classify(key) {
                Ok(file) => self.transcript(&bucket, key, file.kind).await,
                Err(_) => Ok(None),
            };
            match text {
                Ok(Some(text)) => facts.note = Some(text),
                Ok(None) => {
                    tracing::warn!(
                        key,
                        "the transcript has no text to note; the file is linked only"
                    );
                    facts.note_wanted = false;
                }
                Err(error) => {
                    unread = Some(format!("transcript `{key}` could not be read: {error}"))
                }
            }
        }
        unread
    }

    async fn transcript(
        &self,
        bucket: &str,
        key: &str,
        kind: RecordingKind,
    ) -> Result<Option<String>, StoreError> {
        let Some(s3) = &self.s3 else {
            return Ok(None);
        };
        let limit = self.config.contact.transcript_max_bytes;
        // The key may arrive URL-encoded: try it as received, then decoded.
        let decoded = percent_encoding::percent_decode_str(key)
            .decode_utf8_lossy()
            .into_owned();
        let candidates = if decoded != key {
            vec![key.to_owned(), decoded]
        } else {
            vec![key.to_owned()]
        };
        for candidate in candidates {
            match s3
                .get()
                .get_object()
                .bucket(bucket)
                .key(&candidate)
                .send()
                .await
            {
                Ok(object) => {
                    if object
                        .content_length()
                        .is_some_and(|len| len as u64 > limit)
                    {
                        return Ok(None);
                    }
                    let bytes = object
                        .body
                        .collect()
                        .await
                        .map_err(|e| StoreError::new("S3", e.to_string(), true))?
                        .into_bytes();
                    let Ok(json) = serde_json::from_slice::<Value>(&bytes) else {
                        tracing::warn!(key = candidate, "transcript is not JSON; linked only");
                        return Ok(None);
                    };
                    return Ok(recording::transcript_text(&json).map(|text| {
                        format!("{}\n\n{text}", kind.label())
                            .chars()
                            .take(NOTE_MAX_CHARS)
                            .collect()
                    }));
                }
                Err(error) if error.as_service_error().is_some_and(|e| e.is_no_such_key()) => {
                    continue;
                }
                Err(error) => return Err(StoreError::from_sdk("S3", error)),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_columns_are_sent() {
        let written = json!({"a": 1, "b": "x"}).as_object().unwrap().clone();
        let desired = json!({"a": 1, "b": "y", "c": true})
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(
            Value::Object(changed(&written, &desired)),
            json!({"b": "y", "c": true})
        );
    }

    #[test]
    fn retry_delays_grow_to_sqs_limit() {
        assert_eq!(retry_delay(RETRY_BASE_DELAY, 0), Duration::from_secs(10));
        assert_eq!(retry_delay(RETRY_BASE_DELAY, 3), Duration::from_secs(80));
        assert_eq!(retry_delay(RETRY_BASE_DELAY, 20), Duration::from_secs(900));
    }
}
