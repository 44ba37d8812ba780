//! The caller directory: Dynamics records (contacts, accounts, any mapped entity)
//! findable by phone number in one DynamoDB query.
//!
//! One table, two kinds of item:
//! - the entry: `pk = record#<entity>#<id>`, `sk = entry`, with the mapped fields;
//! - one phone item per number: `pk = phone#<E.164>`, `sk = <entity>#<id>`, holding
//!   what a lookup returns, so a lookup is a single `Query` on `pk`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use aws_sdk_dynamodb::types::AttributeValue;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::store_error::StoreError;

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
    /// For the local simulation: phone number -> matches.
    Memory(Mutex<BTreeMap<String, Vec<Customer>>>),
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
            Self::Memory(numbers) => Ok(numbers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(e164)
                .cloned()
                .unwrap_or_default()),
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
