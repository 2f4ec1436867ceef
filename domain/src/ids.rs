//! Identifiers and stream names.
//!
//! Every id is a newtype over [`uuid::Uuid`] so that a `MessageId` can never be
//! passed where a `RunId` is expected. Ids are created outside this crate (the
//! domain never generates ids) and arrive in commands.
//!
//! Streams follow Message DB naming, `category-id`: a conversation lives in
//! `conversation-<uuid>` ([`CONVERSATION_CATEGORY`]) and an agent run in
//! `agentRun-<uuid>` ([`RUN_CATEGORY`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Message DB category of conversation streams (`conversation-<uuid>`).
pub const CONVERSATION_CATEGORY: &str = "conversation";

/// Message DB category of agent run streams (`agentRun-<uuid>`).
pub const RUN_CATEGORY: &str = "agentRun";

/// An id string that is not a UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid id: {0}")]
pub struct ParseIdError(String);

/// A stream name that does not name a stream of the expected category.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamNameError {
    /// The name has no `-` separating category and id.
    #[error("stream name {name:?} has no `category-id` form")]
    NoCategory {
        /// The stream name as given.
        name: String,
    },
    /// The category differs from the expected one.
    #[error("stream {name:?} is not in category {expected:?}")]
    WrongCategory {
        /// The stream name as given.
        name: String,
        /// The category the caller expected.
        expected: &'static str,
    },
    /// The id part is not a UUID.
    #[error("stream {name:?} does not end in a valid id")]
    BadId {
        /// The stream name as given.
        name: String,
    },
}

/// Splits a Message DB stream name into `(category, id)` at the first `-`.
///
/// Returns `None` when there is no `-` (a bare category name).
///
/// ```
/// assert_eq!(
///     colloquy_domain::ids::split_stream_name("agentRun-1234"),
///     Some(("agentRun", "1234"))
/// );
/// ```
#[must_use]
pub fn split_stream_name(stream_name: &str) -> Option<(&str, &str)> {
    stream_name.split_once('-')
}

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// Wraps an existing UUID (ids are minted by the caller, never here).
            #[must_use]
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The underlying UUID.
            #[must_use]
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| ParseIdError(s.to_owned()))
            }
        }
    };
}

macro_rules! stream_id {
    ($name:ident, $category:expr) => {
        impl $name {
            /// The Message DB category of this id's streams.
            pub const CATEGORY: &'static str = $category;

            /// The stream name, `category-<uuid>` (hyphenated lower-case UUID).
            #[must_use]
            pub fn stream_name(&self) -> String {
                format!("{}-{}", $category, self.0)
            }

            /// Parses a stream name produced by [`Self::stream_name`].
            ///
            /// # Errors
            /// [`StreamNameError`] when the name has another category or the id
            /// part is not a UUID.
            pub fn from_stream_name(stream_name: &str) -> Result<Self, StreamNameError> {
                let Some((category, id)) = split_stream_name(stream_name) else {
                    return Err(StreamNameError::NoCategory {
                        name: stream_name.to_owned(),
                    });
                };
                if category != $category {
                    return Err(StreamNameError::WrongCategory {
                        name: stream_name.to_owned(),
                        expected: $category,
                    });
                }
                id.parse().map_err(|_| StreamNameError::BadId {
                    name: stream_name.to_owned(),
                })
            }
        }
    };
}

uuid_id!(
    /// Identifies a conversation and its stream `conversation-<uuid>`.
    ConversationId
);
uuid_id!(
    /// Identifies an agent run and its stream `agentRun-<uuid>`.
    RunId
);
uuid_id!(
    /// Identifies one message within a conversation (user, assistant or system).
    MessageId
);
uuid_id!(
    /// Identifies a user: the owner of a conversation, the author of a message,
    /// the requester of a run.
    UserId
);

stream_id!(ConversationId, CONVERSATION_CATEGORY);
stream_id!(RunId, RUN_CATEGORY);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const U: &str = "6f1c0c36-6f4e-4c55-9d0a-3f6f3d8c2b11";

    #[test]
    fn a_conversation_stream_name_round_trips() {
        let id: ConversationId = U.parse().unwrap();
        assert_eq!(id.stream_name(), format!("conversation-{U}"));
        assert_eq!(
            ConversationId::from_stream_name(&id.stream_name()).unwrap(),
            id
        );
    }

    #[test]
    fn a_run_stream_name_round_trips() {
        let id: RunId = U.parse().unwrap();
        assert_eq!(id.stream_name(), format!("agentRun-{U}"));
        assert_eq!(RunId::from_stream_name(&id.stream_name()).unwrap(), id);
    }

    #[test]
    fn a_stream_of_another_category_is_not_a_conversation() {
        let err = ConversationId::from_stream_name(&format!("agentRun-{U}")).unwrap_err();
        assert!(matches!(err, StreamNameError::WrongCategory { .. }));
        assert!(matches!(
            RunId::from_stream_name("agentRun"),
            Err(StreamNameError::NoCategory { .. })
        ));
        assert!(matches!(
            RunId::from_stream_name("agentRun-nope"),
            Err(StreamNameError::BadId { .. })
        ));
    }

    #[test]
    fn ids_serialize_as_bare_uuid_strings() {
        let id: MessageId = U.parse().unwrap();
        assert_eq!(serde_json::to_value(id).unwrap(), serde_json::json!(U));
        assert_eq!(id.to_string(), U);
        assert!("x".parse::<UserId>().is_err());
    }
}
