//! Dynamics -> directory: record saves pushed by a Dynamics webhook, and a
//! scheduled sweep of Dataverse change tracking that catches what webhooks miss,
//! deletions above all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::clock::unix_now;
use crate::config::Config;
use crate::dataverse::{Change, DataverseClient, DataverseError};
use crate::directory::{CallerDirectory, WriteOutcome};
use crate::handoff::{DeadLetter, Handoff};
use crate::mapping::EntityMapping;
use crate::on_demand::OnDemand;
use crate::secret::{Secret, SecretError};
use crate::store_error::StoreError;
use crate::webhook::{self, Message, Refusal, WebhookKeys};

/// The services record-saved and sync-sweep build once per container.
pub struct DirectorySync {
    pub config: Arc<Config>,
    pub dataverse: DataverseClient,
    pub directory: Arc<CallerDirectory>,
    pub handoff: Handoff,
    pub checkpoints: CheckpointStore,
    pub secrets: Option<OnDemand<aws_sdk_secretsmanager::Client>>,
    pub keys: OnceCell<WebhookKeys>,
    pub function: &'static str,
    /// First retry delay; doubles per attempt up to SQS's 15 minutes.
    pub retry_base_delay: Duration,
}

/// One record to bring into the directory later (Dynamics was throttling or down).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectoryRetry {
    pub entity: String,
    pub id: Uuid,
    pub deleted: bool,
    pub attempt: u32,
    pub first_seen: u64,
}

/// What happened to one record.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum RecordOutcome {
    Applied {
        write: WriteOutcome,
    },
    /// Handed off durably; it will be applied when Dynamics answers.
    Accepted {
        reason: String,
    },
    /// The record cannot be mapped (a required column is empty, say).
    Refused {
        reason: String,
    },
}

/// An HTTP answer for the function URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

fn answer(status: u16, body: Value) -> Answer {
    Answer { status, body }
}

/// What a webhook request brings, whatever the transport.
#[derive(Debug, Clone, Default)]
pub struct WebhookRequest {
    pub code: Option<String>,
    /// The configured header's value, if the request carried it.
    pub header: Option<String>,
    pub body: Vec<u8>,
}

/// Why record-saved cannot check the key a webhook call presents.
#[derive(Debug, thiserror::Error)]
enum KeysUnavailable {
    #[error("webhook.key is not configured")]
    NotConfigured,
    #[error("webhook key: {0}")]
    Secret(#[from] SecretError),
}

impl DirectorySync {
    /// The accepted keys, read on first use; a failed read is tried again on the next call.
    async fn keys(&self) -> Result<&WebhookKeys, KeysUnavailable> {
        if let Some(keys) = self.keys.get() {
            return Ok(keys);
        }
        let webhook = self
            .config
            .webhook
            .as_ref()
            .ok_or(KeysUnavailable::NotConfigured)?;
        self.keys
            .get_or_try_init(|| async {
                let mut keys: Vec<Secret> = vec![webhook.key.resolve(self.secrets.as_ref()).await?];
                if let Some(next) = &webhook.next_key {
                    keys.push(next.resolve(self.secrets.as_ref()).await?);
                }
                Ok::<_, KeysUnavailable>(WebhookKeys::new(&keys))
            })
            .await
    }

    /// Handles one webhook call: authenticate, validate, fetch, write; answers
    /// with the outcome so the Dynamics side sees success or failure.
    pub async fn record_saved(&self, request: WebhookRequest, deadline: Instant) -> Answer {
        let keys = match self.keys().await {
            Ok(keys) => keys,
            // Secrets Manager throttled or out of reach is not the caller's fault:
            // 503 is the one answer Dynamics sends again (401 is final), and the
            // sweep reconciles a save whose retry fails too.
            Err(KeysUnavailable::Secret(error)) if error.is_transient() => {
                tracing::warn!(%error, "webhook key out of reach; asking Dynamics to retry");
                return answer(
                    503,
                    json!({"error": "the webhook key cannot be checked now; try again"}),
                );
            }
            Err(error) => {
                tracing::error!(%error, "webhook keys unavailable; refusing every call");
                return answer(401, json!({"error": "unauthorized"}));
            }
        };
        let header = self.config.webhook.as_ref().and(request.header.as_deref());
        let authorised = webhook::presented_key(request.code.as_deref(), header)
            .is_some_and(|key| keys.accepts(key));
        if !authorised {
            // Never log what was presented.
            tracing::warn!(
                had_code = request.code.is_some(),
                had_header = request.header.is_some(),
                "webhook call refused: wrong or missing key"
            );
            return answer(401, json!({"error": "unauthorized"}));
        }
        let limit = self
            .config
            .webhook
            .as_ref()
            .map_or(1024 * 1024, |w| w.max_body_bytes);
        if request.body.len() > limit {
            return answer(
                413,
                json!({"error": format!("body of {} bytes is over the {limit} byte limit", request.body.len())}),
            );
        }
        let notification = match webhook::parse(&request.body) {
            Ok(notification) => notification,
            Err(Refusal { status, reason }) => return answer(status, json!({"error": reason})),
        };
        let Some(mapping) = self.config.mapping_for(&notification.entity) else {
            return answer(
                400,
                json!({"error": format!("entity `{}` is not mapped to the directory", notification.entity)}),
            );
        };
        if notification.user_id.is_some()
            && notification.user_id == self.config.dynamics.application_user_id
        {
            return answer(
                200,
                json!({"outcome": "skipped", "reason": "saved by the integration's own application user"}),
            );
        }
        let mut results = Vec::new();
        let mut accepted = false;
        for id in &notification.ids {
            let deleted = notification.message == Message::Delete;
            let outcome = match self.apply(mapping, *id, deleted, deadline).await {
                Ok(outcome) => outcome,
                Err(reason) => {
                    let retry = DirectoryRetry {
                        entity: notification.entity.clone(),
                        id: *id,
                        deleted,
                        attempt: 0,
                        first_seen: unix_now(),
                    };
                    if let Err(error) = self
                        .handoff
                        .retry_later(&retry, self.retry_base_delay)
                        .await
                    {
                        tracing::error!(%error, "durable hand-off failed");
                        return answer(
                            503,
                            json!({"error": "temporarily unable to accept the change; retry"}),
                        );
                    }
                    accepted = true;
                    RecordOutcome::Accepted { reason }
                }
            };
            tracing::info!(function = self.function, entity = notification.entity, id = %id, message = ?notification.message, outcome = ?outcome, correlation_id = notification.correlation_id.as_deref().unwrap_or_default(), "record saved");
            results.push(json!({"id": id.to_string(), "result": outcome}));
        }
        let refused = results.iter().any(|r| r["result"]["outcome"] == "refused");
        let status = if refused {
            422
        } else if accepted {
            202
        } else {
            200
        };
        answer(
            status,
            json!({"entity": notification.entity, "message": notification.message, "results": results}),
        )
    }

    /// Brings one record into the directory. `Err` is transient (hand it off).
    async fn apply(
        &self,
        mapping: &EntityMapping,
        id: Uuid,
        deleted: bool,
        deadline: Instant,
    ) -> Result<RecordOutcome, String> {
        let entity = mapping.logical_name.as_str();
        if deleted {
            return self
                .directory
                .remove(entity, id)
                .await
                .map(|write| RecordOutcome::Applied { write })
                .map_err(|e| e.to_string());
        }
        // An Update carries only changed columns: fetch the record as it is now.
        let record = match self
            .dataverse
            .get(&mapping.entity_set, id, &mapping.select(), deadline)
            .await
        {
            Ok(record) => record,
            Err(error) if error.is_transient() => return Err(error.to_string()),
            Err(error) => {
                return Ok(RecordOutcome::Refused {
                    reason: error.to_string(),
                });
            }
        };
        let write = match record {
            // Gone since the save (or a replay after a delete): the directory follows.
            None => self.directory.remove(entity, id).await,
            Some(record) => match mapping.map(&record, &self.config.phones) {
                Ok(entry) => self.directory.put(&entry, mapping).await,
                Err(error) => {
                    return Ok(RecordOutcome::Refused {
                        reason: error.to_string(),
                    });
                }
            },
        };
        match write {
            Ok(write) => Ok(RecordOutcome::Applied { write }),
            Err(error) if error.is_transient() => Err(error.to_string()),
            Err(error) => Ok(RecordOutcome::Refused {
                reason: error.to_string(),
            }),
        }
    }

    /// A retry from the queue; `Err` hands the message back to SQS.
    pub async fn retry(
        &self,
        message: DirectoryRetry,
        deadline: Instant,
    ) -> Result<RecordOutcome, StoreError> {
        let Some(mapping) = self.config.mapping_for(&message.entity) else {
            return Ok(RecordOutcome::Refused {
                reason: format!("entity `{}` is no longer mapped", message.entity),
            });
        };
        match self
            .apply(mapping, message.id, message.deleted, deadline)
            .await
        {
            Ok(outcome) => {
                if let RecordOutcome::Refused { reason } = &outcome {
                    self.dead_letter(&message, reason).await?;
                }
                Ok(outcome)
            }
            Err(reason) => {
                let age = Duration::from_secs(unix_now().saturating_sub(message.first_seen));
                if age >= self.config.contact.retry_window {
                    self.dead_letter(&message, &reason).await?;
                    return Ok(RecordOutcome::Refused { reason });
                }
                let next = DirectoryRetry {
                    attempt: message.attempt + 1,
                    ..message
                };
                self.handoff
                    .retry_later(
                        &next,
                        crate::lifecycle::retry_delay(self.retry_base_delay, next.attempt),
                    )
                    .await?;
                Ok(RecordOutcome::Accepted { reason })
            }
        }
    }

    async fn dead_letter(&self, message: &DirectoryRetry, reason: &str) -> Result<(), StoreError> {
        tracing::error!(entity = message.entity, id = %message.id, reason, "directory change dead-lettered");
        self.handoff
            .dead_letter(&DeadLetter {
                reason: reason.to_owned(),
                function: self.function.to_owned(),
                step: Some("directory".into()),
                contact_id: None,
                record_id: Some(message.id.to_string()),
                transient: true,
                event: serde_json::to_value(message).ok(),
                column: None,
            })
            .await
    }
}

// ---------------------------------------------------------------------------
// The sweep.
// ---------------------------------------------------------------------------

/// Where a sweep of one entity stands, saved after every page so the next run
/// continues exactly there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub phase: Phase,
    /// The delta link of the last completed pass.
    pub delta_link: Option<String>,
    /// The pass stamp of the last full reconciliation: entries not stamped with it are gone.
    pub stamp: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    /// Between passes: the next run follows `delta_link`, or starts a full read.
    #[default]
    Idle,
    /// Reading every record; `next` is the page to read (none: the first).
    Full { next: Option<String> },
    /// Following changes; `next` is the page to read.
    Delta { next: String },
    /// A full read finished: remove what it did not see, then keep `delta_link`.
    Removing { delta_link: String },
}

/// How one entity's sweep went.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SweepReport {
    pub entity: String,
    pub pages: u32,
    pub upserted: u64,
    pub deleted: u64,
    pub removed_unseen: u64,
    /// Phone items no entry listed, left by a write that failed half way.
    pub removed_orphan_phones: u64,
    pub refused: u64,
    pub full_reconciliation: bool,
    /// False when time ran out: the next run continues from the checkpoint.
    pub finished: bool,
    /// Why this entity's sweep stopped, when it failed (the others still ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub enum CheckpointStore {
    /// Item: `entity` (S, key), `checkpoint` (S, JSON).
    DynamoDb {
        client: aws_sdk_dynamodb::Client,
        table: String,
    },
    Memory(std::sync::Mutex<HashMap<String, Checkpoint>>),
}

impl CheckpointStore {
    pub fn memory() -> Self {
        Self::Memory(std::sync::Mutex::new(HashMap::new()))
    }

    pub async fn load(&self, entity: &str) -> Result<Checkpoint, StoreError> {
        match self {
            Self::DynamoDb { client, table } => {
                let output = client
                    .get_item()
                    .table_name(table)
                    .key("entity", AttributeValue::S(entity.to_owned()))
                    .consistent_read(true)
                    .send()
                    .await
                    .map_err(|e| StoreError::from_sdk("DynamoDB", e))?;
                let json = output
                    .item
                    .as_ref()
                    .and_then(|i| i.get("checkpoint"))
                    .and_then(|v| v.as_s().ok());
                Ok(json
                    .and_then(|j| serde_json::from_str(j).ok())
                    .unwrap_or_default())
            }
            Self::Memory(items) => Ok(items
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(entity)
                .cloned()
                .unwrap_or_default()),
        }
    }

    pub async fn save(&self, entity: &str, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        match self {
            Self::DynamoDb { client, table } => {
                let json = serde_json::to_string(checkpoint)
                    .map_err(|e| StoreError::new("DynamoDB", e.to_string(), false))?;
                client
                    .put_item()
                    .table_name(table)
                    .item("entity", AttributeValue::S(entity.to_owned()))
                    .item("checkpoint", AttributeValue::S(json))
                    .send()
                    .await
                    .map_err(|e| StoreError::from_sdk("DynamoDB", e))?;
                Ok(())
            }
            Self::Memory(items) => {
                items
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(entity.to_owned(), checkpoint.clone());
                Ok(())
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Dataverse(#[from] DataverseError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Some entity's sweep failed; every entity's report, the failed ones with `error`.
#[derive(Debug, thiserror::Error)]
#[error("sweep of {} failed", failed_entities(.reports))]
pub struct SweepFailed {
    pub reports: Vec<SweepReport>,
}

fn failed_entities(reports: &[SweepReport]) -> String {
    reports
        .iter()
        .filter_map(|r| Some(format!("{}: {}", r.entity, r.error.as_deref()?)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Time kept back for saving the checkpoint after the last page.
const SWEEP_RESERVE: Duration = Duration::from_secs(3);

impl DirectorySync {
    /// Sweeps every mapped entity, each on its own: one that fails is reported
    /// (`error`) and the others still run, and each gets a fair share of the time
    /// left (what an entity does not use passes to the next), so the first cannot
    /// starve the rest run after run.
    pub async fn sweep(&self, deadline: Instant) -> Result<Vec<SweepReport>, SweepFailed> {
        let mut reports = Vec::new();
        let count = self.config.directory.len();
        for (index, mapping) in self.config.directory.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let share = left / u32::try_from(count - index).unwrap_or(1).max(1);
            let entity_deadline = (Instant::now() + share).max(Instant::now() + SWEEP_RESERVE);
            let report = match self
                .sweep_entity(mapping, entity_deadline.min(deadline))
                .await
            {
                Ok(report) => report,
                Err(error) => {
                    tracing::error!(entity = mapping.logical_name.as_str(), %error, "sweep of the entity failed; the others go on");
                    SweepReport {
                        entity: mapping.logical_name.as_str().to_owned(),
                        error: Some(error.to_string()),
                        ..SweepReport::default()
                    }
                }
            };
            reports.push(report);
        }
        if reports.iter().any(|r| r.error.is_some()) {
            Err(SweepFailed { reports })
        } else {
            Ok(reports)
        }
    }

    /// One pass over an entity's changes (a full read when there is no valid delta
    /// link), checkpointed after every page.
    pub async fn sweep_entity(
        &self,
        mapping: &EntityMapping,
        deadline: Instant,
    ) -> Result<SweepReport, SweepError> {
        let entity = mapping.logical_name.as_str();
        let mut report = SweepReport {
            entity: entity.to_owned(),
            ..SweepReport::default()
        };
        let mut checkpoint = self.checkpoints.load(entity).await?;
        let page_size = self.config.sweep_page_size;
        let select = mapping.select();
        let mut started_delta = false;
        let mut restarted = false;
        loop {
            if Instant::now() + SWEEP_RESERVE >= deadline {
                self.checkpoints.save(entity, &checkpoint).await?;
                return Ok(report);
            }
            let work_deadline = deadline - SWEEP_RESERVE;
            match checkpoint.phase.clone() {
                Phase::Idle => match checkpoint.delta_link.clone() {
                    Some(link) if !started_delta => {
                        started_delta = true;
                        checkpoint.phase = Phase::Delta { next: link };
                        continue;
                    }
                    Some(_) => {
                        report.finished = true;
                        self.checkpoints.save(entity, &checkpoint).await?;
                        return Ok(report);
                    }
                    None => {
                        checkpoint.stamp = crate::directory::now_stamp();
                        checkpoint.phase = Phase::Full { next: None };
                        continue;
                    }
                },
                Phase::Full { next } => {
                    report.full_reconciliation = true;
                    let fetched = match &next {
                        None => {
                            self.dataverse
                                .track_changes(
                                    &mapping.entity_set,
                                    &select,
                                    page_size,
                                    work_deadline,
                                )
                                .await
                        }
                        Some(link) => {
                            self.dataverse
                                .follow_changes(link, page_size, work_deadline)
                                .await
                        }
                    };
                    let page = match fetched {
                        Ok(page) => page,
                        Err(error) if error.is_transient() => {
                            return self.pause(entity, &checkpoint, report, &error).await;
                        }
                        // A next-page link Dataverse no longer takes (it expired while the
                        // pass was paused) would fail every run the same way: start over.
                        Err(
                            error @ (DataverseError::Rejected { .. }
                            | DataverseError::DeltaExpired { .. }),
                        ) if next.is_some() && !restarted => {
                            tracing::warn!(entity, %error, "the full read's next-page link was refused; restarting the pass");
                            restarted = true;
                            checkpoint.stamp = crate::directory::now_stamp();
                            checkpoint.phase = Phase::Full { next: None };
                            continue;
                        }
                        Err(error) => return Err(error.into()),
                    };
                    self.apply_page(mapping, &page.changes, checkpoint.stamp, &mut report)
                        .await?;
                    checkpoint.phase = match (page.next_link, page.delta_link) {
                        (Some(next), _) => Phase::Full { next: Some(next) },
                        (None, Some(delta_link)) => Phase::Removing { delta_link },
                        (None, None) => {
                            return Err(DataverseError::Protocol(format!(
                                "the last page of `{entity}` had no delta link"
                            ))
                            .into());
                        }
                    };
                }
                Phase::Delta { next } => {
                    let page = match self
                        .dataverse
                        .follow_changes(&next, page_size, work_deadline)
                        .await
                    {
                        Ok(page) => page,
                        Err(DataverseError::DeltaExpired { .. }) => {
                            tracing::warn!(
                                entity,
                                "change-tracking token expired or invalid; running a full reconciliation"
                            );
                            checkpoint.delta_link = None;
                            checkpoint.phase = Phase::Idle;
                            continue;
                        }
                        Err(error) if error.is_transient() => {
                            return self.pause(entity, &checkpoint, report, &error).await;
                        }
                        Err(error) => return Err(error.into()),
                    };
                    self.apply_page(mapping, &page.changes, checkpoint.stamp, &mut report)
                        .await?;
                    match (page.next_link, page.delta_link) {
                        (Some(next), _) => checkpoint.phase = Phase::Delta { next },
                        (None, Some(delta_link)) => {
                            checkpoint.delta_link = Some(delta_link);
                            checkpoint.phase = Phase::Idle;
                        }
                        (None, None) => {
                            return Err(DataverseError::Protocol(format!(
                                "the last delta page of `{entity}` had no delta link"
                            ))
                            .into());
                        }
                    }
                }
                Phase::Removing { delta_link } => {
                    let removed = self
                        .directory
                        .remove_unseen(entity, checkpoint.stamp)
                        .await?;
                    report.removed_unseen += removed.entries as u64;
                    report.removed_orphan_phones += removed.orphan_phones as u64;
                    checkpoint.delta_link = Some(delta_link);
                    checkpoint.phase = Phase::Idle;
                    // The full read is itself the pass: no delta right after it.
                    started_delta = true;
                }
            }
            report.pages += 1;
            // Applied, then saved: a crash in between re-applies the page, which is idempotent.
            self.checkpoints.save(entity, &checkpoint).await?;
        }
    }

    /// Dynamics throttled, failed or ran past the deadline: keep the position, stop
    /// this run unfinished; the next run continues from the checkpoint.
    async fn pause(
        &self,
        entity: &str,
        checkpoint: &Checkpoint,
        report: SweepReport,
        error: &DataverseError,
    ) -> Result<SweepReport, SweepError> {
        tracing::warn!(entity, %error, "sweep paused; the next run continues from the checkpoint");
        self.checkpoints.save(entity, checkpoint).await?;
        Ok(report)
    }

    async fn apply_page(
        &self,
        mapping: &EntityMapping,
        changes: &[Change],
        stamp: u64,
        report: &mut SweepReport,
    ) -> Result<(), StoreError> {
        let mut entries = Vec::with_capacity(changes.len());
        for change in changes {
            match change {
                Change::Upserted(record) => match mapping.map(record, &self.config.phones) {
                    Ok(entry) => entries.push(entry),
                    Err(error) => {
                        report.refused += 1;
                        tracing::warn!(%error, "record left out of the directory");
                    }
                },
                Change::Deleted(id) => {
                    self.directory
                        .remove(mapping.logical_name.as_str(), *id)
                        .await?;
                    report.deleted += 1;
                }
            }
        }
        report.upserted += entries.len() as u64;
        self.directory.put_page(&entries, mapping, stamp).await
    }
}
