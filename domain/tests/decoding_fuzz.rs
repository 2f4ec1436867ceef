//! Property tests of event decoding and upcasting (`DomainEvent::from_stored`): whatever
//! is stored — any type name, any schema version, any JSON, or a valid payload with one
//! field missing, mistyped, huge or odd Unicode — decoding never panics and either
//! decodes or returns a typed [`DecodeError`] of the right kind; every valid event
//! round-trips through its stored form, and its v1 form (for `MessageSent`) upcasts to
//! the same event; redaction keeps every valid event decodable.

#![allow(clippy::unwrap_used, reason = "test code")]

use chrono::{DateTime, Utc};
use colloquy_domain::conversation::{
    Author, ConversationArchived, ConversationRenamed, ConversationStarted, MessageDeleted,
    MessageEdited, MessageSent, RunClosed, RunOpened, RunOutcome,
};
use colloquy_domain::event::{DecodeError, DomainEvent, redact};
use colloquy_domain::run::{
    RunCancelled, RunCompleted, RunFailed, RunProgressed, RunRequested, RunRetryScheduled,
    RunStarted, Usage,
};
use colloquy_domain::{ConversationEvent, ConversationId, MessageId, RunEvent, RunId, UserId};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use uuid::Uuid;

// ------------------------------------------------------------ generators --

/// Text as users write it: ASCII, any Unicode (combining marks, emoji, RTL, NUL),
/// sometimes long.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9 .,!?-]{0,40}",
        3 => any::<String>(),
        1 => "[\u{0}-\u{1f}\u{7f}\u{202e}\u{200b}\u{fffd}\u{1f600}-\u{1f64f}\u{300}-\u{36f}]{0,20}",
        1 => (0usize..70_000).prop_map(|n| "é".repeat(n)),
    ]
}

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn conversation_id() -> impl Strategy<Value = ConversationId> {
    uuid().prop_map(ConversationId::from_uuid)
}

fn message_id() -> impl Strategy<Value = MessageId> {
    uuid().prop_map(MessageId::from_uuid)
}

fn run_id() -> impl Strategy<Value = RunId> {
    uuid().prop_map(RunId::from_uuid)
}

fn user_id() -> impl Strategy<Value = UserId> {
    uuid().prop_map(UserId::from_uuid)
}

fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    // Years 1970 to about 2500, to the nanosecond.
    (0i64..16_725_225_600, 0u32..1_000_000_000)
        .prop_map(|(secs, nanos)| DateTime::from_timestamp(secs, nanos).unwrap())
}

fn conversation_event() -> impl Strategy<Value = ConversationEvent> {
    prop_oneof![
        (
            conversation_id(),
            user_id(),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
            any::<bool>()
        )
            .prop_map(
                |(conversation_id, owner, title, system_prompt, model, redacted)| {
                    ConversationStarted {
                        conversation_id,
                        owner,
                        title,
                        system_prompt,
                        model,
                        redacted,
                    }
                    .into()
                }
            ),
        (
            message_id(),
            prop_oneof![
                Just(Author::User),
                Just(Author::Assistant),
                Just(Author::System)
            ],
            proptest::option::of(user_id()),
            text(),
            proptest::option::of(message_id()),
            proptest::option::of(run_id()),
            any::<bool>()
        )
            .prop_map(
                |(message_id, author, author_id, text, reply_to, run_id, redacted)| {
                    MessageSent {
                        message_id,
                        author,
                        author_id,
                        text,
                        reply_to,
                        run_id,
                        redacted,
                    }
                    .into()
                }
            ),
        (message_id(), text(), any::<bool>()).prop_map(|(message_id, text, redacted)| {
            MessageEdited {
                message_id,
                text,
                redacted,
            }
            .into()
        }),
        message_id().prop_map(|message_id| MessageDeleted { message_id }.into()),
        (text(), any::<bool>()).prop_map(|(title, redacted)| ConversationRenamed {
            title,
            redacted
        }
        .into()),
        Just(ConversationArchived {}.into()),
        (run_id(), message_id()).prop_map(|(run_id, prompt_message_id)| {
            RunOpened {
                run_id,
                prompt_message_id,
            }
            .into()
        }),
        (
            run_id(),
            prop_oneof![
                Just(RunOutcome::Succeeded),
                Just(RunOutcome::Failed),
                Just(RunOutcome::Cancelled)
            ]
        )
            .prop_map(|(run_id, outcome)| RunClosed { run_id, outcome }.into()),
    ]
}

fn run_event() -> impl Strategy<Value = RunEvent> {
    prop_oneof![
        (
            run_id(),
            conversation_id(),
            message_id(),
            proptest::option::of(text()),
            proptest::option::of(text()),
            user_id(),
            any::<bool>()
        )
            .prop_map(
                |(
                    run_id,
                    conversation_id,
                    prompt_message_id,
                    model,
                    instructions,
                    requested_by,
                    redacted,
                )| {
                    RunRequested {
                        run_id,
                        conversation_id,
                        prompt_message_id,
                        model,
                        instructions,
                        requested_by,
                        redacted,
                    }
                    .into()
                }
            ),
        (any::<u32>(), text())
            .prop_map(|(attempt, key_label)| RunStarted { attempt, key_label }.into()),
        (any::<u32>(), text(), any::<u8>()).prop_map(|(attempt, stage, percent)| {
            RunProgressed {
                attempt,
                stage,
                percent,
            }
            .into()
        }),
        (any::<u32>(), text(), instant()).prop_map(|(attempt, reason, not_before)| {
            RunRetryScheduled {
                attempt,
                reason,
                not_before,
            }
            .into()
        }),
        (
            any::<u32>(),
            message_id(),
            text(),
            any::<(u64, u64, u64)>(),
            proptest::option::of(any::<u64>())
        )
            .prop_map(
                |(attempt, reply_message_id, finish_reason, (p, c, t), thoughts)| {
                    RunCompleted {
                        attempt,
                        reply_message_id,
                        finish_reason,
                        usage: Usage {
                            prompt_tokens: p,
                            candidates_tokens: c,
                            total_tokens: t,
                            thoughts_tokens: thoughts,
                        },
                    }
                    .into()
                }
            ),
        (text(), any::<u32>()).prop_map(|(reason, attempts)| RunFailed { reason, attempts }.into()),
        user_id().prop_map(|by| RunCancelled { by }.into()),
    ]
}

/// Any JSON value, nested up to a few levels, with keys drawn from the payloads'
/// own field names as often as not.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        text().prop_map(Value::String),
        uuid().prop_map(|u| Value::String(u.to_string())),
        Just(json!("2025-01-01T00:00:00Z")),
        Just(json!("user")),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((field_name(), inner), 0..8)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "conversationId",
    "owner",
    "title",
    "systemPrompt",
    "model",
    "redacted",
    "messageId",
    "author",
    "authorId",
    "text",
    "body",
    "replyTo",
    "runId",
    "promptMessageId",
    "outcome",
    "instructions",
    "requestedBy",
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
    "thoughtsTokens",
    "attempts",
    "by",
];

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(FIELDS).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

/// Every type name either stream knows, near misses, and anything at all.
fn event_type() -> impl Strategy<Value = String> {
    let known: Vec<&'static str> = ConversationEvent::EVENT_TYPES
        .iter()
        .chain(RunEvent::EVENT_TYPES)
        .copied()
        .collect();
    prop_oneof![
        4 => proptest::sample::select(known).prop_map(str::to_owned),
        1 => proptest::sample::select(vec!["", "messageSent", "MessageSent ", "MESSAGESENT", "Message\u{0}Sent", "RunCompleted\u{301}"])
            .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn version() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..4, 1 => any::<u32>()]
}

/// A change to one field of a valid payload.
#[derive(Debug, Clone)]
enum Mutation {
    Remove,
    Replace(Value),
    Huge,
    Add(String, Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        Just(Mutation::Remove),
        json_value().prop_map(Mutation::Replace),
        Just(Mutation::Huge),
        (field_name(), json_value()).prop_map(|(k, v)| Mutation::Add(k, v)),
    ]
}

fn mutate(data: &mut Value, which: prop::sample::Index, mutation: Mutation) {
    let Value::Object(object) = data else {
        return;
    };
    if let Mutation::Add(key, value) = mutation {
        object.insert(key, value);
        return;
    }
    if object.is_empty() {
        return;
    }
    let key = object
        .keys()
        .nth(which.index(object.len()))
        .unwrap()
        .clone();
    match mutation {
        Mutation::Remove => {
            object.remove(&key);
        }
        Mutation::Replace(value) => {
            object.insert(key, value);
        }
        Mutation::Huge => {
            let huge = match &object[&key] {
                Value::String(s) => Value::String(s.repeat(2).clone() + &"x".repeat(1 << 20)),
                Value::Number(_) => json!(u64::MAX),
                Value::Bool(_) => json!("true"),
                Value::Object(_) | Value::Array(_) => Value::Array(vec![json!(0); 100_000]),
                Value::Null => json!(1e300),
            };
            object.insert(key, huge);
        }
        Mutation::Add(..) => unreachable!(),
    }
}

// ---------------------------------------------------------------- checks --

/// Decodes with both streams' decoders and checks that every error fits the input.
fn decode_checked(event_type: &str, version: u32, data: &Value) {
    check_decoder::<ConversationEvent>(
        ConversationEvent::current_schema_version(event_type),
        event_type,
        version,
        data,
    );
    check_decoder::<RunEvent>(
        RunEvent::current_schema_version(event_type),
        event_type,
        version,
        data,
    );
}

fn check_decoder<E: DomainEvent + std::fmt::Debug>(
    current: Option<u32>,
    event_type: &str,
    version: u32,
    data: &Value,
) {
    match (E::from_stored(event_type, version, data.clone()), current) {
        (Ok(event), Some(current)) => {
            assert!(
                version >= 1 && version <= current,
                "{event_type} v{version}"
            );
            assert_eq!(event.event_type(), event_type);
            assert!(event.to_data().is_object());
            // What decoded re-encodes at the current version and decodes again the same.
            let again = E::from_stored(event_type, current, event.to_data());
            assert!(
                again.is_ok(),
                "{event:?} re-encoded does not decode: {again:?}"
            );
        }
        (Ok(event), None) => panic!("{event_type:?} is not a type of this stream: {event:?}"),
        (Err(DecodeError::UnknownType { event_type: t }), None) => assert_eq!(t, event_type),
        (
            Err(DecodeError::UnsupportedVersion {
                version: v,
                current: c,
                ..
            }),
            Some(current),
        ) => {
            assert_eq!((v, c), (version, current));
            assert!(version == 0 || version > current);
        }
        (
            Err(DecodeError::Malformed {
                version: v, reason, ..
            }),
            Some(current),
        ) => {
            assert_eq!(v, version);
            assert!(version >= 1 && version <= current);
            assert!(!reason.is_empty());
        }
        (Err(e), current) => panic!("{e:?} for {event_type:?} v{version} (current {current:?})"),
    }
}

/// `MessageSent` as schema v1 stored it: `body` for `text`, no `author`.
fn as_v1(data: &Value) -> Value {
    let mut v1 = data.as_object().unwrap().clone();
    let text = v1.remove("text").unwrap();
    v1.remove("author");
    v1.insert("body".to_owned(), text);
    Value::Object(v1)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        // A failure's inputs are printed; no file is written beside the tests.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn valid_conversation_events_round_trip(event in conversation_event()) {
        let data = event.to_data();
        prop_assert!(data.is_object());
        let back = ConversationEvent::from_stored(event.event_type(), event.schema_version(), data.clone());
        prop_assert_eq!(back.as_ref(), Ok(&event));
        // The other stream does not know the type, and says so.
        let other = RunEvent::from_stored(event.event_type(), event.schema_version(), data.clone());
        prop_assert!(matches!(other, Err(DecodeError::UnknownType { .. })), "{:?}", other);
        // Redacted, it still decodes, with its text fields blank.
        let mut redacted = data;
        redact(event.event_type(), &mut redacted);
        let decoded = ConversationEvent::from_stored(event.event_type(), event.schema_version(), redacted.clone());
        prop_assert!(decoded.is_ok(), "{:?}", decoded);
        // Redacting twice changes nothing more.
        prop_assert!(!redact(event.event_type(), &mut redacted));
    }

    #[test]
    fn valid_run_events_round_trip(event in run_event()) {
        let data = event.to_data();
        let back = RunEvent::from_stored(event.event_type(), event.schema_version(), data.clone());
        prop_assert_eq!(back.as_ref(), Ok(&event));
        let other = ConversationEvent::from_stored(event.event_type(), event.schema_version(), data.clone());
        prop_assert!(matches!(other, Err(DecodeError::UnknownType { .. })), "{:?}", other);
        let mut redacted = data;
        redact(event.event_type(), &mut redacted);
        let decoded = RunEvent::from_stored(event.event_type(), event.schema_version(), redacted);
        prop_assert!(decoded.is_ok(), "{:?}", decoded);
    }

    /// A user's `MessageSent` stored as v1 upcasts to the event written today.
    #[test]
    fn a_v1_message_sent_upcasts_to_the_same_event(event in conversation_event()) {
        let ConversationEvent::MessageSent(sent) = &event else {
            return Ok(());
        };
        let v1 = as_v1(&event.to_data());
        let decoded = ConversationEvent::from_stored("MessageSent", 1, v1.clone());
        let expected = MessageSent { author: Author::User, ..sent.clone() };
        prop_assert_eq!(decoded, Ok(ConversationEvent::from(expected)));
        // A v1 payload that already names an author keeps it.
        let mut with_author = v1;
        with_author.as_object_mut().unwrap().insert("author".to_owned(), json!("assistant"));
        let decoded = ConversationEvent::from_stored("MessageSent", 1, with_author).unwrap();
        let ConversationEvent::MessageSent(decoded) = decoded else { unreachable!() };
        prop_assert_eq!(decoded.author, Author::Assistant);
    }

    #[test]
    fn arbitrary_stored_events_never_panic(
        event_type in event_type(),
        version in version(),
        data in json_value(),
    ) {
        decode_checked(&event_type, version, &data);
        let mut redacted = data;
        redact(&event_type, &mut redacted);
        decode_checked(&event_type, version, &redacted);
    }

    #[test]
    fn near_valid_events_never_panic(
        event in prop_oneof![
            conversation_event().prop_map(|e| (e.event_type(), e.schema_version(), e.to_data())),
            run_event().prop_map(|e| (e.event_type(), e.schema_version(), e.to_data())),
        ],
        mutations in proptest::collection::vec((any::<prop::sample::Index>(), mutation()), 1..3),
        v1 in any::<bool>(),
        version in version(),
    ) {
        let (event_type, current, mut data) = event;
        for (which, mutation) in mutations {
            mutate(&mut data, which, mutation);
        }
        decode_checked(event_type, current, &data);
        decode_checked(event_type, version, &data);
        if v1 && event_type == "MessageSent" && data.get("text").is_some() {
            decode_checked(event_type, 1, &as_v1(&data));
        }
    }
}

/// Payloads nested as deep as a stored document can be (serde_json's parser stops at
/// 128 levels) decode to an error, not a stack overflow.
#[test]
fn deeply_nested_payloads_are_malformed_not_a_crash() {
    let mut deep = json!("bottom");
    for _ in 0..126 {
        deep = json!({ "text": deep });
    }
    for (event_type, version) in [("MessageSent", 2), ("MessageSent", 1), ("RunCompleted", 1)] {
        decode_checked(event_type, version, &deep);
        let mut copy = deep.clone();
        redact(event_type, &mut copy);
        decode_checked(event_type, version, &copy);
    }
    // The same through the parser that reads the log: a document it accepts decodes
    // to an error, one nested deeper is refused by the parser already.
    let text = serde_json::to_string(&deep).unwrap();
    let parsed: Value = serde_json::from_str(&text).unwrap();
    assert!(ConversationEvent::from_stored("MessageSent", 2, parsed).is_err());
    let deeper = format!("{}{}{}", "[".repeat(200), 0, "]".repeat(200));
    assert!(serde_json::from_str::<Value>(&deeper).is_err());
}
