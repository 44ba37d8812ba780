//! What can go wrong talking to Dataverse, and whether trying again later can help.

use std::time::Duration;

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
