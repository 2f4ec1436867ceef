//! How events travel over NATS, shared by the relay (which publishes) and every
//! consumer: subjects, header names and the payload. No NATS types here, only names
//! and encodings, so both sides agree by construction.
//!
//! Subject: `<prefix>.ev.<category>.<id>.<type>`, each token encoded with
//! [`encode_token`] (stream names written through SQL may hold `.`, `*`, `>`, spaces).
//! The headers carry the real names and the positions consumers use to detect gaps.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::model::{GlobalPosition, RecordedEvent};

/// JetStream de-duplication id: the event id.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// Fencing: the stream sequence the publisher expects to be last.
pub const EXPECTED_LAST_SEQUENCE: &str = "Nats-Expected-Last-Sequence";
/// The event's global position.
pub const POSITION: &str = "Colloquy-Position";
/// The event's position in its stream.
pub const STREAM_POSITION: &str = "Colloquy-Stream-Position";
/// The real stream name.
pub const STREAM: &str = "Colloquy-Stream";
/// The event type.
pub const TYPE: &str = "Colloquy-Type";
/// Global position of the previous event of the same category (0 if none): a consumer
/// of one category sees a break in this chain when something is missing.
pub const PREVIOUS_IN_CATEGORY: &str = "Colloquy-Previous-In-Category";
/// Global position of the previous event in the log (0 if none): the same for
/// consumers of everything.
pub const PREVIOUS: &str = "Colloquy-Previous";
/// W3C trace context from the event's metadata.
pub const TRACEPARENT: &str = "traceparent";

/// The subject an event is published on.
pub fn subject(prefix: &str, stream_name: &str, event_type: &str) -> String {
    let (category, id) = match stream_name.split_once('-') {
        Some((category, id)) => (category, id),
        None => (stream_name, ""),
    };
    format!(
        "{prefix}.ev.{}.{}.{}",
        encode_token(category),
        encode_token(id),
        encode_token(event_type)
    )
}

/// The subject filter for every event of one stream.
pub fn stream_filter(prefix: &str, stream_name: &str) -> String {
    let (category, id) = match stream_name.split_once('-') {
        Some((category, id)) => (category, id),
        None => (stream_name, ""),
    };
    format!(
        "{prefix}.ev.{}.{}.>",
        encode_token(category),
        encode_token(id)
    )
}

/// The subject filter for one category (`None`: every event).
pub fn filter(prefix: &str, category: Option<&str>) -> String {
    match category {
        Some(category) => format!("{prefix}.ev.{}.>", encode_token(category)),
        None => format!("{prefix}.ev.>"),
    }
}

/// Encodes one subject token: bytes outside `[A-Za-z0-9_+:=-]` become `%XX`, and an
/// empty token is `%00` (a NUL cannot occur in a stored name, so it is unambiguous).
pub fn encode_token(raw: &str) -> String {
    if raw.is_empty() {
        return "%00".to_owned();
    }
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'+' | b':' | b'=') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Reverses [`encode_token`]; `None` for malformed input.
pub fn decode_token(token: &str) -> Option<String> {
    if token == "%00" {
        return Some(String::new());
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = token.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The message body: the whole event, so a consumer needs no read of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Payload {
    pub id: Uuid,
    pub global_position: GlobalPosition,
    pub position: i64,
    pub time: DateTime<Utc>,
    pub stream_name: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: Value,
    pub metadata: Option<Value>,
}

impl From<&RecordedEvent> for Payload {
    fn from(e: &RecordedEvent) -> Self {
        Self {
            id: e.id,
            global_position: e.global_position,
            position: e.position,
            time: e.time,
            stream_name: e.stream_name.clone(),
            event_type: e.event_type.clone(),
            data: e.data.clone(),
            metadata: e.metadata.clone(),
        }
    }
}

impl From<Payload> for RecordedEvent {
    fn from(p: Payload) -> Self {
        Self {
            global_position: p.global_position,
            position: p.position,
            time: p.time,
            stream_name: p.stream_name,
            event_type: p.event_type,
            data: p.data,
            metadata: p.metadata,
            id: p.id,
        }
    }
}

/// The trace context an event's metadata carries, if any.
pub fn traceparent(event: &RecordedEvent) -> Option<&str> {
    event
        .metadata
        .as_ref()
        .and_then(|m| m.get("traceparent"))
        .and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_never_contain_subject_syntax() {
        for raw in [
            "plain",
            "a.b",
            "*",
            ">",
            "with space",
            "ünï",
            "",
            "%",
            "x+y:z",
            "a\tb",
        ] {
            let token = encode_token(raw);
            assert!(!token.is_empty());
            assert!(
                !token.contains(['.', '*', '>', ' ', '\t']),
                "{raw:?} -> {token}"
            );
            assert_eq!(decode_token(&token).as_deref(), Some(raw));
        }
        assert_eq!(decode_token("%G1"), None);
        assert_eq!(decode_token("%4"), None);
    }

    #[test]
    fn subjects_split_category_and_id() {
        assert_eq!(
            subject("colloquy", "conversation-123-abc", "MessageSent"),
            "colloquy.ev.conversation.123-abc.MessageSent"
        );
        assert_eq!(subject("p", "odd.name", "T"), "p.ev.odd%2Ename.%00.T");
        assert_eq!(filter("p", Some("agentRun")), "p.ev.agentRun.>");
        assert_eq!(filter("p", None), "p.ev.>");
        assert_eq!(
            stream_filter("colloquy", "conversation-123-abc"),
            "colloquy.ev.conversation.123-abc.>"
        );
        assert_eq!(stream_filter("p", "odd.name"), "p.ev.odd%2Ename.%00.>");
    }
}
