//! What Dynamics sends to record-saved: the `RemoteExecutionContext` of a WebHook
//! step (Create, Update, Delete), or a light `{entity, ids}` form from an OnSave
//! script or ribbon button; and the key that proves it is Dynamics.

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::dataverse::odata::parse_guid;
use crate::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    Create,
    Update,
    Delete,
    /// The light form: "this record changed, fetch it".
    Saved,
}

/// A validated notification: which records of which entity changed, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub message: Message,
    /// Logical name (`contact`).
    pub entity: String,
    pub ids: Vec<Uuid>,
    /// The systemuser behind the save (loops: skip our own application user).
    pub user_id: Option<Uuid>,
    pub correlation_id: Option<String>,
}

/// A refused request: the status to answer and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {reason}")]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

fn bad(reason: impl Into<String>) -> Refusal {
    Refusal {
        status: 400,
        reason: reason.into(),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RemoteExecutionContext {
    message_name: String,
    primary_entity_name: String,
    #[serde(default)]
    primary_entity_id: Option<Value>,
    #[serde(default)]
    input_parameters: Option<Vec<KeyValue>>,
    #[serde(default)]
    output_parameters: Option<Vec<KeyValue>>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
}

#[derive(Deserialize)]
struct KeyValue {
    key: String,
    #[serde(default)]
    value: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LightForm {
    entity: String,
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    ids: Option<Vec<Value>>,
}

/// Collections are `[{"key":…,"value":…}]`; on a repeated key the last wins.
fn lookup<'a>(collection: Option<&'a [KeyValue]>, key: &str) -> Option<&'a Value> {
    collection?
        .iter()
        .rev()
        .find(|kv| kv.key == key)
        .map(|kv| &kv.value)
}

/// A GUID from a JSON value: `None` when absent or all zeros, an error when malformed.
fn guid(value: Option<&Value>, what: &str) -> Result<Option<Uuid>, Refusal> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => {
            let id = parse_guid(text).map_err(|_| {
                bad(format!(
                    "{what} `{}` is not a GUID",
                    text.chars().take(64).collect::<String>()
                ))
            })?;
            Ok((!id.is_nil()).then_some(id))
        }
        Some(other) => Err(bad(format!("{what} must be a GUID string, not {other}"))),
    }
}

/// Parses a request body into a notification.
pub fn parse(body: &[u8]) -> Result<Notification, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(bad("empty body"));
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(bad("body must be a JSON object"));
    }
    if value.get("MessageName").is_some() {
        webhook(value)
    } else {
        light_form(value)
    }
}

fn webhook(value: Value) -> Result<Notification, Refusal> {
    let context: RemoteExecutionContext = serde_json::from_value(value)
        .map_err(|e| bad(format!("not a RemoteExecutionContext: {e}")))?;
    let message = match context.message_name.as_str() {
        "Create" => Message::Create,
        "Update" => Message::Update,
        "Delete" => Message::Delete,
        other => {
            return Err(bad(format!(
                "message `{other}` is not handled (Create, Update, Delete)"
            )));
        }
    };
    let target = lookup(context.input_parameters.as_deref(), "Target");
    // PrimaryEntityId first; Create may also name the id in OutputParameters, and
    // Target carries it unless the payload was truncated over 256 KB.
    let id = match guid(context.primary_entity_id.as_ref(), "PrimaryEntityId")? {
        Some(id) => Some(id),
        None => match guid(
            lookup(context.output_parameters.as_deref(), "id"),
            "OutputParameters.id",
        )? {
            Some(id) => Some(id),
            None => guid(target.and_then(|t| t.get("Id")), "Target.Id")?,
        },
    };
    let id = id.ok_or_else(|| {
        bad("no record id: PrimaryEntityId, OutputParameters.id and Target.Id are all missing")
    })?;
    let user_id = context.user_id.as_deref().and_then(|u| parse_guid(u).ok());
    Ok(Notification {
        message,
        entity: context.primary_entity_name,
        ids: vec![id],
        user_id,
        correlation_id: context.correlation_id,
    })
}

fn light_form(value: Value) -> Result<Notification, Refusal> {
    let form: LightForm = serde_json::from_value(value).map_err(|e| {
        bad(format!(
            "expected a RemoteExecutionContext or {{\"entity\", \"ids\"}}: {e}"
        ))
    })?;
    let values: Vec<Value> = form
        .ids
        .unwrap_or_default()
        .into_iter()
        .chain(form.id)
        .collect();
    if values.is_empty() || values.len() > 100 {
        return Err(bad("`ids` must hold 1 to 100 record ids"));
    }
    let ids = values
        .iter()
        .map(|v| guid(Some(v), "id")?.ok_or_else(|| bad("an id is empty or all zeros")))
        .collect::<Result<_, _>>()?;
    Ok(Notification {
        message: Message::Saved,
        entity: form.entity,
        ids,
        user_id: None,
        correlation_id: None,
    })
}

/// The keys a caller may present: the current one and, during rotation, the next.
/// Compared in constant time over SHA-256 digests, so neither content nor length leaks.
#[derive(Debug, Clone)]
pub struct WebhookKeys(Vec<[u8; 32]>);

impl WebhookKeys {
    pub fn new(keys: &[Secret]) -> Self {
        Self(
            keys.iter()
                .map(|k| Sha256::digest(k.expose().as_bytes()).into())
                .collect(),
        )
    }

    pub fn accepts(&self, presented: &str) -> bool {
        if presented.is_empty() {
            return false;
        }
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Check every key, always, so timing does not tell which one matched.
        self.0
            .iter()
            .fold(false, |found, key| found | bool::from(key.ct_eq(&digest)))
    }
}

/// The key a request presents: `?code=` (WebhookKey) or the configured header.
/// A repeated `code` (joined with `,` by the function URL) presents nothing.
pub fn presented_key<'a>(code: Option<&'a str>, header: Option<&'a str>) -> Option<&'a str> {
    match code {
        Some(code) if !code.is_empty() && !code.contains(',') => Some(code),
        Some(_) => None,
        None => header.filter(|h| !h.is_empty()),
    }
}

/// Parses a WCF date (`/Date(1762875393000-0500)/`): milliseconds since the epoch,
/// UTC; the optional offset marks a local-kind value and does not shift the instant.
pub fn parse_wcf_date(text: &str) -> Option<OffsetDateTime> {
    let inner = text.strip_prefix("/Date(")?.strip_suffix(")/")?;
    // A leading `-` is the sign of the milliseconds, not an offset.
    let split = inner.get(1..)?.find(['+', '-']).map(|i| i + 1);
    let (millis, offset) = match split {
        Some(at) => inner.split_at(at),
        None => (inner, ""),
    };
    let offset_ok =
        offset.is_empty() || (offset.len() == 5 && offset[1..].bytes().all(|b| b.is_ascii_digit()));
    if !offset_ok {
        return None;
    }
    let millis: i64 = millis.parse().ok()?;
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/../tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn the_three_samples() {
        let update = parse(&fixture("dynamics-webhook-update.json")).unwrap();
        assert_eq!(
            (update.message, update.entity.as_str()),
            (Message::Update, "contact")
        );
        assert_eq!(
            update.ids[0].to_string(),
            "374cca32-b347-4e5a-8fa6-11098c82c9a5"
        );
        let create = parse(&fixture("dynamics-webhook-create.constructed.json")).unwrap();
        assert_eq!(create.message, Message::Create);
        let delete = parse(&fixture("dynamics-webhook-delete.constructed.json")).unwrap();
        assert_eq!(delete.message, Message::Delete);
    }

    #[test]
    fn id_falls_back_when_primary_id_is_missing() {
        let body = serde_json::json!({
            "MessageName": "Create", "PrimaryEntityName": "contact",
            "PrimaryEntityId": "00000000-0000-0000-0000-000000000000",
            "OutputParameters": [{"key": "id", "value": "f21bd6bb-c4c1-480a-96a2-f634bc21eb22"}]
        });
        assert_eq!(
            parse(body.to_string().as_bytes()).unwrap().ids[0].to_string(),
            "f21bd6bb-c4c1-480a-96a2-f634bc21eb22"
        );
        let none = serde_json::json!({"MessageName": "Update", "PrimaryEntityName": "contact"});
        assert_eq!(parse(none.to_string().as_bytes()).unwrap_err().status, 400);
    }

    #[test]
    fn bad_bodies_are_400() {
        for body in [
            "".to_owned(),
            "{not json".to_owned(),
            "[1,2]".to_owned(),
            r#"{"MessageName":"Assign","PrimaryEntityName":"contact","PrimaryEntityId":"f21bd6bb-c4c1-480a-96a2-f634bc21eb22"}"#.to_owned(),
            r#"{"MessageName":"Update","PrimaryEntityName":"contact","PrimaryEntityId":"abc"}"#.to_owned(),
            r#"{"MessageName":"Update","PrimaryEntityName":"contact","PrimaryEntityId":"f21bd6bb-c4c1-480a-96a2-f634bc21eb22)/x"}"#.to_owned(),
            r#"{"entity":"contact","ids":[]}"#.to_owned(),
        ] {
            assert_eq!(parse(body.as_bytes()).unwrap_err().status, 400, "{body}");
        }
        let light =
            parse(br#"{"entity":"account","ids":["f21bd6bb-c4c1-480a-96a2-f634bc21eb22"]}"#)
                .unwrap();
        assert_eq!((light.message, light.ids.len()), (Message::Saved, 1));
    }

    #[test]
    fn keys_compare_in_constant_time_and_rotate() {
        let keys = WebhookKeys::new(&[Secret::new("current"), Secret::new("next")]);
        assert!(keys.accepts("current") && keys.accepts("next"));
        assert!(!keys.accepts("") && !keys.accepts("curren") && !keys.accepts("current "));
        assert_eq!(presented_key(Some("a,b"), Some("header")), None);
        assert_eq!(presented_key(None, Some("header")), Some("header"));
        assert_eq!(presented_key(Some(""), None), None);
    }

    #[test]
    fn wcf_dates() {
        let utc = |t: &str| parse_wcf_date(t).map(|d| d.unix_timestamp());
        assert_eq!(utc("/Date(1762875391000)/"), Some(1_762_875_391));
        assert_eq!(utc("/Date(1762875393000-0500)/"), Some(1_762_875_393));
        assert_eq!(utc("/Date(1762875393000+0130)/"), Some(1_762_875_393));
        assert_eq!(utc("/Date(-86400000)/"), Some(-86_400));
        for garbage in ["", "/Date()/", "/Date(abc)/", "Date(1)", "/Date(1-05)/"] {
            assert_eq!(parse_wcf_date(garbage), None, "{garbage}");
        }
    }

    proptest! {
        #[test]
        fn any_body_is_ok_or_a_400_never_a_panic(body in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Err(refusal) = parse(&body) {
                prop_assert_eq!(refusal.status, 400);
            }
        }

        #[test]
        fn wcf_date_parsing_never_panics(text in ".{0,30}") {
            let _ = parse_wcf_date(&format!("/Date({text})/"));
            let _ = parse_wcf_date(&text);
        }

        #[test]
        fn any_json_object_is_ok_or_a_400(name in "[A-Za-z]{0,10}", id in ".{0,40}") {
            let body = serde_json::json!({"MessageName": name, "PrimaryEntityName": "contact", "PrimaryEntityId": id});
            if let Err(refusal) = parse(body.to_string().as_bytes()) {
                prop_assert_eq!(refusal.status, 400);
            }
        }
    }
}
