//! `$batch`: many operations in one HTTP request (CRLF `multipart/mixed`).
//!
//! The outer `200 OK` proves nothing: every part carries its own status. A change
//! set is atomic (a failed part rolls back the whole set); operations outside a
//! change set run one by one and Dataverse stops at the first failure, so an
//! operation without a response part did not run.

use std::time::Instant;

use serde_json::Value;
use uuid::Uuid;

use super::client::DataverseClient;
use super::error::{DataverseError, parse_error_body};
use super::odata::EntitySet;

/// Dataverse's limit on operations in one batch.
pub const MAX_OPERATIONS: usize = 1000;

#[derive(Debug, Clone, PartialEq)]
pub struct BatchOperation {
    method: &'static str,
    /// Relative to the API base, built only from validated names and GUIDs.
    path: String,
    headers: Vec<(&'static str, &'static str)>,
    body: Option<Value>,
}

impl BatchOperation {
    pub fn create(set: &EntitySet, body: Value) -> Self {
        Self {
            method: "POST",
            path: set.to_string(),
            headers: vec![],
            body: Some(body),
        }
    }
    pub fn upsert(set: &EntitySet, id: Uuid, body: Value) -> Self {
        Self {
            method: "PATCH",
            path: format!("{set}({id})"),
            headers: vec![],
            body: Some(body),
        }
    }
    pub fn update(set: &EntitySet, id: Uuid, body: Value) -> Self {
        Self {
            method: "PATCH",
            path: format!("{set}({id})"),
            headers: vec![("If-Match", "*")],
            body: Some(body),
        }
    }
    pub fn delete(set: &EntitySet, id: Uuid) -> Self {
        Self {
            method: "DELETE",
            path: format!("{set}({id})"),
            headers: vec![],
            body: None,
        }
    }
}

/// One part of a batch answer.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchResponse {
    pub status: u16,
    pub content_id: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl BatchResponse {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The part's failure as the error a single request would have given.
    pub fn error(&self) -> Option<DataverseError> {
        if self.is_success() {
            return None;
        }
        let (code, message) = parse_error_body(&self.body);
        Some(match self.status {
            429 => DataverseError::Throttled { retry_after: None },
            status @ (500 | 502..=504) => DataverseError::Unavailable {
                status,
                attempts: 1,
            },
            status => DataverseError::Rejected {
                status,
                code,
                message,
            },
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

impl DataverseClient {
    /// Runs operations in batches of at most 1,000. With `atomic`, each batch is
    /// one change set: all of it applies or none. Returns one response per
    /// operation that ran, in order.
    pub async fn batch(
        &self,
        operations: &[BatchOperation],
        atomic: bool,
        deadline: Instant,
    ) -> Result<Vec<BatchResponse>, DataverseError> {
        let mut responses = Vec::with_capacity(operations.len());
        for chunk in operations.chunks(MAX_OPERATIONS) {
            let (content_type, body) = encode(self.api_base().as_str(), chunk, atomic);
            let (answer_type, answer) = self
                .send_batch(content_type, body.into_bytes(), deadline)
                .await?;
            responses.extend(decode(&answer_type, &answer)?);
        }
        Ok(responses)
    }
}

/// Builds the request body and its `Content-Type`.
pub fn encode(api_base: &str, operations: &[BatchOperation], atomic: bool) -> (String, String) {
    let batch = format!("batch_{}", Uuid::new_v4());
    let mut out = String::new();
    let write_operation =
        |out: &mut String, operation: &BatchOperation, content_id: Option<usize>| {
            out.push_str("Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n");
            if let Some(id) = content_id {
                out.push_str(&format!("Content-ID: {id}\r\n"));
            }
            out.push_str(&format!(
                "\r\n{} {api_base}{} HTTP/1.1\r\n",
                operation.method, operation.path
            ));
            for (name, value) in &operation.headers {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
            match &operation.body {
                Some(body) => out.push_str(&format!(
                    "Content-Type: application/json;type=entry\r\n\r\n{body}\r\n"
                )),
                None => out.push_str("\r\n"),
            }
        };
    if atomic {
        let changeset = format!("changeset_{}", Uuid::new_v4());
        out.push_str(&format!(
            "--{batch}\r\nContent-Type: multipart/mixed;boundary={changeset}\r\n\r\n"
        ));
        for (index, operation) in operations.iter().enumerate() {
            out.push_str(&format!("--{changeset}\r\n"));
            write_operation(&mut out, operation, Some(index + 1));
        }
        out.push_str(&format!("--{changeset}--\r\n"));
    } else {
        for operation in operations {
            out.push_str(&format!("--{batch}\r\n"));
            write_operation(&mut out, operation, None);
        }
    }
    out.push_str(&format!("--{batch}--\r\n"));
    (format!("multipart/mixed;boundary={batch}"), out)
}

/// Parses a `multipart/mixed` batch answer, change sets included, into its parts.
pub fn decode(content_type: &str, body: &str) -> Result<Vec<BatchResponse>, DataverseError> {
    let boundary = boundary_of(content_type).ok_or_else(|| {
        DataverseError::Protocol(format!("batch answer has no boundary in `{content_type}`"))
    })?;
    let mut responses = Vec::new();
    let delimiter = format!("--{boundary}");
    for segment in body.split(delimiter.as_str()).skip(1) {
        if segment.starts_with("--") {
            break;
        }
        let (headers, content) = split_head(segment.trim_start_matches(['\r', '\n']));
        let headers = parse_headers(headers);
        let part_type = find(&headers, "Content-Type").unwrap_or_default();
        if part_type
            .to_ascii_lowercase()
            .starts_with("multipart/mixed")
        {
            responses.extend(decode(part_type, content)?);
            continue;
        }
        let (head, payload) = split_head(content);
        let mut lines = head.lines();
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| {
                DataverseError::Protocol(format!("batch part has no status line: `{status_line}`"))
            })?;
        responses.push(BatchResponse {
            status,
            content_id: find(&headers, "Content-ID").map(str::to_owned),
            headers: parse_headers(&lines.collect::<Vec<_>>().join("\n")),
            body: payload.trim_end_matches(['\r', '\n']).to_owned(),
        });
    }
    Ok(responses)
}

fn boundary_of(content_type: &str) -> Option<&str> {
    content_type.split(';').find_map(|param| {
        let (key, value) = param.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"'))
    })
}

/// Splits at the first blank line (CRLF or bare LF).
fn split_head(text: &str) -> (&str, &str) {
    match (text.find("\r\n\r\n"), text.find("\n\n")) {
        (Some(crlf), Some(lf)) if lf < crlf => (&text[..lf], &text[lf + 2..]),
        (Some(crlf), _) => (&text[..crlf], &text[crlf + 4..]),
        (None, Some(lf)) => (&text[..lf], &text[lf + 2..]),
        (None, None) => (text, ""),
    }
}

fn parse_headers(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SAMPLE: &str = include_str!("../../tests/fixtures/dataverse-batch-response.txt");

    #[test]
    fn decodes_the_documented_sample() {
        let sample = if SAMPLE.contains("\r\n") {
            SAMPLE.to_owned()
        } else {
            SAMPLE.replace('\n', "\r\n")
        };
        let parts = decode(
            "multipart/mixed; boundary=batchresponse_b3148385-0d85-4e9d-8506-8f288751c23e",
            &sample,
        )
        .unwrap();
        let statuses: Vec<u16> = parts.iter().map(|p| p.status).collect();
        assert_eq!(statuses, [204, 204, 200]);
        assert_eq!(parts[1].content_id.as_deref(), Some("2"));
        assert_eq!(
            parts[0].header("OData-EntityId"),
            Some(
                "https://contoso-demo.crm.dynamics.com/api/data/v9.2/tasks(620e05c0-6dd3-4103-ab72-b4583b67d810)"
            )
        );
        assert!(parts[2].body.starts_with('{'));
    }

    #[test]
    fn encodes_crlf_change_sets() {
        let set = EntitySet::new("phonecalls").unwrap();
        let id = Uuid::nil();
        let (content_type, body) = encode(
            "https://org/api/data/v9.2/",
            &[
                BatchOperation::update(&set, id, json!({"subject": "x"})),
                BatchOperation::delete(&set, id),
            ],
            true,
        );
        let boundary = boundary_of(&content_type).unwrap();
        assert!(body.starts_with(&format!("--{boundary}\r\n")));
        assert!(body.ends_with(&format!("--{boundary}--\r\n")));
        assert!(body.contains("Content-ID: 2\r\n"));
        assert!(body.contains(&format!(
            "PATCH https://org/api/data/v9.2/phonecalls({id}) HTTP/1.1\r\nIf-Match: *\r\n"
        )));
        assert!(!body.replace("\r\n", "").contains('\n'));
    }
}
