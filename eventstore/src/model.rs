//! The store's vocabulary: events to write, events read, expectations, errors, and
//! the validation every backend applies before it touches storage.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

/// A global position in the log. Positions are assigned in commit order and start at 1;
/// `0` means "before the first event".
pub type GlobalPosition = i64;

/// What an append expects of a stream's version (the position of its last event;
/// Message DB numbers stream positions from 0, so a stream with one event has version 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must not exist (version -1).
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream's version must be exactly this (-1 means no stream).
    Exact(i64),
}

/// One event to append. The id makes the append idempotent: an event id is stored once.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub id: Uuid,
    pub event_type: String,
    /// A JSON object.
    pub data: Value,
    /// A JSON object, or none.
    pub metadata: Option<Value>,
}

impl NewEvent {
    pub fn new(id: Uuid, event_type: impl Into<String>, data: Value) -> Self {
        Self {
            id,
            event_type: event_type.into(),
            data,
            metadata: None,
        }
    }

    #[must_use]
    pub fn with_metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }
}

/// The events for one stream within an append, with that stream's expectation.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamAppend {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

impl StreamAppend {
    pub fn new(
        stream: impl Into<String>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Self {
        Self {
            stream: stream.into(),
            expected,
            events,
        }
    }
}

/// Where one stream of an append ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamWritten {
    pub stream: String,
    /// The stream's version after the append (the position of its last event).
    pub version: i64,
}

/// The result of an append: per stream, its new version, and the global position of
/// the append's last event (what command responses hand back to clients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    pub streams: Vec<StreamWritten>,
    /// Global positions of the appended events, in the order they were given.
    pub positions: Vec<GlobalPosition>,
    /// The global position of the last event.
    pub last_position: GlobalPosition,
    /// True when every event was already stored with the same content: nothing was
    /// written, and the original positions are returned.
    pub replayed: bool,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub global_position: GlobalPosition,
    /// Position within its stream (0-based).
    pub position: i64,
    pub time: DateTime<Utc>,
    pub stream_name: String,
    pub event_type: String,
    pub data: Value,
    pub metadata: Option<Value>,
    pub id: Uuid,
}

impl RecordedEvent {
    /// The stream's category (the part before the first `-`), as Message DB defines it.
    pub fn category(&self) -> &str {
        category(&self.stream_name)
    }

    /// The payload's schema version from metadata `schemaVersion`; events written
    /// without one (e.g. by a Message DB client) are version 1.
    pub fn schema_version(&self) -> u32 {
        self.metadata
            .as_ref()
            .and_then(|m| m.get("schemaVersion"))
            .and_then(serde_json::Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(1)
    }
}

/// Message DB's category of a stream name: the part before the first `-`.
pub fn category(stream_name: &str) -> &str {
    stream_name.split('-').next().unwrap_or(stream_name)
}

/// Which part of the log a read or subscription covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogFilter {
    /// Every event (`$all`).
    All,
    /// Every event of one category.
    Category(String),
    /// One member's share of a category, as Message DB's consumer groups split it:
    /// the streams whose cardinal id hashes to `member` (`abs(hash_64(cardinal_id))
    /// mod size`), so `size` consumers together see each stream exactly once, each
    /// stream always on the same member.
    CategoryMember {
        category: String,
        member: u32,
        size: u32,
    },
}

/// Errors of the event store. Validation errors write nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A stream's version was not what the append expected.
    #[error("wrong expected version for stream {stream}: expected {expected:?}, actual {actual}")]
    WrongExpectedVersion {
        stream: String,
        expected: ExpectedVersion,
        /// -1 when the stream does not exist.
        actual: i64,
    },
    /// An event id is already stored with other content, or an append mixes stored and
    /// new ids.
    #[error("event id {id} is already stored with different content")]
    DuplicateEventId { id: Uuid },
    /// The input was rejected before anything was written.
    #[error("invalid append: {0}")]
    Invalid(#[from] InvalidInput),
    /// The storage backend failed; the append may or may not have been committed when
    /// the failure hit the commit itself (retry it: appends are idempotent by id).
    #[error("storage failure")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store is shutting down.
    #[error("the event store is closed")]
    Closed,
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

impl StoreError {
    /// Whether this is the database being unreachable, shutting down or out of
    /// connections ([`database_unavailable`]) or the store closing: a client may retry
    /// shortly, as opposed to a fault of the request or of the code.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Closed => true,
            Self::Backend(source) => source
                .downcast_ref::<sqlx::Error>()
                .is_some_and(database_unavailable),
            _ => false,
        }
    }
}

/// Whether a database error means the database cannot be reached or is not taking work
/// now (a connection refused, reset or timed out, no connection free within the pool's
/// acquire timeout, the server shutting down or starting, too many connections), rather
/// than a fault of the query.
pub fn database_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => true,
        // Class 08: connection exceptions; 57P01-03: admin or crash shutdown, cannot
        // connect now; 53300: too many connections.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// Whether `error` or any of its causes is the store or its database being unavailable
/// ([`StoreError::is_unavailable`], [`database_unavailable`]).
pub fn unavailable_cause(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error
            .downcast_ref::<sqlx::Error>()
            .is_some_and(database_unavailable)
            || error
                .downcast_ref::<StoreError>()
                .is_some_and(StoreError::is_unavailable)
        {
            return true;
        }
        next = error.source();
    }
    false
}

/// Why an append was rejected before writing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("an append needs at least one event")]
    Empty,
    #[error("stream name is empty")]
    EmptyStreamName,
    #[error("stream name {0:?} contains whitespace or control characters")]
    StreamNameCharacters(String),
    #[error("stream name is {0} bytes; the limit is 255")]
    StreamNameTooLong(usize),
    #[error("stream {0:?} appears twice in one append")]
    RepeatedStream(String),
    #[error("event type {0:?} must match [A-Za-z][A-Za-z0-9_]*")]
    EventType(String),
    #[error("event data must be a JSON object")]
    DataNotObject,
    #[error("event metadata must be a JSON object")]
    MetadataNotObject,
    #[error("event {what} is {size} bytes; the limit is {limit}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("event {0} contains a NUL character, which cannot be stored")]
    Nul(&'static str),
    #[error("expected version {0} is below -1")]
    ExpectedVersion(i64),
    #[error("event id {0} appears twice in one append")]
    RepeatedId(Uuid),
}

/// Limits applied to every append.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest serialised data or metadata, in bytes (default 1 MiB).
    pub max_payload_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
        }
    }
}

/// Checks an append before any storage is touched.
pub fn validate(appends: &[StreamAppend], limits: Limits) -> Result<(), InvalidInput> {
    if appends.is_empty() || appends.iter().all(|a| a.events.is_empty()) {
        return Err(InvalidInput::Empty);
    }
    let mut streams = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    for append in appends {
        validate_stream_name(&append.stream)?;
        if !streams.insert(append.stream.as_str()) {
            return Err(InvalidInput::RepeatedStream(append.stream.clone()));
        }
        if let ExpectedVersion::Exact(v) = append.expected
            && v < -1
        {
            return Err(InvalidInput::ExpectedVersion(v));
        }
        for event in &append.events {
            if !ids.insert(event.id) {
                return Err(InvalidInput::RepeatedId(event.id));
            }
            validate_event_type(&event.event_type)?;
            if !event.data.is_object() {
                return Err(InvalidInput::DataNotObject);
            }
            check_payload("data", &event.data, limits)?;
            if let Some(metadata) = &event.metadata {
                if !metadata.is_object() {
                    return Err(InvalidInput::MetadataNotObject);
                }
                check_payload("metadata", metadata, limits)?;
            }
        }
    }
    Ok(())
}

fn validate_stream_name(name: &str) -> Result<(), InvalidInput> {
    if name.is_empty() {
        return Err(InvalidInput::EmptyStreamName);
    }
    if name.len() > 255 {
        return Err(InvalidInput::StreamNameTooLong(name.len()));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(InvalidInput::StreamNameCharacters(name.to_owned()));
    }
    Ok(())
}

fn validate_event_type(event_type: &str) -> Result<(), InvalidInput> {
    let mut chars = event_type.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(InvalidInput::EventType(event_type.to_owned()))
    }
}

fn check_payload(what: &'static str, value: &Value, limits: Limits) -> Result<(), InvalidInput> {
    // Serialising once gives both the size and a cheap scan for NUL, which Postgres'
    // jsonb rejects (as `\u0000`), so it is refused here with a clear error instead.
    let text = serde_json::to_string(value).expect("BUG: a serde_json::Value always serialises");
    if text.len() > limits.max_payload_bytes {
        return Err(InvalidInput::TooLarge {
            what,
            size: text.len(),
            limit: limits.max_payload_bytes,
        });
    }
    if text.contains("\\u0000") {
        return Err(InvalidInput::Nul(what));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(stream: &str, event_type: &str, data: Value) -> Vec<StreamAppend> {
        vec![StreamAppend::new(
            stream,
            ExpectedVersion::Any,
            vec![NewEvent::new(Uuid::new_v4(), event_type, data)],
        )]
    }

    /// A server error with a SQLSTATE, as Postgres sends them.
    #[derive(Debug)]
    struct ServerError(&'static str);

    impl std::fmt::Display for ServerError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "server error {}", self.0)
        }
    }

    impl std::error::Error for ServerError {}

    impl sqlx::error::DatabaseError for ServerError {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[test]
    fn unreachable_or_refusing_databases_are_unavailable() {
        let server = |code| sqlx::Error::Database(Box::new(ServerError(code)));
        for error in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into()),
            sqlx::Error::Io(std::io::ErrorKind::UnexpectedEof.into()),
            server("57P01"),
            server("57P03"),
            server("08006"),
            server("53300"),
        ] {
            assert!(database_unavailable(&error), "{error:?}");
        }
        for error in [
            sqlx::Error::RowNotFound,
            server("23505"),
            server("42P01"),
            server("57014"),
        ] {
            assert!(!database_unavailable(&error), "{error:?}");
        }
        assert!(StoreError::Closed.is_unavailable());
        assert!(StoreError::from(sqlx::Error::PoolTimedOut).is_unavailable());
        assert!(!StoreError::DuplicateEventId { id: Uuid::nil() }.is_unavailable());
        // Found among the causes, however deep.
        #[derive(Debug, thiserror::Error)]
        #[error("reading a checkpoint")]
        struct Context(#[source] StoreError);
        assert!(unavailable_cause(&Context(StoreError::from(
            sqlx::Error::PoolTimedOut
        ))));
        assert!(!unavailable_cause(&Context(StoreError::from(
            sqlx::Error::RowNotFound
        ))));
    }

    #[test]
    fn bad_input_is_named() {
        let l = Limits::default();
        assert_eq!(validate(&[], l), Err(InvalidInput::Empty));
        assert_eq!(
            validate(&one("", "A", json!({})), l),
            Err(InvalidInput::EmptyStreamName)
        );
        assert!(matches!(
            validate(&one("a b", "A", json!({})), l),
            Err(InvalidInput::StreamNameCharacters(_))
        ));
        assert!(matches!(
            validate(&one("a\u{7}", "A", json!({})), l),
            Err(InvalidInput::StreamNameCharacters(_))
        ));
        assert_eq!(
            validate(&one(&"x".repeat(256), "A", json!({})), l),
            Err(InvalidInput::StreamNameTooLong(256))
        );
        assert!(validate(&one(&"x".repeat(255), "A", json!({})), l).is_ok());
        for bad in ["", "1A", "A-B", "A B", "Ä"] {
            assert!(matches!(
                validate(&one("s-1", bad, json!({})), l),
                Err(InvalidInput::EventType(_))
            ));
        }
        assert!(validate(&one("s-1", "Message_Sent2", json!({})), l).is_ok());
        assert_eq!(
            validate(&one("s-1", "A", json!([1])), l),
            Err(InvalidInput::DataNotObject)
        );
        assert_eq!(
            validate(&one("s-1", "A", json!({"t": "a\u{0}b"})), l),
            Err(InvalidInput::Nul("data"))
        );
        let small = Limits {
            max_payload_bytes: 10,
        };
        assert!(matches!(
            validate(&one("s-1", "A", json!({"t": "0123456789"})), small),
            Err(InvalidInput::TooLarge { what: "data", .. })
        ));
        let mut a = one("s-1", "A", json!({}));
        a[0].expected = ExpectedVersion::Exact(-2);
        assert_eq!(validate(&a, l), Err(InvalidInput::ExpectedVersion(-2)));
    }

    #[test]
    fn category_is_the_part_before_the_first_dash() {
        assert_eq!(category("conversation-123-4"), "conversation");
        assert_eq!(category("plain"), "plain");
        assert_eq!(category("account:command-1"), "account:command");
    }
}
