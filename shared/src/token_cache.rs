//! Access tokens cached in memory for a warm container and in DynamoDB across
//! every container and function, refreshed ahead of expiry.
//!
//! Refresh is single-flight across containers: a container that finds no fresh
//! token takes a short lease with a conditional write, and only the lease holder
//! asks Entra ID; the others poll the table and use the token it writes. A lease
//! whose holder died simply runs out after `lease` (seconds), and the next
//! container takes over.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use tokio::sync::Mutex;

use crate::auth::{AccessToken, Authenticator, TokenError};
use crate::clock::{unix_millis, unix_now};
use crate::secret::Secret;
use crate::store_error::{StoreError, is_condition_failure};

/// A token is used until this long before it expires.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// How long a refreshing container holds the lease before others may take over.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);
/// Consecutive table errors after which a refresh bypasses the shared cache.
const MAX_TABLE_ERRORS: u32 = 3;
/// How long a token item outlives its expiry before the table's TTL removes it.
const TTL_SLACK_SECS: u64 = 3600;

pub struct TokenCache {
    authenticator: Authenticator,
    memory: Mutex<Option<AccessToken>>,
    store: Option<TokenStore>,
    refresh_margin: Duration,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("authenticator", &self.authenticator)
            .field("shared", &self.store.as_ref().map(|s| &s.table))
            .finish_non_exhaustive()
    }
}

/// The DynamoDB side of the cache: one item per tenant + client + scope.
///
/// Item: `cache_key` (S, key), `access_token` (S), `expires_at` (N, Unix s),
/// `ttl` (N, Unix s; the table's TTL attribute), and while a refresh runs
/// `lease_owner` (S) and `lease_until` (N, Unix ms).
#[derive(Debug, Clone)]
pub struct TokenStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    cache_key: String,
    lease: Duration,
}

impl TokenStore {
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        table: impl Into<String>,
        tenant: &str,
        client_id: &str,
        scope: &str,
    ) -> Self {
        Self {
            client,
            table: table.into(),
            cache_key: format!("{tenant}|{client_id}|{scope}"),
            lease: DEFAULT_LEASE,
        }
    }

    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    async fn read(&self) -> Result<Option<AccessToken>, StoreError> {
        let item = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("cache_key", AttributeValue::S(self.cache_key.clone()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| StoreError::from_sdk("DynamoDB", e))?;
        Ok(item.item.as_ref().and_then(token_from_item))
    }

    /// Takes the refresh lease unless a fresh token exists or a live lease is held.
    async fn try_lease(&self, owner: &str, margin: Duration) -> Result<bool, StoreError> {
        let now_ms = unix_millis();
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("cache_key", AttributeValue::S(self.cache_key.clone()))
            .update_expression("SET lease_owner = :owner, lease_until = :until")
            .condition_expression(
                "(attribute_not_exists(expires_at) OR expires_at <= :stale) AND (attribute_not_exists(lease_until) OR lease_until < :now)",
            )
            .expression_attribute_values(":owner", AttributeValue::S(owner.to_owned()))
            .expression_attribute_values(":until", number(now_ms + self.lease.as_millis() as u64))
            .expression_attribute_values(":stale", number(unix_now() + margin.as_secs()))
            .expression_attribute_values(":now", number(now_ms))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error) if is_condition_failure(&error) => Ok(false),
            Err(error) => Err(StoreError::from_sdk("DynamoDB", error)),
        }
    }

    /// Stores a new token and drops the lease, unless the table already holds a
    /// token that lives longer.
    async fn write(&self, token: &AccessToken) -> Result<(), StoreError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("cache_key", AttributeValue::S(self.cache_key.clone()))
            .item(
                "access_token",
                AttributeValue::S(token.token.expose().to_owned()),
            )
            .item("expires_at", number(token.expires_at))
            .item("ttl", number(token.expires_at + TTL_SLACK_SECS))
            .condition_expression("attribute_not_exists(expires_at) OR expires_at < :mine")
            .expression_attribute_values(":mine", number(token.expires_at))
            .send()
            .await;
        ignore_lost_condition(result)
    }

    /// Gives the lease back after a failed refresh, so the next container need not wait it out.
    async fn release(&self, owner: &str) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("cache_key", AttributeValue::S(self.cache_key.clone()))
            .update_expression("REMOVE lease_owner, lease_until")
            .condition_expression("lease_owner = :owner")
            .expression_attribute_values(":owner", AttributeValue::S(owner.to_owned()))
            .send()
            .await;
        ignore_lost_condition(result)
    }

    /// Removes a token Dataverse refused, but only that one: a newer token another
    /// container wrote meanwhile stays.
    async fn discard(&self, token: &AccessToken) -> Result<(), StoreError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("cache_key", AttributeValue::S(self.cache_key.clone()))
            .condition_expression("access_token = :refused")
            .expression_attribute_values(
                ":refused",
                AttributeValue::S(token.token.expose().to_owned()),
            )
            .send()
            .await;
        ignore_lost_condition(result)
    }
}

/// A conditional write whose condition did not hold changed nothing, on purpose.
fn ignore_lost_condition<T, E, R>(
    result: Result<T, aws_sdk_dynamodb::error::SdkError<E, R>>,
) -> Result<(), StoreError>
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match result {
        Ok(_) => Ok(()),
        Err(error) if is_condition_failure(&error) => Ok(()),
        Err(error) => Err(StoreError::from_sdk("DynamoDB", error)),
    }
}

fn number(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn token_from_item(item: &HashMap<String, AttributeValue>) -> Option<AccessToken> {
    let token = item.get("access_token")?.as_s().ok()?;
    let expires_at = item.get("expires_at")?.as_n().ok()?.parse().ok()?;
    Some(AccessToken {
        token: Secret::new(token.as_str()),
        expires_at,
    })
}

impl TokenCache {
    /// A cache shared through DynamoDB when `store` is given, in memory only otherwise.
    pub fn new(authenticator: Authenticator, store: Option<TokenStore>) -> Self {
        Self {
            authenticator,
            memory: Mutex::new(None),
            store,
            refresh_margin: DEFAULT_REFRESH_MARGIN,
        }
    }

    pub fn authenticator(&self) -> &Authenticator {
        &self.authenticator
    }

    /// A token fresh for at least the refresh margin. Within one container, callers
    /// queue behind one refresh; across containers, the DynamoDB lease does the same.
    pub async fn token(&self, deadline: Instant) -> Result<AccessToken, TokenError> {
        let mut memory = self.memory.lock().await;
        if let Some(token) = memory.as_ref().filter(|t| t.is_fresh(self.refresh_margin)) {
            return Ok(token.clone());
        }
        let token = match &self.store {
            Some(store) => self.shared_refresh(store, deadline).await?,
            None => self.request_token(deadline).await?,
        };
        *memory = Some(token.clone());
        Ok(token)
    }

    /// Forgets a token Dataverse answered 401 to, here and in the table.
    pub async fn invalidate(&self, refused: &AccessToken) {
        let mut memory = self.memory.lock().await;
        if memory.as_ref() == Some(refused) {
            *memory = None;
        }
        if let Some(store) = &self.store
            && let Err(error) = store.discard(refused).await
        {
            tracing::warn!(%error, "could not drop the refused token from the shared cache");
        }
    }

    async fn shared_refresh(
        &self,
        store: &TokenStore,
        deadline: Instant,
    ) -> Result<AccessToken, TokenError> {
        let owner = uuid::Uuid::new_v4().to_string();
        // A passing table error (a timeout under load) is waited out; only a table that
        // keeps failing is bypassed, so a burst of cold containers still costs one token.
        let mut table_errors = 0;
        loop {
            let pause = Duration::from_millis(40 + fastrand::u64(0..40));
            match store.read().await {
                Ok(Some(token)) if token.is_fresh(self.refresh_margin) => return Ok(token),
                Ok(_) => {}
                Err(error) => {
                    table_errors += 1;
                    if table_errors >= MAX_TABLE_ERRORS || Instant::now() + pause >= deadline {
                        return self.fallback(&error, deadline).await;
                    }
                    tokio::time::sleep(pause).await;
                    continue;
                }
            }
            match store.try_lease(&owner, self.refresh_margin).await {
                Ok(true) => {
                    let result = self.request_token(deadline).await;
                    for _ in 0..MAX_TABLE_ERRORS {
                        let stored = match &result {
                            Ok(token) => store.write(token).await,
                            Err(_) => store.release(&owner).await,
                        };
                        match stored {
                            Ok(()) => break,
                            Err(error) => {
                                tracing::warn!(%error, "could not update the shared token cache")
                            }
                        }
                    }
                    return result;
                }
                Ok(false) => {
                    // Someone else is refreshing: wait for the table, not for Entra ID.
                    if Instant::now() + pause >= deadline {
                        return Err(TokenError::Unavailable(
                            "deadline reached while another container was refreshing the token"
                                .into(),
                        ));
                    }
                    tokio::time::sleep(pause).await;
                }
                Err(error) => {
                    table_errors += 1;
                    if table_errors >= MAX_TABLE_ERRORS || Instant::now() + pause >= deadline {
                        return self.fallback(&error, deadline).await;
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// The table is unreachable: availability beats saving a token request.
    async fn fallback(
        &self,
        error: &StoreError,
        deadline: Instant,
    ) -> Result<AccessToken, TokenError> {
        tracing::warn!(%error, "shared token cache unavailable; requesting a token directly");
        self.request_token(deadline).await
    }

    /// A token request that gives up at the caller's deadline: a slow Entra ID must
    /// not hold the contact flow past its budget.
    async fn request_token(&self, deadline: Instant) -> Result<AccessToken, TokenError> {
        tokio::time::timeout_at(deadline.into(), self.authenticator.request_token())
            .await
            .unwrap_or_else(|_| {
                Err(TokenError::Unavailable(
                    "the token endpoint did not answer before the deadline".into(),
                ))
            })
    }
}
