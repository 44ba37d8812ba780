//! OAuth 2.0 client credentials against the Microsoft Entra ID v2 token endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use tokio::sync::OnceCell;
use url::Url;

use crate::config::{Credential, DynamicsConfig};
use crate::secret::Secret;

/// A bearer token and when it stops being valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub token: Secret,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
}

impl AccessToken {
    /// Usable until `margin` before it expires.
    pub fn is_fresh(&self, margin: Duration) -> bool {
        self.expires_at > unix_now() + margin.as_secs()
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// Entra ID refused the request (wrong secret, no consent, bad scope): a
    /// configuration problem no retry fixes.
    #[error("Entra ID refused the token request ({status}): {error}: {description}")]
    Rejected {
        status: u16,
        error: String,
        description: String,
    },
    /// Entra ID unreachable or failing (5xx, timeout).
    #[error("Entra ID token endpoint unavailable: {0}")]
    Unavailable(String),
    /// The secret or key could not be loaded or used.
    #[error("credential problem: {0}")]
    Credential(String),
}

impl TokenError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

#[derive(Deserialize, Default)]
struct TokenErrorAnswer {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

/// Requests tokens from Entra ID. The secret (or private key) is read lazily, on
/// the first token request, so a container served from the token cache never
/// calls Secrets Manager at all.
pub struct Authenticator {
    http: reqwest::Client,
    token_url: Url,
    client_id: String,
    scope: String,
    credential: Credential,
    secrets: Option<aws_sdk_secretsmanager::Client>,
    secret: OnceCell<Secret>,
    requests: AtomicU64,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(
        http: reqwest::Client,
        config: &DynamicsConfig,
        secrets: Option<aws_sdk_secretsmanager::Client>,
    ) -> Self {
        Self {
            http,
            token_url: config.token_url.clone(),
            client_id: config.client_id.clone(),
            scope: config.scope.clone(),
            credential: config.credential.clone(),
            secrets,
            secret: OnceCell::new(),
            requests: AtomicU64::new(0),
        }
    }

    /// Uses a secret already at hand (the CLI, the local simulation) instead of
    /// resolving the configured reference.
    pub fn with_secret(self, secret: Secret) -> Self {
        Self {
            secret: OnceCell::new_with(Some(secret)),
            ..self
        }
    }

    /// Token requests this authenticator has sent (for metrics and benchmarks).
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    async fn secret(&self) -> Result<&Secret, TokenError> {
        let reference = match &self.credential {
            Credential::ClientSecret(reference) => reference,
            Credential::Certificate { private_key, .. } => private_key,
        };
        self.secret
            .get_or_try_init(|| async {
                reference
                    .resolve(self.secrets.as_ref())
                    .await
                    .map_err(TokenError::Credential)
            })
            .await
    }

    /// Asks Entra ID for a new token. Its lifetime is the `expires_in` the endpoint
    /// returns (60 to 90 minutes, varying), never an assumed constant.
    pub async fn request_token(&self) -> Result<AccessToken, TokenError> {
        let secret = self.secret().await?;
        let mut form: Vec<(&str, String)> = vec![
            ("grant_type", "client_credentials".into()),
            ("client_id", self.client_id.clone()),
            ("scope", self.scope.clone()),
        ];
        match &self.credential {
            Credential::ClientSecret(_) => form.push(("client_secret", secret.expose().to_owned())),
            Credential::Certificate { thumbprint, .. } => {
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push((
                    "client_assertion",
                    self.client_assertion(thumbprint, secret)?,
                ));
            }
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let requested_at = unix_now();
        let response = self
            .http
            .post(self.token_url.clone())
            .form(&form)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| TokenError::Unavailable(e.without_url().to_string()))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| TokenError::Unavailable(e.without_url().to_string()))?;
        if status.is_success() {
            let answer: TokenAnswer = serde_json::from_str(&body).map_err(|e| {
                TokenError::Unavailable(format!("token answer is not the documented JSON: {e}"))
            })?;
            return Ok(AccessToken {
                token: Secret::new(answer.access_token),
                expires_at: requested_at + answer.expires_in,
            });
        }
        let answer: TokenErrorAnswer = serde_json::from_str(&body).unwrap_or_default();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(TokenError::Unavailable(format!(
                "{status} {}",
                answer.error
            )));
        }
        Err(TokenError::Rejected {
            status: status.as_u16(),
            error: answer.error,
            description: answer
                .error_description
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        })
    }

    /// A client assertion signed with the certificate's private key (RS256), naming
    /// the certificate by its thumbprint in the `x5t` header.
    fn client_assertion(
        &self,
        thumbprint: &str,
        private_key: &Secret,
    ) -> Result<String, TokenError> {
        let thumbprint = hex::decode(thumbprint.replace(':', ""))
            .map_err(|_| TokenError::Credential("certificate thumbprint is not hex".into()))?;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.x5t = Some(URL_SAFE_NO_PAD.encode(thumbprint));
        let now = unix_now();
        let claims = serde_json::json!({
            "aud": self.token_url.as_str(),
            "iss": self.client_id,
            "sub": self.client_id,
            "jti": uuid::Uuid::new_v4().to_string(),
            "nbf": now,
            "iat": now,
            "exp": now + 600,
        });
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(private_key.expose().as_bytes())
            .map_err(|e| {
                TokenError::Credential(format!("private key is not an RSA PEM key: {e}"))
            })?;
        jsonwebtoken::encode(&header, &claims, &key).map_err(|e| {
            TokenError::Credential(format!("could not sign the client assertion: {e}"))
        })
    }
}
