//! A stand-in for the Lambda Runtime API on loopback, so a function's release
//! binary runs exactly as Lambda runs it (`AWS_LAMBDA_RUNTIME_API`): it polls
//! `invocation/next`, handles the event, posts the response or the error.
//! One stand-in serves one process; it notes when that process first asked for work.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// What the function answered: its response, or its error document.
pub type Answer = Result<Value, Value>;

struct Shared {
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<(String, Value, Duration)>>,
    waiting: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    first_poll: OnceLock<Instant>,
    init_error: Mutex<Option<String>>,
}

pub struct RuntimeApi {
    address: String,
    shared: Arc<Shared>,
    queue: mpsc::UnboundedSender<(String, Value, Duration)>,
}

impl RuntimeApi {
    pub async fn start() -> Self {
        let (queue, events) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            events: tokio::sync::Mutex::new(events),
            waiting: Mutex::new(HashMap::new()),
            first_poll: OnceLock::new(),
            init_error: Mutex::new(None),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Runtime API stand-in on loopback");
        let address = listener
            .local_addr()
            .expect("Runtime API address")
            .to_string();
        let router = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self {
            address,
            shared,
            queue,
        }
    }

    /// `host:port`, the value of `AWS_LAMBDA_RUNTIME_API`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// When the process first asked for an event.
    pub fn first_poll(&self) -> Option<Instant> {
        self.shared.first_poll.get().copied()
    }

    /// What the process reported before it could take events, if it failed to start.
    pub fn init_error(&self) -> Option<String> {
        self.shared
            .init_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Hands one event to the process and waits for its answer (`None`: no answer in `timeout`).
    pub async fn invoke(&self, payload: Value, timeout: Duration) -> Option<Answer> {
        let id = uuid::Uuid::new_v4().to_string();
        let (sender, receiver) = oneshot::channel();
        self.shared
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), sender);
        self.queue.send((id, payload, timeout)).ok()?;
        tokio::time::timeout(timeout, receiver).await.ok()?.ok()
    }
}

async fn next(State(shared): State<Arc<Shared>>) -> Response {
    let _ = shared.first_poll.set(Instant::now());
    let Some((id, payload, timeout)) = shared.events.lock().await.recv().await else {
        return StatusCode::GONE.into_response();
    };
    let deadline_ms = (SystemTime::now() + timeout)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut headers = HeaderMap::new();
    let header = |value: String| HeaderValue::from_str(&value).expect("an ASCII header value");
    headers.insert("lambda-runtime-aws-request-id", header(id));
    headers.insert(
        "lambda-runtime-deadline-ms",
        header(deadline_ms.to_string()),
    );
    headers.insert(
        "lambda-runtime-invoked-function-arn",
        header("arn:aws:lambda:us-east-1:123456789012:function:bench".into()),
    );
    headers.insert(
        "lambda-runtime-trace-id",
        header("Root=1-00000000-000000000000000000000000;Sampled=0".into()),
    );
    (headers, axum::Json(payload)).into_response()
}

async fn response(state: State<Arc<Shared>>, id: Path<String>, body: Bytes) -> StatusCode {
    answer(state, id, body, true)
}

async fn error(state: State<Arc<Shared>>, id: Path<String>, body: Bytes) -> StatusCode {
    answer(state, id, body, false)
}

fn answer(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
    ok: bool,
) -> StatusCode {
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    let waiter = shared
        .waiting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    if let Some(waiter) = waiter {
        let _ = waiter.send(if ok { Ok(value) } else { Err(value) });
    }
    StatusCode::ACCEPTED
}

async fn init_error(State(shared): State<Arc<Shared>>, body: Bytes) -> StatusCode {
    *shared.init_error.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(String::from_utf8_lossy(&body).into_owned());
    StatusCode::ACCEPTED
}
