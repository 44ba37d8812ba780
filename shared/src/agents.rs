//! The agent behind a contact event's agent ARN: username, email and name from
//! Amazon Connect's `DescribeUser`, and, when configured, the Dynamics user
//! (`systemusers`) who should own the record.
//!
//! Both answers are cached per container: Connect allows only a few
//! `DescribeUser` calls a second per account, and one agent takes many contacts.
//! What was resolved is kept in the contact's state, so a later render of the
//! same contact never depends on a lookup again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::config::OwnerColumn;
use crate::connect_users::{ConnectError, ConnectUsers};
use crate::dataverse::odata::{EntitySet, parse_guid, string_literal};
use crate::dataverse::{DataverseClient, DataverseError, Query};

/// How long a found user (or Dynamics owner) is reused.
const FOUND_FOR: Duration = Duration::from_secs(3600);
/// How long a user that does not exist (or cannot be read) is not asked for again.
const MISSING_FOR: Duration = Duration::from_secs(300);

/// What Amazon Connect says about a user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub username: Option<String>,
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// A contact's agent as resolved once for the contact.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    /// The Amazon Connect user id (the last part of the agent ARN).
    pub id: Uuid,
    pub profile: Profile,
    /// The `systemuserid` that owns the record, when an owner mapping matched.
    pub owner_id: Option<Uuid>,
}

impl Agent {
    /// Adds what was resolved to a template's `agent` object (`agent.username`,
    /// `agent.email`, `agent.first_name`, `agent.last_name`, `agent.owner_id`);
    /// only known values, so `default(...)` still works for the rest.
    pub fn extend_context(&self, agent: &mut Map<String, Value>) {
        let profile = &self.profile;
        let values = [
            ("username", profile.username.clone()),
            ("email", profile.email.clone()),
            ("first_name", profile.first_name.clone()),
            ("last_name", profile.last_name.clone()),
            ("owner_id", self.owner_id.map(|id| id.to_string())),
        ];
        for (name, value) in values {
            if let Some(value) = value {
                agent.insert(name.into(), Value::String(value));
            }
        }
    }
}

/// The instance id and user id of `arn:aws:connect:<region>:<account>:instance/<instance>/agent/<user>`.
pub fn ids_from_agent_arn(arn: &str) -> Option<(Uuid, Uuid)> {
    let fields: Vec<&str> = arn.strip_prefix("arn:")?.split(':').collect();
    let [_, "connect", _, _, resource] = fields[..] else {
        return None;
    };
    let mut parts = resource.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("instance"), Some(instance), Some("agent"), Some(user)) if parts.next().is_none() => {
            Some((parse_guid(instance).ok()?, parse_guid(user).ok()?))
        }
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("Amazon Connect DescribeUser failed: {0}")]
    Connect(#[source] ConnectError),
    #[error("finding the agent's Dynamics user failed: {0}")]
    Dataverse(#[from] DataverseError),
}

impl AgentError {
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect(error) => error.is_transient(),
            Self::Dataverse(error) => error.is_transient(),
        }
    }
}

/// Where user profiles come from.
pub enum UserSource {
    Connect(ConnectUsers),
    /// Users known up front (the local simulation): no lookup at all.
    Known(HashMap<Uuid, Profile>),
}

/// Answers kept for a while: found ones long, missing ones briefly.
struct TtlCache<K, T>(Mutex<HashMap<K, (T, Instant)>>);

impl<K: Eq + std::hash::Hash, T: Clone> TtlCache<K, T> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    fn get(&self, key: &K) -> Option<T> {
        let entries = self.0.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(value, _)| value.clone())
    }

    /// Turns every entry holding `value` into `replacement`, kept as briefly as a miss.
    fn replace(&self, value: &T, replacement: T)
    where
        T: PartialEq,
    {
        let mut entries = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (held, until) in entries.values_mut() {
            if held == value {
                *held = replacement.clone();
                *until = Instant::now() + MISSING_FOR;
            }
        }
    }

    fn put(&self, key: K, value: T, found: bool) {
        let until = Instant::now() + if found { FOUND_FOR } else { MISSING_FOR };
        let mut entries = self.0.lock().unwrap_or_else(|p| p.into_inner());
        entries.insert(key, (value, until));
    }
}

/// Resolves agents for one container, caching what it learns.
pub struct AgentResolver {
    source: UserSource,
    profiles: TtlCache<(Uuid, Uuid), Option<Profile>>,
    owners: TtlCache<(OwnerColumn, String), Option<Uuid>>,
}

impl AgentResolver {
    pub fn new(source: UserSource) -> Self {
        Self {
            source,
            profiles: TtlCache::new(),
            owners: TtlCache::new(),
        }
    }

    /// The agent of `agent_arn`, with its Dynamics owner when `owner` is set.
    /// A user Connect does not know (or will not show) resolves without a
    /// profile, and one Dynamics does not know without an owner: the contact
    /// goes on with what is known. Only passing failures are errors.
    pub async fn resolve(
        &self,
        agent_arn: &str,
        owner: Option<OwnerColumn>,
        dataverse: &DataverseClient,
        deadline: Instant,
    ) -> Result<Option<Agent>, AgentError> {
        let Some((instance, user)) = ids_from_agent_arn(agent_arn) else {
            return Ok(None);
        };
        let profile = self.profile(instance, user, deadline).await?;
        let owner_id = match (owner, &profile) {
            (Some(column), Some(profile)) => {
                self.owner(column, profile, dataverse, deadline).await?
            }
            _ => None,
        };
        Ok(Some(Agent {
            id: user,
            profile: profile.unwrap_or_default(),
            owner_id,
        }))
    }

    async fn profile(
        &self,
        instance: Uuid,
        user: Uuid,
        deadline: Instant,
    ) -> Result<Option<Profile>, AgentError> {
        if let Some(profile) = self.profiles.get(&(instance, user)) {
            return Ok(profile);
        }
        let profile = match &self.source {
            UserSource::Known(users) => users.get(&user).cloned(),
            UserSource::Connect(users) => match users.describe_user(instance, user, deadline).await
            {
                Ok(profile) => Some(profile),
                Err(error) if error.is_transient() => return Err(AgentError::Connect(error)),
                Err(error) => {
                    tracing::warn!(%error, %user, "agent not resolvable; the contact goes on with the agent id");
                    None
                }
            },
        };
        let found = profile.is_some();
        self.profiles.put((instance, user), profile.clone(), found);
        Ok(profile)
    }

    /// Dataverse refused `owner` as a record owner (no role, no privilege): it
    /// counts as no match, like a user Dynamics does not know.
    pub fn owner_refused(&self, owner: Uuid) {
        self.owners.replace(&Some(owner), None);
    }

    async fn owner(
        &self,
        column: OwnerColumn,
        profile: &Profile,
        dataverse: &DataverseClient,
        deadline: Instant,
    ) -> Result<Option<Uuid>, AgentError> {
        let value = match column {
            // Reference: match the email, fall back to the username when it is empty.
            OwnerColumn::Internalemailaddress => {
                profile.email.as_ref().or(profile.username.as_ref())
            }
            OwnerColumn::Domainname => profile.username.as_ref(),
        };
        let Some(value) = value else {
            return Ok(None);
        };
        let key = (column, value.to_lowercase());
        if let Some(owner) = self.owners.get(&key) {
            return Ok(owner);
        }
        let users = EntitySet::new("systemusers").expect("a literal entity set");
        let query = Query {
            select: vec!["systemuserid".into()],
            // A disabled user is no one to hand the record to.
            filter: Some(format!(
                "{} eq {} and isdisabled eq false",
                column.as_str(),
                string_literal(value)
            )),
            top: Some(1),
            ..Query::default()
        };
        let page = dataverse.query(&users, &query, deadline).await?;
        let owner = page
            .records
            .first()
            .and_then(|r| r.get("systemuserid"))
            .and_then(Value::as_str)
            .and_then(|id| parse_guid(id).ok());
        if owner.is_none() {
            tracing::warn!(
                column = column.as_str(),
                "no Dynamics user matches the agent; the record keeps its owner"
            );
        }
        self.owners.put(key, owner, owner.is_some());
        Ok(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_arns_give_instance_and_user() {
        let arn = "arn:aws:connect:us-west-2:123456789012:instance/aaaaaaaa-bbbb-cccc-dddd-111111111111/agent/eeeeeeee-ffff-4444-8888-222222222222";
        let (instance, user) = ids_from_agent_arn(arn).expect("a valid ARN");
        assert_eq!(instance.to_string(), "aaaaaaaa-bbbb-cccc-dddd-111111111111");
        assert_eq!(user.to_string(), "eeeeeeee-ffff-4444-8888-222222222222");
        for bad in [
            "",
            "arn:aws:connect:us-west-2:123456789012:instance/aaaaaaaa-bbbb-cccc-dddd-111111111111",
            "arn:aws:connect:us-west-2:123456789012:instance/not-a-guid/agent/eeeeeeee-ffff-4444-8888-222222222222",
            "arn:aws:connect:us-west-2:123456789012:instance/aaaaaaaa-bbbb-cccc-dddd-111111111111/queue/eeeeeeee-ffff-4444-8888-222222222222",
            "arn:aws:connect:us-west-2:123456789012:instance/aaaaaaaa-bbbb-cccc-dddd-111111111111/agent/eeeeeeee-ffff-4444-8888-222222222222/x",
        ] {
            assert_eq!(ids_from_agent_arn(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_an_arn_or_none(text in "\\PC{0,200}") {
            let _ = ids_from_agent_arn(&text);
        }
    }

    #[test]
    fn only_known_values_reach_the_template() {
        let agent = Agent {
            id: Uuid::nil(),
            profile: Profile {
                username: Some("jdoe".into()),
                ..Profile::default()
            },
            owner_id: None,
        };
        let mut context = Map::new();
        agent.extend_context(&mut context);
        assert_eq!(
            Value::Object(context),
            serde_json::json!({"username": "jdoe"})
        );
    }
}
