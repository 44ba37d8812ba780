//! What Amazon Connect writes to S3, recognised by key layout.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::dataverse::odata::parse_guid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingKind {
    CallRecording,
    ChatTranscript,
    ContactLensAnalysis,
}

impl RecordingKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::CallRecording => "call recording",
            Self::ChatTranscript => "chat transcript",
            Self::ContactLensAnalysis => "Contact Lens analysis",
        }
    }

    /// Whether the file is JSON holding a `Transcript` array.
    pub fn has_transcript(self) -> bool {
        !matches!(self, Self::CallRecording)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingKey {
    pub kind: RecordingKind,
    pub contact_id: Uuid,
    pub redacted: bool,
}

/// Why a key is not one of ours (logged, then skipped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key has no contact id before the first `_` of its file name")]
    NoContactId,
    #[error("key is not a call recording, chat transcript or Contact Lens file")]
    UnknownLayout,
    #[error("key is a redacted copy of a call recording")]
    RedactedAudio,
}

/// Classifies an object key, URL-encoded or not. The contact id is the part of
/// the file name before its first `_`, and must be a UUID.
pub fn classify(raw_key: &str) -> Result<RecordingKey, KeyError> {
    let decoded = percent_encoding::percent_decode_str(raw_key).decode_utf8_lossy();
    let key = decoded.replace('+', " ");
    let segments: Vec<&str> = key.split('/').filter(|s| !s.is_empty()).collect();
    let file = segments.last().copied().unwrap_or_default();
    let contact_id = file
        .split('_')
        .next()
        .and_then(|id| parse_guid(id).ok())
        .ok_or(KeyError::NoContactId)?;
    let folders = &segments[..segments.len().saturating_sub(1)];
    let has = |name: &str| folders.contains(&name);
    let redacted = has("Redacted");
    let kind = if has("CallRecordings") && file.ends_with(".wav") {
        RecordingKind::CallRecording
    } else if has("ChatTranscripts") && file.ends_with(".json") {
        RecordingKind::ChatTranscript
    } else if has("Analysis") && (has("Voice") || has("Chat")) {
        if file.contains("_analysis_") && file.ends_with(".json") {
            RecordingKind::ContactLensAnalysis
        } else if file.contains("_call_recording_redacted_") {
            return Err(KeyError::RedactedAudio);
        } else {
            return Err(KeyError::UnknownLayout);
        }
    } else {
        return Err(KeyError::UnknownLayout);
    };
    Ok(RecordingKey {
        kind,
        contact_id,
        redacted,
    })
}

/// The readable text of a chat transcript or Contact Lens file: one line per
/// message, `Role: content`. Unknown fields are ignored.
pub fn transcript_text(json: &serde_json::Value) -> Option<String> {
    let items = json.get("Transcript")?.as_array()?;
    let lines: Vec<String> = items
        .iter()
        .filter_map(|item| {
            let content = item.get("Content")?.as_str()?.trim();
            if content.is_empty() {
                return None;
            }
            let who = item
                .get("DisplayName")
                .or_else(|| item.get("ParticipantRole"))
                .or_else(|| item.get("ParticipantId"))
                .and_then(|v| v.as_str())
                .unwrap_or("Participant");
            Some(format!("{who}: {content}"))
        })
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: &str = "aee46de9-1e0c-428c-aa82-afe11b6ad2c5";

    #[test]
    fn every_documented_layout() {
        let cases = [
            (
                format!("connect/example-cc/CallRecordings/2025/03/11/{ID}_20250311T09:41_UTC.wav"),
                RecordingKind::CallRecording,
                false,
            ),
            (
                format!(
                    "connect/example-cc/ChatTranscripts/2025/03/11/{ID}_20250311T09:41_UTC.json"
                ),
                RecordingKind::ChatTranscript,
                false,
            ),
            (
                format!("Analysis/Voice/2025/03/11/{ID}_analysis_2025-03-11T09:52:10Z.json"),
                RecordingKind::ContactLensAnalysis,
                false,
            ),
            (
                format!("Analysis/Chat/2025/03/11/{ID}_analysis_2025-03-11T09:52:10Z.json"),
                RecordingKind::ContactLensAnalysis,
                false,
            ),
            (
                format!(
                    "Analysis/Voice/Redacted/2025/03/11/{ID}_analysis_redacted_2025-03-11T09:52:10Z.json"
                ),
                RecordingKind::ContactLensAnalysis,
                true,
            ),
        ];
        for (key, kind, redacted) in cases {
            let parsed = classify(&key).unwrap();
            assert_eq!(
                (parsed.kind, parsed.redacted, parsed.contact_id.to_string()),
                (kind, redacted, ID.to_owned()),
                "{key}"
            );
        }
    }

    #[test]
    fn url_encoded_keys_work() {
        let key =
            format!("connect/example-cc/CallRecordings/2025/03/11/{ID}_20250311T09%3A41_UTC.wav");
        assert_eq!(classify(&key).unwrap().kind, RecordingKind::CallRecording);
    }

    #[test]
    fn other_keys_are_refused_with_a_reason() {
        assert_eq!(
            classify("connect/example-cc/Reports/x.csv"),
            Err(KeyError::NoContactId)
        );
        assert_eq!(
            classify(&format!("connect/example-cc/Reports/{ID}_x.csv")),
            Err(KeyError::UnknownLayout)
        );
        assert_eq!(
            classify(&format!(
                "Analysis/Voice/Redacted/2025/03/11/{ID}_call_recording_redacted_2025-03-11T09:52:10Z.wav"
            )),
            Err(KeyError::RedactedAudio)
        );
    }

    #[test]
    fn transcript_lines() {
        let json = serde_json::json!({"Transcript": [
            {"Content": "Hello", "DisplayName": "Nadia", "ParticipantRole": "CUSTOMER"},
            {"Content": "Hi, how can I help?", "ParticipantRole": "AGENT"},
            {"Type": "EVENT"}
        ]});
        assert_eq!(
            transcript_text(&json).unwrap(),
            "Nadia: Hello\nAGENT: Hi, how can I help?"
        );
        assert!(transcript_text(&serde_json::json!({})).is_none());
    }

    proptest! {
        #[test]
        fn classify_never_panics(key in ".{0,200}") {
            let _ = classify(&key);
        }

        #[test]
        fn any_prefix_keeps_the_contact_id(prefix in "[a-zA-Z0-9/_-]{0,40}") {
            let key = format!("{prefix}/CallRecordings/2025/03/11/{ID}_20250311T09:41_UTC.wav");
            prop_assert_eq!(classify(&key).unwrap().contact_id.to_string(), ID);
        }
    }
}
