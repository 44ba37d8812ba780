//! Secrets: text that must never reach a log line (client secrets, private keys,
//! tokens, webhook keys), where the configuration says each lives, and reading it.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use crate::on_demand::OnDemand;

/// Holds sensitive text. `Debug` and `Display` print a fixed placeholder, so a
/// secret inside any config, credential or error struct is redacted wherever
/// that struct is logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The secret text itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How the application authenticates to Entra ID.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Credential {
    ClientSecret(SecretRef),
    /// A certificate registered on the app: the client signs an assertion (RS256)
    /// with the private key; the thumbprint is the certificate's SHA-1 hex.
    Certificate {
        thumbprint: String,
        private_key: SecretRef,
    },
}

impl Credential {
    /// The secret the credential is made from.
    pub fn secret(&self) -> &SecretRef {
        match self {
            Self::ClientSecret(reference) => reference,
            Self::Certificate { private_key, .. } => private_key,
        }
    }
}

/// Where a secret lives. Never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretRef {
    /// An environment variable's name.
    Env(String),
    /// A Secrets Manager secret's ARN or name (the whole `SecretString`).
    SecretsManager(String),
}

/// Why a secret could not be read. Never carries the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable `{0}` is not set")]
    NotInEnvironment(String),
    #[error("secret `{0}` is in Secrets Manager, but no Secrets Manager client was given")]
    NoSecretsManager(String),
    #[error("secret `{id}`: {}", aws_sdk_secretsmanager::error::DisplayErrorContext(.source))]
    SecretsManager {
        id: String,
        #[source]
        source: Box<
            aws_sdk_secretsmanager::error::SdkError<
                aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError,
            >,
        >,
    },
    #[error("secret `{0}` has no SecretString")]
    NotAString(String),
}

impl SecretError {
    /// Secrets Manager throttled, failing or out of reach: the same read can
    /// succeed later. A missing secret or a refused permission will not.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::SecretsManager { source, .. } => crate::store_error::is_transient(source),
            Self::NotInEnvironment(_) | Self::NoSecretsManager(_) | Self::NotAString(_) => false,
        }
    }
}

impl SecretRef {
    /// Resolves the secret: from the environment, or from Secrets Manager.
    pub async fn resolve(
        &self,
        secrets: Option<&OnDemand<aws_sdk_secretsmanager::Client>>,
    ) -> Result<Secret, SecretError> {
        match self {
            Self::Env(name) => std::env::var(name)
                .ok()
                .filter(|value| !value.is_empty())
                .map(Secret::new)
                .ok_or_else(|| SecretError::NotInEnvironment(name.clone())),
            Self::SecretsManager(id) => {
                let client = secrets.ok_or_else(|| SecretError::NoSecretsManager(id.clone()))?;
                let answer = client
                    .get()
                    .get_secret_value()
                    .secret_id(id)
                    .send()
                    .await
                    .map_err(|source| SecretError::SecretsManager {
                        id: id.clone(),
                        source: Box::new(source),
                    })?;
                answer
                    .secret_string()
                    .map(Secret::new)
                    .ok_or_else(|| SecretError::NotAString(id.clone()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("hunter2-very-secret");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(!format!("{secret}").contains("hunter2"));
        assert_eq!(secret.expose(), "hunter2-very-secret");
    }
}
