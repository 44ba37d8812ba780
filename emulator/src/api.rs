//! The Web API itself: one request in, one response out, against the store.
//! The HTTP layer (auth, faults, logging) wraps this; `$batch` calls it per part.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::filter;
use crate::store::{Kind, Store};

pub const MAX_PAGE_SIZE: usize = 5000;

#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: String,
    /// Path below the API root (`phonecalls(…)`), percent-decoded.
    pub path: String,
    /// The raw query string, still encoded.
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Option<Value>,
}

impl ApiRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn prefer(&self) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case("prefer"))
            .flat_map(|(_, value)| value.split(',').map(|p| p.trim().to_owned()))
            .collect()
    }

    fn max_page_size(&self) -> usize {
        self.prefer()
            .iter()
            .find_map(|p| {
                p.strip_prefix("odata.maxpagesize=")
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(MAX_PAGE_SIZE)
            .clamp(1, MAX_PAGE_SIZE)
    }
}

pub fn error(status: u16, code: &str, message: impl Into<String>) -> ApiResponse {
    ApiResponse {
        status,
        headers: vec![],
        body: Some(json!({"error": {"code": code, "message": message.into()}})),
    }
}

fn ok(body: Value) -> ApiResponse {
    ApiResponse {
        status: 200,
        headers: vec![],
        body: Some(body),
    }
}

fn no_content() -> ApiResponse {
    ApiResponse {
        status: 204,
        headers: vec![],
        body: None,
    }
}

/// Splits `phonecalls(<guid>)` into the set and the id.
fn parse_target(path: &str) -> Result<(String, Option<String>), ApiResponse> {
    let path = path.trim_end_matches('/');
    match path.split_once('(') {
        None => Ok((path.to_owned(), None)),
        Some((set, rest)) => {
            let key = rest.strip_suffix(')').ok_or_else(|| {
                error(
                    400,
                    "0x80060888",
                    format!("Bad Request - Error in query syntax: `{path}`"),
                )
            })?;
            Ok((set.to_owned(), Some(key.to_owned())))
        }
    }
}

fn parse_id(key: &str) -> Result<Uuid, ApiResponse> {
    let bare = key.trim_start_matches('{').trim_end_matches('}');
    if bare.len() != 36 {
        return Err(error(
            400,
            "0x80060888",
            format!("Bad Request - Error in query syntax: the key `{key}` is not a GUID"),
        ));
    }
    Uuid::try_parse(bare).map_err(|_| {
        error(
            400,
            "0x80060888",
            format!("Bad Request - Error in query syntax: the key `{key}` is not a GUID"),
        )
    })
}

fn query_options(query: &str) -> BTreeMap<String, String> {
    // Form decoding turns a bare `+` into a space, as the real service does.
    url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn not_found_segment(set: &str) -> ApiResponse {
    error(
        404,
        "0x8006088a",
        format!("Resource not found for the segment '{set}'."),
    )
}

pub fn handle(store: &mut Store, base: &str, request: &ApiRequest) -> ApiResponse {
    if request.path.starts_with("EntityDefinitions") {
        if let Some((definition, member)) = request.path.split_once(")/") {
            return entity_members(store, definition, member, request);
        }
        return entity_definitions(store, request);
    }
    if request.path == "PublishXml" && request.method == "POST" {
        return publish(store, request);
    }
    let (set, key) = match parse_target(&request.path) {
        Ok(target) => target,
        Err(response) => return response,
    };
    if !store.tables.contains_key(&set) {
        return not_found_segment(&set);
    }
    let id = match key.as_deref().map(parse_id).transpose() {
        Ok(id) => id,
        Err(response) => return response,
    };
    match (request.method.as_str(), id) {
        ("GET", Some(id)) => get_one(store, base, &set, id, request),
        ("GET", None) => get_many(store, base, &set, request),
        ("POST", None) => create(store, base, &set, request),
        ("PATCH", Some(id)) => patch(store, base, &set, id, request),
        ("DELETE", Some(id)) => {
            if store.remove(&set, id) {
                no_content()
            } else {
                missing(store, &set, id)
            }
        }
        (method, _) => error(
            405,
            "0x80060888",
            format!("The HTTP method '{method}' is not allowed on this resource."),
        ),
    }
}

fn missing(store: &Store, set: &str, id: Uuid) -> ApiResponse {
    let logical = store
        .tables
        .get(set)
        .map(|t| t.def.logical.as_str())
        .unwrap_or(set);
    error(
        404,
        "0x80040217",
        format!("{logical} With Id = {id} Does Not Exist"),
    )
}

fn etag(version: u64) -> String {
    format!("W/\"{version}\"")
}

fn project(row: &Map<String, Value>, key: &str, version: u64, select: Option<&[String]>) -> Value {
    let mut out = Map::new();
    out.insert("@odata.etag".into(), Value::String(etag(version)));
    // Write-only columns (a service endpoint's key) are never read back.
    let row: Map<String, Value> = row
        .iter()
        .filter(|(k, _)| k.as_str() != "authvalue")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let row = &row;
    match select {
        Some(columns) => {
            for column in columns {
                let value = row.get(column).cloned().unwrap_or(Value::Null);
                out.insert(column.clone(), value);
                let annotation = format!("{column}@Microsoft.Dynamics.CRM.lookuplogicalname");
                if let Some(target) = row.get(&annotation) {
                    out.insert(annotation, target.clone());
                }
            }
            out.insert(key.to_owned(), row.get(key).cloned().unwrap_or(Value::Null));
        }
        None => out.extend(row.iter().map(|(k, v)| (k.clone(), v.clone()))),
    }
    Value::Object(out)
}

fn select_of(options: &BTreeMap<String, String>) -> Option<Vec<String>> {
    options.get("$select").map(|s| {
        s.split(',')
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .collect()
    })
}

fn get_one(store: &Store, base: &str, set: &str, id: Uuid, request: &ApiRequest) -> ApiResponse {
    let table = &store.tables[set];
    let Some(row) = table.rows.get(&id) else {
        return missing(store, set, id);
    };
    if request.header("If-None-Match") == Some(etag(row.version).as_str()) {
        return ApiResponse {
            status: 304,
            headers: vec![],
            body: None,
        };
    }
    let options = query_options(&request.query);
    let select = select_of(&options);
    let mut body = project(&row.data, &table.def.key, row.version, select.as_deref());
    if let Some(object) = body.as_object_mut() {
        object.insert(
            "@odata.context".into(),
            Value::String(format!("{base}$metadata#{set}/$entity")),
        );
    }
    ok(body)
}

/// Paging position carried in `$skiptoken`: the last key of a page ordered by key,
/// or an offset when an `$orderby` applies.
fn get_many(store: &Store, base: &str, set: &str, request: &ApiRequest) -> ApiResponse {
    let options = query_options(&request.query);
    let tracking = request.prefer().iter().any(|p| p == "odata.track-changes")
        || options.contains_key("$deltatoken");
    if tracking {
        return changes(store, base, set, request, &options);
    }
    let table = &store.tables[set];
    let select = select_of(&options);
    let expr = match options.get("$filter").map(|f| filter::parse(f)).transpose() {
        Ok(expr) => expr,
        Err(message) => {
            return error(
                400,
                "0x80060888",
                format!("Syntax error in $filter: {message}"),
            );
        }
    };
    let mut rows: Vec<(&Uuid, &crate::store::Row)> = table
        .rows
        .iter()
        .filter(|(_, row)| expr.as_ref().is_none_or(|e| filter::matches(e, &row.data)))
        .collect();
    let order_by = options.get("$orderby").cloned();
    if let Some(order_by) = &order_by {
        let clauses: Vec<(String, bool)> = order_by
            .split(',')
            .map(|clause| {
                let mut parts = clause.split_whitespace();
                let column = parts.next().unwrap_or_default().to_owned();
                (column, parts.next() == Some("desc"))
            })
            .collect();
        rows.sort_by(|a, b| {
            for (column, descending) in &clauses {
                let ordering = compare(a.1.data.get(column), b.1.data.get(column));
                let ordering = if *descending {
                    ordering.reverse()
                } else {
                    ordering
                };
                if ordering.is_ne() {
                    return ordering;
                }
            }
            a.0.cmp(b.0)
        });
    }
    if let Some(top) = options.get("$top").and_then(|t| t.parse::<usize>().ok())
        && !request
            .prefer()
            .iter()
            .any(|p| p.starts_with("odata.maxpagesize="))
    {
        rows.truncate(top);
    }
    let page_size = request.max_page_size();
    let skip = options.get("$skiptoken").cloned().unwrap_or_default();
    let start = if let Some(offset) = skip.strip_prefix("o:") {
        offset.parse().unwrap_or(0)
    } else if let Some(last) = skip
        .strip_prefix("k:")
        .and_then(|k| Uuid::try_parse(k).ok())
    {
        rows.iter()
            .position(|(id, _)| **id > last)
            .unwrap_or(rows.len())
    } else {
        0
    };
    let page: Vec<Value> = rows
        .iter()
        .skip(start)
        .take(page_size)
        .map(|(_, row)| project(&row.data, &table.def.key, row.version, select.as_deref()))
        .collect();
    let mut body = json!({
        "@odata.context": format!("{base}$metadata#{set}"),
        "value": page,
    });
    let end = start + page_size;
    if end < rows.len() {
        let token = if order_by.is_some() {
            format!("o:{end}")
        } else {
            format!("k:{}", rows[end - 1].0)
        };
        body["@odata.nextLink"] =
            Value::String(link_with(base, set, &request.query, "$skiptoken", &token));
    }
    let mut response = ok(body);
    if request
        .prefer()
        .iter()
        .any(|p| p.starts_with("odata.maxpagesize="))
    {
        response.headers.push((
            "Preference-Applied".into(),
            format!("odata.maxpagesize={page_size}"),
        ));
    }
    response
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    match (a, b) {
        (Some(Value::Number(a)), Some(Value::Number(b))) => a
            .as_f64()
            .partial_cmp(&b.as_f64())
            .unwrap_or(std::cmp::Ordering::Equal),
        (Some(Value::String(a)), Some(Value::String(b))) => a.to_lowercase().cmp(&b.to_lowercase()),
        (None | Some(Value::Null), Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None | Some(Value::Null)) => std::cmp::Ordering::Greater,
        _ => std::cmp::Ordering::Equal,
    }
}

/// The same request URL with one query option replaced.
fn link_with(base: &str, set: &str, query: &str, name: &str, value: &str) -> String {
    let mut pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .filter(|(key, _)| key != name)
        .collect();
    pairs.push((name.to_owned(), value.to_owned()));
    let encoded = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    format!("{base}{set}?{encoded}")
}

fn encode(text: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'$')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b',')
        .remove(b':');
    percent_encoding::utf8_percent_encode(text, SET).to_string()
}

/// Change tracking: the first read lists every row and ends with a delta link;
/// following a delta link lists rows changed since, then deletions.
/// Paging state (`$skiptoken`) is `<phase>:<last id>:<snapshot version>`.
fn changes(
    store: &Store,
    base: &str,
    set: &str,
    request: &ApiRequest,
    options: &BTreeMap<String, String>,
) -> ApiResponse {
    let table = &store.tables[set];
    if !table.change_tracking {
        // Unconfirmed what the service does here; the documented symptom is no
        // Preference-Applied and no delta link, which the client must refuse.
        let mut plain = request.clone();
        plain
            .headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case("prefer"));
        return get_many(store, base, set, &plain);
    }
    for refused in ["$filter", "$orderby", "$expand", "$top"] {
        if options.contains_key(refused) {
            return error(
                400,
                "0x80060888",
                "The $filter/ $orderby/ $expand / $top query parameter isn't supported when Change Tracking is enabled.",
            );
        }
    }
    let since = match options.get("$deltatoken") {
        None => None,
        Some(token) => {
            let version = token.split('!').next().and_then(|v| v.parse::<u64>().ok());
            match version {
                Some(version)
                    if version >= store.oldest_valid_delta && version <= store.version =>
                {
                    Some(version)
                }
                _ => {
                    return error(
                        400,
                        "0x80044352",
                        "Version stamp associated with the client has expired. Please perform a full sync.",
                    );
                }
            }
        }
    };
    let select = select_of(options);
    let skip = options.get("$skiptoken").cloned().unwrap_or_default();
    let mut parts = skip.splitn(3, ':');
    let (phase, last, snapshot) = (
        parts
            .next()
            .filter(|p| !p.is_empty())
            .unwrap_or("u")
            .to_owned(),
        parts.next().and_then(|p| Uuid::try_parse(p).ok()),
        parts
            .next()
            .and_then(|p| p.parse::<u64>().ok())
            .unwrap_or(store.version),
    );
    let floor = since.unwrap_or(0);
    let page_size = request.max_page_size();
    let mut page: Vec<Value> = Vec::new();
    let mut next: Option<String> = None;
    if phase == "u" {
        let candidates = table.rows.iter().filter(|(id, row)| {
            last.is_none_or(|l| **id > l)
                && (since.is_none() || (row.version > floor && row.version <= snapshot))
        });
        let mut last_listed = None;
        for (id, row) in candidates {
            if let Some(last) = last_listed.filter(|_| page.len() == page_size) {
                next = Some(format!("u:{last}:{snapshot}"));
                break;
            }
            page.push(project(
                &row.data,
                &table.def.key,
                row.version,
                select.as_deref(),
            ));
            last_listed = Some(*id);
        }
    }
    if next.is_none() && since.is_some() {
        let deletion_start = if phase == "d" { last } else { None };
        let mut deleted: Vec<Uuid> = store
            .deletions
            .iter()
            .filter(|d| {
                d.set == set
                    && d.version > floor
                    && d.version <= snapshot
                    && !table.rows.contains_key(&d.id)
            })
            .map(|d| d.id)
            .filter(|id| deletion_start.is_none_or(|l| *id > l))
            .collect();
        deleted.sort();
        deleted.dedup();
        let mut last_listed: Option<Uuid> = None;
        for id in deleted {
            if page.len() == page_size {
                // A page that ends on the last row carries on with the deletions.
                let last = last_listed.map(|l| l.to_string()).unwrap_or_default();
                next = Some(format!("d:{last}:{snapshot}"));
                break;
            }
            last_listed = Some(id);
            page.push(json!({
                "@odata.context": format!("{base}$metadata#{set}/$deletedEntity"),
                "id": id.to_string(),
                "reason": "deleted",
            }));
        }
    }
    let suffix = if since.is_some() { "/$delta" } else { "" };
    let mut body = json!({
        "@odata.context": format!("{base}$metadata#{set}{suffix}"),
        "value": page,
    });
    match next {
        Some(token) => {
            body["@odata.nextLink"] =
                Value::String(link_with(base, set, &request.query, "$skiptoken", &token))
        }
        None => {
            let stamp = format!("{snapshot}!{}", store_date());
            let mut query: Vec<(String, String)> =
                url::form_urlencoded::parse(request.query.as_bytes())
                    .into_owned()
                    .filter(|(k, _)| k != "$skiptoken" && k != "$deltatoken")
                    .collect();
            query.push(("$deltatoken".into(), stamp));
            let encoded = query
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect::<Vec<_>>()
                .join("&");
            body["@odata.deltaLink"] = Value::String(format!("{base}{set}?{encoded}"));
        }
    }
    let mut response = ok(body);
    response.headers.push((
        "Preference-Applied".into(),
        format!("odata.track-changes,odata.maxpagesize={page_size}"),
    ));
    response
}

fn metadata_id(logical: &str) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("entity:{logical}").as_bytes())
}

/// `EntityDefinitions(LogicalName='contact')` or `EntityDefinitions(<MetadataId>)`:
/// read a definition; `PUT` (with `MSCRM.MergeLabels: true`) writes it back whole.
fn entity_definitions(store: &mut Store, request: &ApiRequest) -> ApiResponse {
    let key = request
        .path
        .strip_prefix("EntityDefinitions(")
        .and_then(|k| k.strip_suffix(')'))
        .unwrap_or_default();
    let set = store
        .tables
        .iter()
        .find(|(_, table)| {
            let logical = &table.def.logical;
            key == format!("LogicalName='{logical}'") || key == metadata_id(logical).to_string()
        })
        .map(|(set, _)| set.clone());
    let Some(set) = set else {
        return error(
            404,
            "0x80060888",
            format!("Could not find an entity definition for `{key}`."),
        );
    };
    let definition = |store: &Store| {
        let table = &store.tables[&set];
        let logical = &table.def.logical;
        json!({
            "MetadataId": metadata_id(logical).to_string(),
            "LogicalName": logical,
            "SchemaName": logical,
            "EntitySetName": set,
            "PrimaryIdAttribute": table.def.key,
            "ChangeTrackingEnabled": table.change_tracking,
            "CanChangeTrackingBeEnabled": {"Value": true, "CanBeChanged": false, "ManagedPropertyLogicalName": "canchangetrackingbeenabled"},
        })
    };
    match request.method.as_str() {
        "GET" => {
            let mut body = definition(store);
            if let Some(select) = select_of(&query_options(&request.query))
                && let Some(object) = body.as_object_mut()
            {
                object.retain(|k, _| select.iter().any(|s| s == k));
            }
            ok(body)
        }
        "PUT" => {
            if request.header("MSCRM.MergeLabels") != Some("true") {
                return error(
                    400,
                    "0x80060888",
                    "PUT of an entity definition needs MSCRM.MergeLabels: true, or its labels are lost.",
                );
            }
            let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
                return error(400, "0x80060888", "The request body is not valid JSON.");
            };
            // PUT replaces the whole definition: one without its names would wipe them.
            if body.get("LogicalName") != definition(store).get("LogicalName")
                || body.get("SchemaName").is_none()
            {
                return error(
                    400,
                    "0x80060888",
                    "An entity definition PUT must carry the whole definition.",
                );
            }
            let enabled = body
                .get("ChangeTrackingEnabled")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if let Some(table) = store.tables.get_mut(&set) {
                table.change_tracking = enabled;
            }
            no_content()
        }
        method => error(
            405,
            "0x80060888",
            format!("The HTTP method '{method}' is not allowed on entity definitions; use PUT."),
        ),
    }
}

/// `EntityDefinitions(LogicalName='phonecall')/Attributes[/Microsoft.Dynamics.CRM.<cast>]`
/// and `…/ManyToOneRelationships`, for tables with a schema: the columns with their
/// `AttributeType`, `MaxLength` behind the String and Memo casts, `OptionSet` behind
/// the Picklist, State and Status casts (with `$expand=OptionSet`), the lookups'
/// navigation properties. `$filter` and `$select` apply; metadata does not page.
fn entity_members(
    store: &Store,
    definition: &str,
    member: &str,
    request: &ApiRequest,
) -> ApiResponse {
    let key = definition
        .strip_prefix("EntityDefinitions(")
        .unwrap_or_default();
    let Some(table) = store
        .tables
        .values()
        .find(|table| key == format!("LogicalName='{}'", table.def.logical))
    else {
        return error(
            404,
            "0x80060888",
            format!("Could not find an entity definition for `{key}`."),
        );
    };
    let logical = &table.def.logical;
    let rows: Vec<Value> = if member == "ManyToOneRelationships" {
        let mut rows = vec![json!({
            "ReferencingAttribute": "ownerid",
            "ReferencedEntity": "systemuser",
            "ReferencingEntityNavigationPropertyName": "ownerid",
        })];
        if table.def.activity {
            for target in store.tables.values().filter(|t| !t.def.activity) {
                rows.push(json!({
                    "ReferencingAttribute": "regardingobjectid",
                    "ReferencedEntity": target.def.logical,
                    "ReferencingEntityNavigationPropertyName":
                        format!("regardingobjectid_{}_{logical}", target.def.logical),
                }));
            }
        }
        rows
    } else if member == "Attributes" || member.starts_with("Attributes/") {
        let Some(columns) = &table.def.columns else {
            return error(
                400,
                "0x80060888",
                format!("the emulator keeps no column definitions for `{logical}`"),
            );
        };
        let cast = member
            .strip_prefix("Attributes/")
            .map(|cast| cast.trim_start_matches("Microsoft.Dynamics.CRM."));
        columns
            .iter()
            .filter_map(|(name, kind)| attribute_metadata(name, *kind, cast))
            .collect()
    } else {
        return not_found_segment(member);
    };
    let options = query_options(&request.query);
    let filter = match options.get("$filter").map(|f| crate::filter::parse(f)) {
        Some(Err(message)) => return error(400, "0x80060888", message),
        Some(Ok(filter)) => Some(filter),
        None => None,
    };
    let select = select_of(&options);
    let rows: Vec<Value> = rows
        .into_iter()
        .filter_map(|row| match row {
            Value::Object(row) => Some(row),
            _ => None,
        })
        .filter(|row| {
            filter
                .as_ref()
                .is_none_or(|f| crate::filter::matches(f, row))
        })
        .map(|mut row| {
            if let Some(select) = &select {
                row.retain(|k, _| select.iter().any(|s| s == k) || k == "OptionSet");
            }
            Value::Object(row)
        })
        .collect();
    ok(json!({ "value": rows }))
}

/// One column's metadata as Dataverse gives it, or `None` when the cast does not
/// apply to it (no cast: every column, common properties only).
fn attribute_metadata(name: &str, kind: Kind, cast: Option<&str>) -> Option<Value> {
    let attribute_type = match (name, kind) {
        (_, Kind::Parties) => return None,
        ("statecode", _) => "State",
        ("statuscode", _) => "Status",
        (_, Kind::Text(max)) if max > 4000 => "Memo",
        (_, Kind::Text(_)) => "String",
        (_, Kind::Bool) => "Boolean",
        (_, Kind::DateTime) => "DateTime",
        (_, Kind::Int) => "Integer",
        (_, Kind::Choice(_)) => "Picklist",
    };
    let mut row = json!({"LogicalName": name, "AttributeType": attribute_type});
    match cast {
        None => {}
        Some(cast) if cast == format!("{attribute_type}AttributeMetadata") => match kind {
            Kind::Text(max) => row["MaxLength"] = json!(max.min(1_048_576)),
            Kind::Choice(values) => {
                let options: Vec<Value> = values
                    .iter()
                    .map(|value| json!({"Value": value, "Label": {"UserLocalizedLabel": {"Label": value.to_string()}}}))
                    .collect();
                row["OptionSet"] = json!({ "Options": options });
            }
            _ => {}
        },
        Some(_) => return None,
    }
    Some(row)
}

fn publish(store: &mut Store, request: &ApiRequest) -> ApiResponse {
    let body: Value = serde_json::from_slice(&request.body).unwrap_or_default();
    let xml = body
        .get("ParameterXml")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut rest = xml;
    while let Some(start) = rest.find("<entity>") {
        let after = &rest[start + 8..];
        let Some(end) = after.find("</entity>") else {
            break;
        };
        store.published.push(after[..end].to_owned());
        rest = &after[end..];
    }
    no_content()
}

fn store_date() -> String {
    let now = OffsetDateTime::now_utc();
    format!(
        "{:02}/{:02}/{:04} {:02}:{:02}:{:02}",
        u8::from(now.month()),
        now.day(),
        now.year(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// Validates a body against the table's columns and turns `@odata.bind` entries
/// into lookup columns.
fn prepare(
    store: &Store,
    set: &str,
    body: &[u8],
    creating: bool,
) -> Result<Map<String, Value>, ApiResponse> {
    let table = &store.tables[set];
    let logical = table.def.logical.clone();
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        error(
            400,
            "0x80060888",
            format!("The request body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(fields) = value else {
        return Err(error(
            400,
            "0x80060888",
            "The request body must be a JSON object.",
        ));
    };
    let mut columns = Map::new();
    for (name, value) in fields {
        if let Some(navigation) = name.strip_suffix("@odata.bind") {
            let (column, target_logical, id) = bind(store, &logical, navigation, &value)?;
            if column == "ownerid" && store.users_without_roles.contains(&id) {
                return Err(error(
                    403,
                    "0x80042f09",
                    format!("The user (Id = {id}) has not been assigned any roles."),
                ));
            }
            columns.insert(format!("_{column}_value"), Value::String(id.to_string()));
            columns.insert(
                format!("_{column}_value@Microsoft.Dynamics.CRM.lookuplogicalname"),
                Value::String(target_logical),
            );
            continue;
        }
        if name.starts_with('@') || name.contains("@odata.") {
            continue;
        }
        if creating && (name == "statecode") && table.def.activity {
            return Err(error(
                400,
                "0x80040203",
                format!("statecode cannot be set when a {logical} is created."),
            ));
        }
        if let Some(schema) = &table.def.columns {
            // Outside strict mode, custom columns (publisher prefix: `new_`, `cr1a2_`)
            // are accepted as they are.
            let custom = !table.def.strict && name.contains('_');
            match schema.get(name.as_str()) {
                None if custom => {}
                None => {
                    return Err(error(
                        400,
                        "0x80060888",
                        format!(
                            "The property '{name}' does not exist on type 'Microsoft.Dynamics.CRM.{logical}'. Make sure to only use property names that are defined by the type or mark the type as open type."
                        ),
                    ));
                }
                Some(kind) => check_kind(&logical, &name, *kind, &value)?,
            }
        }
        if name.ends_with("_activity_parties") {
            check_parties(store, &value)?;
        }
        columns.insert(name, value);
    }
    Ok(columns)
}

/// Refuses a value the column cannot hold, with Dataverse's answers: the length and
/// option-set validations name the column; a type mismatch names only the literal.
fn check_kind(logical: &str, name: &str, kind: Kind, value: &Value) -> Result<(), ApiResponse> {
    let fits = match (kind, value) {
        (_, Value::Null) => true,
        (Kind::Text(max), Value::String(text)) => {
            if text.chars().count() > max {
                return Err(error(
                    400,
                    "0x80044331",
                    format!(
                        "A validation error occurred. The length of the '{name}' attribute of the '{logical}' entity exceeded the maximum allowed length of '{max}'."
                    ),
                ));
            }
            true
        }
        (Kind::Bool, Value::Bool(_)) => true,
        (Kind::Int, Value::Number(n)) => n.is_i64(),
        (Kind::Choice(options), Value::Number(n)) if n.is_i64() => {
            let chosen = n.as_i64().unwrap_or_default();
            if !options.contains(&chosen) {
                let accepted: Vec<String> = options.iter().map(i64::to_string).collect();
                return Err(error(
                    400,
                    "0x8004431a",
                    format!(
                        "A validation error occurred. The value {chosen} of '{name}' on record of type '{logical}' is outside the valid range. Accepted Values: {}",
                        accepted.join(",")
                    ),
                ));
            }
            true
        }
        (Kind::DateTime, Value::String(text)) => OffsetDateTime::parse(text, &Rfc3339).is_ok(),
        (Kind::Parties, Value::Array(_)) => true,
        _ => false,
    };
    if fits {
        return Ok(());
    }
    let literal = match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let expected = match kind {
        Kind::Text(_) => "Edm.String",
        Kind::Bool => "Edm.Boolean",
        Kind::DateTime => "Edm.DateTimeOffset",
        Kind::Int | Kind::Choice(_) => "Edm.Int32",
        Kind::Parties => "Collection(Microsoft.Dynamics.CRM.activityparty)",
    };
    Err(error(
        400,
        "0x0",
        format!("Cannot convert the literal '{literal}' to the expected type '{expected}'."),
    ))
}

/// Every party's `partyid_<entity>@odata.bind` must name an existing row, as a
/// single-valued bind must.
fn check_parties(store: &Store, parties: &Value) -> Result<(), ApiResponse> {
    let binds = parties
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .flat_map(|party| party.iter())
        .filter(|(key, _)| key.ends_with("@odata.bind"));
    for (_, reference) in binds {
        let tail = reference
            .as_str()
            .and_then(|r| r.rsplit('/').next())
            .unwrap_or_default();
        let (target_set, key) = parse_target(tail)?;
        let Some(id) = key.as_deref().map(parse_id).transpose()? else {
            continue;
        };
        let exists = store
            .tables
            .get(&target_set)
            .is_some_and(|t| t.rows.contains_key(&id));
        if !exists {
            return Err(missing(store, &target_set, id));
        }
    }
    Ok(())
}

/// `regardingobjectid_contact_phonecall@odata.bind: "/contacts(<id>)"` -> column
/// `regardingobjectid`, target `contact`, id. The target must exist.
fn bind(
    store: &Store,
    logical: &str,
    navigation: &str,
    value: &Value,
) -> Result<(String, String, Uuid), ApiResponse> {
    let reference = value.as_str().ok_or_else(|| {
        error(
            400,
            "0x80060888",
            format!("'{navigation}@odata.bind' must be a string like /contacts(<id>)"),
        )
    })?;
    let tail = reference.rsplit('/').next().unwrap_or_default();
    let (target_set, key) = parse_target(tail)?;
    let key = key.ok_or_else(|| {
        error(
            400,
            "0x80060888",
            format!("'{reference}' does not name a record"),
        )
    })?;
    let id = parse_id(&key)?;
    let Some(target) = store.tables.get(&target_set) else {
        return Err(not_found_segment(&target_set));
    };
    if !target.rows.contains_key(&id) {
        return Err(missing(store, &target_set, id));
    }
    let target_logical = target.def.logical.clone();
    let column = navigation
        .strip_suffix(&format!("_{logical}"))
        .unwrap_or(navigation);
    let column = column
        .strip_suffix(&format!("_{target_logical}"))
        .unwrap_or(column);
    Ok((column.to_owned(), target_logical, id))
}

fn created(base: &str, set: &str, id: Uuid, store: &Store, request: &ApiRequest) -> ApiResponse {
    let wants_body = request
        .prefer()
        .iter()
        .any(|p| p == "return=representation");
    if wants_body {
        let table = &store.tables[set];
        let row = &table.rows[&id];
        let options = query_options(&request.query);
        let mut body = project(
            &row.data,
            &table.def.key,
            row.version,
            select_of(&options).as_deref(),
        );
        body["@odata.context"] = Value::String(format!("{base}$metadata#{set}/$entity"));
        ApiResponse {
            status: 201,
            headers: vec![("Preference-Applied".into(), "return=representation".into())],
            body: Some(body),
        }
    } else {
        let url = format!("{base}{set}({id})");
        ApiResponse {
            status: 204,
            headers: vec![
                ("OData-EntityId".into(), url.clone()),
                ("Location".into(), url),
            ],
            body: None,
        }
    }
}

fn create(store: &mut Store, base: &str, set: &str, request: &ApiRequest) -> ApiResponse {
    let mut columns = match prepare(store, set, &request.body, true) {
        Ok(columns) => columns,
        Err(response) => return response,
    };
    let key = store.tables[set].def.key.clone();
    let id = match columns.remove(&key) {
        Some(Value::String(text)) => match parse_id(&text) {
            Ok(id) => id,
            Err(response) => return response,
        },
        _ => Uuid::new_v4(),
    };
    if store.tables[set].rows.contains_key(&id) {
        return error(412, "", "A record with matching key values already exists.");
    }
    store.write(set, id, columns);
    created(base, set, id, store, request)
}

fn patch(store: &mut Store, base: &str, set: &str, id: Uuid, request: &ApiRequest) -> ApiResponse {
    let existing = store.tables[set].rows.get(&id).cloned();
    match (request.header("If-Match"), &existing) {
        (Some(_), None) => return missing(store, set, id),
        (Some(tag), Some(row)) if tag != "*" && tag != etag(row.version) => {
            return error(
                412,
                "0x80060882",
                "The version of the existing record doesn't match the RowVersion property provided.",
            );
        }
        _ => {}
    }
    if request.header("If-None-Match") == Some("*") && existing.is_some() {
        return error(412, "", "A record with matching key values already exists.");
    }
    let mut columns = match prepare(store, set, &request.body, existing.is_none()) {
        Ok(columns) => columns,
        Err(response) => return response,
    };
    let key = store.tables[set].def.key.clone();
    columns.remove(&key);
    if let Some(row) = &existing
        && store.tables[set].def.activity
    {
        let state = row
            .data
            .get("statecode")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let only_state = columns
            .keys()
            .all(|k| k == "statecode" || k == "statuscode");
        let reopening = columns.get("statecode").and_then(Value::as_i64) == Some(0);
        if state != 0 && !(only_state && reopening) {
            let logical = &store.tables[set].def.logical;
            // The service's exact text is not documented; the rule is: a closed activity can only be reopened.
            return error(
                400,
                "0x80040203",
                format!(
                    "This {logical} is closed (statecode {state}) and cannot be updated. Reopen it first."
                ),
            );
        }
    }
    store.write(set, id, columns);
    match existing {
        None => created(base, set, id, store, request),
        Some(_) => no_content(),
    }
}
