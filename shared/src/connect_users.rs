//! Amazon Connect's `DescribeUser` (`GET /users/{InstanceId}/{UserId}`), the one
//! Connect operation the product calls, as a SigV4-signed HTTPS request through
//! the SDK's own signer (`aws-sigv4`) and credentials chain.
//!
//! The generated Connect client is a crate of several hundred operations (a
//! 180 MB release rlib, three times S3's): linking it into the four lifecycle
//! functions for this one call was the longest step of a release build.

use std::time::{Instant, SystemTime};

use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningError, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use aws_types::service_config::ServiceConfigKey;
use serde::Deserialize;
use url::Url;
use uuid::Uuid;

use crate::agents::Profile;
use crate::dataverse::retry::RetryPolicy;

/// Connect's signing name (the `connect` in `connect.<region>.amazonaws.com`).
const SERVICE: &str = "connect";

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no AWS region is configured")]
    NoRegion,
    #[error("no AWS credentials provider is configured")]
    NoCredentialsProvider,
    #[error("the AWS endpoint URL {0} is not a base URL")]
    Endpoint(String),
    #[error("AWS credentials are unavailable: {0}")]
    Credentials(#[source] CredentialsError),
    #[error("signing the request failed: {0}")]
    Signing(#[source] SigningError),
    #[error("signing the request failed: {0}")]
    SigningParams(#[source] v4::signing_params::BuildError),
    #[error("the request failed: {0}")]
    Http(#[source] reqwest::Error),
    #[error("no answer before the deadline")]
    Timeout,
    #[error("{code} (HTTP {status}): {message}")]
    Service {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the answer is not a DescribeUser response: {0}")]
    Answer(#[source] serde_json::Error),
}

impl ConnectError {
    /// Throttling, server errors, timeouts and lost connections can pass; a user
    /// that does not exist, a refused permission or a bad setting will not.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Credentials(error) => !matches!(
                error,
                CredentialsError::CredentialsNotLoaded(_)
                    | CredentialsError::InvalidConfiguration(_)
            ),
            Self::Http(error) => !error.is_builder(),
            Self::Timeout => true,
            Self::Service { status, code, .. } => {
                *status == 429 || *status >= 500 || code.contains("Throttl")
            }
            Self::NoRegion
            | Self::NoCredentialsProvider
            | Self::Endpoint(_)
            | Self::Signing(_)
            | Self::SigningParams(_)
            | Self::Answer(_) => false,
        }
    }
}

/// Reads Amazon Connect users for one container.
pub struct ConnectUsers {
    http: reqwest::Client,
    endpoint: Url,
    region: String,
    credentials: SharedCredentialsProvider,
    retry: RetryPolicy,
}

impl ConnectUsers {
    /// The region, credentials and endpoint override of `aws`.
    /// Credentials are asked for on each call: calls are rare (answers are cached
    /// per agent) and on Lambda they come from the environment.
    pub fn new(http: reqwest::Client, aws: &aws_config::SdkConfig) -> Result<Self, ConnectError> {
        let region = aws.region().ok_or(ConnectError::NoRegion)?.to_string();
        let endpoint = endpoint_override(aws)
            .unwrap_or_else(|| format!("https://{SERVICE}.{region}.amazonaws.com"));
        let endpoint = Url::parse(&endpoint)
            .ok()
            .filter(|url| !url.cannot_be_a_base())
            .ok_or(ConnectError::Endpoint(endpoint))?;
        Ok(Self {
            http,
            endpoint,
            region,
            credentials: aws
                .credentials_provider()
                .ok_or(ConnectError::NoCredentialsProvider)?,
            // Connect allows a few calls a second per account: as the SDK, three
            // attempts with jittered backoff, then the contact's own retry path.
            retry: RetryPolicy {
                max_attempts: 3,
                ..RetryPolicy::default()
            },
        })
    }

    /// The user's profile, trying passing failures again until the deadline.
    pub async fn describe_user(
        &self,
        instance: Uuid,
        user: Uuid,
        deadline: Instant,
    ) -> Result<Profile, ConnectError> {
        let mut url = self.endpoint.clone();
        url.path_segments_mut()
            .map_err(|()| ConnectError::Endpoint(self.endpoint.to_string()))?
            .pop_if_empty()
            .extend(["users", &instance.to_string(), &user.to_string()]);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let answer = tokio::time::timeout_at(deadline.into(), self.get(&url))
                .await
                .unwrap_or(Err(ConnectError::Timeout));
            match answer {
                Err(error) if error.is_transient() => {
                    let wait = self
                        .retry
                        .next_wait(attempt, None, Instant::now(), deadline)
                        .ok_or(error)?;
                    tokio::time::sleep(wait).await;
                }
                answer => return answer,
            }
        }
    }

    async fn get(&self, url: &Url) -> Result<Profile, ConnectError> {
        let credentials = self
            .credentials
            .provide_credentials()
            .await
            .map_err(ConnectError::Credentials)?;
        let identity = Identity::from(credentials);
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(SERVICE)
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(ConnectError::SigningParams)?
            .into();
        let signable = SignableRequest::new(
            "GET",
            url.as_str(),
            std::iter::empty(),
            SignableBody::Bytes(&[]),
        )
        .map_err(ConnectError::Signing)?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(ConnectError::Signing)?
            .into_parts();
        let mut request = self.http.get(url.clone());
        for (name, value) in instructions.headers() {
            request = request.header(name, value);
        }
        let response = request.send().await.map_err(ConnectError::Http)?;
        let status = response.status();
        // REST-JSON errors name their type in a header (`Type:namespace-url`).
        let error_type = response
            .headers()
            .get("x-amzn-ErrorType")
            .and_then(|value| value.to_str().ok())
            .map(|value| value.split(':').next().unwrap_or(value).to_owned());
        let body = response.bytes().await.map_err(ConnectError::Http)?;
        if !status.is_success() {
            let error: ErrorBody = serde_json::from_slice(&body).unwrap_or_default();
            return Err(ConnectError::Service {
                status: status.as_u16(),
                code: error_type.or(error.kind).unwrap_or_default(),
                message: error.message.unwrap_or_default(),
            });
        }
        let answer: DescribeUserOutput =
            serde_json::from_slice(&body).map_err(ConnectError::Answer)?;
        let identity = answer.user.identity_info.unwrap_or_default();
        Ok(Profile {
            username: answer.user.username,
            email: identity.email.filter(|e| !e.is_empty()),
            first_name: identity.first_name,
            last_name: identity.last_name,
        })
    }
}

/// The endpoint a generated client would use: one set in code, else Connect's own
/// (`AWS_ENDPOINT_URL_CONNECT`, a profile's `services` section), else the global one.
fn endpoint_override(aws: &aws_config::SdkConfig) -> Option<String> {
    if aws.get_origin("endpoint_url").is_client_config() {
        return aws.endpoint_url().map(str::to_owned);
    }
    let key = ServiceConfigKey::builder()
        .service_id("Connect")
        .env("AWS_ENDPOINT_URL")
        .profile("endpoint_url")
        .build()
        .ok()?;
    aws.service_config()
        .and_then(|config| config.load_config(key))
        .or_else(|| aws.endpoint_url().map(str::to_owned))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DescribeUserOutput {
    user: User,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct User {
    username: Option<String>,
    identity_info: Option<IdentityInfo>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IdentityInfo {
    email: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
}

#[derive(Default, Deserialize)]
struct ErrorBody {
    #[serde(rename = "__type")]
    kind: Option<String>,
    #[serde(alias = "Message")]
    message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_credential_types::Credentials;
    use aws_types::region::Region;
    use aws_types::service_config::LoadServiceConfig;

    /// `AWS_ENDPOINT_URL_CONNECT`, as the config loader answers it.
    #[derive(Debug)]
    struct ConnectEndpoint(Option<&'static str>);

    impl LoadServiceConfig for ConnectEndpoint {
        fn load_config(&self, key: ServiceConfigKey<'_>) -> Option<String> {
            (key.service_id() == "Connect" && key.env() == "AWS_ENDPOINT_URL")
                .then_some(self.0)
                .flatten()
                .map(str::to_owned)
        }
    }

    fn endpoint(global: Option<&str>, connect: Option<&'static str>) -> String {
        let mut aws = aws_config::SdkConfig::builder()
            .region(Region::new("eu-west-2"))
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "id", "secret", None, None, "test",
            )))
            .service_config(ConnectEndpoint(connect));
        aws.set_endpoint_url(global.map(str::to_owned));
        let users = ConnectUsers::new(reqwest::Client::new(), &aws.build()).expect("configured");
        users.endpoint.to_string()
    }

    #[test]
    fn connects_own_endpoint_wins_over_the_global_one_and_the_default() {
        assert_eq!(
            endpoint(None, None),
            "https://connect.eu-west-2.amazonaws.com/"
        );
        assert_eq!(
            endpoint(Some("http://global.test"), None),
            "http://global.test/"
        );
        assert_eq!(
            endpoint(Some("http://global.test"), Some("http://connect.test:4000")),
            "http://connect.test:4000/"
        );
    }

    #[test]
    fn only_passing_failures_are_tried_again() {
        let service = |status: u16, code: &str| ConnectError::Service {
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(service(429, "ThrottlingException").is_transient());
        assert!(service(400, "ThrottlingException").is_transient());
        assert!(service(500, "InternalServiceException").is_transient());
        assert!(!service(404, "ResourceNotFoundException").is_transient());
        assert!(!service(403, "AccessDeniedException").is_transient());
        assert!(ConnectError::Timeout.is_transient());
        assert!(!ConnectError::NoRegion.is_transient());
    }
}
