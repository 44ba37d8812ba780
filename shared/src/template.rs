//! JSON payload templates: string values with `{{ ... }}` placeholders, rendered
//! from a contact's context into a request body that is valid JSON by construction.
//!
//! A template is parsed once into a tree of literal JSON and compiled minijinja
//! templates. Rendering fills the tree: a value is always placed into a
//! `serde_json::Value` string, never spliced into JSON text, so no value can
//! escape its string or add a field. A string that is exactly one placeholder
//! (`"{{ duration_minutes }}"`) keeps the value's JSON type.

use std::collections::BTreeSet;

use minijinja::value::Value as JinjaValue;
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::phone::PhoneNormalizer;

/// All compiled templates of one configuration.
pub struct Templates {
    env: Environment<'static>,
}

/// A compiled JSON payload template; render it with [`Templates::render`].
#[derive(Debug, Clone)]
pub struct PayloadTemplate {
    path: String,
    root: Node,
}

/// A compiled text template (a URL, a subject line); render it with [`Templates::render_text`].
#[derive(Debug, Clone)]
pub struct TextTemplate {
    path: String,
}

#[derive(Debug, Clone)]
enum Node {
    Literal(Value),
    /// A string with placeholders, rendered as text. Holds the template's name.
    Text(String),
    /// Exactly one placeholder: the value keeps its JSON type.
    Typed(String),
    Array(Vec<Node>),
    Object(Vec<(String, Node)>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("`{path}`: template does not parse: {detail}")]
    Syntax { path: String, detail: String },
    #[error("`{path}`: undefined variable {variables} (add `| default(...)` if it may be missing)")]
    Undefined { path: String, variables: String },
    #[error("`{path}`: {detail}")]
    Render { path: String, detail: String },
}

impl TemplateError {
    /// The template's key path (`contact.ended.body.actualend`).
    pub fn path(&self) -> &str {
        match self {
            Self::Syntax { path, .. }
            | Self::Undefined { path, .. }
            | Self::Render { path, .. } => path,
        }
    }
}

impl Templates {
    /// An engine whose `e164` filter uses the given normaliser.
    pub fn new(phones: PhoneNormalizer) -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Output goes into JSON values, never into HTML.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.add_filter("truncate", truncate);
        env.add_filter("datetime", datetime);
        env.add_filter("e164", move |raw: JinjaValue| {
            defined(&raw)?;
            let text = raw.as_str().map_or_else(|| raw.to_string(), str::to_owned);
            Ok::<_, minijinja::Error>(phones.normalize(&text).unwrap_or(text))
        });
        Self { env }
    }

    /// Compiles a JSON payload template; `path` names it in every error.
    pub fn compile_payload(
        &mut self,
        path: &str,
        json: &Value,
    ) -> Result<PayloadTemplate, TemplateError> {
        let root = self.compile_node(path, json)?;
        Ok(PayloadTemplate {
            path: path.to_owned(),
            root,
        })
    }

    /// Compiles a text template (the whole string is one template).
    pub fn compile_text(
        &mut self,
        path: &str,
        source: &str,
    ) -> Result<TextTemplate, TemplateError> {
        self.add(path, source.to_owned())?;
        Ok(TextTemplate {
            path: path.to_owned(),
        })
    }

    fn compile_node(&mut self, path: &str, json: &Value) -> Result<Node, TemplateError> {
        Ok(match json {
            Value::String(text) if has_placeholder(text) => match single_placeholder(text) {
                Some(expression) => {
                    self.add(path, format!("{{{{ ({expression}) | tojson }}}}"))?;
                    Node::Typed(path.to_owned())
                }
                None => {
                    self.add(path, text.clone())?;
                    Node::Text(path.to_owned())
                }
            },
            Value::Array(items) => Node::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| self.compile_node(&format!("{path}[{index}]"), item))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(fields) => Node::Object(
                fields
                    .iter()
                    .map(|(key, value)| {
                        Ok((
                            key.clone(),
                            self.compile_node(&format!("{path}.{key}"), value)?,
                        ))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            literal => Node::Literal(literal.clone()),
        })
    }

    fn add(&mut self, path: &str, source: String) -> Result<(), TemplateError> {
        self.env
            .add_template_owned(path.to_owned(), source)
            .map_err(|error| TemplateError::Syntax {
                path: path.to_owned(),
                detail: describe(&error),
            })
    }

    /// Renders a payload from a context (a JSON object of named values).
    pub fn render(
        &self,
        template: &PayloadTemplate,
        context: &Value,
    ) -> Result<Value, TemplateError> {
        let jinja_context = JinjaValue::from_serialize(context);
        self.render_node(&template.root, context, &jinja_context)
    }

    /// Renders a text template.
    pub fn render_text(
        &self,
        template: &TextTemplate,
        context: &Value,
    ) -> Result<String, TemplateError> {
        self.render_string(
            &template.path,
            context,
            &JinjaValue::from_serialize(context),
        )
    }

    /// The compiled template's key path, as named in errors.
    pub fn path(template: &PayloadTemplate) -> &str {
        &template.path
    }

    /// The top-level keys of a body template, each with its value when that is a
    /// literal (known before any contact), for checks against the org's schema.
    pub fn columns(template: &PayloadTemplate) -> Vec<(&str, Option<&Value>)> {
        match &template.root {
            Node::Object(fields) => fields
                .iter()
                .map(|(key, node)| {
                    let literal = match node {
                        Node::Literal(value) => Some(value),
                        _ => None,
                    };
                    (key.as_str(), literal)
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    fn render_node(
        &self,
        node: &Node,
        context: &Value,
        jinja_context: &JinjaValue,
    ) -> Result<Value, TemplateError> {
        Ok(match node {
            Node::Literal(value) => value.clone(),
            Node::Text(name) => Value::String(self.render_string(name, context, jinja_context)?),
            Node::Typed(name) => {
                let json = self.render_string(name, context, jinja_context)?;
                let value: Value =
                    serde_json::from_str(&json).map_err(|error| TemplateError::Render {
                        path: name.clone(),
                        detail: format!("value is not JSON: {error}"),
                    })?;
                if value.is_object() || value.is_array() {
                    return Err(TemplateError::Render {
                        path: name.clone(),
                        detail: "placeholder renders to an object or list; a value can only be a string, number, boolean or null".into(),
                    });
                }
                value
            }
            Node::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| self.render_node(item, context, jinja_context))
                    .collect::<Result<_, _>>()?,
            ),
            Node::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(key, value)| {
                        Ok((
                            key.clone(),
                            self.render_node(value, context, jinja_context)?,
                        ))
                    })
                    .collect::<Result<Map<_, _>, TemplateError>>()?,
            ),
        })
    }

    fn render_string(
        &self,
        name: &str,
        context: &Value,
        jinja_context: &JinjaValue,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(name)
            .map_err(|error| TemplateError::Render {
                path: name.to_owned(),
                detail: describe(&error),
            })?;
        template.render(jinja_context).map_err(|error| {
            if error.kind() == ErrorKind::UndefinedError {
                let missing: BTreeSet<String> = template
                    .undeclared_variables(true)
                    .into_iter()
                    .filter(|variable| lookup(context, variable).is_none())
                    .collect();
                if !missing.is_empty() {
                    return TemplateError::Undefined {
                        path: name.to_owned(),
                        variables: missing
                            .iter()
                            .map(|v| format!("`{v}`"))
                            .collect::<Vec<_>>()
                            .join(", "),
                    };
                }
            }
            TemplateError::Render {
                path: name.to_owned(),
                detail: describe(&error),
            }
        })
    }
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates").finish_non_exhaustive()
    }
}

fn describe(error: &minijinja::Error) -> String {
    match error.detail() {
        Some(detail) => format!("{}: {detail}", error.kind()),
        None => error.kind().to_string(),
    }
}

/// Follows a dotted variable path (`customer.name`) through the context.
fn lookup<'a>(context: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(context, |value, key| value.get(key))
}

fn has_placeholder(text: &str) -> bool {
    text.contains("{{") || text.contains("{%")
}

/// The expression inside a string that is exactly one `{{ ... }}`.
fn single_placeholder(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.trim_start_matches('-').trim_end_matches('-');
    (!inner.contains("{{") && !inner.contains("}}") && !inner.trim().is_empty())
        .then(|| inner.trim())
}

/// A filter given an undefined value fails the way a bare undefined variable does,
/// so the error names the variable.
fn defined(value: &JinjaValue) -> Result<(), minijinja::Error> {
    if value.is_undefined() {
        Err(minijinja::Error::from(ErrorKind::UndefinedError))
    } else {
        Ok(())
    }
}

/// `truncate(n)`: at most `n` characters (Dynamics text columns have maximum lengths).
fn truncate(value: JinjaValue, length: usize) -> Result<String, minijinja::Error> {
    defined(&value)?;
    let text = match value.as_str() {
        Some(text) => text.to_owned(),
        None => value.to_string(),
    };
    Ok(text.chars().take(length).collect())
}

/// `datetime`: an ISO-8601 timestamp (or Unix seconds) as Dataverse writes it,
/// UTC to the second: `2026-11-20T14:05:31Z`.
fn datetime(value: JinjaValue) -> Result<String, minijinja::Error> {
    defined(&value)?;
    let invalid = |detail: String| minijinja::Error::new(ErrorKind::InvalidOperation, detail);
    let instant = if let Some(text) = value.as_str() {
        OffsetDateTime::parse(text, &Rfc3339)
            .map_err(|e| invalid(format!("`{text}` is not an ISO-8601 timestamp: {e}")))?
    } else if let Some(seconds) = value.as_i64() {
        OffsetDateTime::from_unix_timestamp(seconds).map_err(|e| invalid(e.to_string()))?
    } else {
        return Err(invalid(format!("`{value}` is not a timestamp")));
    };
    Ok(format_dataverse_datetime(instant))
}

/// Dataverse's UTC date-time form, to the second.
pub fn format_dataverse_datetime(instant: OffsetDateTime) -> String {
    let utc = instant.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        utc.year(),
        u8::from(utc.month()),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn engine() -> Templates {
        Templates::new(PhoneNormalizer::new("44").unwrap())
    }

    fn render(template: Value, context: Value) -> Result<Value, TemplateError> {
        let mut templates = engine();
        let compiled = templates.compile_payload("contact.created.body", &template)?;
        templates.render(&compiled, &context)
    }

    #[test]
    fn connectpath_style_template() {
        let body = render(
            json!({"phonenumber": "{{CustomerEndpoint}}", "subject": "Call from {{CustomerEndpoint}}", "directioncode": false}),
            json!({"CustomerEndpoint": "+447700900123"}),
        )
        .unwrap();
        assert_eq!(
            body,
            json!({"phonenumber": "+447700900123", "subject": "Call from +447700900123", "directioncode": false})
        );
    }

    #[test]
    fn injection_attempts_stay_inside_their_string() {
        let hostile = "\"}, \"ownerid@odata.bind\": \"/systemusers(x)\", \"a\": {\"b\": \"\\ }} {{ 7*7 }} \n\t\u{0}\u{7f} ☎️ Ünïcødé";
        let body = render(
            json!({"subject": "Call from {{ name }}", "description": "{{ name }}"}),
            json!({"name": hostile}),
        )
        .unwrap();
        let object = body.as_object().unwrap();
        assert_eq!(object.len(), 2);
        assert_eq!(object["description"], json!(hostile));
        assert_eq!(object["subject"], json!(format!("Call from {hostile}")));
        // And it survives the trip through JSON text.
        let text = serde_json::to_string(&body).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), body);
    }

    #[test]
    fn single_placeholder_keeps_the_json_type() {
        let body = render(
            json!({"minutes": "{{ minutes }}", "flag": "{{flag}}", "none": "{{ nothing | default(none) }}", "text": "{{ minutes }} min"}),
            json!({"minutes": 7, "flag": true}),
        )
        .unwrap();
        assert_eq!(
            body,
            json!({"minutes": 7, "flag": true, "none": null, "text": "7 min"})
        );
    }

    #[test]
    fn single_placeholder_cannot_inject_structure() {
        let error = render(
            json!({"x": "{{ customer }}"}),
            json!({"customer": {"a": 1}}),
        )
        .unwrap_err();
        assert!(matches!(error, TemplateError::Render { .. }), "{error}");
    }

    #[test]
    fn filters() {
        let body = render(
            json!({
                "upper": "{{ name | upper }}",
                "lower": "{{ name | lower }}",
                "short": "{{ name | truncate(3) }}",
                "fallback": "{{ missing | default('n/a') }}",
                "phone": "{{ phone | e164 }}",
                "when": "{{ at | datetime }}",
                "unix": "{{ 0 | datetime }}",
            }),
            json!({"name": "Ünïcode", "phone": "07700 900123", "at": "2026-11-20T15:05:31.123+01:00"}),
        )
        .unwrap();
        assert_eq!(
            body,
            json!({
                "upper": "ÜNÏCODE", "lower": "ünïcode", "short": "Ünï", "fallback": "n/a",
                "phone": "+447700900123", "when": "2026-11-20T14:05:31Z", "unix": "1970-01-01T00:00:00Z"
            })
        );
    }

    #[test]
    fn missing_value_names_the_path_and_the_variable() {
        let error = render(
            json!({"nested": {"actualend": "{{ agent.username }} at {{ ended }}"}}),
            json!({"agent": {}, "ended": "x"}),
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "`contact.created.body.nested.actualend`: undefined variable `agent.username` (add `| default(...)` if it may be missing)"
        );
    }

    #[test]
    fn filters_on_a_missing_value_name_the_variable() {
        let error =
            render(json!({"end": "{{ DisconnectTime | datetime }}"}), json!({})).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("undefined variable `DisconnectTime`"),
            "{error}"
        );
    }

    #[test]
    fn syntax_errors_name_the_path() {
        let mut templates = engine();
        let error = templates
            .compile_payload(
                "contact.ended.body",
                &json!({"actualend": "{{ ended_at | }}"}),
            )
            .unwrap_err();
        assert_eq!(error.path(), "contact.ended.body.actualend");
        assert!(error.to_string().contains("does not parse"), "{error}");
    }

    #[test]
    fn bad_datetime_is_an_error_not_a_panic() {
        let error = render(
            json!({"x": "{{ at | datetime }}"}),
            json!({"at": "yesterday"}),
        )
        .unwrap_err();
        assert!(error.to_string().contains("not an ISO-8601"), "{error}");
    }

    proptest! {
        #[test]
        fn any_values_render_to_valid_json_with_the_templates_keys(
            values in proptest::collection::vec(any::<String>(), 3),
            number in any::<i64>(),
        ) {
            let template = json!({
                "subject": "Call from {{ a }} about {{ b }}",
                "phonenumber": "{{ a }}",
                "description": "{{ c | truncate(2000) }}",
                "count": "{{ n }}",
                "fixed": 1,
            });
            let body = render(template, json!({"a": values[0], "b": values[1], "c": values[2], "n": number})).unwrap();
            let text = serde_json::to_string(&body).unwrap();
            let reparsed: Value = serde_json::from_str(&text).unwrap();
            let keys: BTreeSet<&str> = reparsed.as_object().unwrap().keys().map(String::as_str).collect();
            prop_assert_eq!(keys, BTreeSet::from(["subject", "phonenumber", "description", "count", "fixed"]));
            prop_assert_eq!(&reparsed["phonenumber"], &json!(values[0]));
            prop_assert_eq!(&reparsed["count"], &json!(number));
        }
    }
}
