//! What became of one event: its outcome and report, for the flow's answer, the
//! event's log line and its metrics.

use uuid::Uuid;

use crate::connect::Step;
use crate::directory::Customer;

/// What became of one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Everything known about the contact is in Dynamics.
    Applied,
    /// Handed to the retry queue: Dynamics unavailable, the creation not seen yet, or the contact busy.
    Deferred { reason: String },
    /// Can never succeed: sent to the dead-letter queue with this reason.
    DeadLettered { reason: String },
    /// Not ours to handle (an unused event type, a file that is not a recording).
    Skipped { reason: String },
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Deferred { .. } => "deferred",
            Self::DeadLettered { .. } => "dead_lettered",
            Self::Skipped { .. } => "skipped",
        }
    }
}

/// One event's result, for the flow answer and the event's log line.
#[derive(Debug, Clone)]
pub struct Report {
    pub contact_id: Option<Uuid>,
    pub step: Option<Step>,
    pub record_id: Option<Uuid>,
    pub customer: Option<Customer>,
    pub outcome: Outcome,
    pub dataverse_requests: u64,
    pub dataverse_retries: u64,
    pub dataverse_throttled: u64,
    /// What this event had to leave out of the record: optional parts (`customer_link`,
    /// `owner`) and columns Dataverse refused (`column:<name>`).
    pub degraded: Vec<String>,
}
