//! Support for the end-to-end tests: the Dataverse emulator, moto_server for the
//! AWS services, and clients wired to both exactly as the functions wire theirs.

pub mod bench;
pub mod contact;
pub mod crash_proxy;
pub mod runtime_api;

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use dataverse_emulator::{Emulator, EmulatorOptions};
use shared::auth::Authenticator;
use shared::config::Config;
use shared::dataverse::DataverseClient;
use shared::dataverse::retry::RetryPolicy;
use shared::handoff::RetryMessage;
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
    shared::aws_http::config_loader(
        &shared::tls::TlsRoots::built_in()
            .expect("built-in roots")
            .https_client()
            .expect("the HTTPS client"),
    )
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
    config_yaml_via(emulator, &emulator.org_url())
}

/// The same document with every Dynamics URL on `base` (a proxy in front of the emulator).
pub fn config_yaml_via(emulator: &Emulator, base: &str) -> String {
    format!(
        "dynamics:
  url: {org}
  token_url: {base}/{tenant}/oauth2/v2.0/token
  tenant_id: {tenant}
  client_id: {client}
  credential: {{ client_secret: {{ env: CONNECT_DYNAMICS_TEST_SECRET }} }}
  request_timeout_ms: 3000
phone:
  default_country_code: \"44\"
",
        org = base,
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
    client_via(emulator, &emulator.org_url(), store)
}

/// A Dataverse client whose requests go to `base` (a proxy in front of the emulator).
pub fn client_via(emulator: &Emulator, base: &str, store: Option<TokenStore>) -> DataverseClient {
    let config = Config::from_yaml(&config_yaml_via(emulator, base))
        .expect("the test configuration is valid");
    let http = shared::tls::TlsRoots::built_in()
        .expect("built-in roots")
        .https_client()
        .expect("http client");
    let authenticator = Authenticator::new(http.clone(), config.dynamics.entra_app(), None)
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

/// Counts the requests an AWS SDK client sends (retries included).
#[derive(Debug, Clone, Default)]
pub struct RequestCounter(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl RequestCounter {
    pub fn count(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl aws_sdk_dynamodb::config::Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    fn read_before_transmit(
        &self,
        _context: &aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _components: &aws_sdk_dynamodb::config::RuntimeComponents,
        _cfg: &mut aws_sdk_dynamodb::config::ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

pub async fn create_table(
    client: &aws_sdk_dynamodb::Client,
    prefix: &str,
    keys: &[&str],
) -> String {
    let name = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let mut request = client
        .create_table()
        .table_name(&name)
        .billing_mode(BillingMode::PayPerRequest);
    for (index, key) in keys.iter().enumerate() {
        request = request
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(*key)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .expect("attribute definition"),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(*key)
                    .key_type(if index == 0 {
                        KeyType::Hash
                    } else {
                        KeyType::Range
                    })
                    .build()
                    .expect("key schema"),
            );
    }
    request.send().await.expect("create a table in moto_server");
    name
}

/// The AWS side of one test: its own tables, queues and bucket in moto_server.
pub struct AwsResources {
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub dynamodb_requests: RequestCounter,
    pub sqs: aws_sdk_sqs::Client,
    pub s3: aws_sdk_s3::Client,
    pub token_table: String,
    pub state_table: String,
    pub directory_table: String,
    pub retry_queue: String,
    pub dead_letter_queue: String,
    pub bucket: String,
    pub sdk: aws_config::SdkConfig,
}

type Clients = (
    aws_sdk_dynamodb::Client,
    aws_sdk_sqs::Client,
    aws_sdk_s3::Client,
);

fn clients(config: &aws_config::SdkConfig, dynamodb_requests: &RequestCounter) -> Clients {
    let dynamodb = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(config)
            .interceptor(dynamodb_requests.clone())
            .build(),
    );
    let sqs = aws_sdk_sqs::Client::new(config);
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(config)
            .force_path_style(true)
            .build(),
    );
    (dynamodb, sqs, s3)
}

impl AwsResources {
    /// The same tables, queues and bucket, reached through `endpoint` (a proxy in front of moto_server).
    pub fn through(&self, endpoint: &str) -> Self {
        let sdk = self.sdk.to_builder().endpoint_url(endpoint).build();
        let (dynamodb, sqs, s3) = clients(&sdk, &self.dynamodb_requests);
        Self {
            dynamodb,
            sqs,
            s3,
            sdk,
            dynamodb_requests: self.dynamodb_requests.clone(),
            token_table: self.token_table.clone(),
            state_table: self.state_table.clone(),
            directory_table: self.directory_table.clone(),
            retry_queue: self.retry_queue.clone(),
            dead_letter_queue: self.dead_letter_queue.clone(),
            bucket: self.bucket.clone(),
        }
    }

    pub async fn create() -> Self {
        let config = aws_config().await;
        let dynamodb_requests = RequestCounter::default();
        let (dynamodb, sqs, s3) = clients(&config, &dynamodb_requests);
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let queue = |name: String| {
            let sqs = sqs.clone();
            async move {
                sqs.create_queue()
                    .queue_name(name)
                    .send()
                    .await
                    .expect("create a queue in moto_server")
                    .queue_url
                    .expect("queue url")
            }
        };
        let bucket = format!("recordings-{suffix}");
        s3.create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .expect("create a bucket in moto_server");
        Self {
            token_table: token_table(&dynamodb).await,
            state_table: create_table(&dynamodb, "contact-state", &["contact_id"]).await,
            directory_table: create_table(&dynamodb, "directory", &["pk", "sk"]).await,
            retry_queue: queue(format!("retry-{suffix}")).await,
            dead_letter_queue: queue(format!("dead-letters-{suffix}")).await,
            dynamodb,
            dynamodb_requests,
            sqs,
            s3,
            bucket,
            sdk: config,
        }
    }

    /// Messages waiting in a queue, removed from it.
    pub async fn drain(&self, queue: &str) -> Vec<aws_sdk_sqs::types::Message> {
        let mut all = Vec::new();
        loop {
            let output = self
                .sqs
                .receive_message()
                .queue_url(queue)
                .max_number_of_messages(10)
                .send()
                .await
                .expect("receive from moto_server");
            let messages = output.messages.unwrap_or_default();
            if messages.is_empty() {
                return all;
            }
            for message in &messages {
                if let Some(handle) = message.receipt_handle() {
                    self.sqs
                        .delete_message()
                        .queue_url(queue)
                        .receipt_handle(handle)
                        .send()
                        .await
                        .expect("delete from moto_server");
                }
            }
            all.extend(messages);
        }
    }

    /// Messages waiting in `queue`, visible or still delayed. Both are read in one
    /// call: a delay that ends between two reads would otherwise hide a message
    /// from both (received as none while delayed, counted as none once visible).
    pub async fn pending_messages(&self, queue: &str) -> u64 {
        use aws_sdk_sqs::types::QueueAttributeName;
        let names = [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ];
        let output = self
            .sqs
            .get_queue_attributes()
            .queue_url(queue)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .expect("queue attributes from moto_server");
        let attributes = output.attributes.unwrap_or_default();
        names
            .iter()
            .filter_map(|name| attributes.get(name)?.parse::<u64>().ok())
            .sum()
    }

    pub async fn dead_letters(&self) -> Vec<serde_json::Value> {
        self.drain(&self.dead_letter_queue)
            .await
            .iter()
            .filter_map(|m| m.body().and_then(|b| serde_json::from_str(b).ok()))
            .collect()
    }
}

/// The close's wait for a recording in tests that do not set their own: short, so
/// that draining the retry queue also runs the delayed close, and never zero, so
/// that every delivery test goes through the hold.
pub const TEST_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A function's lifecycle wired to the emulator and moto_server, as `services` wires it in Lambda.
pub fn lifecycle(
    emulator: &Emulator,
    aws: &AwsResources,
    yaml_extra: &str,
) -> shared::lifecycle::Lifecycle {
    lifecycle_via(emulator, &emulator.org_url(), aws, yaml_extra)
}

/// A lifecycle whose Dynamics and Amazon Connect requests go to `base` (a proxy in
/// front of the emulator); its AWS clients are `aws`'s.
pub fn lifecycle_via(
    emulator: &Emulator,
    base: &str,
    aws: &AwsResources,
    yaml_extra: &str,
) -> shared::lifecycle::Lifecycle {
    let yaml = format!("{}{yaml_extra}", config_yaml_via(emulator, base));
    let mut config = Config::from_yaml(&yaml).expect("the test configuration is valid");
    if !yaml_extra.contains("close_grace_seconds") {
        config.contact.close_grace = TEST_CLOSE_GRACE;
    }
    let store = token_store(&aws.dynamodb, &aws.token_table, emulator);
    shared::lifecycle::Lifecycle {
        dataverse: client_via(emulator, base, Some(store)),
        state: shared::contact_state::ContactStateStore::dynamodb(
            aws.dynamodb.clone(),
            &aws.state_table,
        ),
        directory: std::sync::Arc::new(shared::directory::CallerDirectory::dynamodb(
            aws.dynamodb.clone(),
            &aws.directory_table,
        )),
        handoff: shared::handoff::Handoff::Sqs {
            client: aws.sqs.clone().into(),
            retry_queue_url: aws.retry_queue.clone(),
            dead_letter_queue_url: aws.dead_letter_queue.clone(),
        },
        s3: Some(aws.s3.clone().into()),
        agents: connect_agents(base, aws),
        config: std::sync::Arc::new(config),
        function: "test",
        retry_base_delay: Duration::ZERO,
    }
}

/// A lifecycle whose client secret lives in Secrets Manager (moto_server) under
/// `secret_id`, read the way a deployed function reads it: lazily, and again when
/// Entra ID refuses it.
pub fn lifecycle_with_stored_secret(
    emulator: &Emulator,
    aws: &AwsResources,
    secret_id: &str,
) -> shared::lifecycle::Lifecycle {
    lifecycle_with_secret_at(emulator, aws, secret_id, &aws_endpoint())
}

/// As [`lifecycle_with_stored_secret`], Secrets Manager reached at `endpoint`.
pub fn lifecycle_with_secret_at(
    emulator: &Emulator,
    aws: &AwsResources,
    secret_id: &str,
    endpoint: &str,
) -> shared::lifecycle::Lifecycle {
    let yaml = config_yaml(emulator).replace(
        "{ client_secret: { env: CONNECT_DYNAMICS_TEST_SECRET } }",
        &format!("{{ client_secret: {{ secrets_manager: {secret_id} }} }}"),
    );
    let config = Config::from_yaml(&yaml).expect("the test configuration is valid");
    let http = shared::tls::TlsRoots::built_in()
        .expect("built-in roots")
        .https_client()
        .expect("http client");
    let authenticator = Authenticator::new(
        http.clone(),
        config.dynamics.entra_app(),
        Some(
            aws_sdk_secretsmanager::Client::from_conf(
                aws_sdk_secretsmanager::config::Builder::from(&aws.sdk)
                    .endpoint_url(endpoint)
                    .build(),
            )
            .into(),
        ),
    );
    let store = token_store(&aws.dynamodb, &aws.token_table, emulator);
    let mut lifecycle = lifecycle(emulator, aws, "");
    lifecycle.dataverse = DataverseClient::new(
        http,
        config.dynamics.api_base.clone(),
        TokenCache::new(authenticator, Some(store)),
        RetryPolicy::default(),
        config.dynamics.request_timeout,
    );
    lifecycle
}

/// Agent lookups through Amazon Connect's signed `DescribeUser`, answered by the emulator.
pub fn connect_agents(base: &str, aws: &AwsResources) -> shared::agents::AgentResolver {
    let sdk = aws.sdk.to_builder().endpoint_url(base).build();
    let http = shared::tls::TlsRoots::built_in()
        .expect("built-in roots")
        .https_client()
        .expect("http client");
    let users =
        shared::connect_users::ConnectUsers::new(http, &sdk).expect("region and credentials");
    shared::agents::AgentResolver::new(shared::agents::UserSource::Connect(users))
}

/// The retry queue's next messages as the SQS event its trigger delivers, and how
/// many of them are retries (the delayed closes an ended step schedules are not);
/// `None` once the queue is empty with nothing delayed either.
pub async fn next_retry_batch(aws: &AwsResources) -> Option<(serde_json::Value, usize)> {
    loop {
        let messages = aws.drain(&aws.retry_queue).await;
        if messages.is_empty() {
            // A hand-off with a delay (a busy contact waits 2 s, a held close its
            // grace) is not received yet: the queue is drained only when nothing
            // waits in it at all.
            if aws.pending_messages(&aws.retry_queue).await == 0 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        let retries = messages
            .iter()
            .filter_map(|m| serde_json::from_str::<RetryMessage>(m.body()?).ok())
            .filter(|message| !message.close_due)
            .count();
        let records: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::json!({"messageId": m.message_id(), "body": m.body(), "eventSource": "aws:sqs"}))
            .collect();
        return Some((serde_json::json!({"Records": records}), retries));
    }
}

/// Feeds the retry queue's messages to contact-created until it stays empty; how
/// many were retries.
pub async fn drain_retries(lifecycle: &shared::lifecycle::Lifecycle, aws: &AwsResources) -> usize {
    let mut handled = 0;
    for _ in 0..100 {
        let Some((batch, retries)) = next_retry_batch(aws).await else {
            return handled;
        };
        handled += retries;
        let answer = shared::handlers::contact_created(lifecycle, batch, deadline(30))
            .await
            .expect("retry batch handled");
        assert_eq!(
            answer["batchItemFailures"],
            serde_json::json!([]),
            "retries failed: {answer}"
        );
    }
    panic!("the retry queue did not drain");
}

/// A fixture from `tests/fixtures`.
pub fn fixture(name: &str) -> serde_json::Value {
    let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
        .expect("fixture is JSON")
}

/// record-saved / sync-sweep wired to the emulator and moto_server, with the webhook key given.
pub async fn directory_sync(
    emulator: &Emulator,
    aws: &AwsResources,
    yaml_extra: &str,
    webhook_key: &str,
) -> shared::directory_sync::DirectorySync {
    let yaml = format!(
        "{}webhook:\n  key: {{ env: CONNECT_DYNAMICS_TEST_WEBHOOK_KEY }}\n  max_body_bytes: 65536\n{yaml_extra}",
        config_yaml(emulator)
    );
    let config = Config::from_yaml(&yaml).expect("the test configuration is valid");
    let store = token_store(&aws.dynamodb, &aws.token_table, emulator);
    let checkpoint_table = create_table(&aws.dynamodb, "checkpoints", &["entity"]).await;
    let keys = tokio::sync::OnceCell::new();
    keys.set(shared::webhook::WebhookKeys::new(&[Secret::new(
        webhook_key,
    )]))
    .expect("fresh cell");
    shared::directory_sync::DirectorySync {
        dataverse: client(emulator, Some(store)),
        directory: std::sync::Arc::new(shared::directory::CallerDirectory::dynamodb(
            aws.dynamodb.clone(),
            &aws.directory_table,
        )),
        handoff: shared::handoff::Handoff::Sqs {
            client: aws.sqs.clone().into(),
            retry_queue_url: aws.retry_queue.clone(),
            dead_letter_queue_url: aws.dead_letter_queue.clone(),
        },
        checkpoints: shared::directory_sync::CheckpointStore::DynamoDb {
            client: aws.dynamodb.clone(),
            table: checkpoint_table,
        },
        secrets: None,
        keys,
        config: std::sync::Arc::new(config),
        function: "test",
        retry_base_delay: Duration::ZERO,
    }
}

/// A directory of contacts found by `telephone1`, read `page_size` records a page.
pub fn contacts_directory_yaml(page_size: u32) -> String {
    format!(
        "directory:\n  sweep_page_size: {page_size}\n  entities:\n    - {{ entity_set: contacts, logical_name: contact, key: contactid, name: fullname, phones: [telephone1] }}\n"
    )
}

/// The phone number of the `n`-th contact [`seed_numbered_contacts`] makes.
pub fn numbered_phone(n: usize) -> String {
    format!("+4477009{n:05}")
}

/// `count` contacts in Dynamics, the `n`-th named `C<n>` with [`numbered_phone`]`(n)`; their ids in order.
pub fn seed_numbered_contacts(emulator: &Emulator, count: usize) -> Vec<uuid::Uuid> {
    (0..count)
        .map(|n| {
            emulator.seed(
                "contacts",
                serde_json::json!({"lastname": format!("C{n}"), "telephone1": numbered_phone(n)}),
            )
        })
        .collect()
}

/// The `contact` entry of record `id` with one number, as Dynamics held it at `modified`.
pub fn contact_entry(
    sync: &shared::directory_sync::DirectorySync,
    id: uuid::Uuid,
    number: &str,
    modified: &str,
) -> shared::mapping::DirectoryEntry {
    let mapping = sync
        .config
        .mapping_for("contact")
        .expect("the test directory maps contacts");
    mapping
        .map(
            &serde_json::json!({"contactid": id.to_string(), "modifiedon": modified, "fullname": "X", "telephone1": number}),
            &sync.config.phones,
        )
        .expect("a valid contact row")
}

/// Entries of one entity in the directory table.
pub async fn directory_entries(aws: &AwsResources, entity: &str) -> usize {
    let mut count = 0;
    let mut start = None;
    loop {
        let output = aws
            .dynamodb
            .scan()
            .table_name(&aws.directory_table)
            .filter_expression("sk = :entry AND entity = :entity")
            .expression_attribute_values(
                ":entry",
                aws_sdk_dynamodb::types::AttributeValue::S("entry".into()),
            )
            .expression_attribute_values(
                ":entity",
                aws_sdk_dynamodb::types::AttributeValue::S(entity.into()),
            )
            .set_exclusive_start_key(start)
            .send()
            .await
            .expect("scan the directory");
        count += output.items().len();
        match output.last_evaluated_key {
            Some(key) if !key.is_empty() => start = Some(key),
            _ => return count,
        }
    }
}
