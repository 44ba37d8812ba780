//! Typed operations on the Dataverse Web API, each retried within a deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use url::Url;
use uuid::Uuid;

use super::error::{DataverseError, parse_error_body};
use super::odata::{EntitySet, encode_query_value, id_from_entity_url, parse_guid};
use super::retry::{RetryPolicy, parse_retry_after};
use crate::token_cache::TokenCache;

/// Request and retry counts since the client was built (for metrics and benchmarks).
#[derive(Debug, Default)]
pub struct ClientStats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub throttled: AtomicU64,
}

/// A snapshot of [`ClientStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub retries: u64,
    pub throttled: u64,
}

impl ClientStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
        }
    }
}

/// One Web API client per container: it holds the connection pool and the token cache.
#[derive(Debug, Clone)]
pub struct DataverseClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    api_base: Url,
    tokens: TokenCache,
    retry: RetryPolicy,
    request_timeout: Duration,
    stats: ClientStats,
}

/// A `$select` / `$filter` / `$orderby` query on an entity set.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub select: Vec<String>,
    /// An OData filter; build string literals with [`super::odata::string_literal`].
    pub filter: Option<String>,
    pub order_by: Option<String>,
    pub top: Option<u32>,
    /// `Prefer: odata.maxpagesize` (at most 5000).
    pub page_size: Option<u32>,
}

/// One page of a query; follow `next_link` for the next.
#[derive(Debug, Clone)]
pub struct Page {
    pub records: Vec<Value>,
    pub next_link: Option<String>,
}

/// One row of a change-tracking read.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A new or changed record (the selected columns).
    Upserted(Value),
    /// A deleted record's id.
    Deleted(Uuid),
}

/// One page of changes. The delta link comes only with the last page.
#[derive(Debug, Clone)]
pub struct DeltaPage {
    pub changes: Vec<Change>,
    pub next_link: Option<String>,
    pub delta_link: Option<String>,
}

/// Pieces of a request that a retry resends unchanged.
struct Request {
    method: Method,
    url: Url,
    /// Lower-case header names.
    headers: Vec<(&'static str, String)>,
    /// Serialised once, resent by every attempt.
    body: Option<Vec<u8>>,
    /// True when following a change-tracking link: a 4xx then means "start over".
    delta: bool,
}

impl Request {
    fn new(method: Method, url: Url) -> Self {
        Self {
            method,
            url,
            headers: Vec::new(),
            body: None,
            delta: false,
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn json(mut self, body: &Value) -> Self {
        self.body = Some(body.to_string().into_bytes());
        self.header("content-type", "application/json")
    }
}

impl DataverseClient {
    pub fn new(
        http: reqwest::Client,
        api_base: Url,
        tokens: TokenCache,
        retry: RetryPolicy,
        request_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                http,
                api_base,
                tokens,
                retry,
                request_timeout,
                stats: ClientStats::default(),
            }),
        }
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    pub fn tokens(&self) -> &TokenCache {
        &self.inner.tokens
    }

    pub fn api_base(&self) -> &Url {
        &self.inner.api_base
    }

    fn entity_url(&self, set: &EntitySet, id: Option<Uuid>) -> Url {
        let path = match id {
            Some(id) => format!("{set}({id})"),
            None => set.to_string(),
        };
        // Both pieces are validated identifiers or GUIDs, so joining cannot fail or escape.
        let mut url = self.inner.api_base.clone();
        url.set_path(&format!("{}{path}", self.inner.api_base.path()));
        url
    }

    /// A link Dataverse sent (`@odata.nextLink`, `@odata.deltaLink`), used as
    /// received; it must point into the same API, so a token is never sent elsewhere.
    fn server_link(&self, link: &str) -> Result<Url, DataverseError> {
        let url = Url::parse(link)
            .map_err(|e| DataverseError::Protocol(format!("link `{link}` is not a URL: {e}")))?;
        let base = &self.inner.api_base;
        let same_api = url.scheme() == base.scheme()
            && url.host_str() == base.host_str()
            && url.port_or_known_default() == base.port_or_known_default()
            && url.path().starts_with(base.path());
        if same_api {
            Ok(url)
        } else {
            Err(DataverseError::Protocol(format!(
                "link `{link}` leaves the organisation's API"
            )))
        }
    }

    /// Creates a record and returns its id (from `OData-EntityId`, or from the
    /// body when the server answers 201 with a representation).
    pub async fn create(
        &self,
        set: &EntitySet,
        body: &Value,
        deadline: Instant,
    ) -> Result<Uuid, DataverseError> {
        let response = self
            .send(
                Request::new(Method::POST, self.entity_url(set, None)).json(body),
                deadline,
            )
            .await?;
        if let Some(id) = response
            .headers()
            .get("OData-EntityId")
            .and_then(|v| v.to_str().ok())
            .and_then(id_from_entity_url)
        {
            return Ok(id);
        }
        let body = read_json(response).await?;
        body.get("@odata.id")
            .and_then(Value::as_str)
            .and_then(id_from_entity_url)
            .ok_or_else(|| {
                DataverseError::Protocol("create answered without OData-EntityId".into())
            })
    }

    /// Creates a record and returns it (`Prefer: return=representation`).
    pub async fn create_returning(
        &self,
        set: &EntitySet,
        body: &Value,
        select: &[&str],
        deadline: Instant,
    ) -> Result<Value, DataverseError> {
        let mut url = self.entity_url(set, None);
        with_select(&mut url, select);
        let request = Request::new(Method::POST, url)
            .json(body)
            .header("prefer", "return=representation");
        read_json(self.send(request, deadline).await?).await
    }

    /// Creates the record with this id unless it exists (`If-None-Match: *`).
    /// Returns false when it was already there (412): the idempotent create.
    pub async fn create_with_id(
        &self,
        set: &EntitySet,
        id: Uuid,
        body: &Value,
        deadline: Instant,
    ) -> Result<bool, DataverseError> {
        let request = Request::new(Method::PATCH, self.entity_url(set, Some(id)))
            .json(body)
            .header("if-none-match", "*");
        match self.send(request, deadline).await {
            Ok(_) => Ok(true),
            Err(DataverseError::Rejected { status: 412, .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Updates an existing record (`If-Match: *`): never creates one. A missing
    /// record is a 404 [`DataverseError::Rejected`] (see `is_not_found`).
    pub async fn update(
        &self,
        set: &EntitySet,
        id: Uuid,
        body: &Value,
        deadline: Instant,
    ) -> Result<(), DataverseError> {
        let request = Request::new(Method::PATCH, self.entity_url(set, Some(id)))
            .json(body)
            .header("if-match", "*");
        self.send(request, deadline).await.map(drop)
    }

    /// Creates or updates the record with this id (a plain PATCH). With ids derived
    /// from the event, a retry can never make a second record.
    pub async fn upsert(
        &self,
        set: &EntitySet,
        id: Uuid,
        body: &Value,
        deadline: Instant,
    ) -> Result<(), DataverseError> {
        let request = Request::new(Method::PATCH, self.entity_url(set, Some(id))).json(body);
        self.send(request, deadline).await.map(drop)
    }

    /// Deletes a record; false when it did not exist.
    pub async fn delete(
        &self,
        set: &EntitySet,
        id: Uuid,
        deadline: Instant,
    ) -> Result<bool, DataverseError> {
        match self
            .send(
                Request::new(Method::DELETE, self.entity_url(set, Some(id))),
                deadline,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(error) if error.is_not_found() => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Reads one record's columns; `None` when it does not exist.
    pub async fn get(
        &self,
        set: &EntitySet,
        id: Uuid,
        select: &[String],
        deadline: Instant,
    ) -> Result<Option<Value>, DataverseError> {
        let mut url = self.entity_url(set, Some(id));
        with_select(&mut url, select);
        match self.send(Request::new(Method::GET, url), deadline).await {
            Ok(response) => read_json(response).await.map(Some),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The first page of a query.
    pub async fn query(
        &self,
        set: &EntitySet,
        query: &Query,
        deadline: Instant,
    ) -> Result<Page, DataverseError> {
        let mut options = Vec::new();
        if !query.select.is_empty() {
            options.push(format!(
                "$select={}",
                encode_query_value(&query.select.join(","))
            ));
        }
        if let Some(filter) = &query.filter {
            options.push(format!("$filter={}", encode_query_value(filter)));
        }
        if let Some(order_by) = &query.order_by {
            options.push(format!("$orderby={}", encode_query_value(order_by)));
        }
        if let Some(top) = query.top {
            options.push(format!("$top={top}"));
        }
        let mut url = self.entity_url(set, None);
        if !options.is_empty() {
            url.set_query(Some(&options.join("&")));
        }
        self.page(url, query.page_size, deadline).await
    }

    /// The page behind an `@odata.nextLink`, with the same page size as the first.
    pub async fn next_page(
        &self,
        next_link: &str,
        page_size: Option<u32>,
        deadline: Instant,
    ) -> Result<Page, DataverseError> {
        self.page(self.server_link(next_link)?, page_size, deadline)
            .await
    }

    async fn page(
        &self,
        url: Url,
        page_size: Option<u32>,
        deadline: Instant,
    ) -> Result<Page, DataverseError> {
        let mut request = Request::new(Method::GET, url);
        if let Some(size) = page_size {
            request = request.header(
                "prefer",
                format!("odata.maxpagesize={}", size.clamp(1, 5000)),
            );
        }
        let body = read_json(self.send(request, deadline).await?).await?;
        Ok(Page {
            records: records_of(&body)?,
            next_link: link(&body, "@odata.nextLink"),
        })
    }

    /// Starts change tracking: every current record, paged, with a delta link on the last page.
    pub async fn track_changes(
        &self,
        set: &EntitySet,
        select: &[String],
        page_size: u32,
        deadline: Instant,
    ) -> Result<DeltaPage, DataverseError> {
        let mut url = self.entity_url(set, None);
        with_select(&mut url, select);
        let request = Request::new(Method::GET, url).header(
            "prefer",
            format!(
                "odata.track-changes,odata.maxpagesize={}",
                page_size.clamp(1, 5000)
            ),
        );
        let response = self.send(request, deadline).await?;
        let applied = response
            .headers()
            .get_all("Preference-Applied")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("odata.track-changes"));
        if !applied {
            return Err(DataverseError::Protocol(format!(
                "change tracking is not enabled on `{set}` (no Preference-Applied: odata.track-changes); run `setup`"
            )));
        }
        delta_page(read_json(response).await?)
    }

    /// Follows a `@odata.nextLink` of a change-tracking read, or a stored `@odata.deltaLink`.
    /// An expired or invalid delta token is [`DataverseError::DeltaExpired`].
    pub async fn follow_changes(
        &self,
        link: &str,
        page_size: u32,
        deadline: Instant,
    ) -> Result<DeltaPage, DataverseError> {
        let mut request = Request::new(Method::GET, self.server_link(link)?).header(
            "prefer",
            format!(
                "odata.track-changes,odata.maxpagesize={}",
                page_size.clamp(1, 5000)
            ),
        );
        request.delta = true;
        delta_page(read_json(self.send(request, deadline).await?).await?)
    }

    /// Sends a prepared `$batch` body and returns the raw answer (see [`super::batch`]).
    /// A request to a path below the API root that the typed operations do not
    /// cover (metadata, registration). `path` must be built from validated names,
    /// GUIDs and escaped literals. Returns the JSON body (if any) and the id in
    /// `OData-EntityId` (if any).
    pub(crate) async fn execute(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
        headers: &[(&'static str, &str)],
        deadline: Instant,
    ) -> Result<(Option<Value>, Option<Uuid>), DataverseError> {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let mut url = self.inner.api_base.clone();
        url.set_path(&format!("{}{path}", self.inner.api_base.path()));
        if !query.is_empty() {
            url.set_query(Some(query));
        }
        let mut request = Request::new(method, url);
        if let Some(body) = body {
            request = request.json(body);
        }
        for (name, value) in headers {
            request = request.header(name, *value);
        }
        let response = self.send(request, deadline).await?;
        let id = response
            .headers()
            .get("OData-EntityId")
            .and_then(|v| v.to_str().ok())
            .and_then(id_from_entity_url);
        let bytes = response.bytes().await.map_err(|e| {
            DataverseError::Protocol(format!("answer could not be read: {}", e.without_url()))
        })?;
        let json = if bytes.is_empty() {
            None
        } else {
            Some(
                serde_json::from_slice(&bytes)
                    .map_err(|e| DataverseError::Protocol(format!("answer is not JSON: {e}")))?,
            )
        };
        Ok((json, id))
    }

    pub(crate) async fn send_batch(
        &self,
        content_type: String,
        body: Vec<u8>,
        deadline: Instant,
    ) -> Result<(String, String), DataverseError> {
        let mut url = self.inner.api_base.clone();
        url.set_path(&format!("{}$batch", self.inner.api_base.path()));
        let mut request = Request::new(Method::POST, url).header("content-type", content_type);
        request.body = Some(body);
        let response = self.send(request, deadline).await?;
        let content_type = response
            .headers()
            .get("Content-Type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.map_err(|e| {
            DataverseError::Protocol(format!(
                "batch answer could not be read: {}",
                e.without_url()
            ))
        })?;
        Ok((content_type, text))
    }

    /// Sends a request, retrying throttling, server errors, timeouts and dropped
    /// connections within the retry policy and the deadline; a 401 refreshes the
    /// token once. Anything else comes back as a typed error.
    async fn send(
        &self,
        request: Request,
        deadline: Instant,
    ) -> Result<reqwest::Response, DataverseError> {
        let inner = &*self.inner;
        let mut attempt = 0;
        let mut refreshed_token = false;
        loop {
            attempt += 1;
            let now = Instant::now();
            if now >= deadline {
                return Err(DataverseError::DeadlineExceeded);
            }
            let token = inner.tokens.token(deadline).await?;
            let timeout = inner
                .request_timeout
                .min(deadline.saturating_duration_since(Instant::now()));
            let mut headers = HeaderMap::with_capacity(6 + request.headers.len());
            headers.insert("Accept", HeaderValue::from_static("application/json"));
            headers.insert("OData-MaxVersion", HeaderValue::from_static("4.0"));
            headers.insert("OData-Version", HeaderValue::from_static("4.0"));
            for (name, value) in &request.headers {
                if let Ok(value) = HeaderValue::from_str(value) {
                    headers.insert(HeaderName::from_static(name), value);
                }
            }
            let mut builder = inner
                .http
                .request(request.method.clone(), request.url.clone())
                .bearer_auth(token.token.expose())
                .timeout(timeout);
            if let Some(body) = &request.body {
                builder = builder.body(body.clone());
            }
            inner.stats.requests.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let result = builder.headers(headers).send().await;
            let (retry_after, failure) = match result {
                Err(error) => {
                    let message = error.without_url().to_string();
                    (
                        None,
                        DataverseError::Network {
                            message,
                            attempts: attempt,
                        },
                    )
                }
                Ok(response) => {
                    let status = response.status();
                    tracing::debug!(method = %request.method, status = status.as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "dataverse request");
                    if status.is_success() || status == StatusCode::NOT_MODIFIED {
                        return Ok(response);
                    }
                    if status == StatusCode::UNAUTHORIZED {
                        if refreshed_token {
                            return Err(DataverseError::Unauthorized);
                        }
                        refreshed_token = true;
                        inner.tokens.invalidate(&token).await;
                        continue;
                    }
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        inner.stats.throttled.fetch_add(1, Ordering::Relaxed);
                        let retry_after = response
                            .headers()
                            .get("Retry-After")
                            .and_then(|v| v.to_str().ok())
                            .and_then(parse_retry_after);
                        (retry_after, DataverseError::Throttled { retry_after })
                    } else if status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED {
                        (
                            None,
                            DataverseError::Unavailable {
                                status: status.as_u16(),
                                attempts: attempt,
                            },
                        )
                    } else {
                        let body = response.text().await.unwrap_or_default();
                        let (code, message) = parse_error_body(&body);
                        if request.delta && status.is_client_error() {
                            return Err(DataverseError::DeltaExpired {
                                status: status.as_u16(),
                                code,
                            });
                        }
                        return Err(DataverseError::Rejected {
                            status: status.as_u16(),
                            code,
                            message,
                        });
                    }
                }
            };
            match inner
                .retry
                .next_wait(attempt, retry_after, Instant::now(), deadline)
            {
                Some(wait) => {
                    inner.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(attempt, wait_ms = wait.as_millis() as u64, error = %failure, "retrying Dataverse request");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(failure),
            }
        }
    }
}

/// Adds `$select` to a URL that has no other query options.
fn with_select<S: AsRef<str>>(url: &mut Url, select: &[S]) {
    if !select.is_empty() {
        let columns: Vec<&str> = select.iter().map(AsRef::as_ref).collect();
        url.set_query(Some(&format!(
            "$select={}",
            encode_query_value(&columns.join(","))
        )));
    }
}

async fn read_json(response: reqwest::Response) -> Result<Value, DataverseError> {
    let bytes = response.bytes().await.map_err(|e| {
        DataverseError::Protocol(format!("answer could not be read: {}", e.without_url()))
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| DataverseError::Protocol(format!("answer is not JSON: {e}")))
}

fn records_of(body: &Value) -> Result<Vec<Value>, DataverseError> {
    match body.get("value") {
        Some(Value::Array(records)) => Ok(records.clone()),
        _ => Err(DataverseError::Protocol(
            "collection answer has no `value` array".into(),
        )),
    }
}

fn link(body: &Value, name: &str) -> Option<String> {
    body.get(name).and_then(Value::as_str).map(str::to_owned)
}

fn delta_page(body: Value) -> Result<DeltaPage, DataverseError> {
    let changes = records_of(&body)?
        .into_iter()
        .map(|row| {
            let deleted = row.get("reason").and_then(Value::as_str) == Some("deleted")
                || row
                    .get("@odata.context")
                    .and_then(Value::as_str)
                    .is_some_and(|context| context.ends_with("$deletedEntity"));
            if deleted {
                let id = row.get("id").and_then(Value::as_str).unwrap_or_default();
                parse_guid(id)
                    .map(Change::Deleted)
                    .map_err(|e| DataverseError::Protocol(format!("deleted row: {e}")))
            } else {
                Ok(Change::Upserted(row))
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(DeltaPage {
        changes,
        next_link: link(&body, "@odata.nextLink"),
        delta_link: link(&body, "@odata.deltaLink"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn delta_rows_and_deletions() {
        let page = delta_page(json!({
            "@odata.context": "https://x/api/data/v9.2/$metadata#accounts(name)/$delta",
            "@odata.deltaLink": "https://x/api/data/v9.2/accounts?$deltatoken=1",
            "value": [
                {"@odata.etag": "W/\"1\"", "name": "Alder", "accountid": "dab1df92-3947-496f-806a-5b61409b379f"},
                {"@odata.context": "https://x/api/data/v9.2/$metadata#accounts/$deletedEntity", "id": "c5d72eb9-a544-4106-beeb-fb42dc15da36", "reason": "deleted"}
            ]
        }))
        .unwrap();
        assert_eq!(page.changes.len(), 2);
        assert!(matches!(page.changes[0], Change::Upserted(_)));
        assert_eq!(
            page.changes[1],
            Change::Deleted("c5d72eb9-a544-4106-beeb-fb42dc15da36".parse().unwrap())
        );
        assert!(page.delta_link.is_some() && page.next_link.is_none());
    }
}
