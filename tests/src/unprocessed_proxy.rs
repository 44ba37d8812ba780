//! A loopback proxy in front of moto_server that answers one DynamoDB batch
//! operation as DynamoDB does under throttling: nothing processed, every key or
//! item handed back as `UnprocessedKeys` / `UnprocessedItems`. Every other request
//! goes through to moto_server.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

struct Shared {
    aws: String,
    /// `BatchGetItem` or `BatchWriteItem`.
    operation: &'static str,
    http: reqwest::Client,
    refused: AtomicUsize,
}

pub struct UnprocessedProxy {
    url: String,
    shared: Arc<Shared>,
}

impl UnprocessedProxy {
    pub async fn start(aws: String, operation: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy on loopback");
        let url = format!("http://{}", listener.local_addr().expect("proxy address"));
        let shared = Arc::new(Shared {
            aws,
            operation,
            http: reqwest::Client::new(),
            refused: AtomicUsize::new(0),
        });
        let router = Router::new().fallback(answer).with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { url, shared }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Batch requests answered with everything unprocessed.
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

async fn answer(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if target.strip_prefix("DynamoDB_20120810.") == Some(shared.operation) {
        shared.refused.fetch_add(1, Ordering::SeqCst);
        let request: Value = serde_json::from_slice(&body).unwrap_or_default();
        let items = request.get("RequestItems").cloned().unwrap_or(json!({}));
        let body = if shared.operation == "BatchGetItem" {
            json!({"Responses": {}, "UnprocessedKeys": items})
        } else {
            json!({"UnprocessedItems": items})
        };
        return (
            StatusCode::OK,
            [("content-type", "application/x-amz-json-1.0")],
            body.to_string(),
        )
            .into_response();
    }
    let url = format!(
        "{}{}",
        shared.aws,
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut request = shared.http.request(method, url).body(body);
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            request = request.header(name, value);
        }
    }
    let Ok(answer) = request.send().await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let status = answer.status();
    let answer_headers = answer.headers().clone();
    let body = answer.bytes().await.unwrap_or_default();
    let mut response = (status, body).into_response();
    for (name, value) in &answer_headers {
        if name != "content-length" && name != "transfer-encoding" {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}
