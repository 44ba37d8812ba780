//! Durable hand-off: work that cannot finish now goes to an SQS retry queue (with
//! its facts, so nothing is lost), and work that can never finish goes to a
//! dead-letter queue with its reason.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::connect::StepFacts;
use crate::on_demand::OnDemand;
use crate::store_error::StoreError;

/// Work on a contact: an event's facts as they arrive, or a contact to process
/// again later (the retry queue's message).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryMessage {
    pub contact_id: Uuid,
    /// Facts that could not be stored yet (the contact was locked).
    pub facts: Option<StepFacts>,
    pub attempt: u32,
    /// Unix seconds when the work was first handed off: the retry window runs from here.
    pub first_seen: u64,
    pub reason: String,
    /// The close held for the contact's recording is due (sent with the grace as its delay).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub close_due: bool,
}

impl RetryMessage {
    /// An event's facts, first seen now.
    pub fn event(facts: StepFacts) -> Self {
        Self {
            contact_id: facts.contact_id,
            facts: Some(facts),
            attempt: 0,
            first_seen: crate::clock::unix_now(),
            reason: String::new(),
            close_due: false,
        }
    }
}

/// What the dead-letter queue receives: enough to understand and replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub reason: String,
    pub function: String,
    pub step: Option<String>,
    pub contact_id: Option<String>,
    pub record_id: Option<String>,
    pub transient: bool,
    pub event: Option<Value>,
    /// A column Dynamics refused: the record was written without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<RefusedColumn>,
}

/// A column left out of a record, with what to write once Dynamics takes it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusedColumn {
    pub name: String,
    pub value: Value,
    /// Dataverse's answer.
    pub message: String,
}

pub enum Handoff {
    Sqs {
        /// Built on the first hand-off: most events never need one.
        client: OnDemand<aws_sdk_sqs::Client>,
        retry_queue_url: String,
        dead_letter_queue_url: String,
    },
    /// For the local simulation: the messages, in order.
    Memory {
        retries: Mutex<VecDeque<(Value, Duration)>>,
        dead_letters: Mutex<Vec<DeadLetter>>,
    },
}

impl Handoff {
    pub fn memory() -> Self {
        Self::Memory {
            retries: Mutex::new(VecDeque::new()),
            dead_letters: Mutex::new(Vec::new()),
        }
    }

    /// Queues a contact for another attempt after `delay` (at most 15 minutes, SQS's limit).
    pub async fn retry_later<T: Serialize>(
        &self,
        message: &T,
        delay: Duration,
    ) -> Result<(), StoreError> {
        let delay = delay.min(Duration::from_secs(900));
        match self {
            Self::Sqs {
                client,
                retry_queue_url,
                ..
            } => {
                let body = serde_json::to_string(message)
                    .map_err(|e| StoreError::new("SQS", e.to_string(), false))?;
                client
                    .get()
                    .send_message()
                    .queue_url(retry_queue_url)
                    .message_body(body)
                    .delay_seconds(delay.as_secs() as i32)
                    .send()
                    .await
                    .map_err(|e| StoreError::from_sdk("SQS", e))?;
                Ok(())
            }
            Self::Memory { retries, .. } => {
                let value = serde_json::to_value(message)
                    .map_err(|e| StoreError::new("memory", e.to_string(), false))?;
                retries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back((value, delay));
                Ok(())
            }
        }
    }

    pub async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        match self {
            Self::Sqs {
                client,
                dead_letter_queue_url,
                ..
            } => {
                let body = serde_json::to_string(letter)
                    .map_err(|e| StoreError::new("SQS", e.to_string(), false))?;
                client
                    .get()
                    .send_message()
                    .queue_url(dead_letter_queue_url)
                    .message_body(body)
                    .send()
                    .await
                    .map_err(|e| StoreError::from_sdk("SQS", e))?;
                Ok(())
            }
            Self::Memory { dead_letters, .. } => {
                dead_letters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(letter.clone());
                Ok(())
            }
        }
    }

    /// The next queued retry of the in-memory hand-off (the local simulation drains it).
    pub fn take_retry<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        match self {
            Self::Memory { retries, .. } => {
                let (value, _) = retries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop_front()?;
                serde_json::from_value(value).ok()
            }
            Self::Sqs { .. } => None,
        }
    }

    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        match self {
            Self::Memory { dead_letters, .. } => dead_letters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            Self::Sqs { .. } => Vec::new(),
        }
    }
}
