//! A Dataverse Web API and Entra ID token endpoint on loopback, for tests and
//! local runs: written from the public Web API documentation, with fault
//! injection (429 + `Retry-After`, 5xx, latency) and a request log to assert on.
//!
//! Beside it, Amazon Connect's `DescribeUser` (`GET /users/{instance}/{user}`), so
//! the agent lookup runs through the real AWS SDK client too.
//!
//! Start it in-process with [`Emulator::start`], or as the `dataverse-emulator` binary.

mod api;
mod batch;
mod filter;
mod store;

pub use store::Kind;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde_json::{Value, json};
use uuid::Uuid;

pub use store::now_text;

pub const API_PATH: &str = "/api/data/v9.2/";

/// Who may get a token, and how tokens behave.
#[derive(Debug, Clone)]
pub struct EmulatorOptions {
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: String,
    /// Accept certificate client assertions signed by this key, naming this `x5t`.
    pub certificate: Option<TrustedCertificate>,
    /// Token lifetimes in seconds, drawn at random like Entra ID's 60-90 minutes.
    pub token_lifetime_secs: RangeInclusive<u64>,
    /// How long the token endpoint takes to answer.
    pub token_latency: Duration,
    /// Seed for fault injection, so a failing run can be replayed.
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct TrustedCertificate {
    pub public_key_pem: String,
    /// base64url of the SHA-1 thumbprint, as the assertion's `x5t` header carries it.
    pub x5t: String,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        Self {
            tenant_id: "9048f85d-df6b-44fd-8a90-90338af57872".into(),
            client_id: "2f3c1a4e-7b8d-4e5f-9a6b-1c2d3e4f5a6b".into(),
            client_secret: "emulator-client-secret".into(),
            certificate: None,
            token_lifetime_secs: 3600..=5400,
            token_latency: Duration::ZERO,
            seed: 7,
        }
    }
}

/// Faults injected into Web API requests (never into the token endpoint).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Share of requests answered 429 with `Retry-After`.
    pub throttle_ratio: f64,
    pub retry_after_secs: u64,
    /// Share of requests answered 503.
    pub unavailable_ratio: f64,
    /// Added to every request.
    pub latency: Duration,
    /// Faults for the next requests, in order, before any ratio applies.
    pub queue: VecDeque<Fault>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    Throttle { retry_after_secs: u64 },
    Status(u16),
    Delay(Duration),
}

/// One request as the emulator received it.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub method: String,
    /// Path and query as sent (still percent-encoded).
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub status: u16,
    pub received: Instant,
}

impl LoggedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Shared {
    options: EmulatorOptions,
    org_url: String,
    store: Mutex<store::Store>,
    log: Mutex<Vec<LoggedRequest>>,
    tokens: Mutex<HashMap<String, Instant>>,
    faults: Mutex<Faults>,
    rng: Mutex<fastrand::Rng>,
    throttled_until: Mutex<Option<Instant>>,
    premature: AtomicUsize,
    token_requests: AtomicUsize,
    /// Amazon Connect users by (instance id, user id): the `User` of `DescribeUser`.
    connect_users: Mutex<HashMap<(Uuid, Uuid), Value>>,
    describe_user_requests: AtomicUsize,
    /// `DescribeUser` calls still to be answered with `ThrottlingException`.
    describe_user_throttles: AtomicUsize,
    /// The client secret Entra ID accepts now (`options.client_secret` until rotated).
    client_secret: Mutex<String>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not wedge the emulator for the others.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running emulator; stops when dropped.
pub struct Emulator {
    shared: Arc<Shared>,
    address: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Emulator {
    /// Starts on a free loopback port.
    pub async fn start(options: EmulatorOptions) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), options).await
    }

    pub async fn start_on(address: SocketAddr, options: EmulatorOptions) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let seed = options.seed;
        let client_secret = Mutex::new(options.client_secret.clone());
        let shared = Arc::new(Shared {
            options,
            org_url: format!("http://{address}"),
            store: Mutex::new(store::Store::default()),
            log: Mutex::new(Vec::new()),
            tokens: Mutex::new(HashMap::new()),
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            throttled_until: Mutex::new(None),
            premature: AtomicUsize::new(0),
            token_requests: AtomicUsize::new(0),
            connect_users: Mutex::new(HashMap::new()),
            describe_user_requests: AtomicUsize::new(0),
            describe_user_throttles: AtomicUsize::new(0),
            client_secret,
        });
        let router = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .route("/api/data/v9.2/{*rest}", any(web_api))
            .route("/users/{instance}/{user}", get(describe_user))
            .layer(DefaultBodyLimit::max(32 * 1024 * 1024))
            .with_state(shared.clone());
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            shared,
            address,
            shutdown: Some(shutdown),
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The organisation URL (`http://127.0.0.1:<port>`).
    pub fn org_url(&self) -> String {
        self.shared.org_url.clone()
    }

    /// `<org>/api/data/v9.2/`.
    pub fn api_base(&self) -> String {
        format!("{}{API_PATH}", self.shared.org_url)
    }

    /// The tenant's token endpoint.
    pub fn token_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.shared.org_url, self.shared.options.tenant_id
        )
    }

    pub fn options(&self) -> &EmulatorOptions {
        &self.shared.options
    }

    /// Adds a record directly (no request log, no faults); returns its id.
    pub fn seed(&self, set: &str, record: Value) -> Uuid {
        let mut store = lock(&self.shared.store);
        let key = store
            .tables
            .get(set)
            .map(|t| t.def.key.clone())
            .unwrap_or_default();
        let mut columns = record.as_object().cloned().unwrap_or_default();
        let id = columns
            .remove(&key)
            .and_then(|v| v.as_str().and_then(|s| Uuid::try_parse(s).ok()))
            .unwrap_or_else(Uuid::new_v4);
        store.write(set, id, columns);
        id
    }

    /// Changes a record directly, as a user in Dynamics would (no webhook).
    pub fn modify(&self, set: &str, id: Uuid, changes: Value) {
        lock(&self.shared.store).write(set, id, changes.as_object().cloned().unwrap_or_default());
    }

    /// Deletes a record directly, as a user in Dynamics would (no webhook).
    pub fn remove(&self, set: &str, id: Uuid) -> bool {
        lock(&self.shared.store).remove(set, id)
    }

    pub fn record(&self, set: &str, id: Uuid) -> Option<Value> {
        let store = lock(&self.shared.store);
        let row = store.tables.get(set)?.rows.get(&id)?;
        Some(Value::Object(row.data.clone()))
    }

    pub fn records(&self, set: &str) -> Vec<Value> {
        let store = lock(&self.shared.store);
        store
            .tables
            .get(set)
            .map(|t| {
                t.rows
                    .values()
                    .map(|r| Value::Object(r.data.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Takes every security role from a user: assigning it as an owner is then
    /// refused with 403 `0x80042f09` (UserNotAssignedRoles).
    pub fn remove_security_roles(&self, user: Uuid) {
        lock(&self.shared.store).users_without_roles.insert(user);
    }

    /// Adds a column to a table that has a schema (`phonecalls`, `annotations`) and
    /// makes the schema strict: from now on a custom column the table does not
    /// define is refused, as in a real org.
    pub fn define_column(&self, set: &str, name: &str, kind: Kind) {
        if let Some(table) = lock(&self.shared.store).tables.get_mut(set)
            && let Some(columns) = table.def.columns.as_mut()
        {
            columns.insert(name.to_owned(), kind);
            table.def.strict = true;
        }
    }

    /// Deletes a column from a table that has a schema, as an admin tidying it does:
    /// its values go with it and writes that carry it are refused.
    pub fn remove_column(&self, set: &str, name: &str) {
        if let Some(table) = lock(&self.shared.store).tables.get_mut(set)
            && let Some(columns) = table.def.columns.as_mut()
        {
            columns.remove(name);
            table.def.strict = true;
            for row in table.rows.values_mut() {
                row.data.remove(name);
            }
        }
    }

    /// Declares another entity set (custom tables).
    pub fn define_entity(&self, set: &str, logical: &str, key: &str, activity: bool) {
        lock(&self.shared.store).define(set, logical, key, activity, None);
    }

    /// Entities published with `PublishXml`, in order.
    pub fn published(&self) -> Vec<String> {
        lock(&self.shared.store).published.clone()
    }

    pub fn change_tracking(&self, set: &str) -> bool {
        lock(&self.shared.store)
            .tables
            .get(set)
            .is_some_and(|t| t.change_tracking)
    }

    pub fn set_change_tracking(&self, set: &str, enabled: bool) {
        if let Some(table) = lock(&self.shared.store).tables.get_mut(set) {
            table.change_tracking = enabled;
        }
    }

    /// Makes every delta link issued so far invalid (`0x80044352`).
    pub fn expire_delta_tokens(&self) {
        let mut store = lock(&self.shared.store);
        store.oldest_valid_delta = store.version + 1;
        store.version += 1;
    }

    /// Rotates the app's client secret: from now on only `secret` gets a token, the
    /// old one is refused with `invalid_client` (AADSTS7000215), as after a rotation.
    pub fn rotate_client_secret(&self, secret: &str) {
        *lock(&self.shared.client_secret) = secret.to_owned();
    }

    /// Revokes every issued access token: the API answers 401 until a new one is fetched.
    pub fn expire_tokens(&self) {
        lock(&self.shared.tokens).clear();
    }

    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    pub fn push_fault(&self, fault: Fault) {
        lock(&self.shared.faults).queue.push_back(fault);
    }

    pub fn clear_faults(&self) {
        *lock(&self.shared.faults) = Faults::default();
        *lock(&self.shared.throttled_until) = None;
    }

    /// Every Web API request so far (token requests are counted, not logged).
    pub fn requests(&self) -> Vec<LoggedRequest> {
        lock(&self.shared.log).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.log).clear();
    }

    pub fn token_requests(&self) -> usize {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    /// Adds an Amazon Connect user that `DescribeUser` then answers with.
    pub fn add_connect_user(
        &self,
        instance: Uuid,
        user: Uuid,
        username: &str,
        email: Option<&str>,
    ) {
        let user_value = json!({
            "Id": user.to_string(),
            "Arn": format!("arn:aws:connect:us-east-1:123456789012:instance/{instance}/agent/{user}"),
            "Username": username,
            "IdentityInfo": {"FirstName": "Agent", "LastName": username, "Email": email},
            "PhoneConfig": {"PhoneType": "SOFT_PHONE", "AutoAccept": false, "AfterContactWorkTimeLimit": 0},
            "SecurityProfileIds": [Uuid::new_v5(&instance, b"Agent").to_string()],
            "RoutingProfileId": Uuid::new_v5(&instance, b"Basic Routing Profile").to_string(),
        });
        lock(&self.shared.connect_users).insert((instance, user), user_value);
    }

    /// Answers the next `count` `DescribeUser` calls with 429 `ThrottlingException`.
    pub fn throttle_describe_user(&self, count: usize) {
        self.shared
            .describe_user_throttles
            .store(count, Ordering::SeqCst);
    }

    /// `DescribeUser` calls so far.
    pub fn describe_user_requests(&self) -> usize {
        self.shared.describe_user_requests.load(Ordering::SeqCst)
    }

    /// Requests that arrived while a `Retry-After` the emulator sent had not elapsed.
    pub fn premature_requests(&self) -> usize {
        self.shared.premature.load(Ordering::SeqCst)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

fn json_response(status: u16, headers: &[(String, String)], body: Option<&Value>) -> Response {
    let mut response = match body {
        Some(body) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [("content-type", "application/json; odata.metadata=minimal")],
            body.to_string(),
        )
            .into_response(),
        None => StatusCode::from_u16(status)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response(),
    };
    let map = response.headers_mut();
    map.insert("odata-version", HeaderValue::from_static("4.0"));
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            map.append(name, value);
        }
    }
    response
}

#[derive(serde::Deserialize)]
struct TokenForm {
    #[serde(default)]
    grant_type: String,
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    client_secret: Option<String>,
    #[serde(default)]
    client_assertion_type: Option<String>,
    #[serde(default)]
    client_assertion: Option<String>,
}

fn entra_error(status: StatusCode, error: &str, code: u32, description: &str) -> Response {
    let body = json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {description}\r\nTrace ID: {}\r\nTimestamp: {}", Uuid::new_v4(), now_text()),
        "error_codes": [code],
        "timestamp": now_text(),
        "trace_id": Uuid::new_v4().to_string(),
        "correlation_id": Uuid::new_v4().to_string(),
    });
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Amazon Connect `DescribeUser` (restJson1; errors name their type in `x-amzn-ErrorType`).
async fn describe_user(
    State(shared): State<Arc<Shared>>,
    Path((instance, user)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    shared.describe_user_requests.fetch_add(1, Ordering::SeqCst);
    if !signed_for_connect(&headers) {
        return aws_error(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            json!({ "message": "Missing Authentication Token" }),
        );
    }
    let throttled = shared
        .describe_user_throttles
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if throttled {
        return aws_error(
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            json!({ "Message": "Rate exceeded" }),
        );
    }
    let found = match (Uuid::parse_str(&instance), Uuid::parse_str(&user)) {
        (Ok(instance), Ok(user)) => lock(&shared.connect_users).get(&(instance, user)).cloned(),
        _ => None,
    };
    match found {
        Some(user) => (StatusCode::OK, axum::Json(json!({ "User": user }))).into_response(),
        None => aws_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            json!({ "Message": format!("User {user} not found in instance {instance}") }),
        ),
    }
}

/// A restJson1 error: the type in `x-amzn-ErrorType`, the message in the body.
fn aws_error(status: StatusCode, error_type: &'static str, body: Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert("x-amzn-ErrorType", HeaderValue::from_static(error_type));
    response
}

/// AWS refuses a request without a SigV4 signature for the service: the emulator
/// checks its shape (algorithm, a `connect` credential scope, the signed date), not
/// the HMAC itself.
fn signed_for_connect(headers: &HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(authorization) = header("authorization") else {
        return false;
    };
    let scope_is_connect = authorization
        .strip_prefix("AWS4-HMAC-SHA256 Credential=")
        .and_then(|rest| rest.split(',').next())
        .is_some_and(|credential| credential.ends_with("/connect/aws4_request"));
    scope_is_connect
        && authorization.contains("SignedHeaders=host;x-amz-date")
        && authorization.contains("Signature=")
        && header("x-amz-date").is_some()
}

async fn token(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Response {
    shared.token_requests.fetch_add(1, Ordering::SeqCst);
    if !shared.options.token_latency.is_zero() {
        tokio::time::sleep(shared.options.token_latency).await;
    }
    let Ok(form) = serde_urlencoded_form(&body) else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'grant_type'.",
        );
    };
    let options = &shared.options;
    if tenant != options.tenant_id {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_tenant",
            90002,
            &format!("Tenant '{tenant}' not found."),
        );
    }
    if form.grant_type != "client_credentials" {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    if form.client_id != options.client_id {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{}' was not found in the directory.",
                form.client_id
            ),
        );
    }
    if form.scope != format!("{}/.default", shared.org_url) {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            70011,
            &format!(
                "The provided value for the input parameter 'scope' is not valid: {}",
                form.scope
            ),
        );
    }
    let authenticated = match (&form.client_secret, &form.client_assertion) {
        (Some(secret), None) => *secret == *lock(&shared.client_secret),
        (None, Some(assertion)) => {
            form.client_assertion_type.as_deref()
                == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                && verify_assertion(&shared, assertion)
        }
        _ => false,
    };
    if !authenticated {
        return entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
        );
    }
    let lifetime = {
        let range = options.token_lifetime_secs.clone();
        lock(&shared.rng).u64(range)
    };
    let access_token = format!("emu.{}", Uuid::new_v4().simple());
    lock(&shared.tokens).insert(
        access_token.clone(),
        Instant::now() + Duration::from_secs(lifetime),
    );
    let body = json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": access_token});
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn serde_urlencoded_form(body: &[u8]) -> Result<TokenForm, ()> {
    let pairs: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let value = serde_json::to_value(pairs).map_err(|_| ())?;
    serde_json::from_value(value).map_err(|_| ())
}

fn verify_assertion(shared: &Shared, assertion: &str) -> bool {
    let Some(trusted) = &shared.options.certificate else {
        return false;
    };
    let Ok(header) = jsonwebtoken::decode_header(assertion) else {
        return false;
    };
    if header.alg != jsonwebtoken::Algorithm::RS256
        || header.x5t.as_deref() != Some(trusted.x5t.as_str())
    {
        return false;
    }
    let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_pem(trusted.public_key_pem.as_bytes()) else {
        return false;
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    let token_url = format!(
        "{}/{}/oauth2/v2.0/token",
        shared.org_url, shared.options.tenant_id
    );
    validation.set_audience(&[token_url]);
    validation.set_issuer(std::slice::from_ref(&shared.options.client_id));
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    match jsonwebtoken::decode::<Value>(assertion, &key, &validation) {
        Ok(data) => {
            data.claims.get("sub").and_then(Value::as_str)
                == Some(shared.options.client_id.as_str())
        }
        Err(_) => false,
    }
}

/// What fault, if any, this request meets.
fn draw_fault(shared: &Shared) -> (Option<Fault>, Duration) {
    let mut faults = lock(&shared.faults);
    let latency = faults.latency;
    if let Some(fault) = faults.queue.pop_front() {
        return (Some(fault), latency);
    }
    let mut rng = lock(&shared.rng);
    if faults.throttle_ratio > 0.0 && rng.f64() < faults.throttle_ratio {
        return (
            Some(Fault::Throttle {
                retry_after_secs: faults.retry_after_secs.max(1),
            }),
            latency,
        );
    }
    if faults.unavailable_ratio > 0.0 && rng.f64() < faults.unavailable_ratio {
        return (Some(Fault::Status(503)), latency);
    }
    (None, latency)
}

async fn web_api(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Instant::now();
    let header_list: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let target = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let (status, response) = answer(&shared, &method, &uri, &headers, &body, received).await;
    lock(&shared.log).push(LoggedRequest {
        method: method.to_string(),
        target,
        headers: header_list,
        body: String::from_utf8_lossy(&body).into_owned(),
        status,
        received,
    });
    response
}

async fn answer(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    received: Instant,
) -> (u16, Response) {
    // A request sent before an earlier Retry-After elapsed breaks the protocol: count it.
    {
        let mut until = lock(&shared.throttled_until);
        if let Some(deadline) = *until {
            if received < deadline {
                shared.premature.fetch_add(1, Ordering::SeqCst);
                let wait = (deadline - received).as_secs_f64().ceil().max(1.0) as u64;
                return (429, throttled(wait));
            }
            *until = None;
        }
    }
    let (fault, latency) = draw_fault(shared);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault {
        Some(Fault::Throttle { retry_after_secs }) => {
            *lock(&shared.throttled_until) =
                Some(Instant::now() + Duration::from_secs(retry_after_secs));
            return (429, throttled(retry_after_secs));
        }
        Some(Fault::Status(status)) => {
            let body = json!({"error": {"code": "", "message": "The service is temporarily unavailable."}});
            return (status, json_response(status, &[], Some(&body)));
        }
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        None => {}
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let valid = bearer.is_some_and(|token| {
        lock(&shared.tokens)
            .get(token)
            .is_some_and(|expiry| *expiry > Instant::now())
    });
    if !valid {
        let mut response = json_response(401, &[], None);
        let challenge = format!(
            "Bearer authorization_uri=https://login.microsoftonline.com/{}/oauth2/authorize",
            shared.options.tenant_id
        );
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response.headers_mut().insert("www-authenticate", value);
        }
        return (401, response);
    }
    let base = format!("{}{API_PATH}", shared.org_url);
    let path = uri.path().strip_prefix(API_PATH).unwrap_or_default();
    let path = percent_encoding::percent_decode_str(path)
        .decode_utf8_lossy()
        .into_owned();
    if path == "$batch" && method == Method::POST {
        let content_type = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(body);
        let (status, answer_type, answer) = {
            let mut store = lock(&shared.store);
            batch::handle(&mut store, &base, API_PATH, content_type, &text)
        };
        let response = (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            [("content-type", answer_type)],
            answer,
        )
            .into_response();
        return (status, response);
    }
    let request = api::ApiRequest {
        method: method.to_string(),
        path,
        query: uri.query().unwrap_or_default().to_owned(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    };
    let answer = {
        let mut store = lock(&shared.store);
        api::handle(&mut store, &base, &request)
    };
    (
        answer.status,
        json_response(answer.status, &answer.headers, answer.body.as_ref()),
    )
}

fn throttled(retry_after_secs: u64) -> Response {
    let body = json!({"error": {
        "code": "0x80072322",
        "message": "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
    }});
    json_response(
        429,
        &[("Retry-After".into(), retry_after_secs.to_string())],
        Some(&body),
    )
}
