//! Prepares the Dynamics side, idempotently, through the Web API: change tracking
//! on every mapped entity, the record-saved WebHook service endpoint with its key,
//! and asynchronous PostOperation steps for Create, Update and Delete of each mapped
//! entity. A second run changes nothing.

use std::time::Instant;

use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::Config;
use crate::dataverse::odata::{encode_query_value, string_literal};
use crate::dataverse::{DataverseClient, DataverseError};
use crate::secret::Secret;

pub const ENDPOINT_NAME: &str = "connect-dynamics record-saved";
const MESSAGES: [&str; 3] = ["Create", "Update", "Delete"];

/// One request setup sends (or, with `--dry-run`, would send).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRequest {
    pub method: String,
    pub path: String,
    /// With `authvalue` redacted.
    pub body: Option<Value>,
}

impl std::fmt::Display for PlannedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if let Some(body) = &self.body {
            write!(f, "\n    {body}")?;
        }
        Ok(())
    }
}

pub struct Setup<'a> {
    pub client: &'a DataverseClient,
    pub config: &'a Config,
    pub webhook_url: String,
    pub webhook_key: Secret,
    /// Send nothing: print every request, as if nothing existed yet.
    pub dry_run: bool,
    pub deadline: Instant,
    /// Every request, in order (writes included in a dry run).
    pub requests: Vec<PlannedRequest>,
    /// Writes actually sent (or planned, in a dry run).
    pub writes: usize,
}

/// The first 8 hex digits of the key's SHA-256, kept in the endpoint's description:
/// `authvalue` cannot be read back, so this tells whether the key changed.
pub fn key_fingerprint(key: &Secret) -> String {
    hex::encode(&Sha256::digest(key.expose().as_bytes())[..4])
}

impl Setup<'_> {
    async fn call(
        &mut self,
        method: Method,
        path: String,
        body: Option<Value>,
        headers: &[(&'static str, &str)],
    ) -> Result<(Option<Value>, Option<Uuid>), DataverseError> {
        let shown = body.clone().map(|mut b| {
            if b.get("authvalue").is_some() {
                b["authvalue"] = json!("<redacted>");
            }
            b
        });
        self.requests.push(PlannedRequest {
            method: method.to_string(),
            path: path.clone(),
            body: shown,
        });
        if method != Method::GET {
            self.writes += 1;
        }
        if self.dry_run {
            return Ok((None, Some(Uuid::nil())));
        }
        self.client
            .execute(method, &path, body.as_ref(), headers, self.deadline)
            .await
    }

    async fn get(&mut self, path: String) -> Result<Option<Value>, DataverseError> {
        Ok(self.call(Method::GET, path, None, &[]).await?.0)
    }

    /// The rows of a collection answer (none in a dry run).
    async fn rows(&mut self, path: String) -> Result<Vec<Value>, DataverseError> {
        Ok(self
            .get(path)
            .await?
            .and_then(|v| v.get("value").and_then(Value::as_array).cloned())
            .unwrap_or_default())
    }

    pub async fn run(&mut self) -> Result<(), DataverseError> {
        for mapping in &self.config.directory {
            self.enable_change_tracking(mapping.logical_name.as_str())
                .await?;
        }
        let endpoint = self.service_endpoint().await?;
        for mapping in &self.config.directory {
            let filtering: Vec<String> = mapping.select();
            for message in MESSAGES {
                self.step(endpoint, mapping.logical_name.as_str(), message, &filtering)
                    .await?;
            }
        }
        Ok(())
    }

    async fn enable_change_tracking(&mut self, entity: &str) -> Result<(), DataverseError> {
        let literal = string_literal(entity);
        let summary = self
            .get(format!("EntityDefinitions(LogicalName={literal})?$select=MetadataId,ChangeTrackingEnabled,CanChangeTrackingBeEnabled"))
            .await?;
        if let Some(summary) = &summary {
            if summary["ChangeTrackingEnabled"] == json!(true) {
                return Ok(());
            }
            if summary["CanChangeTrackingBeEnabled"]["Value"] == json!(false) {
                return Err(DataverseError::Rejected {
                    status: 400,
                    code: String::new(),
                    message: format!("change tracking cannot be enabled on `{entity}`"),
                });
            }
        }
        let metadata_id = summary
            .as_ref()
            .and_then(|s| s["MetadataId"].as_str())
            .and_then(|id| Uuid::try_parse(id).ok())
            .unwrap_or_default();
        // Definitions refuse PATCH and PUT replaces everything: send back all we read.
        let mut definition = self
            .get(format!("EntityDefinitions({metadata_id})"))
            .await?
            .unwrap_or_else(|| json!({}));
        definition["ChangeTrackingEnabled"] = json!(true);
        self.call(
            Method::PUT,
            format!("EntityDefinitions({metadata_id})"),
            Some(definition),
            &[("mscrm.mergelabels", "true")],
        )
        .await?;
        let xml = format!(
            "<importexportxml><entities><entity>{entity}</entity></entities></importexportxml>"
        );
        self.call(
            Method::POST,
            "PublishXml".into(),
            Some(json!({"ParameterXml": xml})),
            &[],
        )
        .await?;
        Ok(())
    }

    async fn service_endpoint(&mut self) -> Result<Uuid, DataverseError> {
        let fingerprint = format!("key-fp:{}", key_fingerprint(&self.webhook_key));
        let filter = encode_query_value(&format!(
            "contract eq 8 and name eq {}",
            string_literal(ENDPOINT_NAME)
        ));
        let existing = self
            .rows(format!("serviceendpoints?$filter={filter}&$select=serviceendpointid,url,authtype,description"))
            .await?;
        let body = json!({
            "name": ENDPOINT_NAME,
            "url": self.webhook_url,
            "contract": 8,
            "authtype": 4,
            "authvalue": self.webhook_key.expose(),
            "description": fingerprint,
        });
        match existing.first() {
            None => {
                let (_, id) = self
                    .call(Method::POST, "serviceendpoints".into(), Some(body), &[])
                    .await?;
                id.ok_or_else(|| {
                    DataverseError::Protocol("service endpoint created without an id".into())
                })
            }
            Some(endpoint) => {
                let id = endpoint["serviceendpointid"]
                    .as_str()
                    .and_then(|id| Uuid::try_parse(id).ok())
                    .unwrap_or_default();
                let same = endpoint["url"] == json!(self.webhook_url)
                    && endpoint["description"] == json!(fingerprint)
                    && endpoint["authtype"] == json!(4);
                if !same {
                    self.call(
                        Method::PATCH,
                        format!("serviceendpoints({id})"),
                        Some(body),
                        &[("if-match", "*")],
                    )
                    .await?;
                }
                Ok(id)
            }
        }
    }

    async fn step(
        &mut self,
        endpoint: Uuid,
        entity: &str,
        message: &str,
        columns: &[String],
    ) -> Result<(), DataverseError> {
        let name = format!("connect-dynamics: {message} of {entity}");
        let filter = encode_query_value(&format!(
            "name eq {} and _eventhandler_value eq {endpoint}",
            string_literal(&name)
        ));
        let existing = self
            .rows(format!("sdkmessageprocessingsteps?$filter={filter}&$select=sdkmessageprocessingstepid,mode,stage,filteringattributes,statecode"))
            .await?;
        // Only Update carries filtering attributes: the columns the directory maps.
        let filtering = if message == "Update" {
            columns.join(",")
        } else {
            String::new()
        };
        if let Some(step) = existing.first() {
            let id = step["sdkmessageprocessingstepid"]
                .as_str()
                .and_then(|id| Uuid::try_parse(id).ok())
                .unwrap_or_default();
            if step["mode"] == json!(1) && step["stage"] == json!(40) {
                let mut changes = json!({});
                if step["filteringattributes"].as_str().unwrap_or_default() != filtering {
                    changes["filteringattributes"] = json!(filtering);
                }
                if step["statecode"] != json!(0) {
                    changes["statecode"] = json!(0);
                    changes["statuscode"] = json!(1);
                }
                if changes.as_object().is_some_and(|c| !c.is_empty()) {
                    self.call(
                        Method::PATCH,
                        format!("sdkmessageprocessingsteps({id})"),
                        Some(changes),
                        &[("if-match", "*")],
                    )
                    .await?;
                }
                return Ok(());
            }
            // A changed mode or stage: recreate the step.
            self.call(
                Method::DELETE,
                format!("sdkmessageprocessingsteps({id})"),
                None,
                &[],
            )
            .await?;
        }
        let message_filter = encode_query_value(&format!("name eq {}", string_literal(message)));
        let message_id = self
            .rows(format!(
                "sdkmessages?$filter={message_filter}&$select=sdkmessageid"
            ))
            .await?
            .first()
            .and_then(|m| {
                m["sdkmessageid"]
                    .as_str()
                    .and_then(|id| Uuid::try_parse(id).ok())
            })
            .unwrap_or_default();
        let entity_filter = encode_query_value(&format!(
            "primaryobjecttypecode eq {} and _sdkmessageid_value eq {message_id}",
            string_literal(entity)
        ));
        let filter_id = self
            .rows(format!(
                "sdkmessagefilters?$filter={entity_filter}&$select=sdkmessagefilterid"
            ))
            .await?
            .first()
            .and_then(|m| {
                m["sdkmessagefilterid"]
                    .as_str()
                    .and_then(|id| Uuid::try_parse(id).ok())
            })
            .unwrap_or_default();
        let mut body = json!({
            "name": name,
            "mode": 1,
            "stage": 40,
            "rank": 1,
            "supporteddeployment": 0,
            "asyncautodelete": true,
            "eventhandler_serviceendpoint@odata.bind": format!("/serviceendpoints({endpoint})"),
            "sdkmessageid@odata.bind": format!("/sdkmessages({message_id})"),
            "sdkmessagefilterid@odata.bind": format!("/sdkmessagefilters({filter_id})"),
        });
        if !filtering.is_empty() {
            body["filteringattributes"] = json!(filtering);
        }
        self.call(
            Method::POST,
            "sdkmessageprocessingsteps".into(),
            Some(body),
            &[],
        )
        .await?;
        Ok(())
    }
}
