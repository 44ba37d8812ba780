//! The AWS SDK's requests sent through the container's one `reqwest` client.
//!
//! The SDK's own HTTPS client wants its roots as PEM, parses them again into a
//! second rustls configuration and links a second TLS stack. Over `reqwest`, the
//! SDK and the Dataverse client share one client and root store (`crate::tls`),
//! built once. The SDK keeps everything above the wire: signing, retries,
//! timeouts, endpoints.

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;

/// The standard AWS configuration (environment, profile, credentials chain), its
/// requests sent through `http`.
///
/// Lambda puts the execution role's credentials and the region in the environment.
/// When they are there, they are read directly: the default chains would find them
/// first too, but building the chains builds an STS client (web identity) and an
/// IMDS client, each parsing the endpoint partition tables, for nothing.
pub fn config_loader(http: &reqwest::Client) -> aws_config::ConfigLoader {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(SharedHttpClient::new(Reqwest(http.clone())));
    let in_env = EnvShortcuts::read(|name| std::env::var(name).ok());
    if in_env.credentials {
        loader = loader.credentials_provider(
            aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
        );
    }
    if in_env.region {
        loader = loader.region(aws_config::environment::EnvironmentVariableRegionProvider::new());
    }
    loader
}

/// Which parts of the AWS configuration the environment settles on its own, as the
/// first link of each default chain would read them.
#[derive(Debug, PartialEq, Eq)]
struct EnvShortcuts {
    credentials: bool,
    region: bool,
}

impl EnvShortcuts {
    fn read(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |name: &str| var(name).is_some_and(|value| !value.trim().is_empty());
        Self {
            credentials: set("AWS_ACCESS_KEY_ID")
                && (set("AWS_SECRET_ACCESS_KEY") || set("SECRET_ACCESS_KEY")),
            region: set("AWS_REGION") || set("AWS_DEFAULT_REGION"),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shortcuts(vars: &[(&str, &str)]) -> EnvShortcuts {
        EnvShortcuts::read(|name| {
            vars.iter()
                .find(|(var, _)| *var == name)
                .map(|(_, value)| (*value).to_owned())
        })
    }

    #[test]
    fn lambdas_environment_settles_credentials_and_region_without_the_chains() {
        let lambda = [
            ("AWS_ACCESS_KEY_ID", "ASIAEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_SESSION_TOKEN", "token"),
            ("AWS_REGION", "eu-west-2"),
        ];
        assert_eq!(
            shortcuts(&lambda),
            EnvShortcuts {
                credentials: true,
                region: true
            }
        );
    }

    #[test]
    fn anything_less_is_left_to_the_default_chains() {
        let partial = [
            ("AWS_ACCESS_KEY_ID", "ASIAEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", " "),
            ("AWS_PROFILE", "operator"),
        ];
        assert_eq!(
            shortcuts(&partial),
            EnvShortcuts {
                credentials: false,
                region: false
            }
        );
        let default_region = [("AWS_DEFAULT_REGION", "us-east-1")];
        assert!(shortcuts(&default_region).region);
    }
}
