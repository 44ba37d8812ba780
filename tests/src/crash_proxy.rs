//! A loopback HTTP proxy in front of the Dataverse emulator and moto_server that
//! stops a function at a chosen request boundary: the k-th request reaches its
//! service (its effect happens there) and its answer never comes back, as when
//! the process is killed right after sending it. Every request is numbered and
//! labelled, so a test can crash at each boundary of a lifecycle in turn.
//!
//! It can also answer one DynamoDB batch operation as DynamoDB does under
//! throttling: nothing processed, every key or item handed back as
//! `UnprocessedKeys` / `UnprocessedItems`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;

struct Shared {
    url: String,
    dynamics: String,
    aws: String,
    http: reqwest::Client,
    crash_after: Option<usize>,
    seen: AtomicUsize,
    crashed: Notify,
    labels: Mutex<Vec<String>>,
    /// `BatchGetItem` or `BatchWriteItem` answered with everything unprocessed.
    unprocessed: Option<&'static str>,
    unprocessed_answers: AtomicUsize,
}

pub struct CrashProxy {
    url: String,
    shared: Arc<Shared>,
}

impl CrashProxy {
    /// Forwards Dynamics, Entra and Amazon Connect paths to `dynamics`, the rest to
    /// `aws`; holds the answer to request number `crash_after` (1-based) forever.
    pub async fn start(dynamics: String, aws: String, crash_after: Option<usize>) -> Self {
        Self::launch(dynamics, aws, crash_after, None).await
    }

    /// In front of moto_server: `operation` (`BatchGetItem`, `BatchWriteItem`) is
    /// answered with nothing processed; everything else goes through.
    pub async fn leaving_unprocessed(aws: String, operation: &'static str) -> Self {
        Self::launch(String::new(), aws, None, Some(operation)).await
    }

    async fn launch(
        dynamics: String,
        aws: String,
        crash_after: Option<usize>,
        unprocessed: Option<&'static str>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy on loopback");
        let url = format!("http://{}", listener.local_addr().expect("proxy address"));
        let shared = Arc::new(Shared {
            url: url.clone(),
            dynamics,
            aws,
            http: reqwest::Client::new(),
            crash_after,
            seen: AtomicUsize::new(0),
            crashed: Notify::new(),
            labels: Mutex::new(Vec::new()),
            unprocessed,
            unprocessed_answers: AtomicUsize::new(0),
        });
        let router = Router::new().fallback(forward).with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { url, shared }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Batch requests answered with everything unprocessed.
    pub fn unprocessed_answers(&self) -> usize {
        self.shared.unprocessed_answers.load(Ordering::SeqCst)
    }

    /// Requests seen so far.
    pub fn requests(&self) -> usize {
        self.shared.seen.load(Ordering::SeqCst)
    }

    /// What each request was (`dynamodb UpdateItem`, `PATCH /api/data/v9.2/phonecalls(…)`), in order.
    pub fn labels(&self) -> Vec<String> {
        self.shared
            .labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resolves once the crash request has had its effect.
    pub async fn crashed(&self) {
        self.shared.crashed.notified().await;
    }
}

fn label(method: &Method, uri: &Uri, headers: &HeaderMap) -> String {
    match headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        Some(target) => match target.split_once('.') {
            Some((service, operation)) if service.starts_with("DynamoDB") => {
                format!("dynamodb {operation}")
            }
            Some((_, operation)) => format!("sqs {operation}"),
            None => target.to_owned(),
        },
        None => {
            let path = uri.path();
            let path = path.split('(').next().unwrap_or(path);
            format!("{method} {path}")
        }
    }
}

async fn forward(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let number = shared.seen.fetch_add(1, Ordering::SeqCst) + 1;
    let label = label(&method, &uri, &headers);
    shared
        .labels
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(label);
    if let Some(answer) = unprocessed_answer(&shared, &headers, &body) {
        return answer;
    }
    let path = uri.path();
    let to_dynamics =
        path.starts_with("/api/data/") || path.contains("/oauth2/") || path.starts_with("/users/");
    let base = if to_dynamics {
        &shared.dynamics
    } else {
        &shared.aws
    };
    let target = format!("{base}{}", uri.path_and_query().map_or("/", |p| p.as_str()));
    // The token's scope names the organisation, which is the emulator behind us.
    let body = if path.contains("/oauth2/") {
        let encode = |url: &str| url.replace(':', "%3A").replace('/', "%2F");
        String::from_utf8_lossy(&body)
            .replace(&encode(&shared.url), &encode(&shared.dynamics))
            .replace(&shared.url, &shared.dynamics)
            .into()
    } else {
        body
    };
    let mut request = shared.http.request(method, target).body(body);
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            request = request.header(name, value);
        }
    }
    if shared.crash_after == Some(number) {
        // The effect happens whatever the caller does meanwhile (a caller that gives
        // up would otherwise cancel this handler before the crash is told); the
        // process that asked is gone before it hears of it.
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Ok(answer) = request.send().await {
                let _ = answer.bytes().await;
            }
            shared.crashed.notify_one();
        });
        return std::future::pending().await;
    }
    let answer = match request.send().await {
        Ok(answer) => answer,
        Err(error) => return (StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    };
    let status = answer.status();
    let answer_headers = answer.headers().clone();
    let body = answer.bytes().await.unwrap_or_default();
    // Like any reverse proxy, links the organisation sends back (`@odata.nextLink`,
    // `@odata.deltaLink`, `OData-EntityId`) are rewritten to point through us.
    let body = if to_dynamics {
        String::from_utf8_lossy(&body)
            .replace(&shared.dynamics, &shared.url)
            .into()
    } else {
        body
    };
    let mut response = (status, body).into_response();
    for (name, value) in &answer_headers {
        if name != "content-length" && name != "transfer-encoding" {
            let rewritten = value
                .to_str()
                .ok()
                .filter(|text| to_dynamics && text.contains(&shared.dynamics))
                .and_then(|text| {
                    HeaderValue::from_str(&text.replace(&shared.dynamics, &shared.url)).ok()
                });
            let value = rewritten.unwrap_or_else(|| value.clone());
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// The answer DynamoDB gives a batch it processed none of, for the chosen operation.
fn unprocessed_answer(shared: &Shared, headers: &HeaderMap, body: &Bytes) -> Option<Response> {
    let operation = shared.unprocessed?;
    let target = headers.get("x-amz-target")?.to_str().ok()?;
    if target.strip_prefix("DynamoDB_20120810.") != Some(operation) {
        return None;
    }
    shared.unprocessed_answers.fetch_add(1, Ordering::SeqCst);
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let items = request["RequestItems"].clone();
    let answer = if operation == "BatchGetItem" {
        serde_json::json!({"Responses": {}, "UnprocessedKeys": items})
    } else {
        serde_json::json!({"UnprocessedItems": items})
    };
    Some(
        (
            StatusCode::OK,
            [("content-type", "application/x-amz-json-1.0")],
            answer.to_string(),
        )
            .into_response(),
    )
}
