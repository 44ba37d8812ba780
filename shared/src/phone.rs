//! Phone numbers to E.164, the one form the caller directory stores and looks up.

/// Normalises numbers written in any common way (`+44 7700 900123`, `07700 900123`,
/// `0044 7700-900123`, `(206) 555-0137`) to E.164 (`+447700900123`).
///
/// Numbers without an international prefix are taken as national numbers of the
/// configured country. The rule is deliberately simple and documented rather than a
/// full numbering-plan database: trunk prefix `0` is dropped (most of the world), and
/// in the North American plan (country code 1) a 10-digit number is national.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhoneNormalizer {
    country_code: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("`{0}` has characters that are not part of a phone number")]
    InvalidCharacters(String),
    #[error("`{0}` is not a phone number: E.164 allows 8 to 15 digits")]
    InvalidLength(String),
    #[error("country code `{0}` must be 1 to 3 digits, not starting with 0")]
    InvalidCountryCode(String),
}

impl PhoneNormalizer {
    pub fn new(country_code: &str) -> Result<Self, PhoneError> {
        let code = country_code.trim().trim_start_matches('+');
        let valid = (1..=3).contains(&code.len())
            && code.bytes().all(|b| b.is_ascii_digit())
            && !code.starts_with('0');
        if !valid {
            return Err(PhoneError::InvalidCountryCode(country_code.to_owned()));
        }
        Ok(Self {
            country_code: code.to_owned(),
        })
    }

    pub fn normalize(&self, raw: &str) -> Result<String, PhoneError> {
        let text = raw.trim();
        // Strip an extension ("x123", "ext. 123"): the directory matches the line.
        let text = text
            .split(['x', 'X', ';', '#'])
            .next()
            .unwrap_or_default()
            .trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == '.' || c == ' ');
        let mut digits = String::with_capacity(text.len());
        let mut plus = false;
        for (position, c) in text.chars().enumerate() {
            match c {
                '0'..='9' => digits.push(c),
                '+' if position == 0 => plus = true,
                ' ' | '-' | '.' | '(' | ')' | '/' | '\u{a0}' => {}
                _ => return Err(PhoneError::InvalidCharacters(raw.to_owned())),
            }
        }
        let international = if plus {
            digits
        } else if let Some(rest) = digits.strip_prefix("00") {
            rest.to_owned()
        } else if self.country_code == "1" {
            match digits.len() {
                10 => format!("1{digits}"),
                11 if digits.starts_with('1') => digits,
                _ => digits,
            }
        } else if let Some(national) = digits.strip_prefix('0') {
            format!("{}{national}", self.country_code)
        } else {
            format!("{}{digits}", self.country_code)
        };
        if !(8..=15).contains(&international.len()) || international.starts_with('0') {
            return Err(PhoneError::InvalidLength(raw.to_owned()));
        }
        Ok(format!("+{international}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uk_numbers_in_every_common_form() {
        let uk = PhoneNormalizer::new("44").unwrap();
        for form in [
            "+447700900123",
            "+44 7700 900123",
            "07700 900123",
            "07700-900-123",
            "0044 7700 900123",
            "(07700) 900123",
            "+44 7700 900123 ext. 12",
        ] {
            assert_eq!(uk.normalize(form).unwrap(), "+447700900123", "{form}");
        }
    }

    #[test]
    fn north_american_numbers() {
        let us = PhoneNormalizer::new("+1").unwrap();
        for form in [
            "(206) 555-0137",
            "206.555.0137",
            "1 206 555 0137",
            "+1 206-555-0137",
        ] {
            assert_eq!(us.normalize(form).unwrap(), "+12065550137", "{form}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_number() {
        let uk = PhoneNormalizer::new("44").unwrap();
        for bad in [
            "",
            "abc",
            "12",
            "+44 77 00 90 01 23 45 67 89",
            "+44' or 1=1",
        ] {
            assert!(uk.normalize(bad).is_err(), "{bad}");
        }
        assert!(PhoneNormalizer::new("0").is_err());
        assert!(PhoneNormalizer::new("1234").is_err());
    }

    proptest! {
        #[test]
        fn output_is_always_e164(raw in ".{0,40}") {
            let uk = PhoneNormalizer::new("44").unwrap();
            if let Ok(number) = uk.normalize(&raw) {
                prop_assert!(number.starts_with('+'));
                prop_assert!(number[1..].bytes().all(|b| b.is_ascii_digit()));
                prop_assert!((9..=16).contains(&number.len()));
                prop_assert_eq!(uk.normalize(&number).unwrap(), number);
            }
        }
    }
}
