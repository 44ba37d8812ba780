//! `$batch`: CRLF `multipart/mixed` requests, change sets that roll back as a
//! whole, `Content-ID` references, and an outer `200 OK` with one status per part.

use uuid::Uuid;

use crate::api::{self, ApiRequest, ApiResponse};
use crate::store::Store;

pub const MAX_OPERATIONS: usize = 1000;

struct Operation {
    request: ApiRequest,
    content_id: Option<String>,
}

enum Part {
    Single(Operation),
    ChangeSet(Vec<Operation>),
}

fn boundary_of(content_type: &str) -> Option<String> {
    content_type.split(';').find_map(|param| {
        let (key, value) = param.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_owned())
    })
}

fn split_head(text: &str) -> (&str, &str) {
    match text.find("\r\n\r\n") {
        Some(at) => (&text[..at], &text[at + 4..]),
        None => match text.find("\n\n") {
            Some(at) => (&text[..at], &text[at + 2..]),
            None => (text, ""),
        },
    }
}

fn headers_of(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn parse_parts(content_type: &str, body: &str, api_root: &str) -> Result<Vec<Part>, String> {
    let boundary = boundary_of(content_type).ok_or("missing multipart boundary")?;
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    for segment in body.split(delimiter.as_str()).skip(1) {
        if segment.starts_with("--") {
            break;
        }
        let (head, content) = split_head(segment.trim_start_matches(['\r', '\n']));
        let headers = headers_of(head);
        let part_type = find(&headers, "Content-Type").unwrap_or_default();
        if part_type
            .to_ascii_lowercase()
            .starts_with("multipart/mixed")
        {
            let inner = parse_parts(part_type, content, api_root)?;
            let operations = inner
                .into_iter()
                .map(|p| match p {
                    Part::Single(op) => Ok(op),
                    Part::ChangeSet(_) => Err("change sets cannot be nested".to_owned()),
                })
                .collect::<Result<Vec<_>, _>>()?;
            parts.push(Part::ChangeSet(operations));
        } else {
            let (request_head, request_body) = split_head(content);
            let mut lines = request_head.lines();
            let request_line = lines.next().unwrap_or_default();
            let mut words = request_line.split_whitespace();
            let (Some(method), Some(target)) = (words.next(), words.next()) else {
                return Err(format!("bad request line `{request_line}`"));
            };
            let relative = target
                .split_once(api_root)
                .map_or(target, |(_, rest)| rest)
                .trim_start_matches('/');
            let (path, query) = relative.split_once('?').unwrap_or((relative, ""));
            parts.push(Part::Single(Operation {
                request: ApiRequest {
                    method: method.to_owned(),
                    path: percent_encoding::percent_decode_str(path)
                        .decode_utf8_lossy()
                        .into_owned(),
                    query: query.to_owned(),
                    headers: headers_of(&lines.collect::<Vec<_>>().join("\n")),
                    body: request_body
                        .trim_end_matches(['\r', '\n'])
                        .as_bytes()
                        .to_vec(),
                },
                content_id: find(&headers, "Content-ID").map(str::to_owned),
            }));
        }
    }
    Ok(parts)
}

fn write_response(
    out: &mut String,
    boundary: &str,
    response: &ApiResponse,
    content_id: Option<&str>,
) {
    out.push_str(&format!(
        "--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
    ));
    if let Some(id) = content_id {
        out.push_str(&format!("Content-ID: {id}\r\n"));
    }
    let reason = match response.status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        412 => "Precondition Failed",
        _ => "Error",
    };
    out.push_str(&format!(
        "\r\nHTTP/1.1 {} {reason}\r\nOData-Version: 4.0\r\n",
        response.status
    ));
    for (name, value) in &response.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    match &response.body {
        Some(body) => out.push_str(&format!(
            "Content-Type: application/json; odata.metadata=minimal\r\n\r\n{body}\r\n"
        )),
        None => out.push_str("\r\n"),
    }
}

/// Runs a batch; returns (status, content type, body).
pub fn handle(
    store: &mut Store,
    base: &str,
    api_root: &str,
    content_type: &str,
    body: &str,
) -> (u16, String, String) {
    let parts = match parse_parts(content_type, body, api_root) {
        Ok(parts) => parts,
        Err(message) => return bad(&message),
    };
    let count: usize = parts
        .iter()
        .map(|p| match p {
            Part::Single(_) => 1,
            Part::ChangeSet(ops) => ops.len(),
        })
        .sum();
    if count > MAX_OPERATIONS {
        return bad(&format!(
            "The number of requests in a batch ({count}) exceeds the limit of {MAX_OPERATIONS}."
        ));
    }
    let boundary = format!("batchresponse_{}", Uuid::new_v4());
    let mut out = String::new();
    'parts: for part in parts {
        match part {
            Part::Single(operation) => {
                let response = api::handle(store, base, &operation.request);
                let failed = response.status >= 400;
                write_response(&mut out, &boundary, &response, None);
                if failed {
                    break 'parts;
                }
            }
            Part::ChangeSet(operations) => {
                let snapshot = store.clone();
                let mut references: Vec<(String, String)> = Vec::new();
                let mut responses = Vec::new();
                for mut operation in operations {
                    if operation.request.method == "GET" {
                        *store = snapshot;
                        write_response(
                            &mut out,
                            &boundary,
                            &api::error(
                                400,
                                "0x80060888",
                                "GET is not allowed inside a change set.",
                            ),
                            None,
                        );
                        break 'parts;
                    }
                    if let Some(reference) = operation.request.path.strip_prefix('$') {
                        let (id, rest) = reference.split_once('/').unwrap_or((reference, ""));
                        let Some((_, url)) = references.iter().find(|(cid, _)| cid == id) else {
                            *store = snapshot;
                            let message = format!(
                                "Content-ID Reference: '${id}' does not exist in the batch context."
                            );
                            write_response(
                                &mut out,
                                &boundary,
                                &api::error(400, "0x80060888", message),
                                None,
                            );
                            break 'parts;
                        };
                        let path = url.strip_prefix(base).unwrap_or(url);
                        operation.request.path = if rest.is_empty() {
                            path.to_owned()
                        } else {
                            format!("{path}/{rest}")
                        };
                    }
                    let response = api::handle(store, base, &operation.request);
                    if response.status >= 400 {
                        // The whole change set rolls back; only the failure is reported.
                        *store = snapshot;
                        write_response(
                            &mut out,
                            &boundary,
                            &response,
                            operation.content_id.as_deref(),
                        );
                        break 'parts;
                    }
                    if let (Some(cid), Some((_, url))) = (
                        operation.content_id.clone(),
                        response.headers.iter().find(|(k, _)| k == "OData-EntityId"),
                    ) {
                        references.push((cid, url.clone()));
                    }
                    responses.push((response, operation.content_id));
                }
                let changeset = format!("changesetresponse_{}", Uuid::new_v4());
                out.push_str(&format!(
                    "--{boundary}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"
                ));
                for (response, content_id) in &responses {
                    write_response(&mut out, &changeset, response, content_id.as_deref());
                }
                out.push_str(&format!("--{changeset}--\r\n"));
            }
        }
    }
    out.push_str(&format!("--{boundary}--\r\n"));
    (200, format!("multipart/mixed; boundary={boundary}"), out)
}

fn bad(message: &str) -> (u16, String, String) {
    let body = serde_json::json!({"error": {"code": "0x80060888", "message": message}});
    (400, "application/json".into(), body.to_string())
}
