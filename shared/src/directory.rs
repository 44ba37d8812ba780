//! The caller directory: Dynamics records (contacts, accounts, any mapped entity)
//! findable by phone number in one DynamoDB query.
//!
//! One table, two kinds of item:
//! - the entry: `pk = record#<entity>#<id>`, `sk = entry`, with the mapped fields;
//! - one phone item per number: `pk = phone#<E.164>`, `sk = <entity>#<id>`, holding
//!   what a lookup returns, so a lookup is a single `Query` on `pk`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use aws_sdk_dynamodb::types::{
    AttributeValue, DeleteRequest, KeysAndAttributes, PutRequest, WriteRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::mapping::{DirectoryEntry, EntityMapping};
use crate::store_error::{StoreError, is_condition_failure};

/// A directory match, as contact-created exposes it to templates (`customer.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub entity: String,
    pub entity_set: String,
    pub id: Uuid,
    pub name: Option<String>,
    pub modified_on: String,
    pub priority: u32,
    pub fields: BTreeMap<String, Value>,
}

impl Customer {
    /// Template variables: `customer.id`, `customer.entity`, `customer.name`, the mapped fields.
    pub fn context(customer: Option<&Self>) -> Value {
        match customer {
            None => serde_json::json!({"matched": false}),
            Some(c) => {
                let mut object = serde_json::Map::new();
                object.extend(c.fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                object.insert("matched".into(), Value::Bool(true));
                object.insert("id".into(), Value::String(c.id.to_string()));
                object.insert("entity".into(), Value::String(c.entity.clone()));
                object.insert("entity_set".into(), Value::String(c.entity_set.clone()));
                object.insert(
                    "name".into(),
                    c.name.clone().map_or(Value::Null, Value::String),
                );
                Value::Object(object)
            }
        }
    }
}

/// The rule for several matches: the entity with the lowest configured priority
/// wins, then the most recently modified record.
pub fn best_match(mut matches: Vec<Customer>) -> Option<Customer> {
    matches.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then_with(|| b.modified_on.cmp(&a.modified_on))
            .then_with(|| a.id.cmp(&b.id))
    });
    matches.into_iter().next()
}

pub enum CallerDirectory {
    DynamoDb {
        client: aws_sdk_dynamodb::Client,
        table: String,
    },
    /// For the local simulation: entries by (entity, id), with their phones and sweep stamp.
    Memory(Mutex<BTreeMap<(String, Uuid), MemoryEntry>>),
}

/// A stored entry of the in-memory directory: the lookup answer, its numbers, its sweep stamp.
type MemoryEntry = (Customer, Vec<String>, u64);

/// What a directory write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteOutcome {
    Written,
    /// A newer version was already stored: nothing changed.
    Stale,
    Deleted,
    /// Nothing to delete.
    Absent,
}

impl CallerDirectory {
    pub fn dynamodb(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self::DynamoDb {
            client,
            table: table.into(),
        }
    }

    pub fn memory() -> Self {
        Self::Memory(Mutex::new(BTreeMap::new()))
    }

    /// Every entry holding this E.164 number.
    pub async fn lookup(&self, e164: &str) -> Result<Vec<Customer>, StoreError> {
        match self {
            Self::DynamoDb { client, table } => {
                let output = client
                    .query()
                    .table_name(table)
                    .key_condition_expression("pk = :pk")
                    .expression_attribute_values(":pk", AttributeValue::S(format!("phone#{e164}")))
                    .send()
                    .await
                    .map_err(|e| StoreError::from_sdk("DynamoDB", e))?;
                Ok(output
                    .items()
                    .iter()
                    .filter_map(customer_from_item)
                    .collect())
            }
            Self::Memory(entries) => Ok(entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter(|(_, phones, _)| phones.iter().any(|p| p == e164))
                .map(|(customer, _, _)| customer.clone())
                .collect()),
        }
    }
}

pub(crate) fn customer_from_item(
    item: &std::collections::HashMap<String, AttributeValue>,
) -> Option<Customer> {
    let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
    Some(Customer {
        entity: text("entity")?,
        entity_set: text("entity_set")?,
        id: Uuid::try_parse(&text("id")?).ok()?,
        name: text("name"),
        modified_on: text("modified_on").unwrap_or_default(),
        priority: item
            .get("priority")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        fields: text("fields")
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default(),
    })
}

type Item = HashMap<String, AttributeValue>;

fn entry_key(entity: &str, id: Uuid) -> Item {
    HashMap::from([
        (
            "pk".to_owned(),
            AttributeValue::S(format!("record#{entity}#{id}")),
        ),
        ("sk".to_owned(), AttributeValue::S("entry".to_owned())),
    ])
}

fn phone_key(number: &str, entity: &str, id: Uuid) -> Item {
    HashMap::from([
        (
            "pk".to_owned(),
            AttributeValue::S(format!("phone#{number}")),
        ),
        ("sk".to_owned(), AttributeValue::S(format!("{entity}#{id}"))),
    ])
}

fn customer_of(entry: &DirectoryEntry, mapping: &EntityMapping) -> Customer {
    Customer {
        entity: entry.entity.clone(),
        entity_set: mapping.entity_set.to_string(),
        id: entry.id,
        name: entry.name.clone(),
        modified_on: entry.modified_on.clone(),
        priority: mapping.priority,
        fields: entry.fields.clone(),
    }
}

/// What both kinds of item carry: the lookup's answer.
fn customer_attributes(customer: &Customer) -> Item {
    let mut item = HashMap::from([
        (
            "entity".to_owned(),
            AttributeValue::S(customer.entity.clone()),
        ),
        (
            "entity_set".to_owned(),
            AttributeValue::S(customer.entity_set.clone()),
        ),
        ("id".to_owned(), AttributeValue::S(customer.id.to_string())),
        (
            "modified_on".to_owned(),
            AttributeValue::S(customer.modified_on.clone()),
        ),
        (
            "priority".to_owned(),
            AttributeValue::N(customer.priority.to_string()),
        ),
        (
            "fields".to_owned(),
            AttributeValue::S(serde_json::to_string(&customer.fields).unwrap_or_default()),
        ),
    ]);
    if let Some(name) = &customer.name {
        item.insert("name".to_owned(), AttributeValue::S(name.clone()));
    }
    item
}

fn entry_item(entry: &DirectoryEntry, customer: &Customer, stamp: u64) -> Item {
    let mut item = customer_attributes(customer);
    item.extend(entry_key(&entry.entity, entry.id));
    item.insert(
        "phones".to_owned(),
        AttributeValue::L(
            entry
                .phones
                .iter()
                .cloned()
                .map(AttributeValue::S)
                .collect(),
        ),
    );
    item.insert("stamp".to_owned(), AttributeValue::N(stamp.to_string()));
    item
}

fn phones_of(item: &Item) -> Vec<String> {
    item.get("phones")
        .and_then(|v| v.as_l().ok())
        .map(|list| list.iter().filter_map(|v| v.as_s().ok().cloned()).collect())
        .unwrap_or_default()
}

/// The phone items to write and to delete when an entry's numbers change.
fn phone_writes(customer: &Customer, new: &[String], old: &[String]) -> Vec<WriteRequest> {
    let mut writes = Vec::new();
    for number in new {
        let mut item = customer_attributes(customer);
        item.extend(phone_key(number, &customer.entity, customer.id));
        if let Ok(put) = PutRequest::builder().set_item(Some(item)).build() {
            writes.push(WriteRequest::builder().put_request(put).build());
        }
    }
    let kept: BTreeSet<&String> = new.iter().collect();
    for number in old.iter().filter(|n| !kept.contains(n)) {
        writes.push(delete_request(phone_key(
            number,
            &customer.entity,
            customer.id,
        )));
    }
    writes
}

fn delete_request(key: Item) -> WriteRequest {
    let delete = DeleteRequest::builder().set_key(Some(key)).build();
    match delete {
        Ok(delete) => WriteRequest::builder().delete_request(delete).build(),
        Err(_) => WriteRequest::builder().build(),
    }
}

impl CallerDirectory {
    /// Writes one entry, unless a newer version (by modified-on) is stored: an older
    /// webhook never overwrites a newer one, so replays and reordering converge.
    pub async fn put(
        &self,
        entry: &DirectoryEntry,
        mapping: &EntityMapping,
    ) -> Result<WriteOutcome, StoreError> {
        let customer = customer_of(entry, mapping);
        match self {
            Self::DynamoDb { client, table } => {
                let result = client
                    .put_item()
                    .table_name(table)
                    .set_item(Some(entry_item(entry, &customer, now_stamp())))
                    .condition_expression("attribute_not_exists(pk) OR modified_on <= :modified")
                    .expression_attribute_values(
                        ":modified",
                        AttributeValue::S(entry.modified_on.clone()),
                    )
                    .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
                    .send()
                    .await;
                let old = match result {
                    Ok(output) => output
                        .attributes
                        .as_ref()
                        .map(phones_of)
                        .unwrap_or_default(),
                    Err(error) if is_condition_failure(&error) => return Ok(WriteOutcome::Stale),
                    Err(error) => return Err(StoreError::from_sdk("DynamoDB", error)),
                };
                batch_write(client, table, phone_writes(&customer, &entry.phones, &old)).await?;
                Ok(WriteOutcome::Written)
            }
            Self::Memory(entries) => {
                let mut entries = entries.lock().unwrap_or_else(|p| p.into_inner());
                let key = (entry.entity.clone(), entry.id);
                if entries
                    .get(&key)
                    .is_some_and(|(stored, _, _)| stored.modified_on > entry.modified_on)
                {
                    return Ok(WriteOutcome::Stale);
                }
                entries.insert(key, (customer, entry.phones.clone(), now_stamp()));
                Ok(WriteOutcome::Written)
            }
        }
    }

    /// Removes an entry and its phone items.
    pub async fn remove(&self, entity: &str, id: Uuid) -> Result<WriteOutcome, StoreError> {
        match self {
            Self::DynamoDb { client, table } => {
                let output = client
                    .delete_item()
                    .table_name(table)
                    .set_key(Some(entry_key(entity, id)))
                    .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
                    .send()
                    .await
                    .map_err(|e| StoreError::from_sdk("DynamoDB", e))?;
                let Some(old) = output.attributes else {
                    return Ok(WriteOutcome::Absent);
                };
                let deletes = phones_of(&old)
                    .iter()
                    .map(|n| delete_request(phone_key(n, entity, id)))
                    .collect();
                batch_write(client, table, deletes).await?;
                Ok(WriteOutcome::Deleted)
            }
            Self::Memory(entries) => {
                let removed = entries
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(entity.to_owned(), id));
                Ok(if removed.is_some() {
                    WriteOutcome::Deleted
                } else {
                    WriteOutcome::Absent
                })
            }
        }
    }

    /// Writes a page of entries from a sweep in batches, stamped with the sweep's
    /// pass so a full reconciliation can find what it did not see. An entry stored
    /// with a newer `modifiedon` (a webhook since the page was read) is left as it is:
    /// that write came after the pass started, so its stamp already counts as seen.
    pub async fn put_page(
        &self,
        entries: &[DirectoryEntry],
        mapping: &EntityMapping,
        stamp: u64,
    ) -> Result<(), StoreError> {
        match self {
            Self::DynamoDb { client, table } => {
                // The stored numbers, to drop phone items of numbers a record no longer
                // has, and versions, to keep what a webhook wrote since the page was read.
                let mut old: HashMap<Uuid, (Vec<String>, String)> = HashMap::new();
                for chunk in entries.chunks(100) {
                    let keys: Vec<Item> =
                        chunk.iter().map(|e| entry_key(&e.entity, e.id)).collect();
                    let mut request = KeysAndAttributes::builder()
                        .set_keys(Some(keys))
                        .projection_expression("id, phones, modified_on")
                        .build()
                        .map_err(|e| StoreError::new("DynamoDB", e.to_string(), false))
                        .map(|k| HashMap::from([(table.clone(), k)]))?;
                    let mut attempt = 0u32;
                    loop {
                        let output = client
                            .batch_get_item()
                            .set_request_items(Some(request))
                            .send()
                            .await
                            .map_err(|e| StoreError::from_sdk("DynamoDB", e))?;
                        for item in output
                            .responses
                            .unwrap_or_default()
                            .remove(table)
                            .unwrap_or_default()
                        {
                            if let Some(id) = item
                                .get("id")
                                .and_then(|v| v.as_s().ok())
                                .and_then(|s| Uuid::try_parse(s).ok())
                            {
                                let modified_on = item
                                    .get("modified_on")
                                    .and_then(|v| v.as_s().ok())
                                    .cloned()
                                    .unwrap_or_default();
                                old.insert(id, (phones_of(&item), modified_on));
                            }
                        }
                        // Keys left unread would make stale phone items look current:
                        // retried with backoff, and after the last retry an error.
                        match output.unprocessed_keys.filter(|u| !u.is_empty()) {
                            None => break,
                            Some(unprocessed) => {
                                back_off_unprocessed(
                                    &mut attempt,
                                    "batch read left unprocessed keys",
                                )
                                .await?;
                                request = unprocessed;
                            }
                        }
                    }
                }
                let mut writes = Vec::with_capacity(entries.len() * 2);
                for entry in entries {
                    let stored = old.get(&entry.id);
                    if stored.is_some_and(|(_, modified_on)| *modified_on > entry.modified_on) {
                        continue;
                    }
                    let customer = customer_of(entry, mapping);
                    if let Ok(put) = PutRequest::builder()
                        .set_item(Some(entry_item(entry, &customer, stamp)))
                        .build()
                    {
                        writes.push(WriteRequest::builder().put_request(put).build());
                    }
                    writes.extend(phone_writes(
                        &customer,
                        &entry.phones,
                        stored
                            .map(|(phones, _)| phones.as_slice())
                            .unwrap_or_default(),
                    ));
                }
                batch_write(client, table, writes).await
            }
            Self::Memory(stored) => {
                let mut stored = stored.lock().unwrap_or_else(|p| p.into_inner());
                for entry in entries {
                    let key = (entry.entity.clone(), entry.id);
                    if stored
                        .get(&key)
                        .is_some_and(|(held, _, _)| held.modified_on > entry.modified_on)
                    {
                        continue;
                    }
                    stored.insert(
                        key,
                        (customer_of(entry, mapping), entry.phones.clone(), stamp),
                    );
                }
                Ok(())
            }
        }
    }

    /// Removes the entries of an entity that the sweep pass `stamp` did not see:
    /// records deleted in Dynamics while no webhook told us. Streams the table, so
    /// memory stays bounded however large the entity.
    pub async fn remove_unseen(&self, entity: &str, stamp: u64) -> Result<usize, StoreError> {
        match self {
            Self::DynamoDb { client, table } => {
                let mut removed = 0;
                let mut start: Option<Item> = None;
                loop {
                    let output = client
                        .scan()
                        .table_name(table)
                        .filter_expression("sk = :entry AND entity = :entity AND (attribute_not_exists(stamp) OR stamp < :stamp)")
                        .projection_expression("id, phones")
                        .expression_attribute_values(":entry", AttributeValue::S("entry".into()))
                        .expression_attribute_values(":entity", AttributeValue::S(entity.to_owned()))
                        .expression_attribute_values(":stamp", AttributeValue::N(stamp.to_string()))
                        .set_exclusive_start_key(start)
                        .send()
                        .await
                        .map_err(|e| StoreError::from_sdk("DynamoDB", e))?;
                    let mut deletes = Vec::new();
                    for item in output.items() {
                        let Some(id) = item
                            .get("id")
                            .and_then(|v| v.as_s().ok())
                            .and_then(|s| Uuid::try_parse(s).ok())
                        else {
                            continue;
                        };
                        deletes.push(delete_request(entry_key(entity, id)));
                        deletes.extend(
                            phones_of(item)
                                .iter()
                                .map(|n| delete_request(phone_key(n, entity, id))),
                        );
                        removed += 1;
                    }
                    batch_write(client, table, deletes).await?;
                    match output.last_evaluated_key {
                        Some(key) if !key.is_empty() => start = Some(key),
                        _ => return Ok(removed),
                    }
                }
            }
            Self::Memory(stored) => {
                let mut stored = stored.lock().unwrap_or_else(|p| p.into_inner());
                let before = stored.len();
                stored.retain(|(e, _), (_, _, s)| e != entity || *s >= stamp);
                Ok(before - stored.len())
            }
        }
    }
}

/// The stamp of a write made now: Unix milliseconds, like a sweep pass's stamp, so
/// a pass counts every write made after it started as seen.
pub(crate) fn now_stamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Waits before sending a batch's unprocessed part again; after the last retry, an
/// error: what DynamoDB left undone is never silently dropped.
async fn back_off_unprocessed(attempt: &mut u32, what: &str) -> Result<(), StoreError> {
    const RETRIES: u32 = 8;
    if *attempt >= RETRIES {
        return Err(StoreError::new(
            "DynamoDB",
            format!("{what} after {RETRIES} retries"),
            true,
        ));
    }
    *attempt += 1;
    tokio::time::sleep(std::time::Duration::from_millis(50 << *attempt)).await;
    Ok(())
}

/// BatchWriteItem in chunks of 25, retrying unprocessed items with backoff.
async fn batch_write(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    writes: Vec<WriteRequest>,
) -> Result<(), StoreError> {
    for chunk in writes.chunks(25) {
        let mut pending = HashMap::from([(table.to_owned(), chunk.to_vec())]);
        let mut attempt = 0u32;
        loop {
            let output = client
                .batch_write_item()
                .set_request_items(Some(pending))
                .send()
                .await
                .map_err(|e| StoreError::from_sdk("DynamoDB", e))?;
            match output
                .unprocessed_items
                .filter(|u| u.values().any(|w| !w.is_empty()))
            {
                None => break,
                Some(unprocessed) => {
                    back_off_unprocessed(&mut attempt, "batch write left unprocessed items")
                        .await?;
                    pending = unprocessed;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(entity: &str, priority: u32, modified_on: &str) -> Customer {
        Customer {
            entity: entity.into(),
            entity_set: format!("{entity}s"),
            id: Uuid::new_v4(),
            name: Some(format!("{entity} {modified_on}")),
            modified_on: modified_on.into(),
            priority,
            fields: BTreeMap::new(),
        }
    }

    #[test]
    fn priority_then_most_recent() {
        let best = best_match(vec![
            customer("account", 2, "2026-11-20T10:00:00Z"),
            customer("contact", 1, "2026-11-01T10:00:00Z"),
            customer("contact", 1, "2026-11-19T10:00:00Z"),
        ])
        .unwrap();
        assert_eq!(
            (best.entity.as_str(), best.modified_on.as_str()),
            ("contact", "2026-11-19T10:00:00Z")
        );
        assert!(best_match(vec![]).is_none());
    }
}
