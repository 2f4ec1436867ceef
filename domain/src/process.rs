//! Decisions that touch both a conversation and a run.
//!
//! Each function here decides both halves of one change; the caller appends
//! them in **one atomic multi-stream append** (expected versions on both
//! streams), so no reader ever sees one half:
//!
//! | command | conversation events | run events |
//! |---|---|---|
//! | [`RequestRun`] | `RunOpened` | `RunRequested` |
//! | [`SendAndRequestRun`] | `MessageSent`, `RunOpened` | `RunRequested` |
//! | [`CompleteRun`] | `MessageSent` (assistant), `RunClosed{succeeded}` | `RunCompleted` |
//! | [`FailRun`] | `RunClosed{failed}` | `RunFailed` |
//! | [`CancelRun`] | `RunClosed{cancelled}` | `RunCancelled` |
//! | [`ReviveRun`] | `RunOpened` | `RunRetryScheduled` |
//!
//! Every function takes `(conversation, run, command)`, each state an
//! `Option` (`None` = empty stream), so the command layer passes what it
//! loaded and the rules live here.
//!
//! # Decisions
//!
//! * **Archiving does not orphan a run.** A run opened before the
//!   conversation was archived may still complete, fail or be cancelled, and
//!   its reply is recorded in the archived conversation: the user asked before
//!   archiving, the model's tokens are already spent, and the history stays
//!   truthful. Archiving only stops *new* requests.
//! * **A repeated completion is a no-op.** Completing again with the same
//!   attempt and reply message id (an agent redelivery after a crash) returns
//!   an empty [`Decision`]: exactly one reply is ever recorded.
//! * **The reply** is an [`AssistantText`] (up to 200,000 characters), not a
//!   [`crate::text::MessageText`].
//! * **A dead letter comes back through its conversation.** Reviving a run
//!   (see [`crate::run`]) opens it again in its conversation, so the rule
//!   "one active run per conversation" holds: it is refused while another
//!   run is open. It is also refused once the conversation is archived:
//!   archiving stops new work, and an answer nobody waits for is not worth
//!   the tokens.

use chrono::{DateTime, Utc};

use crate::aggregate::Aggregate;
use crate::conversation::{
    Author, Conversation, ConversationCommand, ConversationEvent, MessageSent, RunClosed,
    RunOpened, RunOutcome,
};
use crate::error::DomainError;
use crate::ids::{MessageId, RunId, UserId};
use crate::run::{AgentRun, RunCommand, RunEvent, RunRequested, Usage};
use crate::text::{AssistantText, Instructions, MessageText, ModelName};

/// Both halves of a cross-aggregate decision, to be appended atomically:
/// `conversation` to `conversation-<id>`, `run` to `agentRun-<id>`. Both empty
/// means "accepted, nothing to record".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// Events for the conversation stream.
    pub conversation: Vec<ConversationEvent>,
    /// Events for the run stream.
    pub run: Vec<RunEvent>,
}

impl Decision {
    /// Whether there is nothing to append.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.conversation.is_empty() && self.run.is_empty()
    }
}

/// Ask the agent to answer the conversation's latest user message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRun {
    /// The new run's id (minted by the caller).
    pub run_id: RunId,
    /// The acting user (must own the conversation).
    pub by: UserId,
    /// A model for this run; defaults to the conversation's model.
    pub model: Option<ModelName>,
    /// Extra instructions appended to the system prompt.
    pub instructions: Option<Instructions>,
}

/// Send a message and ask the agent to answer it, in one append
/// (`POST …/messages` with `run_agent: true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendAndRequestRun {
    /// The new message's id.
    pub message_id: MessageId,
    /// The acting user (must own the conversation).
    pub by: UserId,
    /// What they wrote.
    pub text: MessageText,
    /// The new run's id.
    pub run_id: RunId,
    /// A model for this run; defaults to the conversation's model.
    pub model: Option<ModelName>,
    /// Extra instructions appended to the system prompt.
    pub instructions: Option<Instructions>,
}

/// The agent's answer for the run's current attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteRun {
    /// Must be the run's current, running attempt.
    pub attempt: u32,
    /// The id of the assistant message to record (derive it from the run and
    /// attempt so a retried append is idempotent).
    pub reply_message_id: MessageId,
    /// The reply.
    pub text: AssistantText,
    /// The model's finish reason.
    pub finish_reason: String,
    /// Token usage.
    pub usage: Usage,
}

/// Give up on the run for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailRun {
    /// Why (sanitized; see [`crate::run::sanitize_reason`]).
    pub reason: String,
}

/// The requester cancels the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRun {
    /// The acting user (must be the requester).
    pub by: UserId,
}

/// An operator brings a dead letter back for another attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviveRun {
    /// Earliest time for the next attempt (usually now).
    pub not_before: DateTime<Utc>,
}

/// Any cross-aggregate command, for callers that dispatch on one type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessCommand {
    /// See [`RequestRun`].
    RequestRun(RequestRun),
    /// See [`SendAndRequestRun`].
    SendAndRequestRun(SendAndRequestRun),
    /// See [`CompleteRun`].
    CompleteRun(CompleteRun),
    /// See [`FailRun`].
    FailRun(FailRun),
    /// See [`CancelRun`].
    CancelRun(CancelRun),
    /// See [`ReviveRun`].
    ReviveRun(ReviveRun),
}

macro_rules! into_process_command {
    ($($t:ident),+) => {$(
        impl From<$t> for ProcessCommand {
            fn from(command: $t) -> Self {
                Self::$t(command)
            }
        }
    )+};
}
into_process_command!(
    RequestRun,
    SendAndRequestRun,
    CompleteRun,
    FailRun,
    CancelRun,
    ReviveRun
);

/// Dispatches to the function for the command.
///
/// # Errors
/// As the function for the command.
pub fn decide(
    conversation: Option<&Conversation>,
    run: Option<&AgentRun>,
    command: ProcessCommand,
) -> Result<Decision, DomainError> {
    match command {
        ProcessCommand::RequestRun(c) => request_run(conversation, run, c),
        ProcessCommand::SendAndRequestRun(c) => send_and_request_run(conversation, run, c),
        ProcessCommand::CompleteRun(c) => complete_run(conversation, run, c),
        ProcessCommand::FailRun(c) => fail_run(conversation, run, c),
        ProcessCommand::CancelRun(c) => cancel_run(conversation, run, c),
        ProcessCommand::ReviveRun(c) => revive_run(conversation, run, c),
    }
}

fn open_run(
    conv: &Conversation,
    run: Option<&AgentRun>,
    run_id: RunId,
    prompt_message_id: MessageId,
    by: UserId,
    model: Option<ModelName>,
    instructions: Option<Instructions>,
) -> Result<Decision, DomainError> {
    if let Some(active) = conv.open_run() {
        return Err(DomainError::RunAlreadyActive { run_id: active });
    }
    if run.is_some() {
        return Err(DomainError::AlreadyExists);
    }
    Ok(Decision {
        conversation: vec![
            RunOpened {
                run_id,
                prompt_message_id,
            }
            .into(),
        ],
        run: vec![
            RunRequested {
                run_id,
                conversation_id: conv.id(),
                prompt_message_id,
                model: model
                    .or_else(|| conv.model().cloned())
                    .map(ModelName::into_string),
                instructions: instructions.map(Instructions::into_string),
                requested_by: by,
                redacted: false,
            }
            .into(),
        ],
    })
}

/// Opens a run answering the latest not-deleted user message.
///
/// `run` is the state of the new run's stream and must be `None`.
///
/// # Errors
/// [`DomainError::NotFound`] (no conversation), [`DomainError::NotOwner`],
/// [`DomainError::Archived`], [`DomainError::NothingToAnswer`],
/// [`DomainError::RunAlreadyActive`], [`DomainError::AlreadyExists`] (the run
/// id is taken).
pub fn request_run(
    conversation: Option<&Conversation>,
    run: Option<&AgentRun>,
    command: RequestRun,
) -> Result<Decision, DomainError> {
    let conv = conversation.ok_or(DomainError::NotFound)?;
    conv.ensure_open_for(command.by)?;
    let prompt = conv
        .latest_user_message()
        .ok_or(DomainError::NothingToAnswer)?;
    open_run(
        conv,
        run,
        command.run_id,
        prompt,
        command.by,
        command.model,
        command.instructions,
    )
}

/// Sends a user message and opens a run answering it.
///
/// # Errors
/// As [`ConversationCommand::SendMessage`] and [`request_run`].
pub fn send_and_request_run(
    conversation: Option<&Conversation>,
    run: Option<&AgentRun>,
    command: SendAndRequestRun,
) -> Result<Decision, DomainError> {
    let SendAndRequestRun {
        message_id,
        by,
        text,
        run_id,
        model,
        instructions,
    } = command;
    let sent = Conversation::decide(
        conversation,
        ConversationCommand::SendMessage {
            message_id,
            by,
            text,
        },
    )?;
    let conv = conversation.ok_or(DomainError::NotFound)?;
    let mut decision = open_run(conv, run, run_id, message_id, by, model, instructions)?;
    decision.conversation.splice(0..0, sent);
    Ok(decision)
}

/// The two aggregates must agree that this run is open in this conversation.
fn ensure_linked(
    conv: &Conversation,
    run: &AgentRun,
    command: &'static str,
) -> Result<(), DomainError> {
    if conv.id() == run.conversation_id() && conv.open_run() == Some(run.id()) {
        Ok(())
    } else {
        Err(DomainError::InvalidTransition {
            status: run.status(),
            command,
        })
    }
}

fn closed(run: &AgentRun, outcome: RunOutcome) -> ConversationEvent {
    RunClosed {
        run_id: run.id(),
        outcome,
    }
    .into()
}

/// Records the agent's reply and closes the run. Accepted even if the
/// conversation was archived after the run was opened.
///
/// # Errors
/// [`DomainError::NotFound`] (no run or conversation),
/// [`DomainError::StaleAttempt`], [`DomainError::RunTerminal`],
/// [`DomainError::MessageAlreadyExists`] (the reply id is taken),
/// [`DomainError::InvalidTransition`] (the conversation does not have this
/// run open).
pub fn complete_run(
    conversation: Option<&Conversation>,
    run: Option<&AgentRun>,
    command: CompleteRun,
) -> Result<Decision, DomainError> {
    let CompleteRun {
        attempt,
        reply_message_id,
        text,
        finish_reason,
        usage,
    } = command;
    let run_state = run.ok_or(DomainError::NotFound)?;
    let run_events = AgentRun::decide(
        run,
        RunCommand::Complete {
            attempt,
            reply_message_id,
            finish_reason,
            usage,
        },
    )?;
    if run_events.is_empty() {
        return Ok(Decision::default());
    }
    let conv = conversation.ok_or(DomainError::NotFound)?;
    ensure_linked(conv, run_state, "Complete")?;
    conv.ensure_new_message_id(reply_message_id)?;
    Ok(Decision {
        conversation: vec![
            MessageSent {
                message_id: reply_message_id,
                author: Author::Assistant,
                author_id: None,
                text: text.into_string(),
                reply_to: Some(run_state.prompt_message_id()),
                run_id: Some(run_state.id()),
                redacted: false,
            }
            .into(),
            closed(run_state, RunOutcome::Succeeded),
        ],
        run: run_events,
    })
}

/// Fails the run and closes it in the conversation.
///
/// # Errors
/// [`DomainError::NotFound`], [`DomainError::RunTerminal`],
/// [`DomainError::InvalidTransition`] (the conversation does not have this
/// run open).
pub fn fail_run(
    conversation: Option<&Conversation>,
    run: Option<&AgentRun>,
    command: FailRun,
) -> Result<Decision, DomainError> {
    let run_state = run.ok_or(DomainError::NotFound)?;
    let run_events = AgentRun::decide(
        run,
        RunCommand::Fail {
            reason: command.reason,
        },
    )?;
    let conv = conversation.ok_or(DomainError::NotFound)?;
    ensure_linked(conv, run_state, "Fail")?;
    Ok(Decision {
        conversation: vec![closed(run_state, RunOutcome::Failed)],
        run: run_events,
    })
}

/// Cancels the run (requester only) and closes it in the conversation.
///
/// # Errors
/// [`DomainError::NotFound`], [`DomainError::NotOwner`] (not the
/// requester), [`DomainError::RunTerminal`],
/// [`DomainError::InvalidTransition`] (the conversation does not have this
/// run open).
pub fn cancel_run(
    conversation: Option<&Conversation>,
    run: Option<&AgentRun>,
    command: CancelRun,
) -> Result<Decision, DomainError> {
    let run_state = run.ok_or(DomainError::NotFound)?;
    let run_events = AgentRun::decide(run, RunCommand::Cancel { by: command.by })?;
    let conv = conversation.ok_or(DomainError::NotFound)?;
    ensure_linked(conv, run_state, "Cancel")?;
    Ok(Decision {
        conversation: vec![closed(run_state, RunOutcome::Cancelled)],
        run: run_events,
    })
}

/// Revives a dead letter: schedules its next attempt and opens it again in
/// its conversation.
///
/// # Errors
/// [`DomainError::NotFound`] (no run or conversation),
/// [`DomainError::NotADeadLetter`], [`DomainError::Archived`],
/// [`DomainError::RunAlreadyActive`] (another run is open in the
/// conversation), [`DomainError::InvalidTransition`] (the run is not of this
/// conversation).
pub fn revive_run(
    conversation: Option<&Conversation>,
    run: Option<&AgentRun>,
    command: ReviveRun,
) -> Result<Decision, DomainError> {
    let run_state = run.ok_or(DomainError::NotFound)?;
    let run_events = AgentRun::decide(
        run,
        RunCommand::Revive {
            not_before: command.not_before,
        },
    )?;
    let conv = conversation.ok_or(DomainError::NotFound)?;
    if conv.id() != run_state.conversation_id() {
        return Err(DomainError::InvalidTransition {
            status: run_state.status(),
            command: "Revive",
        });
    }
    if conv.is_archived() {
        return Err(DomainError::Archived);
    }
    if let Some(active) = conv.open_run() {
        return Err(DomainError::RunAlreadyActive { run_id: active });
    }
    Ok(Decision {
        conversation: vec![
            RunOpened {
                run_id: run_state.id(),
                prompt_message_id: run_state.prompt_message_id(),
            }
            .into(),
        ],
        run: run_events,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::run::{DEAD_LETTER_PREFIX, REVIVED_REASON, RunCompleted, RunStatus};
    use crate::testing::fixtures::*;
    use crate::testing::given_streams;

    fn request(by: UserId) -> RequestRun {
        RequestRun {
            run_id: r(1),
            by,
            model: None,
            instructions: None,
        }
    }

    fn complete(attempt: u32) -> CompleteRun {
        CompleteRun {
            attempt,
            reply_message_id: m(2),
            text: AssistantText::parse("Here is an answer.".to_owned()).unwrap(),
            finish_reason: "STOP".to_owned(),
            usage: usage(),
        }
    }

    /// A conversation with one user message and run r1 open for it.
    fn conversation_with_open_run() -> Vec<ConversationEvent> {
        vec![started(), user_message(m(1)), run_opened(r(1), m(1))]
    }

    // ---- request

    #[test]
    fn the_owner_can_ask_the_agent_to_answer_the_latest_message() {
        given_streams([started(), user_message(m(1))], [])
            .when(request(owner()))
            .then([run_opened(r(1), m(1))], [run_requested(r(1), m(1))]);
    }

    #[test]
    fn a_run_request_carries_its_own_model_and_instructions() {
        given_streams([started(), user_message(m(1))], [])
            .when(RequestRun {
                run_id: r(1),
                by: owner(),
                model: Some(ModelName::parse("gemini-2.5-pro".to_owned()).unwrap()),
                instructions: Some(Instructions::parse("Answer in French.".to_owned()).unwrap()),
            })
            .then(
                [run_opened(r(1), m(1))],
                [RunRequested {
                    run_id: r(1),
                    conversation_id: conversation_id(),
                    prompt_message_id: m(1),
                    model: Some("gemini-2.5-pro".to_owned()),
                    instructions: Some("Answer in French.".to_owned()),
                    requested_by: owner(),
                    redacted: false,
                }
                .into()],
            );
    }

    #[test]
    fn a_run_answers_the_latest_message_that_is_not_deleted() {
        given_streams(
            [
                started(),
                user_message(m(1)),
                user_message(m(3)),
                message_deleted(m(3)),
            ],
            [],
        )
        .when(request(owner()))
        .then([run_opened(r(1), m(1))], [run_requested(r(1), m(1))]);
    }

    #[test]
    fn a_run_needs_a_user_message_to_answer() {
        given_streams([started()], [])
            .when(request(owner()))
            .then_error(DomainError::NothingToAnswer);
        given_streams([started(), user_message(m(1)), message_deleted(m(1))], [])
            .when(request(owner()))
            .then_error(DomainError::NothingToAnswer);
    }

    #[test]
    fn only_one_run_is_active_per_conversation() {
        given_streams(conversation_with_open_run(), [])
            .when(RequestRun {
                run_id: r(2),
                ..request(owner())
            })
            .then_error(DomainError::RunAlreadyActive { run_id: r(1) });
    }

    #[test]
    fn a_new_run_can_be_requested_once_the_previous_one_closed() {
        let mut history = conversation_with_open_run();
        history.push(run_closed(r(1), RunOutcome::Failed));
        given_streams(history, [])
            .when(RequestRun {
                run_id: r(2),
                ..request(owner())
            })
            .then([run_opened(r(2), m(1))], [run_requested(r(2), m(1))]);
    }

    #[test]
    fn a_stranger_cannot_run_the_agent_in_someone_elses_conversation() {
        given_streams([started(), user_message(m(1))], [])
            .when(request(stranger()))
            .then_error(DomainError::NotOwner);
    }

    #[test]
    fn the_agent_cannot_be_run_in_an_archived_conversation() {
        given_streams([started(), user_message(m(1)), archived()], [])
            .when(request(owner()))
            .then_error(DomainError::Archived);
    }

    #[test]
    fn a_run_cannot_be_requested_in_a_conversation_that_does_not_exist() {
        given_streams([], [])
            .when(request(owner()))
            .then_error(DomainError::NotFound);
    }

    #[test]
    fn a_run_id_cannot_be_reused() {
        given_streams([started(), user_message(m(1))], [run_requested(r(1), m(1))])
            .when(request(owner()))
            .then_error(DomainError::AlreadyExists);
    }

    #[test]
    fn sending_with_run_agent_sends_and_opens_a_run_together() {
        given_streams([started()], [])
            .when(SendAndRequestRun {
                message_id: m(1),
                by: owner(),
                text: text("hello"),
                run_id: r(1),
                model: None,
                instructions: None,
            })
            .then(
                [user_message(m(1)), run_opened(r(1), m(1))],
                [run_requested(r(1), m(1))],
            );
    }

    #[test]
    fn sending_with_run_agent_while_a_run_is_active_is_rejected_entirely() {
        given_streams(conversation_with_open_run(), [])
            .when(SendAndRequestRun {
                message_id: m(5),
                by: owner(),
                text: text("hello again"),
                run_id: r(2),
                model: None,
                instructions: None,
            })
            .then_error(DomainError::RunAlreadyActive { run_id: r(1) });
    }

    // ---- complete

    #[test]
    fn a_completion_records_the_reply_and_closes_the_run() {
        given_streams(
            conversation_with_open_run(),
            [run_requested(r(1), m(1)), run_started(1)],
        )
        .when(complete(1))
        .then(
            [
                assistant_message(m(2), r(1), m(1)),
                run_closed(r(1), RunOutcome::Succeeded),
            ],
            [run_completed(1, m(2))],
        );
    }

    #[test]
    fn a_run_opened_before_archiving_still_records_its_reply() {
        let mut history = conversation_with_open_run();
        history.push(archived());
        given_streams(history, [run_requested(r(1), m(1)), run_started(1)])
            .when(complete(1))
            .then(
                [
                    assistant_message(m(2), r(1), m(1)),
                    run_closed(r(1), RunOutcome::Succeeded),
                ],
                [run_completed(1, m(2))],
            );
    }

    #[test]
    fn a_repeated_completion_records_nothing_twice() {
        let mut history = conversation_with_open_run();
        history.extend([
            assistant_message(m(2), r(1), m(1)),
            run_closed(r(1), RunOutcome::Succeeded),
        ]);
        given_streams(
            history,
            [
                run_requested(r(1), m(1)),
                run_started(1),
                run_completed(1, m(2)),
            ],
        )
        .when(complete(1))
        .then([], []);
    }

    #[test]
    fn a_completion_from_a_lost_attempt_is_stale() {
        given_streams(
            conversation_with_open_run(),
            [
                run_requested(r(1), m(1)),
                run_started(1),
                run_retry_scheduled(1, at(60)),
                run_started(2),
            ],
        )
        .when(complete(1))
        .then_error(DomainError::StaleAttempt {
            current: 2,
            given: 1,
        });
    }

    #[test]
    fn a_completion_of_a_cancelled_run_is_rejected() {
        let mut history = conversation_with_open_run();
        history.push(run_closed(r(1), RunOutcome::Cancelled));
        given_streams(
            history,
            [
                run_requested(r(1), m(1)),
                run_started(1),
                run_cancelled(owner()),
            ],
        )
        .when(complete(1))
        .then_error(DomainError::RunTerminal {
            status: RunStatus::Cancelled,
        });
    }

    #[test]
    fn a_reply_cannot_reuse_a_message_id() {
        let mut history = conversation_with_open_run();
        history.push(user_message(m(2)));
        given_streams(history, [run_requested(r(1), m(1)), run_started(1)])
            .when(complete(1))
            .then_error(DomainError::MessageAlreadyExists { message_id: m(2) });
    }

    #[test]
    fn a_run_the_conversation_does_not_know_cannot_complete() {
        given_streams(
            [started(), user_message(m(1))],
            [run_requested(r(1), m(1)), run_started(1)],
        )
        .when(complete(1))
        .then_error(DomainError::InvalidTransition {
            status: RunStatus::Running,
            command: "Complete",
        });
    }

    #[test]
    fn completing_a_run_that_does_not_exist_is_not_found() {
        given_streams(conversation_with_open_run(), [])
            .when(complete(1))
            .then_error(DomainError::NotFound);
    }

    #[test]
    fn a_long_reply_is_recorded_whole() {
        let long = "word ".repeat(30_000); // 150,000 characters
        let result = given_streams(
            conversation_with_open_run(),
            [run_requested(r(1), m(1)), run_started(1)],
        )
        .when(CompleteRun {
            text: AssistantText::parse(long.clone()).unwrap(),
            ..complete(1)
        })
        .result()
        .unwrap();
        let ConversationEvent::MessageSent(sent) = &result.conversation[0] else {
            panic!("expected MessageSent, got {:?}", result.conversation[0]);
        };
        assert_eq!(sent.text, long);
        assert!(matches!(
            result.run[0],
            RunEvent::RunCompleted(RunCompleted { attempt: 1, .. })
        ));
    }

    // ---- fail and cancel

    #[test]
    fn a_failure_closes_the_run_in_the_conversation() {
        given_streams(
            conversation_with_open_run(),
            [run_requested(r(1), m(1)), run_started(1)],
        )
        .when(FailRun {
            reason: "model unavailable".to_owned(),
        })
        .then(
            [run_closed(r(1), RunOutcome::Failed)],
            [run_failed("model unavailable", 1)],
        );
    }

    #[test]
    fn a_failed_run_cannot_fail_again() {
        let mut history = conversation_with_open_run();
        history.push(run_closed(r(1), RunOutcome::Failed));
        given_streams(history, [run_requested(r(1), m(1)), run_failed("x", 0)])
            .when(FailRun {
                reason: "again".to_owned(),
            })
            .then_error(DomainError::RunTerminal {
                status: RunStatus::Failed,
            });
    }

    #[test]
    fn the_requester_can_cancel_a_run_and_it_closes_in_the_conversation() {
        given_streams(conversation_with_open_run(), [run_requested(r(1), m(1))])
            .when(CancelRun { by: owner() })
            .then(
                [run_closed(r(1), RunOutcome::Cancelled)],
                [run_cancelled(owner())],
            );
    }

    #[test]
    fn a_run_can_be_cancelled_after_its_conversation_was_archived() {
        let mut history = conversation_with_open_run();
        history.push(archived());
        given_streams(history, [run_requested(r(1), m(1)), run_started(1)])
            .when(CancelRun { by: owner() })
            .then(
                [run_closed(r(1), RunOutcome::Cancelled)],
                [run_cancelled(owner())],
            );
    }

    #[test]
    fn a_stranger_cannot_cancel_someone_elses_run() {
        given_streams(conversation_with_open_run(), [run_requested(r(1), m(1))])
            .when(CancelRun { by: stranger() })
            .then_error(DomainError::NotOwner);
    }

    #[test]
    fn a_finished_run_cannot_be_cancelled() {
        let mut history = conversation_with_open_run();
        history.extend([
            assistant_message(m(2), r(1), m(1)),
            run_closed(r(1), RunOutcome::Succeeded),
        ]);
        given_streams(
            history,
            [
                run_requested(r(1), m(1)),
                run_started(1),
                run_completed(1, m(2)),
            ],
        )
        .when(CancelRun { by: owner() })
        .then_error(DomainError::RunTerminal {
            status: RunStatus::Succeeded,
        });
    }

    // ---- revive

    fn revive() -> ReviveRun {
        ReviveRun { not_before: at(90) }
    }

    /// Run r1 after its retries ran out (two attempts).
    fn dead_letter_run() -> Vec<RunEvent> {
        vec![
            run_requested(r(1), m(1)),
            run_started(1),
            run_retry_scheduled(1, at(60)),
            run_started(2),
            run_failed(&format!("{DEAD_LETTER_PREFIX} after 2 attempts: 500"), 2),
        ]
    }

    /// The conversation after r1 failed and closed.
    fn conversation_after_failure() -> Vec<ConversationEvent> {
        let mut history = conversation_with_open_run();
        history.push(run_closed(r(1), RunOutcome::Failed));
        history
    }

    #[test]
    fn reviving_a_dead_letter_reopens_it_in_its_conversation() {
        given_streams(conversation_after_failure(), dead_letter_run())
            .when(revive())
            .then(
                [run_opened(r(1), m(1))],
                [run_retry_scheduled_because(2, REVIVED_REASON, at(90))],
            );
    }

    #[test]
    fn a_revived_run_can_complete_and_close_again() {
        let mut conversation = conversation_after_failure();
        conversation.push(run_opened(r(1), m(1)));
        let mut run = dead_letter_run();
        run.extend([
            run_retry_scheduled_because(2, REVIVED_REASON, at(90)),
            run_started(3),
        ]);
        given_streams(conversation, run).when(complete(3)).then(
            [
                assistant_message(m(2), r(1), m(1)),
                run_closed(r(1), RunOutcome::Succeeded),
            ],
            [run_completed(3, m(2))],
        );
    }

    #[test]
    fn a_dead_letter_is_not_revived_while_another_run_is_open() {
        let mut history = conversation_after_failure();
        history.push(run_opened(r(2), m(1)));
        given_streams(history, dead_letter_run())
            .when(revive())
            .then_error(DomainError::RunAlreadyActive { run_id: r(2) });
    }

    #[test]
    fn a_dead_letter_in_an_archived_conversation_stays_failed() {
        let mut history = conversation_after_failure();
        history.push(archived());
        given_streams(history, dead_letter_run())
            .when(revive())
            .then_error(DomainError::Archived);
    }

    #[test]
    fn a_run_that_failed_for_another_reason_is_not_revived() {
        given_streams(
            conversation_after_failure(),
            [
                run_requested(r(1), m(1)),
                run_started(1),
                run_failed("the prompt was blocked", 1),
            ],
        )
        .when(revive())
        .then_error(DomainError::NotADeadLetter {
            status: RunStatus::Failed,
        });
    }

    #[test]
    fn a_live_run_is_not_revived() {
        given_streams(
            conversation_with_open_run(),
            [run_requested(r(1), m(1)), run_started(1)],
        )
        .when(revive())
        .then_error(DomainError::NotADeadLetter {
            status: RunStatus::Running,
        });
    }

    #[test]
    fn reviving_a_run_that_does_not_exist_is_not_found() {
        given_streams(conversation_after_failure(), [])
            .when(revive())
            .then_error(DomainError::NotFound);
    }
}
