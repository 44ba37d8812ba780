//! Support for the end-to-end tests: the Dataverse emulator, moto_server for the
//! AWS services, and clients wired to both exactly as the functions wire theirs.

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use dataverse_emulator::{Emulator, EmulatorOptions};
use shared::auth::Authenticator;
use shared::config::Config;
use shared::dataverse::DataverseClient;
use shared::dataverse::retry::RetryPolicy;
use shared::secret::Secret;
use shared::token_cache::{TokenCache, TokenStore};

/// The moto_server endpoint the test command started (`AWS_ENDPOINT_URL`).
pub fn aws_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!(
            "AWS_ENDPOINT_URL is not set: run the tests with `tests/run`, which starts moto_server"
        )
    })
}

/// SDK configuration pointing at moto_server, with throwaway credentials.
pub async fn aws_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(aws_endpoint())
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "testing", "testing", None, None, "tests",
        ))
        .load()
        .await
}

pub async fn dynamodb() -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&aws_config().await)
}

/// A token-cache table of its own for one test (the same key schema as the deployed one).
pub async fn token_table(client: &aws_sdk_dynamodb::Client) -> String {
    let name = format!("token-cache-{}", uuid::Uuid::new_v4().simple());
    client
        .create_table()
        .table_name(&name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("cache_key")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("attribute definition"),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("cache_key")
                .key_type(KeyType::Hash)
                .build()
                .expect("key schema"),
        )
        .send()
        .await
        .expect("create the token table in moto_server");
    name
}

pub async fn emulator() -> Emulator {
    emulator_with(EmulatorOptions::default()).await
}

pub async fn emulator_with(options: EmulatorOptions) -> Emulator {
    Emulator::start(options)
        .await
        .expect("start the Dataverse emulator")
}

/// A configuration document for the emulator (client secret from an env var the
/// tests never set: they hand the secret over directly).
pub fn config_yaml(emulator: &Emulator) -> String {
    format!(
        "dynamics:
  url: {org}
  token_url: {token}
  tenant_id: {tenant}
  client_id: {client}
  credential: {{ client_secret: {{ env: CONNECT_DYNAMICS_TEST_SECRET }} }}
  request_timeout_ms: 3000
phone:
  default_country_code: \"44\"
",
        org = emulator.org_url(),
        token = emulator.token_url(),
        tenant = emulator.options().tenant_id,
        client = emulator.options().client_id,
    )
}

pub fn config(emulator: &Emulator) -> Config {
    Config::from_yaml(&config_yaml(emulator)).expect("the test configuration is valid")
}

/// A client as one container would build it: its own HTTP pool and token cache,
/// shared through DynamoDB when a store is given.
pub fn client(emulator: &Emulator, store: Option<TokenStore>) -> DataverseClient {
    let config = config(emulator);
    let http = DataverseClient::http_client().expect("http client");
    let authenticator = Authenticator::new(http.clone(), &config.dynamics, None)
        .with_secret(Secret::new(emulator.options().client_secret.as_str()));
    let retry = RetryPolicy {
        max_attempts: 8,
        ..RetryPolicy::default()
    };
    DataverseClient::new(
        http,
        config.dynamics.api_base.clone(),
        TokenCache::new(authenticator, store),
        retry,
        config.dynamics.request_timeout,
    )
}

pub fn token_store(
    dynamodb: &aws_sdk_dynamodb::Client,
    table: &str,
    emulator: &Emulator,
) -> TokenStore {
    let config = config(emulator);
    TokenStore::new(
        dynamodb.clone(),
        table,
        &config.dynamics.tenant_id,
        &config.dynamics.client_id,
        &config.dynamics.scope,
    )
}

/// A deadline like a Lambda's remaining time.
pub fn deadline(seconds: u64) -> Instant {
    Instant::now() + Duration::from_secs(seconds)
}
