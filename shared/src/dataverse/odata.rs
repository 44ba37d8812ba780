//! Validated pieces of Dataverse URLs: entity set names, record ids, OData string literals.
//!
//! Everything that goes into a request URL passes through here, so a value from an
//! event or a record can never change which resource a request addresses.

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Deserializer};
use uuid::Uuid;

/// Characters escaped in a query option value. Everything but unreserved characters
/// and the OData punctuation that must stay readable is percent-encoded; above all
/// `+`, which a server decodes as a space (so an unencoded E.164 number never matches).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b',')
    .remove(b'(')
    .remove(b')')
    .remove(b'$')
    .remove(b'/');

/// Percent-encodes a query option value (`$filter`, `$select`, ...).
pub fn encode_query_value(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

/// An OData string literal: single-quoted, with embedded quotes doubled.
/// URL encoding happens later, when the query string is built.
pub fn string_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The name of a Dataverse entity set (`phonecalls`, `contacts`, `new_customthings`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntitySet(String);

/// The logical name of an entity or column (`phonecall`, `telephone1`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identifier(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a valid Dataverse identifier (letters, digits and `_`, not starting with a digit, at most 128 characters)"
)]
pub struct InvalidIdentifier(pub String);

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 128
}

macro_rules! identifier_type {
    ($ty:ident) => {
        impl $ty {
            pub fn new(name: impl Into<String>) -> Result<Self, InvalidIdentifier> {
                let name = name.into();
                if is_identifier(&name) {
                    Ok(Self(name))
                } else {
                    Err(InvalidIdentifier(name))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let name = String::deserialize(deserializer)?;
                Self::new(name).map_err(serde::de::Error::custom)
            }
        }
    };
}

identifier_type!(EntitySet);
identifier_type!(Identifier);

/// Parses a record id from untrusted text: a bare GUID or one in braces.
pub fn parse_guid(text: &str) -> Result<Uuid, InvalidGuid> {
    let trimmed = text.trim();
    let bare = trimmed
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(trimmed);
    // Only the hyphenated 8-4-4-4-12 form: Dataverse never emits the others.
    if bare.len() != 36 {
        return Err(InvalidGuid(text.to_owned()));
    }
    Uuid::try_parse(bare).map_err(|_| InvalidGuid(text.to_owned()))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a GUID")]
pub struct InvalidGuid(pub String);

/// The record id inside an `OData-EntityId` header: between the last `(` and the next `)`.
pub fn id_from_entity_url(url: &str) -> Option<Uuid> {
    let start = url.rfind('(')? + 1;
    let end = start + url[start..].find(')')?;
    parse_guid(&url[start..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn literal_doubles_quotes_and_encoding_protects_plus() {
        let filter = format!("lastname eq {}", string_literal("O'Shea"));
        assert_eq!(filter, "lastname eq 'O''Shea'");
        let encoded = encode_query_value(&format!("telephone1 eq {}", string_literal("+441234")));
        assert_eq!(encoded, "telephone1%20eq%20%27%2B441234%27");
    }

    #[test]
    fn identifiers_reject_anything_that_could_change_the_url() {
        for good in ["phonecalls", "new_customthings", "_x1"] {
            assert!(EntitySet::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1abc",
            "contacts(",
            "a/b",
            "a b",
            "contacts?$top=1",
            "é",
        ] {
            assert!(EntitySet::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn guids_are_strict() {
        let id = "e6469cc6-f008-4c49-90ee-f46e23a22f8c";
        assert_eq!(parse_guid(id).unwrap().to_string(), id);
        assert!(parse_guid(&format!("{{{id}}}")).is_ok());
        for bad in [
            "",
            "abc",
            "e6469cc6f0084c4990eef46e23a22f8c",
            "e6469cc6-f008-4c49-90ee-f46e23a22f8c)/x",
        ] {
            assert!(parse_guid(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn entity_id_header_is_parsed() {
        let url = "https://contoso-demo.crm.dynamics.com/api/data/v9.2/accounts(e6469cc6-f008-4c49-90ee-f46e23a22f8c)";
        assert_eq!(
            id_from_entity_url(url).unwrap().to_string(),
            "e6469cc6-f008-4c49-90ee-f46e23a22f8c"
        );
        assert!(id_from_entity_url("https://x/accounts").is_none());
    }

    proptest! {
        #[test]
        fn encoded_values_contain_no_url_syntax(value in ".*") {
            let encoded = encode_query_value(&string_literal(&value));
            prop_assert!(!encoded.contains(['+', '&', '#', '?', ' ', '=', '\'']));
            let decoded = percent_encoding::percent_decode_str(&encoded).decode_utf8().unwrap();
            prop_assert_eq!(decoded, string_literal(&value));
        }

        #[test]
        fn parse_guid_never_panics(text in ".*") {
            let _ = parse_guid(&text);
        }
    }
}
