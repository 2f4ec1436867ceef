//! The crate's one error type for rejected commands.

use crate::ids::{MessageId, RunId};
use crate::run::RunStatus;
use crate::text::ValidationError;

/// Why a command was rejected. Each variant's doc names the HTTP status the
/// gateway should answer with (see [`DomainError::http_status`]).
///
/// A rejection is an expected outcome, not a fault: nothing was appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// **404.** The conversation or run does not exist (its stream is empty).
    #[error("not found")]
    NotFound,
    /// **409.** The conversation or run already exists (e.g. started twice).
    #[error("already exists")]
    AlreadyExists,
    /// **404** (not 403). The actor does not own the conversation or run. The
    /// API never reveals that another user's resource exists.
    #[error("not found")]
    NotOwner,
    /// **409.** The conversation is archived and accepts nothing more.
    #[error("conversation is archived")]
    Archived,
    /// **404.** No such message in this conversation, or it was deleted.
    #[error("message {message_id} not found")]
    MessageNotFound {
        /// The message asked for.
        message_id: MessageId,
    },
    /// **409.** A message with this id already exists in the conversation.
    #[error("message {message_id} already exists")]
    MessageAlreadyExists {
        /// The id that is taken.
        message_id: MessageId,
    },
    /// **409.** The message is not the actor's own user message (assistant
    /// and system messages, and other users' messages, cannot be changed).
    #[error("message {message_id} cannot be changed")]
    NotEditable {
        /// The message asked for.
        message_id: MessageId,
    },
    /// **409.** Another run of this conversation is still active.
    #[error("run {run_id} is still active in this conversation")]
    RunAlreadyActive {
        /// The active run.
        run_id: RunId,
    },
    /// **409.** There is no (not deleted) user message for the agent to answer.
    #[error("there is no user message to answer")]
    NothingToAnswer,
    /// **409.** The run has finished; nothing moves it out of a terminal state.
    #[error("run has already {status}")]
    RunTerminal {
        /// Its terminal status.
        status: RunStatus,
    },
    /// **409.** The command names an attempt that is not the run's current,
    /// running attempt (e.g. an agent that lost its run to a retry).
    #[error("attempt {given} is stale; current attempt is {current}")]
    StaleAttempt {
        /// The run's current attempt (0 before the first start).
        current: u32,
        /// The attempt named by the command.
        given: u32,
    },
    /// **409.** The command is not allowed in the run's current status, or the
    /// two aggregates disagree about a run.
    #[error("{command} is not allowed while the run is {status}")]
    InvalidTransition {
        /// The run's status.
        status: RunStatus,
        /// The command's name.
        command: &'static str,
    },
    /// **409.** Only a dead letter (a run that failed because its retries ran
    /// out) can be brought back by an operator; this run is not one.
    #[error("the run is not a dead letter (it is {status})")]
    NotADeadLetter {
        /// The run's status.
        status: RunStatus,
    },
    /// **422.** A value broke a validation rule.
    #[error(transparent)]
    Validation(#[from] ValidationError),
}

impl DomainError {
    /// The HTTP status this rejection maps to at the API edge.
    #[must_use]
    pub const fn http_status(&self) -> u16 {
        match self {
            Self::NotFound | Self::NotOwner | Self::MessageNotFound { .. } => 404,
            Self::Validation(_) => 422,
            Self::AlreadyExists
            | Self::Archived
            | Self::MessageAlreadyExists { .. }
            | Self::NotEditable { .. }
            | Self::RunAlreadyActive { .. }
            | Self::NothingToAnswer
            | Self::RunTerminal { .. }
            | Self::StaleAttempt { .. }
            | Self::InvalidTransition { .. }
            | Self::NotADeadLetter { .. } => 409,
        }
    }

    /// A stable, machine-readable code for the problem's `code` field.
    /// [`DomainError::NotOwner`] reports `not_found` so it is indistinguishable
    /// from a missing resource.
    #[must_use]
    pub const fn code(&self) -> &'static str {
        match self {
            Self::NotFound | Self::NotOwner => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::Archived => "archived",
            Self::MessageNotFound { .. } => "message_not_found",
            Self::MessageAlreadyExists { .. } => "message_already_exists",
            Self::NotEditable { .. } => "not_editable",
            Self::RunAlreadyActive { .. } => "run_already_active",
            Self::NothingToAnswer => "nothing_to_answer",
            Self::RunTerminal { .. } => "run_terminal",
            Self::StaleAttempt { .. } => "stale_attempt",
            Self::InvalidTransition { .. } => "invalid_transition",
            Self::NotADeadLetter { .. } => "not_a_dead_letter",
            Self::Validation(_) => "validation_failed",
        }
    }
}
