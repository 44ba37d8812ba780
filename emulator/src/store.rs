//! The emulator's tables: rows with version numbers, a deletion log for change
//! tracking, and just enough schema to refuse what Dataverse refuses.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

/// A column's type, as far as the emulator checks values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Text of at most this many characters.
    Text(usize),
    Bool,
    DateTime,
    Int,
    /// An option set (choice): one of these values.
    Choice(&'static [i64]),
    Parties,
}

#[derive(Debug, Clone)]
pub struct EntityDef {
    pub logical: String,
    pub key: String,
    /// Activities can be closed, and a closed activity refuses updates.
    pub activity: bool,
    /// Column rules for tables the product writes; `None` accepts any column.
    pub columns: Option<BTreeMap<String, Kind>>,
    /// Custom columns (publisher prefix) must be defined too, as in a real org;
    /// otherwise any prefixed column is accepted as it is.
    pub strict: bool,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub data: Map<String, Value>,
    pub version: u64,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub def: EntityDef,
    pub rows: BTreeMap<Uuid, Row>,
    pub change_tracking: bool,
}

#[derive(Debug, Clone)]
pub struct Deletion {
    pub set: String,
    pub id: Uuid,
    pub version: u64,
}

#[derive(Debug, Clone)]
pub struct Store {
    pub tables: BTreeMap<String, Table>,
    /// Incremented by every write; rows and deletions carry the version of their last change.
    pub version: u64,
    pub deletions: Vec<Deletion>,
    /// Delta tokens older than this are expired (`0x80044352`).
    pub oldest_valid_delta: u64,
    /// Entities named in `PublishXml` calls, in order.
    pub published: Vec<String>,
    /// `systemusers` without any security role: Dataverse refuses them as owners.
    pub users_without_roles: std::collections::BTreeSet<Uuid>,
}

fn phonecall_columns() -> BTreeMap<String, Kind> {
    columns([
        ("activityid", Kind::Text(36)),
        ("subject", Kind::Text(200)),
        ("phonenumber", Kind::Text(200)),
        ("description", Kind::Text(2000)),
        ("directioncode", Kind::Bool),
        ("leftvoicemail", Kind::Bool),
        ("actualstart", Kind::DateTime),
        ("actualend", Kind::DateTime),
        ("scheduledstart", Kind::DateTime),
        ("scheduledend", Kind::DateTime),
        ("actualdurationminutes", Kind::Int),
        ("scheduleddurationminutes", Kind::Int),
        ("prioritycode", Kind::Choice(&[0, 1, 2])),
        // Open, Completed, Canceled; Open, Made, Canceled, Received.
        ("statecode", Kind::Choice(&[0, 1, 2])),
        ("statuscode", Kind::Choice(&[1, 2, 3, 4])),
        ("category", Kind::Text(250)),
        ("subcategory", Kind::Text(250)),
        ("phonecall_activity_parties", Kind::Parties),
    ])
}

fn annotation_columns() -> BTreeMap<String, Kind> {
    columns([
        ("annotationid", Kind::Text(36)),
        ("subject", Kind::Text(500)),
        ("notetext", Kind::Text(100_000)),
        ("filename", Kind::Text(255)),
        ("mimetype", Kind::Text(256)),
        ("documentbody", Kind::Text(usize::MAX)),
        ("isdocument", Kind::Bool),
    ])
}

fn columns<const N: usize>(columns: [(&str, Kind); N]) -> BTreeMap<String, Kind> {
    columns
        .into_iter()
        .map(|(name, kind)| (name.to_owned(), kind))
        .collect()
}

impl Default for Store {
    fn default() -> Self {
        let mut store = Self {
            tables: BTreeMap::new(),
            version: 0,
            deletions: Vec::new(),
            oldest_valid_delta: 0,
            published: Vec::new(),
            users_without_roles: Default::default(),
        };
        store.define(
            "phonecalls",
            "phonecall",
            "activityid",
            true,
            Some(phonecall_columns()),
        );
        store.define("tasks", "task", "activityid", true, None);
        store.define(
            "annotations",
            "annotation",
            "annotationid",
            false,
            Some(annotation_columns()),
        );
        store.define("contacts", "contact", "contactid", false, None);
        store.define("accounts", "account", "accountid", false, None);
        store.define("systemusers", "systemuser", "systemuserid", false, None);
        store.define(
            "serviceendpoints",
            "serviceendpoint",
            "serviceendpointid",
            false,
            None,
        );
        store.define("sdkmessages", "sdkmessage", "sdkmessageid", false, None);
        store.define(
            "sdkmessagefilters",
            "sdkmessagefilter",
            "sdkmessagefilterid",
            false,
            None,
        );
        store.define(
            "sdkmessageprocessingsteps",
            "sdkmessageprocessingstep",
            "sdkmessageprocessingstepid",
            false,
            None,
        );
        // The platform's messages and their filters, as every org has them.
        let entities: Vec<String> = store
            .tables
            .values()
            .map(|t| t.def.logical.clone())
            .collect();
        for message in ["Create", "Update", "Delete"] {
            let message_id = Uuid::new_v5(&Uuid::NAMESPACE_OID, message.as_bytes());
            let mut columns = Map::new();
            columns.insert("name".into(), Value::String(message.into()));
            store.write("sdkmessages", message_id, columns);
            for entity in &entities {
                let filter_id = Uuid::new_v5(&message_id, entity.as_bytes());
                let mut columns = Map::new();
                columns.insert(
                    "primaryobjecttypecode".into(),
                    Value::String(entity.clone()),
                );
                columns.insert(
                    "_sdkmessageid_value".into(),
                    Value::String(message_id.to_string()),
                );
                store.write("sdkmessagefilters", filter_id, columns);
            }
        }
        for set in ["contacts", "accounts"] {
            if let Some(table) = store.tables.get_mut(set) {
                table.change_tracking = true;
            }
        }
        store
    }
}

impl Store {
    pub fn define(
        &mut self,
        set: &str,
        logical: &str,
        key: &str,
        activity: bool,
        columns: Option<BTreeMap<String, Kind>>,
    ) {
        self.tables.insert(
            set.to_owned(),
            Table {
                def: EntityDef {
                    logical: logical.to_owned(),
                    key: key.to_owned(),
                    activity,
                    columns,
                    strict: false,
                },
                rows: BTreeMap::new(),
                change_tracking: false,
            },
        );
    }

    pub fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// Writes columns into a row (creating it), stamping version and modifiedon.
    pub fn write(&mut self, set: &str, id: Uuid, columns: Map<String, Value>) {
        let version = self.next_version();
        let now = now_text();
        let Some(table) = self.tables.get_mut(set) else {
            return;
        };
        let key = table.def.key.clone();
        let activity = table.def.activity;
        let logical = table.def.logical.clone();
        let row = table.rows.entry(id).or_insert_with(|| {
            let mut data = Map::new();
            data.insert(key.clone(), Value::String(id.to_string()));
            data.insert("createdon".into(), Value::String(now.clone()));
            // Dataverse tables start their rows Active (0) with status reason 1.
            data.insert("statecode".into(), Value::from(0));
            data.insert("statuscode".into(), Value::from(1));
            if activity {
                data.insert("activitytypecode".into(), Value::String(logical.clone()));
            }
            if logical == "systemuser" {
                data.insert("isdisabled".into(), Value::Bool(false));
            }
            Row { data, version }
        });
        let explicit_fullname = columns.contains_key("fullname");
        let sets_auth_value = columns.contains_key("authvalue");
        for (column, value) in columns {
            row.data.insert(column, value);
        }
        row.version = version;
        if sets_auth_value {
            row.data.insert("isauthvalueset".into(), Value::Bool(true));
        }
        row.data.insert("modifiedon".into(), Value::String(now));
        row.data
            .insert("versionnumber".into(), Value::from(version));
        // Dataverse composes a contact's fullname from its parts.
        if logical == "contact" && !explicit_fullname {
            let part = |name: &str| {
                row.data
                    .get(name)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let full = format!("{} {}", part("firstname"), part("lastname"))
                .trim()
                .to_owned();
            if !full.is_empty() {
                row.data.insert("fullname".into(), Value::String(full));
            }
        }
    }

    pub fn remove(&mut self, set: &str, id: Uuid) -> bool {
        let removed = self
            .tables
            .get_mut(set)
            .and_then(|t| t.rows.remove(&id))
            .is_some();
        if removed {
            let version = self.next_version();
            self.deletions.push(Deletion {
                set: set.to_owned(),
                id,
                version,
            });
        }
        removed
    }
}

/// Dataverse writes date-times in UTC to the second.
pub fn now_text() -> String {
    let now = OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}
