//! The caller directory: Dynamics records (contacts, accounts, any mapped entity)
//! findable by phone number in one DynamoDB query.
//!
//! One table, two kinds of item:
//! - the entry: `pk = record#<entity>#<id>`, `sk = entry`, with the mapped fields;
//! - one phone item per number: `pk = phone#<E.164>`, `sk = <entity>#<id>`, holding
//!   what a lookup returns, so a lookup is a single `Query` on `pk`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
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

fn entry_item(
    entry: &DirectoryEntry,
    customer: &Customer,
    stamp: u64,
    rev: &str,
    stale_phones: &[String],
) -> Item {
    let mut item = customer_attributes(customer);
    item.extend(entry_key(&entry.entity, entry.id));
    item.insert("phones".to_owned(), string_list(&entry.phones));
    if !stale_phones.is_empty() {
        item.insert("stale_phones".to_owned(), string_list(stale_phones));
    }
    item.insert("stamp".to_owned(), AttributeValue::N(stamp.to_string()));
    item.insert("rev".to_owned(), AttributeValue::S(rev.to_owned()));
    item
}

fn string_list(values: &[String]) -> AttributeValue {
    AttributeValue::L(values.iter().cloned().map(AttributeValue::S).collect())
}

fn list_of(item: &Item, name: &str) -> Vec<String> {
    item.get(name)
        .and_then(|v| v.as_l().ok())
        .map(|list| list.iter().filter_map(|v| v.as_s().ok().cloned()).collect())
        .unwrap_or_default()
}

fn id_of(item: &Item) -> Option<Uuid> {
    item.get("id")
        .and_then(|v| v.as_s().ok())
        .and_then(|s| Uuid::try_parse(s).ok())
}

/// What a write needs to know of the entry it replaces.
struct StoredEntry {
    phones: Vec<String>,
    /// Numbers an earlier write dropped whose phone items it may not have deleted
    /// (it failed or stopped after the entry): they still have to go.
    stale_phones: Vec<String>,
    modified_on: String,
    /// Changes on every write, so a conditional write knows nobody wrote in between.
    rev: Option<String>,
}

impl StoredEntry {
    const PROJECTION: &'static str = "id, phones, stale_phones, modified_on, rev";

    fn of(item: &Item) -> Self {
        Self {
            phones: list_of(item, "phones"),
            stale_phones: list_of(item, "stale_phones"),
            modified_on: item
                .get("modified_on")
                .and_then(|v| v.as_s().ok())
                .cloned()
                .unwrap_or_default(),
            rev: item.get("rev").and_then(|v| v.as_s().ok()).cloned(),
        }
    }

    /// The numbers whose phone items must go once the entry lists only `phones`.
    fn leftovers(&self, phones: &[String]) -> Vec<String> {
        let kept: BTreeSet<&String> = phones.iter().collect();
        let gone: BTreeSet<&String> = self
            .phones
            .iter()
            .chain(&self.stale_phones)
            .filter(|n| !kept.contains(n))
            .collect();
        gone.into_iter().cloned().collect()
    }
}

/// A condition that holds only while the entry is still the one read (`None`: still absent).
fn unchanged_since(stored: Option<&StoredEntry>) -> (&'static str, Option<Item>) {
    match stored {
        None => ("attribute_not_exists(pk)", None),
        Some(StoredEntry { rev: Some(rev), .. }) => (
            "rev = :rev",
            Some(HashMap::from([(
                ":rev".to_owned(),
                AttributeValue::S(rev.clone()),
            )])),
        ),
        Some(_) => ("attribute_exists(pk) AND attribute_not_exists(rev)", None),
    }
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

fn phone_deletes<'a>(
    numbers: impl IntoIterator<Item = &'a String>,
    entity: &str,
    id: Uuid,
) -> Vec<WriteRequest> {
    numbers
        .into_iter()
        .map(|n| delete_request(phone_key(n, entity, id)))
        .collect()
}

fn delete_request(key: Item) -> WriteRequest {
    let delete = DeleteRequest::builder().set_key(Some(key)).build();
    match delete {
        Ok(delete) => WriteRequest::builder().delete_request(delete).build(),
        Err(_) => WriteRequest::builder().build(),
    }
}

/// How often a write reads again because another write changed the entry in between.
const WRITE_RACES: u32 = 5;

fn kept_changing(entity: &str, id: Uuid) -> StoreError {
    StoreError::new(
        "DynamoDB",
        format!("directory entry {entity} {id} kept changing during {WRITE_RACES} attempts"),
        true,
    )
}

/// What a full reconciliation removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// Entries of records the pass did not see.
    pub entries: usize,
    /// Phone items no entry lists (left by a write that failed half way).
    pub orphan_phones: usize,
}

impl CallerDirectory {
    /// Writes one entry, unless a newer version (by modified-on) is stored: an older
    /// webhook never overwrites a newer one, so replays and reordering converge.
    ///
    /// The entry is written first and remembers the numbers it dropped until their
    /// phone items are gone, so a retry after a failure half way still deletes them;
    /// a conditional write makes concurrent writes of one record take turns.
    pub async fn put(
        &self,
        entry: &DirectoryEntry,
        mapping: &EntityMapping,
    ) -> Result<WriteOutcome, StoreError> {
        let customer = customer_of(entry, mapping);
        match self {
            Self::DynamoDb { client, table } => {
                for _ in 0..WRITE_RACES {
                    let stored = read_entry(client, table, &entry.entity, entry.id).await?;
                    if stored
                        .as_ref()
                        .is_some_and(|s| s.modified_on > entry.modified_on)
                    {
                        return Ok(WriteOutcome::Stale);
                    }
                    let leftovers = stored
                        .as_ref()
                        .map(|s| s.leftovers(&entry.phones))
                        .unwrap_or_default();
                    let rev = Uuid::new_v4().to_string();
                    let (condition, values) = unchanged_since(stored.as_ref());
                    let item = entry_item(entry, &customer, now_stamp(), &rev, &leftovers);
                    let result = client
                        .put_item()
                        .table_name(table)
                        .set_item(Some(item))
                        .condition_expression(condition)
                        .set_expression_attribute_values(values)
                        .send()
                        .await;
                    match result {
                        Ok(_) => {}
                        Err(error) if is_condition_failure(&error) => continue,
                        Err(error) => return Err(StoreError::from_sdk("DynamoDB", error)),
                    }
                    batch_write(
                        client,
                        table,
                        phone_writes(&customer, &entry.phones, &leftovers),
                    )
                    .await?;
                    settle(client, table, &customer, &entry.phones, &rev).await?;
                    return Ok(WriteOutcome::Written);
                }
                Err(kept_changing(&entry.entity, entry.id))
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

    /// Removes an entry and its phone items: the phone items first, so a retry after
    /// a failure still finds the entry that lists them.
    pub async fn remove(&self, entity: &str, id: Uuid) -> Result<WriteOutcome, StoreError> {
        match self {
            Self::DynamoDb { client, table } => {
                for _ in 0..WRITE_RACES {
                    let Some(stored) = read_entry(client, table, entity, id).await? else {
                        return Ok(WriteOutcome::Absent);
                    };
                    batch_write(
                        client,
                        table,
                        phone_deletes(&stored.leftovers(&[]), entity, id),
                    )
                    .await?;
                    let (condition, values) = unchanged_since(Some(&stored));
                    let result = client
                        .delete_item()
                        .table_name(table)
                        .set_key(Some(entry_key(entity, id)))
                        .condition_expression(condition)
                        .set_expression_attribute_values(values)
                        .send()
                        .await;
                    match result {
                        Ok(_) => return Ok(WriteOutcome::Deleted),
                        Err(error) if is_condition_failure(&error) => continue,
                        Err(error) => return Err(StoreError::from_sdk("DynamoDB", error)),
                    }
                }
                Err(kept_changing(entity, id))
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
                let keys = entries.iter().map(|e| entry_key(&e.entity, e.id));
                let old: HashMap<Uuid, StoredEntry> =
                    batch_read(client, table, keys, StoredEntry::PROJECTION, false)
                        .await?
                        .iter()
                        .filter_map(|item| Some((id_of(item)?, StoredEntry::of(item))))
                        .collect();
                let mut writes = Vec::with_capacity(entries.len() * 2);
                let mut unsettled = Vec::new();
                for entry in entries {
                    let stored = old.get(&entry.id);
                    if stored.is_some_and(|s| s.modified_on > entry.modified_on) {
                        continue;
                    }
                    let customer = customer_of(entry, mapping);
                    let leftovers = stored
                        .map(|s| s.leftovers(&entry.phones))
                        .unwrap_or_default();
                    let rev = Uuid::new_v4().to_string();
                    let item = entry_item(entry, &customer, stamp, &rev, &leftovers);
                    if let Ok(put) = PutRequest::builder().set_item(Some(item)).build() {
                        writes.push(WriteRequest::builder().put_request(put).build());
                    }
                    writes.extend(phone_writes(&customer, &entry.phones, &leftovers));
                    if !leftovers.is_empty() {
                        unsettled.push((customer, entry.phones.as_slice(), rev));
                    }
                }
                batch_write(client, table, writes).await?;
                for (customer, phones, rev) in &unsettled {
                    settle(client, table, customer, phones, rev).await?;
                }
                Ok(())
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

    /// Ends a full reconciliation of an entity: removes the entries the pass `stamp`
    /// did not see (records deleted in Dynamics while no webhook told us), and phone
    /// items no entry lists, so any inconsistency heals within one pass. An entry
    /// written since the pass started is never removed (each removal is conditional).
    pub async fn remove_unseen(&self, entity: &str, stamp: u64) -> Result<Removed, StoreError> {
        match self {
            Self::DynamoDb { client, table } => {
                let mut removed = Removed::default();
                // The numbers each entry lists (or listed, for those removed here), and
                // every phone item seen: a phone item not listed is an orphan candidate.
                let mut listed: HashMap<Uuid, BTreeSet<String>> = HashMap::new();
                let mut phone_items: Vec<(String, Uuid)> = Vec::new();
                let mut start: Option<Item> = None;
                loop {
                    let output = client
                        .scan()
                        .table_name(table)
                        .filter_expression("entity = :entity")
                        .projection_expression("pk, id, phones, stale_phones, stamp")
                        .expression_attribute_values(
                            ":entity",
                            AttributeValue::S(entity.to_owned()),
                        )
                        .set_exclusive_start_key(start)
                        .send()
                        .await
                        .map_err(|e| StoreError::from_sdk("DynamoDB", e))?;
                    for item in output.items() {
                        let Some(id) = id_of(item) else { continue };
                        let pk = item.get("pk").and_then(|v| v.as_s().ok());
                        if let Some(number) = pk.and_then(|pk| pk.strip_prefix("phone#")) {
                            phone_items.push((number.to_owned(), id));
                            continue;
                        }
                        let seen = item
                            .get("stamp")
                            .and_then(|v| v.as_n().ok())
                            .and_then(|n| n.parse::<u64>().ok())
                            .is_some_and(|s| s >= stamp);
                        let numbers = if seen {
                            list_of(item, "phones")
                        } else {
                            let gone = remove_if_unseen(client, table, entity, id, stamp).await?;
                            removed.entries += usize::from(gone.is_some());
                            gone.unwrap_or_default()
                        };
                        listed.entry(id).or_default().extend(numbers);
                    }
                    match output.last_evaluated_key {
                        Some(key) if !key.is_empty() => start = Some(key),
                        _ => break,
                    }
                }
                phone_items.retain(|(number, id)| {
                    !listed
                        .get(id)
                        .is_some_and(|numbers| numbers.contains(number))
                });
                removed.orphan_phones = remove_orphans(client, table, entity, phone_items).await?;
                Ok(removed)
            }
            Self::Memory(stored) => {
                let mut stored = stored.lock().unwrap_or_else(|p| p.into_inner());
                let before = stored.len();
                stored.retain(|(e, _), (_, _, s)| e != entity || *s >= stamp);
                Ok(Removed {
                    entries: before - stored.len(),
                    orphan_phones: 0,
                })
            }
        }
    }
}

async fn read_entry(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    entity: &str,
    id: Uuid,
) -> Result<Option<StoredEntry>, StoreError> {
    let output = client
        .get_item()
        .table_name(table)
        .set_key(Some(entry_key(entity, id)))
        .consistent_read(true)
        .projection_expression(StoredEntry::PROJECTION)
        .send()
        .await
        .map_err(|e| StoreError::from_sdk("DynamoDB", e))?;
    Ok(output.item.as_ref().map(StoredEntry::of))
}

/// After a write's phone items: clears the numbers it had left to delete, or, when
/// another write came in between (whose deletes may have run before our puts),
/// removes the phone items we wrote that the entry no longer lists.
async fn settle(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    customer: &Customer,
    phones: &[String],
    rev: &str,
) -> Result<(), StoreError> {
    let result = client
        .update_item()
        .table_name(table)
        .set_key(Some(entry_key(&customer.entity, customer.id)))
        .update_expression("REMOVE stale_phones")
        .condition_expression("rev = :rev")
        .expression_attribute_values(":rev", AttributeValue::S(rev.to_owned()))
        .return_values_on_condition_check_failure(
            aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure::AllOld,
        )
        .send()
        .await;
    let current = match result {
        Ok(_) => return Ok(()),
        Err(error) if is_condition_failure(&error) => match error.into_service_error() {
            UpdateItemError::ConditionalCheckFailedException(failed) => failed.item,
            _ => None,
        },
        Err(error) => return Err(StoreError::from_sdk("DynamoDB", error)),
    };
    let listed = current
        .as_ref()
        .map(|item| list_of(item, "phones"))
        .unwrap_or_default();
    let unlisted = phones.iter().filter(|n| !listed.contains(n));
    batch_write(
        client,
        table,
        phone_deletes(unlisted, &customer.entity, customer.id),
    )
    .await
}

/// Removes an entry the pass did not see, unless it was written since; its numbers when removed.
async fn remove_if_unseen(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    entity: &str,
    id: Uuid,
    stamp: u64,
) -> Result<Option<Vec<String>>, StoreError> {
    let result = client
        .delete_item()
        .table_name(table)
        .set_key(Some(entry_key(entity, id)))
        .condition_expression("attribute_not_exists(stamp) OR stamp < :stamp")
        .expression_attribute_values(":stamp", AttributeValue::N(stamp.to_string()))
        .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
        .send()
        .await;
    let old = match result {
        Ok(output) => output.attributes.unwrap_or_default(),
        Err(error) if is_condition_failure(&error) => return Ok(None),
        Err(error) => return Err(StoreError::from_sdk("DynamoDB", error)),
    };
    let numbers = StoredEntry::of(&old).leftovers(&[]);
    batch_write(client, table, phone_deletes(&numbers, entity, id)).await?;
    Ok(Some(numbers))
}

/// Deletes the candidate phone items whose entry, read again consistently, does not
/// list them (a write in flight during the scan lists its numbers before it writes them).
async fn remove_orphans(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    entity: &str,
    candidates: Vec<(String, Uuid)>,
) -> Result<usize, StoreError> {
    if candidates.is_empty() {
        return Ok(0);
    }
    let ids: BTreeSet<Uuid> = candidates.iter().map(|(_, id)| *id).collect();
    let keys = ids.iter().map(|id| entry_key(entity, *id));
    let current: HashMap<Uuid, Vec<String>> = batch_read(client, table, keys, "id, phones", true)
        .await?
        .iter()
        .filter_map(|item| Some((id_of(item)?, list_of(item, "phones"))))
        .collect();
    let orphans: Vec<WriteRequest> = candidates
        .iter()
        .filter(|(number, id)| {
            !current
                .get(id)
                .is_some_and(|listed| listed.contains(number))
        })
        .map(|(number, id)| delete_request(phone_key(number, entity, *id)))
        .collect();
    let count = orphans.len();
    batch_write(client, table, orphans).await?;
    Ok(count)
}

/// BatchGetItem in chunks of 100; keys left unprocessed are retried with backoff,
/// then an error: a key left unread would make stale phone items look current.
async fn batch_read(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    keys: impl Iterator<Item = Item>,
    projection: &str,
    consistent: bool,
) -> Result<Vec<Item>, StoreError> {
    let keys: Vec<Item> = keys.collect();
    let mut items = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(100) {
        let mut request = KeysAndAttributes::builder()
            .set_keys(Some(chunk.to_vec()))
            .projection_expression(projection)
            .consistent_read(consistent)
            .build()
            .map_err(|e| StoreError::new("DynamoDB", e.to_string(), false))
            .map(|k| HashMap::from([(table.to_owned(), k)]))?;
        let mut attempt = 0u32;
        loop {
            let output = client
                .batch_get_item()
                .set_request_items(Some(request))
                .send()
                .await
                .map_err(|e| StoreError::from_sdk("DynamoDB", e))?;
            items.extend(
                output
                    .responses
                    .unwrap_or_default()
                    .remove(table)
                    .unwrap_or_default(),
            );
            match output.unprocessed_keys.filter(|u| !u.is_empty()) {
                None => break,
                Some(unprocessed) => {
                    back_off_unprocessed(&mut attempt, "batch read left unprocessed keys").await?;
                    request = unprocessed;
                }
            }
        }
    }
    Ok(items)
}

/// The stamp of a write made now: Unix milliseconds, like a sweep pass's stamp, so
/// a pass counts every write made after it started as seen.
pub(crate) fn now_stamp() -> u64 {
    crate::clock::unix_millis()
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
