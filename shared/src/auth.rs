//! OAuth 2.0 client credentials against the Microsoft Entra ID v2 token endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use tokio::sync::Mutex;
use url::Url;

use crate::clock::unix_now;
use crate::on_demand::OnDemand;
use crate::secret::{Credential, Secret, SecretError};

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
    /// The secret or key could not be read.
    #[error("credential unavailable: {0}")]
    Secret(#[source] std::sync::Arc<SecretError>),
    /// The key could not be used.
    #[error("credential problem: {0}")]
    Credential(String),
}

impl TokenError {
    /// Entra ID unavailable, or the credential refused: a secret rotation in
    /// progress looks like that until Secrets Manager holds the value Entra ID
    /// accepts, so it is retried within the retry window before it is dead-lettered.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Secret(error) => error.is_transient(),
            Self::Rejected { .. } => self.is_refused_credential(),
            Self::Credential(_) => false,
        }
    }

    /// `invalid_client`: the secret (or certificate assertion) is not one Entra ID accepts.
    pub fn is_refused_credential(&self) -> bool {
        matches!(self, Self::Rejected { error, .. } if error == "invalid_client")
    }
}

/// A rotated secret is looked for again at most this often per container.
const SECRET_REREAD_INTERVAL: Duration = Duration::from_secs(60);

/// The credential as last read, and when it was last re-read after a refusal.
#[derive(Default)]
struct LoadedSecret {
    value: Option<Secret>,
    reread_at: Option<Instant>,
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

/// The application registration tokens are requested for.
#[derive(Debug, Clone)]
pub struct EntraApp {
    /// The tenant's v2.0 token endpoint.
    pub token_url: Url,
    pub client_id: String,
    /// `<org>/.default`.
    pub scope: String,
    pub credential: Credential,
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
    secrets: Option<OnDemand<aws_sdk_secretsmanager::Client>>,
    secret: Mutex<LoadedSecret>,
    /// A secret handed over directly (`with_secret`): there is nothing to re-read.
    pinned: bool,
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
        app: EntraApp,
        secrets: Option<OnDemand<aws_sdk_secretsmanager::Client>>,
    ) -> Self {
        let EntraApp {
            token_url,
            client_id,
            scope,
            credential,
        } = app;
        Self {
            http,
            token_url,
            client_id,
            scope,
            credential,
            secrets,
            secret: Mutex::default(),
            pinned: false,
            requests: AtomicU64::new(0),
        }
    }

    /// Uses a secret already at hand (the CLI, the local simulation) instead of
    /// resolving the configured reference.
    pub fn with_secret(self, secret: Secret) -> Self {
        Self {
            secret: Mutex::new(LoadedSecret {
                value: Some(secret),
                reread_at: None,
            }),
            pinned: true,
            ..self
        }
    }

    /// Token requests this authenticator has sent (for metrics and benchmarks).
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    async fn resolve(&self) -> Result<Secret, TokenError> {
        self.credential
            .secret()
            .resolve(self.secrets.as_ref())
            .await
            .map_err(|error| TokenError::Secret(error.into()))
    }

    /// The secret, read on first use.
    async fn secret(&self) -> Result<Secret, TokenError> {
        let mut loaded = self.secret.lock().await;
        if let Some(value) = &loaded.value {
            return Ok(value.clone());
        }
        let value = self.resolve().await?;
        loaded.value = Some(value.clone());
        Ok(value)
    }

    /// After Entra ID refused `refused`: the secret as stored now, when it differs
    /// (someone rotated it) and no re-read happened within the last minute.
    async fn rotated_secret(&self, refused: &Secret) -> Result<Option<Secret>, TokenError> {
        if self.pinned {
            return Ok(None);
        }
        let mut loaded = self.secret.lock().await;
        if loaded.value.as_ref() != Some(refused) {
            // Another request already picked up a newer value.
            return Ok(loaded.value.clone());
        }
        if loaded
            .reread_at
            .is_some_and(|at| at.elapsed() < SECRET_REREAD_INTERVAL)
        {
            return Ok(None);
        }
        loaded.reread_at = Some(Instant::now());
        let current = self.resolve().await?;
        if current == *refused {
            return Ok(None);
        }
        tracing::warn!(
            "the credential was refused and has changed where it is stored; using the new value"
        );
        loaded.value = Some(current.clone());
        Ok(Some(current))
    }

    /// Asks Entra ID for a new token. Its lifetime is the `expires_in` the endpoint
    /// returns (60 to 90 minutes, varying), never an assumed constant. A refused
    /// credential is read again from where it is stored (a rotation) and tried once more.
    pub async fn request_token(&self) -> Result<AccessToken, TokenError> {
        let secret = self.secret().await?;
        match self.request_token_with(&secret).await {
            Err(error) if error.is_refused_credential() => {
                match self.rotated_secret(&secret).await? {
                    Some(rotated) => self.request_token_with(&rotated).await,
                    None => Err(error),
                }
            }
            answer => answer,
        }
    }

    async fn request_token_with(&self, secret: &Secret) -> Result<AccessToken, TokenError> {
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
