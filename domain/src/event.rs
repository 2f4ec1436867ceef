//! Event typing, schema versions, upcasting and redaction.
//!
//! Every event has a plain type name (its enum variant's name, e.g.
//! `MessageSent`), a JSON object payload (camelCase fields) and a schema
//! version for that payload, starting at 1. The type name is stored as the
//! Message DB `type`; the version travels in the metadata as
//! `schemaVersion`. Writers always write the current version.
//!
//! # Reading old versions (upcasting)
//!
//! [`DomainEvent::from_stored`] brings an old payload up to the current
//! version one step at a time, then decodes it. Every reader (command
//! handlers, projections, the agent) reads through it, so old events never
//! need rewriting. The one real example so far:
//!
//! * `MessageSent` v1 → v2: v1 had `body` and no `author` (every message was a
//!   user's). v2 renames `body` to `text` and adds `"author": "user"`.
//!
//! To change a payload: bump the version in the `domain_event_enum!` table,
//! add a step to [`upcast_conversation`] / [`upcast_run`], and add a test
//! that decodes a stored payload of the old version.
//!
//! # Decoding never panics
//!
//! An unknown type is [`DecodeError::UnknownType`] (a reader built before the
//! type existed may skip it); a version this build does not know is
//! [`DecodeError::UnsupportedVersion`]; anything else that does not fit is
//! [`DecodeError::Malformed`].
//!
//! # Redaction (erasure)
//!
//! A forgotten user's text is erased by rewriting stored payloads in place
//! (see `docs/adr/0003`): [`redact`] blanks the user-written fields and marks
//! the payload `"redacted": true`. Redacted payloads still decode; the text
//! fields are simply `""`.

use serde_json::{Map, Value};

/// An event that can be stored: a type name, a schema version and a JSON
/// object payload, and back.
pub trait DomainEvent: Sized {
    /// The plain type name, e.g. `MessageSent`.
    fn event_type(&self) -> &'static str;

    /// The schema version of [`DomainEvent::to_data`]'s payload (the current
    /// version of this type).
    fn schema_version(&self) -> u32;

    /// The payload, always a JSON object.
    fn to_data(&self) -> Value;

    /// Decodes a stored event, upcasting old schema versions first.
    ///
    /// # Errors
    /// [`DecodeError`]; never panics, whatever the input.
    fn from_stored(event_type: &str, schema_version: u32, data: Value)
    -> Result<Self, DecodeError>;
}

/// Why a stored event could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a type of this stream. Readers may skip it (it may be newer than
    /// this build).
    #[error("unknown event type {event_type:?}")]
    UnknownType {
        /// The stored type name.
        event_type: String,
    },
    /// A schema version this build cannot read (0, or newer than it knows).
    #[error("{event_type} schema version {version} is not supported (current is {current})")]
    UnsupportedVersion {
        /// The stored type name.
        event_type: String,
        /// The stored version.
        version: u32,
        /// The newest version this build knows.
        current: u32,
    },
    /// The payload does not fit the type and version.
    #[error("malformed {event_type} v{version}: {reason}")]
    Malformed {
        /// The stored type name.
        event_type: String,
        /// The stored version.
        version: u32,
        /// What did not fit.
        reason: String,
    },
}

impl DecodeError {
    /// Whether a reader may skip the event and go on (an unknown type).
    #[must_use]
    pub const fn is_skippable(&self) -> bool {
        matches!(self, Self::UnknownType { .. })
    }
}

/// Implements [`DomainEvent`] and the `From` conversions for an event enum
/// whose variants wrap payload structs of the same name:
/// `domain_event_enum!(Enum { Variant = current_version, … } upcast = path)`.
macro_rules! domain_event_enum {
    ($enum:ident { $($variant:ident = $version:literal),+ $(,)? } upcast = $upcast:path) => {
        impl $enum {
            /// Every type name of this stream, in declaration order.
            pub const EVENT_TYPES: &'static [&'static str] = &[$(stringify!($variant)),+];

            /// The current schema version of a type, or `None` if unknown.
            #[must_use]
            pub fn current_schema_version(event_type: &str) -> Option<u32> {
                match event_type {
                    $(stringify!($variant) => Some($version),)+
                    _ => None,
                }
            }
        }

        $(
            impl From<$variant> for $enum {
                fn from(event: $variant) -> Self {
                    Self::$variant(event)
                }
            }
        )+

        impl $crate::event::DomainEvent for $enum {
            fn event_type(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => stringify!($variant),)+
                }
            }

            fn schema_version(&self) -> u32 {
                match self {
                    $(Self::$variant(_) => $version,)+
                }
            }

            fn to_data(&self) -> serde_json::Value {
                match self {
                    $(Self::$variant(e) => serde_json::to_value(e)
                        .expect("BUG: event payloads are plain structs and always serialize"),)+
                }
            }

            fn from_stored(
                event_type: &str,
                schema_version: u32,
                data: serde_json::Value,
            ) -> Result<Self, $crate::event::DecodeError> {
                let data = $crate::event::prepare(
                    event_type,
                    schema_version,
                    Self::current_schema_version(event_type),
                    data,
                    $upcast,
                )?;
                let decoded = match event_type {
                    $(stringify!($variant) => {
                        serde_json::from_value::<$variant>(data).map(Self::$variant)
                    })+
                    _ => {
                        return Err($crate::event::DecodeError::UnknownType {
                            event_type: event_type.to_owned(),
                        })
                    }
                };
                decoded.map_err(|e| $crate::event::DecodeError::Malformed {
                    event_type: event_type.to_owned(),
                    version: schema_version,
                    reason: e.to_string(),
                })
            }
        }
    };
}
pub(crate) use domain_event_enum;

/// One upcasting step: the payload of `event_type` at `version`, brought to
/// `version + 1`.
pub(crate) type UpcastStep =
    fn(&str, u32, Map<String, Value>) -> Result<Map<String, Value>, String>;

/// Checks type and version, then upcasts `data` to the current version.
pub(crate) fn prepare(
    event_type: &str,
    version: u32,
    current: Option<u32>,
    data: Value,
    step: UpcastStep,
) -> Result<Value, DecodeError> {
    let Some(current) = current else {
        return Err(DecodeError::UnknownType {
            event_type: event_type.to_owned(),
        });
    };
    if version == 0 || version > current {
        return Err(DecodeError::UnsupportedVersion {
            event_type: event_type.to_owned(),
            version,
            current,
        });
    }
    let malformed = |reason: String| DecodeError::Malformed {
        event_type: event_type.to_owned(),
        version,
        reason,
    };
    let Value::Object(mut object) = data else {
        return Err(malformed("payload is not a JSON object".to_owned()));
    };
    for v in version..current {
        object = step(event_type, v, object).map_err(malformed)?;
    }
    Ok(Value::Object(object))
}

/// Upcasting steps for conversation events.
///
/// * `MessageSent` v1 → v2: `body` becomes `text`; `author` is `"user"`.
///
/// # Errors
/// The old payload lacks what the step needs.
pub fn upcast_conversation(
    event_type: &str,
    from_version: u32,
    mut data: Map<String, Value>,
) -> Result<Map<String, Value>, String> {
    match (event_type, from_version) {
        ("MessageSent", 1) => {
            let body = data
                .remove("body")
                .ok_or_else(|| "v1 payload has no `body`".to_owned())?;
            data.insert("text".to_owned(), body);
            data.entry("author")
                .or_insert_with(|| Value::String("user".to_owned()));
            Ok(data)
        }
        _ => Err(format!("no upcaster from {event_type} v{from_version}")),
    }
}

/// Upcasting steps for run events (none yet: every run event is at v1).
///
/// # Errors
/// Always, since no run event has an old version.
pub fn upcast_run(
    event_type: &str,
    from_version: u32,
    _data: Map<String, Value>,
) -> Result<Map<String, Value>, String> {
    Err(format!("no upcaster from {event_type} v{from_version}"))
}

/// The user-written text fields of each redactable type, across all its
/// schema versions (`MessageSent` v1 called its text `body`).
#[must_use]
pub fn redactable_fields(event_type: &str) -> &'static [&'static str] {
    match event_type {
        "MessageSent" => &["text", "body"],
        "MessageEdited" => &["text"],
        "ConversationStarted" => &["title", "systemPrompt"],
        "ConversationRenamed" => &["title"],
        "RunRequested" => &["instructions"],
        _ => &[],
    }
}

/// Erases the user-written text of a stored payload in place.
///
/// For a redactable type (see [`redactable_fields`]), each text field that is
/// present and a string becomes `""` (absent and `null` fields stay so), and
/// the payload gets `"redacted": true`. Returns whether `data` changed, so
/// redacting twice returns `false` the second time. Other types and
/// non-object payloads are left alone (`false`).
///
/// Which events to redact (a forgotten user's conversations and runs,
/// assistant replies included, since they echo what the user wrote) is the
/// caller's decision.
pub fn redact(event_type: &str, data: &mut Value) -> bool {
    let fields = redactable_fields(event_type);
    if fields.is_empty() {
        return false;
    }
    let Value::Object(object) = data else {
        return false;
    };
    let mut changed = false;
    for field in fields {
        if let Some(value @ Value::String(_)) = object.get_mut(*field)
            && value.as_str() != Some("")
        {
            *value = Value::String(String::new());
            changed = true;
        }
    }
    if object.get("redacted") != Some(&Value::Bool(true)) {
        object.insert("redacted".to_owned(), Value::Bool(true));
        changed = true;
    }
    changed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;
    use crate::conversation::{Author, ConversationEvent, MessageSent};
    use crate::run::RunEvent;
    use crate::testing::fixtures::*;

    fn all_sample_conversation_events() -> Vec<ConversationEvent> {
        vec![
            started(),
            user_message(m(1)),
            assistant_message(m(2), r(1), m(1)),
            message_edited(m(1), "edited"),
            message_deleted(m(1)),
            renamed("New"),
            archived(),
            run_opened(r(1), m(1)),
            run_closed(r(1), crate::conversation::RunOutcome::Failed),
        ]
    }

    fn all_sample_run_events() -> Vec<RunEvent> {
        vec![
            run_requested(r(1), m(1)),
            run_started(1),
            crate::run::RunProgressed {
                attempt: 1,
                stage: "streaming".to_owned(),
                percent: 50,
            }
            .into(),
            run_retry_scheduled(1, at(90)),
            run_completed(2, m(2)),
            run_failed("boom", 3),
            run_cancelled(owner()),
        ]
    }

    #[test]
    fn every_event_round_trips_through_its_stored_form() {
        for e in all_sample_conversation_events() {
            let back =
                ConversationEvent::from_stored(e.event_type(), e.schema_version(), e.to_data());
            assert_eq!(back.as_ref(), Ok(&e));
            assert!(e.to_data().is_object());
        }
        for e in all_sample_run_events() {
            let back = RunEvent::from_stored(e.event_type(), e.schema_version(), e.to_data());
            assert_eq!(back.as_ref(), Ok(&e));
        }
        assert_eq!(ConversationEvent::EVENT_TYPES.len(), 8);
        assert_eq!(RunEvent::EVENT_TYPES.len(), 7);
    }

    #[test]
    fn event_payloads_have_the_documented_json_shape() {
        let sent = assistant_message(m(2), r(1), m(1));
        assert_eq!(sent.event_type(), "MessageSent");
        assert_eq!(sent.schema_version(), 2);
        assert_eq!(
            sent.to_data(),
            json!({
                "messageId": m(2).to_string(),
                "author": "assistant",
                "text": "Here is an answer.",
                "replyTo": m(1).to_string(),
                "runId": r(1).to_string(),
            })
        );
        assert_eq!(
            user_message(m(1)).to_data(),
            json!({
                "messageId": m(1).to_string(),
                "author": "user",
                "authorId": owner().to_string(),
                "text": "hello",
            })
        );
        assert_eq!(archived().to_data(), json!({}));
        assert_eq!(
            run_closed(r(1), crate::conversation::RunOutcome::Cancelled).to_data(),
            json!({"runId": r(1).to_string(), "outcome": "cancelled"})
        );
        assert_eq!(
            run_retry_scheduled(1, at(90)).to_data(),
            json!({"attempt": 1, "reason": "model overloaded", "notBefore": "2025-01-01T00:01:30Z"})
        );
        assert_eq!(
            run_completed(1, m(2)).to_data(),
            json!({
                "attempt": 1,
                "replyMessageId": m(2).to_string(),
                "finishReason": "STOP",
                "usage": {"promptTokens": 12, "candidatesTokens": 30, "totalTokens": 42},
            })
        );
        assert_eq!(
            run_requested(r(1), m(1)).to_data(),
            json!({
                "runId": r(1).to_string(),
                "conversationId": conversation_id().to_string(),
                "promptMessageId": m(1).to_string(),
                "model": "gemini-2.5-flash",
                "requestedBy": owner().to_string(),
            })
        );
    }

    #[test]
    fn a_version_1_message_sent_decodes_into_todays_event() {
        let v1 = json!({
            "messageId": m(1).to_string(),
            "authorId": owner().to_string(),
            "body": "written in 2024",
        });
        let e = ConversationEvent::from_stored("MessageSent", 1, v1).unwrap();
        assert_eq!(
            e,
            MessageSent {
                message_id: m(1),
                author: Author::User,
                author_id: Some(owner()),
                text: "written in 2024".to_owned(),
                reply_to: None,
                run_id: None,
                redacted: false,
            }
            .into()
        );
        // Re-encoding writes the current version.
        assert_eq!(e.schema_version(), 2);
        assert_eq!(e.to_data()["text"], "written in 2024");
    }

    #[test]
    fn a_version_1_message_sent_without_a_body_is_malformed() {
        let err = ConversationEvent::from_stored(
            "MessageSent",
            1,
            json!({"messageId": m(1).to_string()}),
        )
        .unwrap_err();
        assert!(
            matches!(err, DecodeError::Malformed { version: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_type_can_be_skipped() {
        let err = ConversationEvent::from_stored("MessageReacted", 1, json!({})).unwrap_err();
        assert_eq!(
            err,
            DecodeError::UnknownType {
                event_type: "MessageReacted".to_owned()
            }
        );
        assert!(err.is_skippable());
        // Run types are unknown to the conversation stream, and vice versa.
        assert!(ConversationEvent::from_stored("RunStarted", 1, json!({})).is_err());
        assert!(RunEvent::from_stored("MessageSent", 2, json!({})).is_err());
    }

    #[test]
    fn a_version_from_the_future_is_unsupported() {
        let err = ConversationEvent::from_stored("MessageDeleted", 2, json!({})).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::UnsupportedVersion {
                version: 2,
                current: 1,
                ..
            }
        ));
        assert!(!err.is_skippable());
        assert!(RunEvent::from_stored("RunFailed", 0, json!({})).is_err());
    }

    #[test]
    fn malformed_payloads_are_errors() {
        for data in [
            json!(null),
            json!([1, 2]),
            json!("MessageSent"),
            json!({"messageId": "not-a-uuid", "author": "user", "text": "x"}),
            json!({"messageId": m(1).to_string(), "author": "robot", "text": "x"}),
            json!({"messageId": m(1).to_string(), "author": "user"}),
        ] {
            let err = ConversationEvent::from_stored("MessageSent", 2, data).unwrap_err();
            assert!(matches!(err, DecodeError::Malformed { .. }), "{err}");
        }
        let err = RunEvent::from_stored(
            "RunProgressed",
            1,
            json!({"attempt": 1, "stage": "x", "percent": 300}),
        )
        .unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }));
    }

    #[test]
    fn unknown_payload_fields_are_ignored() {
        let mut data = user_message(m(1)).to_data();
        data["futureField"] = json!({"x": 1});
        assert_eq!(
            ConversationEvent::from_stored("MessageSent", 2, data),
            Ok(user_message(m(1)))
        );
    }

    /// A small deterministic generator, so the fuzz test needs no crate.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn string(&mut self) -> String {
            const PIECES: &[&str] = &[
                "",
                "a",
                "user",
                "assistant",
                "\0",
                "é",
                "👋",
                "STOP",
                "-1",
                "2025-01-01T00:00:00Z",
                "00000000-0000-0000-0000-000000000001",
                "body",
                "text",
                "null",
            ];
            (0..self.below(3))
                .map(|_| PIECES[usize::try_from(self.below(PIECES.len() as u64)).unwrap()])
                .collect()
        }

        fn value(&mut self, depth: u32) -> Value {
            match self.below(if depth > 3 { 5 } else { 7 }) {
                0 => Value::Null,
                1 => Value::Bool(self.below(2) == 0),
                2 => json!(self.next() as i64),
                3 => json!(f64::from(u32::try_from(self.below(1000)).unwrap()) / 7.0),
                4 => Value::String(self.string()),
                5 => Value::Array((0..self.below(4)).map(|_| self.value(depth + 1)).collect()),
                _ => {
                    const KEYS: &[&str] = &[
                        "messageId",
                        "author",
                        "authorId",
                        "text",
                        "body",
                        "replyTo",
                        "runId",
                        "conversationId",
                        "owner",
                        "title",
                        "systemPrompt",
                        "model",
                        "redacted",
                        "promptMessageId",
                        "outcome",
                        "attempt",
                        "keyLabel",
                        "stage",
                        "percent",
                        "reason",
                        "notBefore",
                        "replyMessageId",
                        "finishReason",
                        "usage",
                        "promptTokens",
                        "candidatesTokens",
                        "totalTokens",
                        "attempts",
                        "by",
                        "requestedBy",
                        "instructions",
                    ];
                    let mut map = Map::new();
                    for _ in 0..self.below(8) {
                        let key = KEYS[usize::try_from(self.below(KEYS.len() as u64)).unwrap()];
                        map.insert(key.to_owned(), self.value(depth + 1));
                    }
                    Value::Object(map)
                }
            }
        }

        /// A valid payload with one field replaced or removed.
        fn mutate(&mut self, mut data: Value) -> Value {
            if let Value::Object(map) = &mut data {
                let keys: Vec<String> = map.keys().cloned().collect();
                if !keys.is_empty() {
                    let key = &keys[usize::try_from(self.below(keys.len() as u64)).unwrap()];
                    if self.below(3) == 0 {
                        map.remove(key);
                    } else {
                        let v = self.value(2);
                        map.insert(key.clone(), v);
                    }
                }
            }
            data
        }
    }

    #[test]
    fn decoding_random_payloads_never_panics() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let conv_samples = all_sample_conversation_events();
        let run_samples = all_sample_run_events();
        let types: Vec<&str> = ConversationEvent::EVENT_TYPES
            .iter()
            .chain(RunEvent::EVENT_TYPES)
            .copied()
            .chain(["", "Nope", "messageSent"])
            .collect();
        let mut decoded = 0;
        for i in 0..20_000u32 {
            let event_type = types[usize::try_from(rng.below(types.len() as u64)).unwrap()];
            let version = u32::try_from(rng.below(4)).unwrap();
            let data = if i % 2 == 0 {
                rng.value(0)
            } else {
                let sample = if rng.below(2) == 0 {
                    conv_samples[usize::try_from(rng.below(conv_samples.len() as u64)).unwrap()]
                        .to_data()
                } else {
                    run_samples[usize::try_from(rng.below(run_samples.len() as u64)).unwrap()]
                        .to_data()
                };
                rng.mutate(sample)
            };
            let mut redacted = data.clone();
            redact(event_type, &mut redacted);
            decoded += usize::from(
                ConversationEvent::from_stored(event_type, version, data.clone()).is_ok(),
            );
            decoded += usize::from(RunEvent::from_stored(event_type, version, data).is_ok());
            let _ = ConversationEvent::from_stored(event_type, version, redacted.clone());
            let _ = RunEvent::from_stored(event_type, version, redacted);
        }
        // The mutations leave some payloads valid, so both paths are exercised.
        assert!(decoded > 100, "only {decoded} decoded");
    }

    // ---- redaction

    #[test]
    fn redaction_blanks_message_text_and_still_decodes() {
        let mut data = user_message_with(m(1), "my secret").to_data();
        assert!(redact("MessageSent", &mut data));
        assert_eq!(data["text"], "");
        assert_eq!(data["redacted"], true);
        let e = ConversationEvent::from_stored("MessageSent", 2, data.clone()).unwrap();
        let ConversationEvent::MessageSent(sent) = e else {
            panic!("decoded {e:?}");
        };
        assert!(sent.redacted);
        assert_eq!(sent.text, "");
        assert_eq!(sent.message_id, m(1));
        assert!(
            !redact("MessageSent", &mut data),
            "second redaction changes nothing"
        );
    }

    #[test]
    fn redaction_covers_every_user_written_field() {
        let cases = [
            (
                started_with_title("Private title").to_data(),
                "ConversationStarted",
                vec!["title", "systemPrompt"],
            ),
            (
                message_edited(m(1), "secret edit").to_data(),
                "MessageEdited",
                vec!["text"],
            ),
            (
                renamed("Secret name").to_data(),
                "ConversationRenamed",
                vec!["title"],
            ),
            (
                RunEvent::from(crate::run::RunRequested {
                    run_id: r(1),
                    conversation_id: conversation_id(),
                    prompt_message_id: m(1),
                    model: None,
                    instructions: Some("talk like a pirate".to_owned()),
                    requested_by: owner(),
                    redacted: false,
                })
                .to_data(),
                "RunRequested",
                vec!["instructions"],
            ),
        ];
        for (mut data, event_type, fields) in cases {
            assert!(redact(event_type, &mut data), "{event_type}");
            for field in fields {
                assert_eq!(data[field], "", "{event_type}.{field}");
            }
            assert_eq!(data["redacted"], true);
            let ok = ConversationEvent::from_stored(event_type, 1, data.clone()).is_ok()
                || RunEvent::from_stored(event_type, 1, data).is_ok();
            assert!(ok, "{event_type} decodes after redaction");
        }
    }

    #[test]
    fn redaction_handles_version_1_payloads() {
        let mut v1 = json!({"messageId": m(1).to_string(), "body": "old secret"});
        assert!(redact("MessageSent", &mut v1));
        let e = ConversationEvent::from_stored("MessageSent", 1, v1).unwrap();
        assert_eq!(e, {
            let mut sent = user_message_with(m(1), "");
            if let ConversationEvent::MessageSent(s) = &mut sent {
                s.author_id = None;
                s.redacted = true;
            }
            sent
        });
    }

    #[test]
    fn redaction_leaves_other_events_alone() {
        let mut data = message_deleted(m(1)).to_data();
        let before = data.clone();
        assert!(!redact("MessageDeleted", &mut data));
        assert_eq!(data, before);
        let mut not_object = json!("text");
        assert!(!redact("MessageSent", &mut not_object));
        // Absent optional fields stay absent.
        let mut bare =
            json!({"conversationId": conversation_id().to_string(), "owner": owner().to_string()});
        assert!(redact("ConversationStarted", &mut bare));
        assert!(bare.get("title").is_none());
        assert!(ConversationEvent::from_stored("ConversationStarted", 1, bare).is_ok());
    }
}
