//! The context a command runs in, and the metadata its events carry (Message DB's
//! correlation and causation names, the acting user, the schema version, W3C
//! `traceparent`, and the idempotency key with the request's fingerprint).

use colloquy_domain::UserId;
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// Namespace for ids derived from idempotency keys.
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_2b7e_4d0a_4a8e_9b1c_3e5f_7a9d_0c2e);

/// A client's idempotency key and a fingerprint of its request body: the same key
/// with another fingerprint is a different request and is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    pub fingerprint: String,
}

/// The event that caused this command (for commands issued by consumers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Causation {
    pub stream_name: String,
    pub position: i64,
    pub global_position: i64,
}

/// Who acts and how the command is traced.
#[derive(Debug, Clone)]
pub struct Context {
    pub user: UserId,
    pub idempotency: Option<Idempotency>,
    pub causation: Option<Causation>,
    pub correlation_stream_name: Option<String>,
    pub traceparent: Option<String>,
}

impl Context {
    /// A context for `user` with nothing else set.
    pub fn new(user: UserId) -> Self {
        Self {
            user,
            idempotency: None,
            causation: None,
            correlation_stream_name: None,
            traceparent: None,
        }
    }

    #[must_use]
    pub fn with_idempotency(
        mut self,
        key: impl Into<String>,
        fingerprint: impl Into<String>,
    ) -> Self {
        self.idempotency = Some(Idempotency {
            key: key.into(),
            fingerprint: fingerprint.into(),
        });
        self
    }

    #[must_use]
    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }

    #[must_use]
    pub fn caused_by(mut self, causation: Causation) -> Self {
        self.causation = Some(causation);
        self
    }

    /// An id for something this command creates (`purpose` tells them apart, e.g.
    /// "message" or "run"): derived from the user and the idempotency key when there
    /// is one, so a repeat creates the same ids; random otherwise.
    pub fn derive_id(&self, purpose: &str) -> Uuid {
        match &self.idempotency {
            Some(idem) => Uuid::new_v5(
                &IDEMPOTENCY_NAMESPACE,
                format!("{}\u{1f}{}\u{1f}{purpose}", self.user, idem.key).as_bytes(),
            ),
            None => Uuid::new_v4(),
        }
    }

    /// The id of the `index`-th event the command appends.
    pub fn event_id(&self, index: usize) -> Uuid {
        self.derive_id(&format!("event/{index}"))
    }

    /// The ids the command's events would have when it has an idempotency key.
    pub(crate) fn idempotent_event_ids(&self, up_to: usize) -> Option<Vec<Uuid>> {
        self.idempotency
            .as_ref()
            .map(|_| (0..up_to).map(|i| self.event_id(i)).collect())
    }

    /// Metadata for an event of schema version `schema_version`.
    pub fn metadata(&self, schema_version: u32) -> Value {
        let mut m = Map::new();
        m.insert("schemaVersion".into(), json!(schema_version));
        m.insert("userId".into(), json!(self.user.to_string()));
        if let Some(c) = &self.correlation_stream_name {
            m.insert("correlationStreamName".into(), json!(c));
        }
        if let Some(c) = &self.causation {
            m.insert("causationMessageStreamName".into(), json!(c.stream_name));
            m.insert("causationMessagePosition".into(), json!(c.position));
            m.insert(
                "causationMessageGlobalPosition".into(),
                json!(c.global_position),
            );
        }
        if let Some(t) = &self.traceparent {
            m.insert("traceparent".into(), json!(t));
        }
        if let Some(i) = &self.idempotency {
            m.insert("idempotencyKey".into(), json!(i.key));
            m.insert("requestFingerprint".into(), json!(i.fingerprint));
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_repeat_for_the_same_user_and_key_only() {
        let user = UserId::from_uuid(Uuid::from_u128(1));
        let other = UserId::from_uuid(Uuid::from_u128(2));
        let a = Context::new(user).with_idempotency("k1", "f");
        let b = Context::new(user).with_idempotency("k1", "g");
        assert_eq!(a.derive_id("message"), b.derive_id("message"));
        assert_ne!(a.derive_id("message"), a.derive_id("run"));
        assert_ne!(a.event_id(0), a.event_id(1));
        assert_ne!(
            a.derive_id("message"),
            Context::new(other)
                .with_idempotency("k1", "f")
                .derive_id("message")
        );
        assert_ne!(
            Context::new(user).derive_id("message"),
            Context::new(user).derive_id("message"),
            "without a key, ids are random"
        );
    }

    #[test]
    fn metadata_carries_message_db_names() {
        let ctx = Context::new(UserId::from_uuid(Uuid::from_u128(7)))
            .with_traceparent(Some("00-abc-def-01".into()))
            .caused_by(Causation {
                stream_name: "agentRun-1".into(),
                position: 3,
                global_position: 99,
            });
        let m = ctx.metadata(2);
        assert_eq!(m["schemaVersion"], 2);
        assert_eq!(m["causationMessageGlobalPosition"], 99);
        assert_eq!(m["causationMessageStreamName"], "agentRun-1");
        assert_eq!(m["traceparent"], "00-abc-def-01");
        assert!(m.get("idempotencyKey").is_none());
    }
}
