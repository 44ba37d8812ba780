//! What can go wrong talking to Dataverse, and whether trying again later can help.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::auth::TokenError;

#[derive(Debug, thiserror::Error)]
pub enum DataverseError {
    /// A 4xx (other than 401/429) or 501: the request itself is wrong. `code` is
    /// Dataverse's `error.code` (often empty), `message` its text.
    #[error("Dataverse refused the request: {status} {code} {message}")]
    Rejected {
        status: u16,
        code: String,
        message: String,
    },
    /// 401 even with a freshly issued token: the app user or its role is missing.
    #[error(
        "Dataverse refused the credentials (401) even with a fresh token: is the application user set up?"
    )]
    Unauthorized,
    /// 429 (service protection limits) and no time left to wait for `Retry-After`.
    #[error("Dataverse is throttling (429); retry after {retry_after:?}")]
    Throttled { retry_after: Option<Duration> },
    /// 5xx after every retry the deadline allowed.
    #[error("Dataverse is unavailable ({status}) after {attempts} attempts")]
    Unavailable { status: u16, attempts: u32 },
    /// Timeout or connection failure after every retry the deadline allowed.
    #[error("Dataverse could not be reached after {attempts} attempts: {message}")]
    Network { message: String, attempts: u32 },
    /// The caller's deadline passed before a request could be sent.
    #[error("no time left before the deadline to call Dataverse")]
    DeadlineExceeded,
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The change-tracking token is expired or invalid: a full read is needed.
    #[error(
        "the change-tracking delta link is no longer valid ({status} {code}); a full reconciliation is needed"
    )]
    DeltaExpired { status: u16, code: String },
    /// An answer that breaks the documented protocol (missing header, bad JSON, foreign link).
    #[error("unexpected answer from Dataverse: {0}")]
    Protocol(String),
}

impl DataverseError {
    /// Whether the same request can succeed later (redeliver the event) or never
    /// will (dead-letter it with this error as the reason).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Throttled { .. }
            | Self::Unavailable { .. }
            | Self::Network { .. }
            | Self::DeadlineExceeded
            // Credentials being rotated or an application user being set up: retried
            // within the retry window, then dead-lettered with what to fix.
            | Self::Unauthorized => true,
            Self::Token(error) => error.is_transient(),
            Self::Rejected { .. }
            | Self::DeltaExpired { .. }
            | Self::Protocol(_) => false,
        }
    }

    /// 404: the record does not exist (never retried).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Rejected { status: 404, .. })
    }

    /// Dataverse's error code (`0x80072322`), where it sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Rejected { code, .. } | Self::DeltaExpired { code, .. } if !code.is_empty() => {
                Some(code)
            }
            _ => None,
        }
    }
}

/// Phrases of the 400s that refuse a write because of one column: an unknown
/// column (two shapes), a bind key that is no navigation property, text over the
/// column's length (`0x80044331`), an option-set value that does not exist
/// (`0x8004431a`), and a value of the wrong type (names only the literal).
const COLUMN_REFUSALS: [&str; 6] = [
    "does not exist on type",
    "was found in entity",
    "which only has property annotations",
    "exceeded the maximum allowed length",
    "is outside the valid range",
    TYPE_MISMATCH,
];
const TYPE_MISMATCH: &str = "Cannot convert the literal";

impl DataverseError {
    /// The column of `sent` (the written body) a 400 refused the write because of,
    /// when Dataverse's answer is a column refusal naming exactly one of them: by
    /// its quoted name or, for a type mismatch, by its value's quoted literal.
    /// `None` for every other answer, which stays a refusal of the whole write.
    pub fn refused_column<'a>(&self, sent: &'a Map<String, Value>) -> Option<&'a str> {
        let Self::Rejected {
            status: 400,
            message,
            ..
        } = self
        else {
            return None;
        };
        if !COLUMN_REFUSALS
            .iter()
            .any(|phrase| message.contains(phrase))
        {
            return None;
        }
        // 'a' 'b' 'c': the quoted parts are every other piece between quotes.
        let quoted: Vec<&str> = message.split('\'').skip(1).step_by(2).collect();
        let by_literal = message.contains(TYPE_MISMATCH);
        let mut named = sent.iter().filter(|(key, value)| {
            let column = key.strip_suffix("@odata.bind").unwrap_or(key);
            quoted.contains(&column)
                || (by_literal
                    && quoted.contains(
                        &match value {
                            Value::String(text) => text.clone(),
                            other => other.to_string(),
                        }
                        .as_str(),
                    ))
        });
        match (named.next(), named.next()) {
            (Some((column, _)), None) => Some(column.as_str()),
            _ => None,
        }
    }
}

/// Reads `{"error":{"code":…,"message":…}}` leniently: the body may be empty,
/// not JSON, or carry extra fields (`innererror`).
pub(crate) fn parse_error_body(body: &str) -> (String, String) {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let text = |key: &str| {
        error
            .and_then(|e| e.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let message = text("message");
    let message = if message.is_empty() {
        body.chars().take(300).collect()
    } else {
        message
    };
    (text("code"), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(code: &str, message: &str) -> DataverseError {
        DataverseError::Rejected {
            status: 400,
            code: code.into(),
            message: message.into(),
        }
    }

    #[test]
    fn column_refusals_name_the_column_they_are_about() {
        let sent = serde_json::json!({
            "subject": "Inbound call",
            "new_mood": "calm",
            "prioritycode": 7,
            "actualdurationminutes": "twelve",
            "regardingobjectid_contact_phonecall@odata.bind": "/contacts(00000000-0000-0000-0000-000000000001)",
        });
        let sent = sent.as_object().unwrap();
        let cases = [
            (
                "0x80060888",
                "The property 'new_mood' does not exist on type 'Microsoft.Dynamics.CRM.phonecall'. Make sure to only use property names that are defined by the type or mark the type as open type.",
                Some("new_mood"),
            ),
            (
                "0x80060888",
                "Invalid property 'new_mood' was found in entity 'Microsoft.Dynamics.CRM.phonecall'.",
                Some("new_mood"),
            ),
            (
                "0x80044331",
                "A validation error occurred. The length of the 'subject' attribute of the 'phonecall' entity exceeded the maximum allowed length of '5'.",
                Some("subject"),
            ),
            (
                "0x8004431a",
                "A validation error occurred. The value 7 of 'prioritycode' on record of type 'phonecall' is outside the valid range. Accepted Values: 0,1,2",
                Some("prioritycode"),
            ),
            (
                "0x0",
                "Cannot convert the literal 'twelve' to the expected type 'Edm.Int32'.",
                Some("actualdurationminutes"),
            ),
            (
                "",
                "An undeclared property 'regardingobjectid_contact_phonecall' which only has property annotations in the payload but no property value was found in the payload.",
                Some("regardingobjectid_contact_phonecall@odata.bind"),
            ),
            // Not about a column: the whole write stays refused.
            (
                "0x80040203",
                "statecode cannot be set when a phonecall is created.",
                None,
            ),
            ("", "Something 'subject' went wrong", None),
            // A column that was not sent is not the one refused.
            (
                "0x80060888",
                "The property 'new_other' does not exist on type 'Microsoft.Dynamics.CRM.phonecall'.",
                None,
            ),
        ];
        for (code, message, expected) in cases {
            assert_eq!(
                rejected(code, message).refused_column(sent),
                expected,
                "{message}"
            );
        }
        let not_found = DataverseError::Rejected {
            status: 404,
            code: "0x80040217".into(),
            message: "The property 'subject' does not exist on type".into(),
        };
        assert_eq!(
            not_found.refused_column(sent),
            None,
            "only a 400 is about a column"
        );
    }

    #[test]
    fn a_literal_two_columns_share_names_neither() {
        let sent = serde_json::json!({"new_a": "x", "new_b": "x"});
        let error = rejected(
            "0x0",
            "Cannot convert the literal 'x' to the expected type 'Edm.Int32'.",
        );
        assert_eq!(error.refused_column(sent.as_object().unwrap()), None);
    }

    #[test]
    fn error_bodies_are_read_leniently() {
        assert_eq!(
            parse_error_body(
                r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded"}}"#
            ),
            ("0x80072322".into(), "Number of requests exceeded".into())
        );
        assert_eq!(parse_error_body(""), (String::new(), String::new()));
        assert_eq!(
            parse_error_body("<html>bad gateway</html>"),
            (String::new(), "<html>bad gateway</html>".into())
        );
    }

    #[test]
    fn transience() {
        assert!(DataverseError::Throttled { retry_after: None }.is_transient());
        assert!(
            DataverseError::Unavailable {
                status: 503,
                attempts: 3
            }
            .is_transient()
        );
        assert!(
            !DataverseError::Rejected {
                status: 400,
                code: String::new(),
                message: String::new()
            }
            .is_transient()
        );
        assert!(DataverseError::Unauthorized.is_transient());
    }
}
