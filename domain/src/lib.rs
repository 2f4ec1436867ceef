#![doc = include_str!("../README.md")]

pub mod aggregate;
pub mod conversation;
pub mod error;
pub mod event;
pub mod ids;
pub mod process;
pub mod run;
pub mod text;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use aggregate::{Aggregate, AggregateEvent};
pub use conversation::{Conversation, ConversationCommand, ConversationEvent};
pub use error::DomainError;
pub use event::{DecodeError, DomainEvent, redact};
pub use ids::{CONVERSATION_CATEGORY, ConversationId, MessageId, RUN_CATEGORY, RunId, UserId};
pub use process::Decision;
pub use run::{AgentRun, Milestone, RunCommand, RunEvent, RunStatus};
pub use text::{
    AssistantText, Instructions, MessageText, ModelName, SystemPrompt, Title, ValidationError,
};
