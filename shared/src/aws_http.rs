//! The AWS SDK's requests sent through `reqwest`, with the container's TLS roots.
//!
//! The SDK's own HTTPS client wants its roots as PEM, parses them again into a
//! second rustls configuration and links a second TLS stack. Over `reqwest`, the
//! SDK and the Dataverse client share one root store (`crate::tls`), built once.
//! The SDK keeps everything above the wire: signing, retries, timeouts, endpoints.

use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;

use crate::tls::TlsRoots;

/// How long an AWS connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The standard AWS configuration (environment, profile, credentials chain), its
/// requests sent through [`sdk_http_client`].
pub fn config_loader(roots: &TlsRoots) -> Result<aws_config::ConfigLoader, reqwest::Error> {
    Ok(aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(sdk_http_client(roots, CONNECT_TIMEOUT)?))
}

/// An SDK HTTP client trusting `roots`.
pub fn sdk_http_client(
    roots: &TlsRoots,
    connect_timeout: Duration,
) -> Result<SharedHttpClient, reqwest::Error> {
    let http = roots
        .apply(reqwest::Client::builder())
        // The SDK reads redirects itself (S3's `PermanentRedirect`, for one).
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(50))
        .build()?;
    Ok(SharedHttpClient::new(Reqwest(http)))
}

#[derive(Debug, Clone)]
struct Reqwest(reqwest::Client);

impl HttpClient for Reqwest {
    /// The connect timeout is the `reqwest` client's; the SDK's per-attempt and
    /// per-operation timeouts bound every request.
    fn http_connector(
        &self,
        _settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(self.clone())
    }
}

impl HttpConnector for Reqwest {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let http = self.0.clone();
        HttpConnectorFuture::new(async move { send(&http, request).await })
    }
}

async fn send(
    http: &reqwest::Client,
    request: HttpRequest,
) -> Result<HttpResponse, ConnectorError> {
    // The SDK's requests here are all small and in memory (JSON, an S3 object read
    // back); a streaming upload would need a streaming body.
    let body = request.body().bytes().map(<[u8]>::to_vec).ok_or_else(|| {
        ConnectorError::user("a streaming request body is not supported by this HTTP client".into())
    })?;
    let method = reqwest::Method::from_bytes(request.method().as_bytes())
        .map_err(|error| ConnectorError::user(error.into()))?;
    let mut builder = http.request(method, request.uri()).body(body);
    for (name, value) in request.headers() {
        builder = builder.header(name, value);
    }
    let response = builder.send().await.map_err(connector_error)?;
    let status = StatusCode::try_from(response.status().as_u16())
        .map_err(|error| ConnectorError::other(error.into(), None))?;
    let headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response.bytes().await.map_err(connector_error)?;
    let mut answer = HttpResponse::new(status, SdkBody::from(body));
    for (name, value) in headers {
        // A header the SDK's type refuses is one it would not read either.
        let _ = answer.headers_mut().try_append(name, value);
    }
    Ok(answer)
}

/// Timeouts and broken connections are the SDK's transient kinds: it retries them.
fn connector_error(error: reqwest::Error) -> ConnectorError {
    if error.is_timeout() {
        ConnectorError::timeout(error.into())
    } else if error.is_builder() {
        ConnectorError::user(error.into())
    } else {
        ConnectorError::io(error.into())
    }
}
