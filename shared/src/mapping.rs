//! Declarative mapping from a Dynamics entity's columns to a caller-directory entry.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::dataverse::odata::{EntitySet, Identifier, parse_guid};
use crate::phone::PhoneNormalizer;

/// How one Dynamics entity (contact, account, any custom table) feeds the directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityMapping {
    /// Web API entity set (`contacts`).
    pub entity_set: EntitySet,
    /// Logical name (`contact`), as webhooks name the entity.
    pub logical_name: Identifier,
    /// Primary key column (`contactid`).
    pub key: Identifier,
    /// The column that orders versions of a record (`modifiedon`).
    #[serde(default = "default_modified_on")]
    pub modified_on: Identifier,
    /// The column shown as the customer's name (`fullname`, `name`).
    pub name: Identifier,
    /// Columns holding phone numbers; each is normalised to E.164.
    pub phones: Vec<Identifier>,
    /// Extra directory fields: field name -> column and transform.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldMapping>,
    /// Columns that must hold a value, or the record is refused.
    #[serde(default)]
    pub required: Vec<Identifier>,
    /// Lower wins when one phone number matches records of several entities.
    #[serde(default)]
    pub priority: u32,
}

fn default_modified_on() -> Identifier {
    Identifier::new("modifiedon").expect("a literal identifier")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMapping {
    pub column: Identifier,
    #[serde(default)]
    pub transform: Transform,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    #[default]
    None,
    Trim,
    Lower,
    Phone,
    /// Option-set value -> label (`customertypecode: 1 -> Gold`).
    OptionSet(BTreeMap<i64, String>),
}

/// A record as the caller directory stores it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DirectoryEntry {
    pub entity: String,
    pub id: Uuid,
    pub name: Option<String>,
    /// Every phone number of the record, E.164, without duplicates.
    pub phones: Vec<String>,
    /// The record's modified-on value as Dataverse wrote it (ISO-8601 UTC).
    pub modified_on: String,
    pub fields: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("{entity} record has no valid `{column}` id")]
    MissingKey { entity: String, column: String },
    #[error("{entity} {id}: required column `{column}` is missing or empty")]
    MissingRequired {
        entity: String,
        id: Uuid,
        column: String,
    },
}

impl EntityMapping {
    /// The `$select` list that fetches everything the mapping reads, in a stable order.
    pub fn select(&self) -> Vec<String> {
        let mut columns: Vec<String> = Vec::new();
        let mut add = |column: &Identifier| {
            if !columns.iter().any(|c| c == column.as_str()) {
                columns.push(column.as_str().to_owned());
            }
        };
        add(&self.key);
        add(&self.modified_on);
        add(&self.name);
        self.phones.iter().for_each(&mut add);
        self.fields.values().for_each(|field| add(&field.column));
        self.required.iter().for_each(&mut add);
        columns
    }

    /// Maps a fetched record, refusing it when a required column is empty.
    /// A phone column that does not hold a phone number is left out, not fatal:
    /// the record is still reachable through its other numbers.
    pub fn map(
        &self,
        record: &Value,
        phones: &PhoneNormalizer,
    ) -> Result<DirectoryEntry, MappingError> {
        let entity = self.logical_name.as_str().to_owned();
        let id = record
            .get(self.key.as_str())
            .and_then(Value::as_str)
            .and_then(|text| parse_guid(text).ok())
            .ok_or_else(|| MappingError::MissingKey {
                entity: entity.clone(),
                column: self.key.to_string(),
            })?;
        let text_of = |column: &Identifier| {
            record
                .get(column.as_str())
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|text| !text.is_empty())
        };
        for column in self.required.iter().chain([&self.modified_on]) {
            let present = match record.get(column.as_str()) {
                None | Some(Value::Null) => false,
                Some(Value::String(text)) => !text.trim().is_empty(),
                Some(_) => true,
            };
            if !present {
                return Err(MappingError::MissingRequired {
                    entity,
                    id,
                    column: column.to_string(),
                });
            }
        }
        let mut numbers: Vec<String> = Vec::new();
        for column in &self.phones {
            if let Some(number) = text_of(column).and_then(|raw| phones.normalize(raw).ok())
                && !numbers.contains(&number)
            {
                numbers.push(number);
            }
        }
        let fields = self
            .fields
            .iter()
            .map(|(name, field)| {
                let raw = record
                    .get(field.column.as_str())
                    .cloned()
                    .unwrap_or(Value::Null);
                (name.clone(), field.transform.apply(raw, phones))
            })
            .collect();
        Ok(DirectoryEntry {
            entity,
            id,
            name: text_of(&self.name).map(str::to_owned),
            phones: numbers,
            modified_on: text_of(&self.modified_on).unwrap_or_default().to_owned(),
            fields,
        })
    }
}

impl Transform {
    fn apply(&self, value: Value, phones: &PhoneNormalizer) -> Value {
        match (self, value) {
            (Self::Trim, Value::String(text)) => Value::String(text.trim().to_owned()),
            (Self::Lower, Value::String(text)) => Value::String(text.trim().to_lowercase()),
            (Self::Phone, Value::String(text)) => phones
                .normalize(&text)
                .map(Value::String)
                .unwrap_or(Value::Null),
            (Self::OptionSet(labels), Value::Number(number)) => {
                match number.as_i64().and_then(|n| labels.get(&n)) {
                    Some(label) => Value::String(label.clone()),
                    // An option added in Dynamics after the mapping was written: keep the number.
                    None => Value::Number(number),
                }
            }
            (_, value) => value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn contact_mapping() -> EntityMapping {
        crate::config::parse_yaml(
            r#"
entity_set: contacts
logical_name: contact
key: contactid
name: fullname
phones: [telephone1, mobilephone]
fields:
  email: { column: emailaddress1, transform: lower }
  tier: { column: customertypecode, transform: { option_set: { 1: Gold, 2: Silver } } }
required: [lastname]
"#,
        )
        .unwrap()
    }

    #[test]
    fn select_lists_every_column_once() {
        assert_eq!(
            contact_mapping().select(),
            [
                "contactid",
                "modifiedon",
                "fullname",
                "telephone1",
                "mobilephone",
                "emailaddress1",
                "customertypecode",
                "lastname"
            ]
        );
    }

    #[test]
    fn maps_a_record() {
        let phones = PhoneNormalizer::new("44").unwrap();
        let entry = contact_mapping()
            .map(
                &json!({
                    "contactid": "f21bd6bb-c4c1-480a-96a2-f634bc21eb22",
                    "modifiedon": "2026-11-20T14:05:31Z",
                    "fullname": " Maren Holt ",
                    "lastname": "Holt",
                    "telephone1": "07700 900123",
                    "mobilephone": "+44 7700 900123",
                    "emailaddress1": " Maren@Example.com",
                    "customertypecode": 2,
                }),
                &phones,
            )
            .unwrap();
        assert_eq!(entry.name.as_deref(), Some("Maren Holt"));
        assert_eq!(entry.phones, ["+447700900123"]);
        assert_eq!(entry.fields["email"], json!("maren@example.com"));
        assert_eq!(entry.fields["tier"], json!("Silver"));
        assert_eq!(entry.modified_on, "2026-11-20T14:05:31Z");
    }

    #[test]
    fn missing_required_column_is_named() {
        let phones = PhoneNormalizer::new("44").unwrap();
        let error = contact_mapping()
            .map(
                &json!({"contactid": "f21bd6bb-c4c1-480a-96a2-f634bc21eb22", "modifiedon": "2026-11-20T14:05:31Z", "lastname": " "}),
                &phones,
            )
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "contact f21bd6bb-c4c1-480a-96a2-f634bc21eb22: required column `lastname` is missing or empty"
        );
        let error = contact_mapping()
            .map(&json!({"contactid": "nope"}), &phones)
            .unwrap_err();
        assert!(matches!(error, MappingError::MissingKey { .. }));
    }
}
