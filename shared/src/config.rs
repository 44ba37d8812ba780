//! The one YAML configuration document, parsed and validated once per container.
//!
//! Every error names the exact key path (`contact.ended.body.actualend`), so an
//! operator can fix a deployment from the first log line. Secrets are never in the
//! document: it names where they live (an environment variable or Secrets Manager).

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use url::Url;
use uuid::Uuid;

use crate::auth::EntraApp;
use crate::dataverse::odata::{EntitySet, Identifier};
use crate::mapping::EntityMapping;
use crate::on_demand::OnDemand;
use crate::phone::PhoneNormalizer;
use crate::secret::{Credential, SecretRef};
use crate::template::{PayloadTemplate, Templates, TextTemplate};

/// The environment variable that locates the document: a file path, or `s3://bucket/key`.
pub const CONFIG_LOCATION_VAR: &str = "CONNECT_DYNAMICS_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: `{path}`: {message}")]
    Invalid { path: String, message: String },
    #[error("configuration could not be read from {location}: {message}")]
    Unreadable { location: String, message: String },
}

impl ConfigError {
    fn at(path: impl Into<String>, message: impl ToString) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.to_string(),
        }
    }

    /// The key path an `Invalid` error names.
    pub fn path(&self) -> Option<&str> {
        match self {
            Self::Invalid { path, .. } => Some(path),
            Self::Unreadable { .. } => None,
        }
    }
}

// ---------------------------------------------------------------------------
// The document as written.
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    dynamics: DynamicsDocument,
    #[serde(default)]
    phone: PhoneDocument,
    #[serde(default)]
    contact: ContactDocument,
    #[serde(default)]
    directory: DirectoryDocument,
    #[serde(default)]
    webhook: Option<WebhookConfig>,
}

/// How record-saved authenticates Dynamics: the WebHook key (`?code=`), a next key
/// during rotation, and optionally one header carrying the same key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub key: SecretRef,
    #[serde(default)]
    pub next_key: Option<SecretRef>,
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
}

fn default_max_body_bytes() -> usize {
    1024 * 1024
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DynamicsDocument {
    url: String,
    tenant_id: String,
    client_id: String,
    credential: Credential,
    #[serde(default)]
    token_url: Option<String>,
    #[serde(default = "default_api_version")]
    api_version: String,
    #[serde(default)]
    app_id: Option<Uuid>,
    #[serde(default = "default_request_timeout_ms")]
    request_timeout_ms: u64,
    #[serde(default = "default_max_attempts")]
    max_attempts: u32,
    /// The integration's own application user: its saves are not echoed back.
    #[serde(default)]
    application_user_id: Option<Uuid>,
}

fn default_api_version() -> String {
    "v9.2".into()
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_max_attempts() -> u32 {
    6
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PhoneDocument {
    #[serde(default = "default_country_code")]
    default_country_code: String,
}

impl Default for PhoneDocument {
    fn default() -> Self {
        Self {
            default_country_code: default_country_code(),
        }
    }
}

fn default_country_code() -> String {
    "1".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContactDocument {
    #[serde(default = "default_activity_set")]
    entity_set: EntitySet,
    #[serde(default = "default_activity_name")]
    logical_name: Identifier,
    #[serde(default = "default_screen_pop")]
    screen_pop_url: String,
    #[serde(default = "default_state_ttl_days")]
    state_ttl_days: u32,
    #[serde(default = "default_created")]
    created: StepDocument,
    #[serde(default = "default_answered")]
    answered: StepDocument,
    #[serde(default = "default_ended")]
    ended: EndedDocument,
    #[serde(default = "default_recording")]
    recording: StepDocument,
    /// The link a recording step writes: a template over `recording.*` and the contact.
    #[serde(default = "default_recording_link")]
    recording_link: String,
    /// Add chat transcripts and Contact Lens transcripts as notes on the record.
    #[serde(default = "default_true")]
    transcript_notes: bool,
    /// Keep a note of an original (unredacted) transcript even when Contact Lens
    /// also wrote a redacted one. Off: once a redacted transcript exists, only it
    /// is a note, and an original's note made before it arrived is deleted.
    #[serde(default)]
    original_transcript_notes: bool,
    /// Link recordings with a presigned S3 URL valid this long (at most 7 days; in
    /// Lambda also bounded by the role session) instead of `recording_link`.
    #[serde(default)]
    recording_presign_seconds: Option<u64>,
    /// Transcript files larger than this are linked, not read.
    #[serde(default = "default_transcript_max_bytes")]
    transcript_max_bytes: u64,
    /// How long the flow invocation may spend on Dynamics before it answers and
    /// hands the creation off (the flow allows 8 s in all).
    #[serde(default = "default_flow_budget_ms")]
    flow_budget_ms: u64,
    /// How long an update may wait for its contact's creation, or for Dynamics to
    /// come back, before it is dead-lettered.
    #[serde(default = "default_retry_window_minutes")]
    retry_window_minutes: u64,
    /// After the contact ends, hold the record's close this long for its call
    /// recording or chat transcript, so the file's link and the close are one
    /// write instead of a close, a reopen and a second close. 0 closes at once.
    #[serde(default = "default_close_grace_seconds")]
    close_grace_seconds: u64,
    /// The channels whose contacts leave a file in S3 (a voice call only when an
    /// agent took it: Amazon Connect records the agent's conversation).
    #[serde(default = "default_close_grace_channels")]
    close_grace_channels: Vec<String>,
    /// A start time from the `INITIATED` event that differs from the flow's by less
    /// than this rides on the contact's next write instead of a request of its own.
    #[serde(default = "default_start_tolerance_seconds")]
    start_tolerance_seconds: u64,
    /// How the record names the matched customer: its `regarding` lookup, or an
    /// activity party (the caller as sender of an inbound call, recipient of an outbound one).
    #[serde(default)]
    bind_customer_as: CustomerBinding,
    /// Make the answering agent's Dynamics user the record's owner, matched by
    /// this `systemusers` column (`internalemailaddress` against the agent's
    /// email, else username; `domainname` against the username).
    #[serde(default)]
    owner_from_agent: Option<OwnerColumn>,
}

impl Default for ContactDocument {
    fn default() -> Self {
        Self {
            entity_set: default_activity_set(),
            logical_name: default_activity_name(),
            screen_pop_url: default_screen_pop(),
            state_ttl_days: default_state_ttl_days(),
            created: default_created(),
            answered: default_answered(),
            ended: default_ended(),
            recording: default_recording(),
            recording_link: default_recording_link(),
            transcript_notes: true,
            original_transcript_notes: false,
            recording_presign_seconds: None,
            transcript_max_bytes: default_transcript_max_bytes(),
            flow_budget_ms: default_flow_budget_ms(),
            retry_window_minutes: default_retry_window_minutes(),
            close_grace_seconds: default_close_grace_seconds(),
            close_grace_channels: default_close_grace_channels(),
            start_tolerance_seconds: default_start_tolerance_seconds(),
            bind_customer_as: CustomerBinding::default(),
            owner_from_agent: None,
        }
    }
}

fn default_recording_link() -> String {
    "https://s3.console.aws.amazon.com/s3/object/{{ recording.bucket }}?prefix={{ recording.key | urlencode }}".into()
}
fn default_true() -> bool {
    true
}
fn default_transcript_max_bytes() -> u64 {
    1024 * 1024
}
fn default_flow_budget_ms() -> u64 {
    3000
}
fn default_retry_window_minutes() -> u64 {
    120
}
fn default_close_grace_seconds() -> u64 {
    300
}
fn default_close_grace_channels() -> Vec<String> {
    vec!["VOICE".into(), "CHAT".into()]
}
fn default_start_tolerance_seconds() -> u64 {
    120
}

/// How the record is tied to the matched customer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CustomerBinding {
    #[default]
    Regarding,
    ActivityParty,
    None,
}

/// The `systemusers` column an agent is matched by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerColumn {
    Internalemailaddress,
    Domainname,
}

impl OwnerColumn {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internalemailaddress => "internalemailaddress",
            Self::Domainname => "domainname",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepDocument {
    body: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndedDocument {
    body: Value,
    /// The state change that closes the activity, written last; none keeps it open.
    #[serde(default)]
    close: Option<Value>,
}

fn default_activity_set() -> EntitySet {
    EntitySet::new("phonecalls").expect("a literal identifier")
}
fn default_activity_name() -> Identifier {
    Identifier::new("phonecall").expect("a literal identifier")
}
fn default_screen_pop() -> String {
    "{{ org_url }}/main.aspx?{% if app_id %}appid={{ app_id }}&{% endif %}pagetype=entityrecord&etn={{ record.entity }}&id={{ record.id }}".into()
}
fn default_state_ttl_days() -> u32 {
    30
}
/// The first line of the default description; later steps repeat it and add theirs,
/// since Dataverse has no "append" and each step writes the whole column.
const DESCRIPTION_HEAD: &str = "Amazon Connect {{ Channel | lower }} contact {{ ContactId }} ({{ InitiationMethod | default('') | lower }})";
const DESCRIPTION_ANSWERED: &str = "{% if agent is defined %}\nAnswered by agent {{ agent.username | default(agent.id) }}{% if ConnectedToAgentTimestamp is defined %} at {{ ConnectedToAgentTimestamp }}{% endif %}{% endif %}";

/// Every file of the contact on its own line: each recording step writes the whole
/// column, so listing only its own file would keep just the last one.
const DESCRIPTION_FILES: &str = "{% for file in recordings %}\n{{ file.kind | capitalize }}{{ ' (redacted)' if file.redacted }}: {{ file.url }}{% endfor %}";

fn default_created() -> StepDocument {
    StepDocument {
        body: json!({
            "subject": "{{ {'VOICE': 'Call', 'CHAT': 'Chat', 'TASK': 'Task', 'EMAIL': 'Email'}[Channel] | default('Contact') }} from {{ CustomerEndpoint | default('an unknown number') }}",
            "phonenumber": "{{ CustomerEndpoint | default(none) }}",
            "directioncode": "{{ InitiationMethod == 'OUTBOUND' }}",
            "actualstart": "{{ InitiationTimestamp | datetime }}",
            "description": DESCRIPTION_HEAD,
        }),
    }
}
fn default_answered() -> StepDocument {
    StepDocument {
        body: json!({ "description": format!("{DESCRIPTION_HEAD}{DESCRIPTION_ANSWERED}") }),
    }
}
fn default_ended() -> EndedDocument {
    EndedDocument {
        body: json!({
            "actualend": "{{ DisconnectTimestamp | datetime }}",
            "actualdurationminutes": "{{ DurationMinutes | default(0) }}",
        }),
        close: Some(json!({
            "statecode": 1,
            "statuscode": "{{ 2 if InitiationMethod == 'OUTBOUND' else 4 }}",
        })),
    }
}
fn default_recording() -> StepDocument {
    StepDocument {
        body: json!({
            "description": format!("{DESCRIPTION_HEAD}{DESCRIPTION_ANSWERED}{DESCRIPTION_FILES}"),
        }),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DirectoryDocument {
    #[serde(default)]
    entities: Option<Vec<EntityMapping>>,
    /// Records per change-tracking page in a sweep.
    #[serde(default)]
    sweep_page_size: Option<u32>,
}

fn default_directory() -> Vec<EntityMapping> {
    // From JSON rather than YAML: the YAML parser's buffers cost a cold start more
    // than this whole document.
    serde_json::from_value(json!([
        {"entity_set": "contacts", "logical_name": "contact", "key": "contactid", "name": "fullname",
            "phones": ["telephone1", "telephone2", "mobilephone"], "priority": 1},
        {"entity_set": "accounts", "logical_name": "account", "key": "accountid", "name": "name",
            "phones": ["telephone1", "telephone2"], "priority": 2},
    ]))
    .expect("the built-in directory mapping parses")
}

// ---------------------------------------------------------------------------
// The validated configuration.
// ---------------------------------------------------------------------------

/// The validated configuration: templates compiled, URLs checked, names validated.
#[derive(Debug)]
pub struct Config {
    pub dynamics: DynamicsConfig,
    pub phones: PhoneNormalizer,
    pub contact: ContactConfig,
    pub directory: Vec<EntityMapping>,
    pub sweep_page_size: u32,
    pub webhook: Option<WebhookConfig>,
    pub templates: Templates,
}

#[derive(Debug, Clone)]
pub struct DynamicsConfig {
    /// The organisation URL without a trailing slash (`https://contoso.crm.dynamics.com`).
    pub org_url: String,
    /// `<org>/api/data/v9.2/`, with the trailing slash.
    pub api_base: Url,
    pub tenant_id: String,
    pub client_id: String,
    pub credential: Credential,
    pub token_url: Url,
    /// `<org>/.default`.
    pub scope: String,
    pub app_id: Option<Uuid>,
    pub request_timeout: Duration,
    pub max_attempts: u32,
    pub application_user_id: Option<Uuid>,
}

impl DynamicsConfig {
    /// The application as Entra ID knows it, for the token requests.
    pub fn entra_app(&self) -> EntraApp {
        EntraApp {
            token_url: self.token_url.clone(),
            client_id: self.client_id.clone(),
            scope: self.scope.clone(),
            credential: self.credential.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ContactConfig {
    pub entity_set: EntitySet,
    pub logical_name: Identifier,
    pub screen_pop_url: TextTemplate,
    pub state_ttl_days: u32,
    pub created: PayloadTemplate,
    pub answered: PayloadTemplate,
    pub ended: PayloadTemplate,
    pub close: Option<PayloadTemplate>,
    pub recording: PayloadTemplate,
    pub recording_link: TextTemplate,
    pub transcript_notes: bool,
    pub original_transcript_notes: bool,
    pub recording_presign: Option<Duration>,
    pub transcript_max_bytes: u64,
    pub flow_budget: Duration,
    pub retry_window: Duration,
    pub close_grace: Duration,
    /// Upper case, as Amazon Connect names channels.
    pub close_grace_channels: Vec<String>,
    pub start_tolerance: Duration,
    pub bind_customer_as: CustomerBinding,
    pub owner_from_agent: Option<OwnerColumn>,
}

impl Config {
    /// Parses and validates a YAML document.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let document: Document = parse_yaml(text)?;
        Self::validate(document)
    }

    fn validate(document: Document) -> Result<Self, ConfigError> {
        let dynamics = validate_dynamics(document.dynamics)?;
        let phones = PhoneNormalizer::new(&document.phone.default_country_code)
            .map_err(|e| ConfigError::at("phone.default_country_code", e))?;
        let mut templates = Templates::new(phones.clone());
        let contact_document = document.contact;
        let mut payload = |path: &str, body: &Value| -> Result<PayloadTemplate, ConfigError> {
            if !body.is_object() {
                return Err(ConfigError::at(
                    path,
                    "must be a JSON object (the request body)",
                ));
            }
            templates
                .compile_payload(path, body)
                .map_err(|e| ConfigError::at(e.path().to_owned(), e))
        };
        let created = payload("contact.created.body", &contact_document.created.body)?;
        let answered = payload("contact.answered.body", &contact_document.answered.body)?;
        let ended = payload("contact.ended.body", &contact_document.ended.body)?;
        let close = contact_document
            .ended
            .close
            .as_ref()
            .map(|close| payload("contact.ended.close", close))
            .transpose()?;
        let recording = payload("contact.recording.body", &contact_document.recording.body)?;
        let screen_pop_url = templates
            .compile_text("contact.screen_pop_url", &contact_document.screen_pop_url)
            .map_err(|e| ConfigError::at("contact.screen_pop_url", e))?;
        let recording_link = templates
            .compile_text("contact.recording_link", &contact_document.recording_link)
            .map_err(|e| ConfigError::at("contact.recording_link", e))?;
        if !(500..=7000).contains(&contact_document.flow_budget_ms) {
            return Err(ConfigError::at(
                "contact.flow_budget_ms",
                "must be between 500 and 7000 (the flow waits 8 s at most)",
            ));
        }
        if contact_document
            .recording_presign_seconds
            .is_some_and(|s| !(1..=604_800).contains(&s))
        {
            return Err(ConfigError::at(
                "contact.recording_presign_seconds",
                "must be between 1 and 604800 (7 days, S3's limit)",
            ));
        }
        if contact_document.retry_window_minutes == 0 {
            return Err(ConfigError::at(
                "contact.retry_window_minutes",
                "must be at least 1",
            ));
        }
        if contact_document.close_grace_seconds > 900 {
            return Err(ConfigError::at(
                "contact.close_grace_seconds",
                "must be at most 900 (15 minutes, the longest SQS delay)",
            ));
        }
        if contact_document.state_ttl_days == 0 {
            return Err(ConfigError::at(
                "contact.state_ttl_days",
                "must be at least 1",
            ));
        }
        let sweep_page_size = document.directory.sweep_page_size.unwrap_or(1000);
        if !(1..=5000).contains(&sweep_page_size) {
            return Err(ConfigError::at(
                "directory.sweep_page_size",
                "must be between 1 and 5000",
            ));
        }
        if let Some(webhook) = &document.webhook {
            validate_secret_ref("webhook.key", &webhook.key)?;
            if let Some(next) = &webhook.next_key {
                validate_secret_ref("webhook.next_key", next)?;
            }
            let header_ok = webhook.header.as_deref().is_none_or(|h| {
                !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
            if !header_ok {
                return Err(ConfigError::at(
                    "webhook.header",
                    "must be an HTTP header name",
                ));
            }
        }
        let directory = document
            .directory
            .entities
            .unwrap_or_else(default_directory);
        validate_directory(&directory)?;
        Ok(Self {
            dynamics,
            phones,
            contact: ContactConfig {
                entity_set: contact_document.entity_set,
                logical_name: contact_document.logical_name,
                screen_pop_url,
                state_ttl_days: contact_document.state_ttl_days,
                created,
                answered,
                ended,
                close,
                recording,
                recording_link,
                transcript_notes: contact_document.transcript_notes,
                original_transcript_notes: contact_document.original_transcript_notes,
                recording_presign: contact_document
                    .recording_presign_seconds
                    .map(Duration::from_secs),
                transcript_max_bytes: contact_document.transcript_max_bytes,
                flow_budget: Duration::from_millis(contact_document.flow_budget_ms),
                retry_window: Duration::from_secs(contact_document.retry_window_minutes * 60),
                close_grace: Duration::from_secs(contact_document.close_grace_seconds),
                close_grace_channels: contact_document
                    .close_grace_channels
                    .iter()
                    .map(|channel| channel.to_ascii_uppercase())
                    .collect(),
                start_tolerance: Duration::from_secs(contact_document.start_tolerance_seconds),
                bind_customer_as: contact_document.bind_customer_as,
                owner_from_agent: contact_document.owner_from_agent,
            },
            directory,
            sweep_page_size,
            webhook: document.webhook,
            templates,
        })
    }

    /// Reads the document from where `CONNECT_DYNAMICS_CONFIG` points: a file, or
    /// `s3://bucket/key` (read with the given S3 client).
    pub async fn load(
        location: &str,
        s3: Option<&OnDemand<aws_sdk_s3::Client>>,
    ) -> Result<Self, ConfigError> {
        let unreadable = |message: String| ConfigError::Unreadable {
            location: location.to_owned(),
            message,
        };
        let text = if let Some(object) = location.strip_prefix("s3://") {
            let (bucket, key) = object
                .split_once('/')
                .filter(|(bucket, key)| !bucket.is_empty() && !key.is_empty())
                .ok_or_else(|| unreadable("expected s3://bucket/key".into()))?;
            let s3 = s3.ok_or_else(|| unreadable("no S3 client".into()))?;
            let object = s3
                .get()
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| unreadable(aws_sdk_s3::error::DisplayErrorContext(e).to_string()))?;
            let bytes = object
                .body
                .collect()
                .await
                .map_err(|e| unreadable(e.to_string()))?
                .into_bytes();
            String::from_utf8(bytes.to_vec()).map_err(|e| unreadable(e.to_string()))?
        } else {
            std::fs::read_to_string(location).map_err(|e| unreadable(e.to_string()))?
        };
        Self::from_yaml(&text)
    }

    /// The entity mapping for a logical name (`contact`), if it is mapped.
    pub fn mapping_for(&self, logical_name: &str) -> Option<&EntityMapping> {
        self.directory
            .iter()
            .find(|m| m.logical_name.as_str() == logical_name)
    }
}

fn validate_dynamics(document: DynamicsDocument) -> Result<DynamicsConfig, ConfigError> {
    let org = parse_service_url("dynamics.url", &document.url)?;
    if org.path() != "/" || org.query().is_some() {
        return Err(ConfigError::at(
            "dynamics.url",
            "must be the organisation URL alone, e.g. https://contoso.crm.dynamics.com",
        ));
    }
    let org_url = org.as_str().trim_end_matches('/').to_owned();
    let version = document.api_version.trim_start_matches('v');
    let version_ok = !version.is_empty()
        && version
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if !version_ok {
        return Err(ConfigError::at(
            "dynamics.api_version",
            "must look like v9.2",
        ));
    }
    let api_base = Url::parse(&format!("{org_url}/api/data/v{version}/"))
        .map_err(|e| ConfigError::at("dynamics.url", e))?;
    let tenant = document.tenant_id.trim();
    let tenant_ok = !tenant.is_empty()
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !tenant_ok {
        return Err(ConfigError::at(
            "dynamics.tenant_id",
            "must be the tenant GUID or its domain name",
        ));
    }
    if Uuid::try_parse(document.client_id.trim()).is_err() {
        return Err(ConfigError::at(
            "dynamics.client_id",
            "must be the application (client) id, a GUID",
        ));
    }
    let token_url = match &document.token_url {
        Some(url) => parse_service_url("dynamics.token_url", url)?,
        None => Url::parse(&format!(
            "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
        ))
        .map_err(|e| ConfigError::at("dynamics.tenant_id", e))?,
    };
    match &document.credential {
        Credential::ClientSecret(secret) => {
            validate_secret_ref("dynamics.credential.client_secret", secret)?
        }
        Credential::Certificate {
            thumbprint,
            private_key,
        } => {
            let bytes = hex::decode(thumbprint.replace(':', ""))
                .ok()
                .filter(|b| b.len() == 20);
            if bytes.is_none() {
                return Err(ConfigError::at(
                    "dynamics.credential.certificate.thumbprint",
                    "must be the certificate's SHA-1 thumbprint, 40 hex digits",
                ));
            }
            validate_secret_ref("dynamics.credential.certificate.private_key", private_key)?;
        }
    }
    if !(1..=20).contains(&document.max_attempts) {
        return Err(ConfigError::at(
            "dynamics.max_attempts",
            "must be between 1 and 20",
        ));
    }
    if !(100..=120_000).contains(&document.request_timeout_ms) {
        return Err(ConfigError::at(
            "dynamics.request_timeout_ms",
            "must be between 100 and 120000",
        ));
    }
    Ok(DynamicsConfig {
        scope: format!("{org_url}/.default"),
        org_url,
        api_base,
        tenant_id: tenant.to_owned(),
        client_id: document.client_id.trim().to_owned(),
        credential: document.credential,
        token_url,
        app_id: document.app_id,
        request_timeout: Duration::from_millis(document.request_timeout_ms),
        max_attempts: document.max_attempts,
        application_user_id: document.application_user_id,
    })
}

/// A service URL must be https; plain http only on loopback (the emulator).
fn parse_service_url(path: &str, text: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(text.trim())
        .map_err(|e| ConfigError::at(path, format!("`{text}` is not a URL: {e}")))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(domain)) => domain == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(ConfigError::at(
            path,
            format!("`{text}` must be an https URL"),
        )),
    }
}

fn validate_secret_ref(path: &str, secret: &SecretRef) -> Result<(), ConfigError> {
    match secret {
        SecretRef::Env(name)
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            Err(ConfigError::at(
                format!("{path}.env"),
                "must be an environment variable name",
            ))
        }
        SecretRef::SecretsManager(id) if id.trim().is_empty() => Err(ConfigError::at(
            format!("{path}.secrets_manager"),
            "must be a secret ARN or name",
        )),
        _ => Ok(()),
    }
}

fn validate_directory(entities: &[EntityMapping]) -> Result<(), ConfigError> {
    let mut names = BTreeSet::new();
    for (index, mapping) in entities.iter().enumerate() {
        if !names.insert(mapping.logical_name.as_str()) {
            return Err(ConfigError::at(
                format!("directory.entities[{index}].logical_name"),
                format!("`{}` is mapped twice", mapping.logical_name),
            ));
        }
        if mapping.phones.is_empty() {
            return Err(ConfigError::at(
                format!("directory.entities[{index}].phones"),
                "needs at least one phone column",
            ));
        }
    }
    Ok(())
}

/// Deserialises YAML, writing enums as one-key maps (`client_secret: {env: X}`)
/// and naming the exact key path of any error.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let mut track = serde_path_to_error::Track::new();
    let tracked = serde_path_to_error::Deserializer::new(
        serde_norway::Deserializer::from_str(text),
        &mut track,
    );
    serde_norway::with::singleton_map_recursive::deserialize(tracked).map_err(
        |error: serde_norway::Error| {
            let path = track.path().to_string();
            // serde_norway's message may repeat the path; it ends with the line and column, which help.
            let message = error.to_string();
            let message = message
                .split_once(": ")
                .filter(|(prefix, _)| !prefix.contains(' '))
                .map_or(message.as_str(), |(_, rest)| rest)
                .to_owned();
            ConfigError::at(
                if path == "." {
                    "(document)".into()
                } else {
                    path
                },
                message,
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
dynamics:
  url: https://contoso-demo.crm.dynamics.com/
  tenant_id: 9048f85d-df6b-44fd-8a90-90338af57872
  client_id: 2f3c1a4e-7b8d-4e5f-9a6b-1c2d3e4f5a6b
  credential: { client_secret: { env: DYNAMICS_CLIENT_SECRET } }
";

    fn error_of(yaml: &str) -> ConfigError {
        Config::from_yaml(yaml).unwrap_err()
    }

    #[test]
    fn minimal_document_gets_phonecall_defaults() {
        let config = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(
            config.dynamics.org_url,
            "https://contoso-demo.crm.dynamics.com"
        );
        assert_eq!(
            config.dynamics.api_base.as_str(),
            "https://contoso-demo.crm.dynamics.com/api/data/v9.2/"
        );
        assert_eq!(
            config.dynamics.scope,
            "https://contoso-demo.crm.dynamics.com/.default"
        );
        assert_eq!(
            config.dynamics.token_url.as_str(),
            "https://login.microsoftonline.com/9048f85d-df6b-44fd-8a90-90338af57872/oauth2/v2.0/token"
        );
        assert_eq!(config.contact.entity_set.as_str(), "phonecalls");
        assert_eq!(config.directory.len(), 2);
        assert!(config.contact.close.is_some());
    }

    #[test]
    fn unknown_key_is_named() {
        let error = error_of(&format!("{MINIMAL}  colour: blue\n"));
        assert_eq!(error.path(), Some("dynamics.colour"), "{error}");
        assert!(
            error.to_string().contains("unknown field `colour`"),
            "{error}"
        );
        let error = error_of(&format!(
            "{MINIMAL}contact:\n  ended:\n    body: {{}}\n    closing: {{}}\n"
        ));
        assert_eq!(error.path(), Some("contact.ended.closing"), "{error}");
    }

    #[test]
    fn the_close_grace_is_bounded_by_the_longest_sqs_delay() {
        let config = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(config.contact.close_grace, Duration::from_secs(300));
        assert_eq!(config.contact.close_grace_channels, ["VOICE", "CHAT"]);
        assert_eq!(config.contact.start_tolerance, Duration::from_secs(120));
        let error = error_of(&format!("{MINIMAL}contact:\n  close_grace_seconds: 901\n"));
        assert_eq!(error.path(), Some("contact.close_grace_seconds"), "{error}");
        let config = Config::from_yaml(&format!(
            "{MINIMAL}contact:\n  close_grace_seconds: 0\n  close_grace_channels: [voice]\n"
        ))
        .unwrap();
        assert!(config.contact.close_grace.is_zero());
        assert_eq!(config.contact.close_grace_channels, ["VOICE"]);
    }

    #[test]
    fn wrong_type_is_named() {
        let error = error_of(&format!("{MINIMAL}  max_attempts: many\n"));
        assert_eq!(error.path(), Some("dynamics.max_attempts"), "{error}");
    }

    #[test]
    fn broken_template_is_named_by_its_key() {
        let error = error_of(&format!(
            "{MINIMAL}contact:\n  ended:\n    body:\n      actualend: \"{{{{ DisconnectTimestamp | }}}}\"\n"
        ));
        assert_eq!(
            error.path(),
            Some("contact.ended.body.actualend"),
            "{error}"
        );
    }

    #[test]
    fn invalid_entity_set_is_named() {
        let error = error_of(&format!(
            "{MINIMAL}contact:\n  entity_set: \"phonecalls?$top=1\"\n"
        ));
        assert_eq!(error.path(), Some("contact.entity_set"), "{error}");
        let error = error_of(&format!(
            "{MINIMAL}directory:\n  entities:\n    - {{ entity_set: contacts, logical_name: contact, key: \"contactid)\", name: fullname, phones: [telephone1] }}\n"
        ));
        assert_eq!(error.path(), Some("directory.entities[0].key"), "{error}");
    }

    #[test]
    fn dynamics_url_must_be_https_except_on_loopback() {
        let error = error_of(&MINIMAL.replace("https://contoso-demo", "http://contoso-demo"));
        assert_eq!(error.path(), Some("dynamics.url"));
        let local = MINIMAL.replace(
            "https://contoso-demo.crm.dynamics.com/",
            "http://127.0.0.1:8080",
        );
        assert!(Config::from_yaml(&local).is_ok());
    }

    #[test]
    fn the_owner_mapping_names_a_systemusers_column() {
        let with = |column: &str| format!("{MINIMAL}contact:\n  owner_from_agent: {column}\n");
        let config = Config::from_yaml(&with("domainname")).expect("valid");
        assert_eq!(
            config.contact.owner_from_agent,
            Some(OwnerColumn::Domainname)
        );
        let error = error_of(&with("fullname"));
        assert_eq!(error.path(), Some("contact.owner_from_agent"), "{error}");
        assert!(
            Config::from_yaml(MINIMAL)
                .expect("valid")
                .contact
                .owner_from_agent
                .is_none()
        );
    }

    #[test]
    fn secrets_cannot_be_written_inline() {
        let error =
            error_of(&MINIMAL.replace("{ env: DYNAMICS_CLIENT_SECRET }", "{ value: hunter2 }"));
        assert_eq!(
            error.path(),
            Some("dynamics.credential.client_secret.value"),
            "{error}"
        );
        assert!(
            error.to_string().contains("unknown variant `value`"),
            "{error}"
        );
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../infra/config.example.yaml");
        let config = Config::from_yaml(text).unwrap();
        assert_eq!(config.directory.len(), 2);
        assert!(config.webhook.is_some());
        // The commented certificate form is valid too.
        let certificate = text
            .replace("  credential:\n    client_secret: { secrets_manager: connect-dynamics/dynamics-client-secret }\n", "")
            .replace("  # credential:\n  #   certificate:\n  #     thumbprint", "  credential:\n    certificate:\n      thumbprint")
            .replace("  #     private_key:", "      private_key:");
        assert!(matches!(
            Config::from_yaml(&certificate).unwrap().dynamics.credential,
            Credential::Certificate { .. }
        ));
    }

    #[test]
    fn certificate_thumbprint_is_checked() {
        let yaml = MINIMAL.replace(
            "{ client_secret: { env: DYNAMICS_CLIENT_SECRET } }",
            "{ certificate: { thumbprint: abc, private_key: { secrets_manager: dynamics-key } } }",
        );
        assert_eq!(
            error_of(&yaml).path(),
            Some("dynamics.credential.certificate.thumbprint")
        );
    }
}
