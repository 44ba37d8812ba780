//! The record templates checked against the org's table definitions before a
//! deployment (`connect-dynamics validate --live`): a column Dataverse would refuse
//! is named with its key path here, instead of turning up as a dead letter.
//!
//! Reads only the record's table: its columns (filtered to the ones the templates
//! write), their lengths and option values behind the cast segments, and its lookups'
//! navigation properties. Values that are templates are known only per contact; a
//! literal is checked against the column's type, length and options.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use reqwest::Method;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::{Config, CustomerBinding};
use crate::dataverse::odata::{encode_query_value, string_literal};
use crate::dataverse::{DataverseClient, DataverseError};
use crate::template::{PayloadTemplate, Templates};

/// Something in the configuration Dataverse would refuse.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// The configuration key (`contact.answered.body.new_stage`).
    pub path: String,
    pub problem: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)
    }
}

/// What the table says about one column.
#[derive(Debug, Default)]
struct Column {
    attribute_type: String,
    max_length: Option<u64>,
    options: Option<Vec<i64>>,
}

/// Every record template's columns against the record table's definition.
pub async fn check_record_templates(
    config: &Config,
    client: &DataverseClient,
    deadline: Instant,
) -> Result<Vec<Finding>, DataverseError> {
    let contact = &config.contact;
    let entity = contact.logical_name.as_str();
    let mut templates: Vec<&PayloadTemplate> = vec![
        &contact.created,
        &contact.answered,
        &contact.ended,
        &contact.recording,
    ];
    templates.extend(contact.close.as_ref());
    let written: Vec<(String, &str, Option<&Value>)> = templates
        .into_iter()
        .flat_map(|template| {
            let path = Templates::path(template);
            Templates::columns(template)
                .into_iter()
                .map(move |(key, literal)| (format!("{path}.{key}"), key, literal))
        })
        .collect();
    let mut names: Vec<&str> = written
        .iter()
        .map(|(_, key, _)| *key)
        .filter(|key| !key.contains('@'))
        .collect();
    names.sort_unstable();
    names.dedup();

    let definition = format!("EntityDefinitions(LogicalName={})", string_literal(entity));
    let columns = read_columns(client, &definition, &names, deadline).await?;
    let navigation = read_navigation(client, &definition, deadline).await?;

    let mut findings = Vec::new();
    for (path, key, literal) in &written {
        if let Some(property) = key.strip_suffix("@odata.bind") {
            if !navigation.iter().any(|n| n == property) {
                findings.push(Finding {
                    path: path.clone(),
                    problem: format!(
                        "`{property}` is no navigation property of {entity} (bind keys are case sensitive; take them from ReferencingEntityNavigationPropertyName)"
                    ),
                });
            }
            continue;
        }
        // Annotations, and the activity-party collection (a navigation, not a column).
        if key.contains('@') || *key == format!("{entity}_activity_parties") {
            continue;
        }
        let Some(column) = columns.get(*key) else {
            findings.push(Finding {
                path: path.clone(),
                problem: format!("`{key}` is not a column of {entity}"),
            });
            continue;
        };
        if let Some(problem) = literal.and_then(|value| refusal(column, value)) {
            findings.push(Finding {
                path: path.clone(),
                problem: format!("`{key}`: {problem}"),
            });
        }
    }
    if contact.bind_customer_as == CustomerBinding::Regarding {
        for mapping in &config.directory {
            let property = format!(
                "regardingobjectid_{}_{entity}",
                mapping.logical_name.as_str()
            );
            if !navigation.contains(&property) {
                findings.push(Finding {
                    path: "contact.bind_customer_as".into(),
                    problem: format!(
                        "{entity} has no regarding link to {} (`{property}`): matched customers of that table cannot be linked",
                        mapping.logical_name.as_str()
                    ),
                });
            }
        }
    }
    Ok(findings)
}

/// Why Dataverse would refuse `value` in `column`, if it would.
fn refusal(column: &Column, value: &Value) -> Option<String> {
    if value.is_null() {
        return None;
    }
    let wrong_type = |expected: &str| Some(format!("{value} is not {expected}"));
    match column.attribute_type.as_str() {
        "String" | "Memo" => {
            let Value::String(text) = value else {
                return wrong_type("text");
            };
            let length = text.chars().count() as u64;
            column
                .max_length
                .filter(|max| length > *max)
                .map(|max| format!("{length} characters, the column holds {max}"))
        }
        "Integer" | "BigInt" if !value.is_i64() => wrong_type("a whole number"),
        "Decimal" | "Double" | "Money" if !value.is_number() => wrong_type("a number"),
        "Boolean" if !value.is_boolean() => wrong_type("true or false"),
        "DateTime" => match value.as_str().map(|t| OffsetDateTime::parse(t, &Rfc3339)) {
            Some(Ok(_)) => None,
            _ => wrong_type("an ISO 8601 date and time"),
        },
        "Picklist" | "State" | "Status" => {
            let Some(chosen) = value.as_i64() else {
                return wrong_type("an option value (a whole number)");
            };
            column
                .options
                .as_ref()
                .filter(|options| !options.contains(&chosen))
                .map(|options| {
                    let options: Vec<String> = options.iter().map(i64::to_string).collect();
                    format!(
                        "{chosen} is not one of its options ({})",
                        options.join(", ")
                    )
                })
        }
        "Lookup" | "Customer" | "Owner" => {
            Some("a lookup is written through its navigation property (`<name>@odata.bind`)".into())
        }
        _ => None,
    }
}

/// The named columns' types, with lengths and options from the cast segments.
async fn read_columns(
    client: &DataverseClient,
    definition: &str,
    names: &[&str],
    deadline: Instant,
) -> Result<BTreeMap<String, Column>, DataverseError> {
    let mut columns = BTreeMap::new();
    if names.is_empty() {
        return Ok(columns);
    }
    // Only the columns the templates write: large orgs have hundreds per table.
    let filter: Vec<String> = names
        .iter()
        .map(|name| format!("LogicalName eq {}", string_literal(name)))
        .collect();
    let filter = encode_query_value(&filter.join(" or "));
    let rows = |cast: &str, select: &str, expand: &str| {
        format!("{definition}/Attributes{cast}?$select={select}&$filter={filter}{expand}")
    };
    for row in read_rows(client, rows("", "LogicalName,AttributeType", ""), deadline).await? {
        if let (Some(name), Some(attribute_type)) = (
            row.get("LogicalName").and_then(Value::as_str),
            row.get("AttributeType").and_then(Value::as_str),
        ) {
            columns.insert(
                name.to_owned(),
                Column {
                    attribute_type: attribute_type.to_owned(),
                    ..Column::default()
                },
            );
        }
    }
    let types: BTreeSet<String> = columns
        .values()
        .map(|column| column.attribute_type.clone())
        .collect();
    // Lengths and options exist only behind a cast, and a cast to the shared
    // EnumAttributeMetadata is refused: one query per type the templates write.
    let casts = [
        ("String", "LogicalName,MaxLength", ""),
        ("Memo", "LogicalName,MaxLength", ""),
        ("Picklist", "LogicalName", "&$expand=OptionSet"),
        ("State", "LogicalName", "&$expand=OptionSet"),
        ("Status", "LogicalName", "&$expand=OptionSet"),
    ];
    for (cast, select, expand) in casts.into_iter().filter(|(t, ..)| types.contains(*t)) {
        let path = rows(
            &format!("/Microsoft.Dynamics.CRM.{cast}AttributeMetadata"),
            select,
            expand,
        );
        for row in read_rows(client, path, deadline).await? {
            let Some(column) = row
                .get("LogicalName")
                .and_then(Value::as_str)
                .and_then(|name| columns.get_mut(name))
            else {
                continue;
            };
            if let Some(max) = row.get("MaxLength").and_then(Value::as_u64) {
                column.max_length = Some(max);
            }
            if let Some(options) = row.pointer("/OptionSet/Options").and_then(Value::as_array) {
                let values = options.iter().filter_map(|o| o.get("Value")?.as_i64());
                column.options = Some(values.collect());
            }
        }
    }
    Ok(columns)
}

/// The navigation property names of the table's lookups.
async fn read_navigation(
    client: &DataverseClient,
    definition: &str,
    deadline: Instant,
) -> Result<Vec<String>, DataverseError> {
    let path = format!(
        "{definition}/ManyToOneRelationships?$select=ReferencingEntityNavigationPropertyName"
    );
    Ok(read_rows(client, path, deadline)
        .await?
        .iter()
        .filter_map(|row| row.get("ReferencingEntityNavigationPropertyName")?.as_str())
        .map(str::to_owned)
        .collect())
}

/// Metadata queries do not page: every match is in the first answer.
async fn read_rows(
    client: &DataverseClient,
    path: String,
    deadline: Instant,
) -> Result<Vec<Value>, DataverseError> {
    let (body, _) = client
        .execute(Method::GET, &path, None, &[], deadline)
        .await?;
    Ok(body
        .and_then(|body| body.get("value").and_then(Value::as_array).cloned())
        .unwrap_or_default())
}
