//! Building a function's clients once per container, and running it on Lambda.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;
use uuid::Uuid;

use crate::agents::{AgentResolver, Profile, UserSource};
use crate::auth::Authenticator;
use crate::config::{CONFIG_LOCATION_VAR, Config};
use crate::connect_users::ConnectUsers;
use crate::contact_state::ContactStateStore;
use crate::dataverse::DataverseClient;
use crate::dataverse::retry::RetryPolicy;
use crate::directory::CallerDirectory;
use crate::directory_sync::{CheckpointStore, DirectorySync};
use crate::handlers::{HandlerError, deadline_from};
use crate::handoff::Handoff;
use crate::lifecycle::Lifecycle;
use crate::on_demand::OnDemand;
use crate::tls::TlsRoots;
use crate::token_cache::{TokenCache, TokenStore};

#[derive(Debug, thiserror::Error)]
#[error("cannot start: {0}")]
pub struct StartupError(String);

fn required(name: &str) -> Result<String, StartupError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| StartupError(format!("environment variable {name} is not set")))
}

/// Everything a lifecycle function needs, from its environment:
/// `CONNECT_DYNAMICS_CONFIG`, `TOKEN_CACHE_TABLE`, `CONTACT_STATE_TABLE`,
/// `DIRECTORY_TABLE`, `RETRY_QUEUE_URL`, `DEAD_LETTER_QUEUE_URL`.
pub async fn lifecycle_from_env(function: &'static str) -> Result<Lifecycle, StartupError> {
    let common = common().await?;
    let users = ConnectUsers::new(common.http.clone(), &common.aws)
        .map_err(|e| StartupError(format!("Amazon Connect: {e}")))?;
    Ok(Lifecycle {
        agents: AgentResolver::new(UserSource::Connect(users)),
        dataverse: common.dataverse,
        state: ContactStateStore::dynamodb(
            common.dynamodb.clone(),
            required("CONTACT_STATE_TABLE")?,
        ),
        directory: Arc::new(CallerDirectory::dynamodb(
            common.dynamodb,
            required("DIRECTORY_TABLE")?,
        )),
        handoff: handoff(&common.aws)?,
        s3: Some(common.s3),
        config: Arc::new(common.config),
        function,
        retry_base_delay: crate::lifecycle::RETRY_BASE_DELAY,
    })
}

/// Runs a function on the Lambda runtime: logging set up, its services built
/// once per container by `build`, each event handed to `handler` with its deadline.
///
/// The Tokio runtime is single-threaded: Lambda hands a container one event at a
/// time and the work is waiting on the network, so worker threads would only add
/// their start-up (thread creation, reading the cgroup's CPU quota) to every cold
/// start.
pub fn run<S, B, BFut, F, Fut>(
    function: &'static str,
    build: B,
    handler: F,
) -> Result<(), lambda_runtime::Error>
where
    S: Send + Sync + 'static,
    B: FnOnce(&'static str) -> BFut,
    BFut: Future<Output = Result<S, StartupError>>,
    F: Fn(&'static S, Value, Instant) -> Fut,
    Fut: Future<Output = Result<Value, HandlerError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        crate::observe::init_logging();
        let services: &'static S = match build(function).await {
            // Lives as long as the container.
            Ok(services) => Box::leak(Box::new(services)),
            Err(error) => {
                tracing::error!(%error, "startup failed");
                return Err(error.into());
            }
        };
        let handler = &handler;
        lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
            handler(
                services,
                event.payload,
                deadline_from(event.context.deadline()),
            )
            .await
            .map_err(|error| lambda_runtime::Diagnostic {
                error_type: match error {
                    HandlerError::Malformed(_) => "MalformedEvent".into(),
                    HandlerError::Retry(_) => "HandoffFailed".into(),
                    HandlerError::Unfinished(_) => "Unfinished".into(),
                },
                error_message: error.to_string(),
            })
        }))
        .await
    })
}

/// Clients shared by every function: AWS config, S3 for the config document, the
/// Dataverse client with its DynamoDB token cache.
struct Common {
    aws: aws_config::SdkConfig,
    dynamodb: aws_sdk_dynamodb::Client,
    /// For a configuration kept in S3, and the lifecycle's recordings.
    s3: OnDemand<aws_sdk_s3::Client>,
    /// The HTTPS client behind the Dataverse client, for Amazon Connect's `DescribeUser`.
    http: reqwest::Client,
    /// For secrets kept in Secrets Manager, read when first needed.
    secrets: OnDemand<aws_sdk_secretsmanager::Client>,
    config: Config,
    dataverse: DataverseClient,
}

/// Bounds on every AWS call: the SDK's defaults have no operation timeout, so a
/// black-holed connection would hold an invocation until Lambda kills it.
fn aws_timeouts() -> aws_config::timeout::TimeoutConfig {
    aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(crate::tls::CONNECT_TIMEOUT)
        .operation_attempt_timeout(std::time::Duration::from_secs(5))
        .operation_timeout(std::time::Duration::from_secs(15))
        .build()
}

async fn common() -> Result<Common, StartupError> {
    // One HTTPS client, with one root store, for everything the container calls.
    let http = TlsRoots::from_env()
        .map_err(|e| StartupError(e.to_string()))?
        .https_client()
        .map_err(|e| StartupError(e.to_string()))?;
    let aws = crate::aws_http::config_loader(&http)
        .timeout_config(aws_timeouts())
        .load()
        .await;
    let s3 = OnDemand::aws(&aws, aws_sdk_s3::Client::new);
    let dynamodb = aws_sdk_dynamodb::Client::new(&aws);
    let location = required(CONFIG_LOCATION_VAR)?;
    let config = Config::load(&location, Some(&s3))
        .await
        .map_err(|e| StartupError(e.to_string()))?;
    check_stack_parameters(&config)?;
    let secrets = OnDemand::aws(&aws, aws_sdk_secretsmanager::Client::new);
    let authenticator = Authenticator::new(
        http.clone(),
        config.dynamics.entra_app(),
        Some(secrets.clone()),
    );
    let dynamics = &config.dynamics;
    let tokens = TokenStore::new(
        dynamodb.clone(),
        required("TOKEN_CACHE_TABLE")?,
        &dynamics.tenant_id,
        &dynamics.client_id,
        &dynamics.scope,
    );
    let dataverse = dataverse_client(
        http.clone(),
        dynamics,
        TokenCache::new(authenticator, Some(tokens)),
    );
    Ok(Common {
        aws,
        dynamodb,
        s3,
        http,
        secrets,
        config,
        dataverse,
    })
}

/// The Dataverse client with the configured retry bound and request timeout.
fn dataverse_client(
    http: reqwest::Client,
    dynamics: &crate::config::DynamicsConfig,
    tokens: TokenCache,
) -> DataverseClient {
    let retry = RetryPolicy {
        max_attempts: dynamics.max_attempts,
        ..RetryPolicy::default()
    };
    DataverseClient::new(
        http,
        dynamics.api_base.clone(),
        tokens,
        retry,
        dynamics.request_timeout,
    )
}

/// The stack's parameters (`DYNAMICS_URL`, `DYNAMICS_TENANT_ID`, `DYNAMICS_CLIENT_ID`)
/// must name the org the document names: a mismatch is a deployment mistake.
fn check_stack_parameters(config: &Config) -> Result<(), StartupError> {
    let dynamics = &config.dynamics;
    let checks = [
        ("DYNAMICS_URL", "dynamics.url", dynamics.org_url.as_str()),
        (
            "DYNAMICS_TENANT_ID",
            "dynamics.tenant_id",
            dynamics.tenant_id.as_str(),
        ),
        (
            "DYNAMICS_CLIENT_ID",
            "dynamics.client_id",
            dynamics.client_id.as_str(),
        ),
    ];
    for (variable, key, configured) in checks {
        if let Ok(parameter) = std::env::var(variable)
            && !parameter
                .trim_end_matches('/')
                .eq_ignore_ascii_case(configured)
        {
            return Err(StartupError(format!(
                "the stack parameter {variable} ({parameter}) differs from `{key}` in the configuration ({configured})"
            )));
        }
    }
    Ok(())
}

fn handoff(aws: &aws_config::SdkConfig) -> Result<Handoff, StartupError> {
    Ok(Handoff::Sqs {
        client: OnDemand::aws(aws, aws_sdk_sqs::Client::new),
        retry_queue_url: required("RETRY_QUEUE_URL")?,
        dead_letter_queue_url: required("DEAD_LETTER_QUEUE_URL")?,
    })
}

/// record-saved and sync-sweep, from their environment: as for the lifecycle, plus
/// `CHECKPOINT_TABLE` (sync-sweep).
pub async fn directory_sync_from_env(
    function: &'static str,
) -> Result<DirectorySync, StartupError> {
    let common = common().await?;
    let checkpoint_table = std::env::var("CHECKPOINT_TABLE").unwrap_or_default();
    Ok(DirectorySync {
        dataverse: common.dataverse,
        directory: Arc::new(CallerDirectory::dynamodb(
            common.dynamodb.clone(),
            required("DIRECTORY_TABLE")?,
        )),
        handoff: handoff(&common.aws)?,
        checkpoints: CheckpointStore::DynamoDb {
            client: common.dynamodb,
            table: checkpoint_table,
        },
        secrets: Some(common.secrets),
        keys: tokio::sync::OnceCell::new(),
        config: Arc::new(common.config),
        function,
        retry_base_delay: crate::lifecycle::RETRY_BASE_DELAY,
    })
}

/// A lifecycle for local runs (the CLI's `simulate` and `preview`): the given
/// Dataverse org or emulator, with in-memory state, directory and queues.
pub fn local_lifecycle(
    config: Config,
    secret: crate::secret::Secret,
    known_agents: HashMap<Uuid, Profile>,
    function: &'static str,
) -> Result<Lifecycle, StartupError> {
    let http = TlsRoots::from_env()
        .map_err(|e| StartupError(e.to_string()))?
        .https_client()
        .map_err(|e| StartupError(e.to_string()))?;
    let authenticator =
        Authenticator::new(http.clone(), config.dynamics.entra_app(), None).with_secret(secret);
    let dynamics = &config.dynamics;
    let dataverse = dataverse_client(http, dynamics, TokenCache::new(authenticator, None));
    Ok(Lifecycle {
        dataverse,
        state: ContactStateStore::memory(),
        directory: Arc::new(CallerDirectory::memory()),
        handoff: Handoff::memory(),
        s3: None,
        agents: AgentResolver::new(UserSource::Known(known_agents)),
        config: Arc::new(config),
        function,
        retry_base_delay: std::time::Duration::ZERO,
    })
}

/// record-saved and sync-sweep for local runs, sharing the lifecycle's directory
/// and Dataverse client; the webhook accepts `webhook_key`.
pub fn local_directory_sync(
    lifecycle: &Lifecycle,
    webhook_key: &crate::secret::Secret,
) -> DirectorySync {
    let keys = tokio::sync::OnceCell::new();
    // A fresh cell always takes its first value.
    let _ = keys.set(crate::webhook::WebhookKeys::new(std::slice::from_ref(
        webhook_key,
    )));
    DirectorySync {
        config: lifecycle.config.clone(),
        dataverse: lifecycle.dataverse.clone(),
        directory: lifecycle.directory.clone(),
        handoff: Handoff::memory(),
        checkpoints: CheckpointStore::memory(),
        secrets: None,
        keys,
        function: "cli",
        retry_base_delay: std::time::Duration::ZERO,
    }
}

/// Resolves a secret reference for a command-line run (environment, or Secrets
/// Manager with the standard AWS configuration).
pub async fn resolve_secret(
    reference: &crate::secret::SecretRef,
) -> Result<crate::secret::Secret, StartupError> {
    let client = match reference {
        crate::secret::SecretRef::SecretsManager(_) => {
            let http = TlsRoots::from_env()
                .map_err(|e| StartupError(e.to_string()))?
                .https_client()
                .map_err(|e| StartupError(e.to_string()))?;
            let aws = crate::aws_http::config_loader(&http).load().await;
            Some(aws_sdk_secretsmanager::Client::new(&aws).into())
        }
        crate::secret::SecretRef::Env(_) => None,
    };
    reference
        .resolve(client.as_ref())
        .await
        .map_err(|e| StartupError(e.to_string()))
}
