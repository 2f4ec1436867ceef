//! Given / when / then harness for aggregate and cross-aggregate tests, and
//! fixtures with fixed ids.
//!
//! Available inside this crate's tests and, with the `testing` feature, to
//! other crates' tests:
//!
//! ```toml
//! [dev-dependencies]
//! colloquy-domain = { workspace = true, features = ["testing"] }
//! ```
//!
//! ```
//! use colloquy_domain::conversation::ConversationCommand;
//! use colloquy_domain::testing::{fixtures::*, given};
//! use colloquy_domain::DomainError;
//!
//! given([started(), archived()])
//!     .when(ConversationCommand::SendMessage { message_id: m(1), by: owner(), text: text("hi") })
//!     .then_error(DomainError::Archived);
//! ```
//!
//! `then` also checks, for free, that every expected event survives its
//! stored form (`to_data` → `from_stored`) and that the state folds past it.

use std::fmt::Debug;

use crate::aggregate::{Aggregate, AggregateEvent};
use crate::conversation::{Conversation, ConversationEvent};
use crate::error::DomainError;
use crate::event::DomainEvent;
use crate::process::{self, Decision, ProcessCommand};
use crate::run::{AgentRun, RunEvent};

/// Starts an aggregate test from a stream's history; the aggregate is
/// inferred from the event type.
pub fn given<E, I>(history: I) -> Given<E::Aggregate>
where
    E: AggregateEvent,
    I: IntoIterator<Item = E>,
{
    Given {
        history: history.into_iter().collect(),
    }
}

/// Starts an aggregate test from an empty stream: `given_nothing::<Conversation>()`.
#[must_use]
pub fn given_nothing<A: Aggregate>() -> Given<A> {
    Given {
        history: Vec::new(),
    }
}

/// A history, waiting for a command.
#[derive(Debug)]
pub struct Given<A: Aggregate> {
    history: Vec<A::Event>,
}

impl<A: Aggregate> Given<A> {
    /// Decides `command` against the folded history.
    #[must_use]
    pub fn when(self, command: A::Command) -> When<A> {
        let state = A::fold(&self.history);
        let result = A::decide(state.as_ref(), command);
        When { state, result }
    }
}

/// The outcome of a command, waiting for assertions.
#[derive(Debug)]
pub struct When<A: Aggregate> {
    state: Option<A>,
    result: Result<Vec<A::Event>, DomainError>,
}

impl<A> When<A>
where
    A: Aggregate,
    A::Event: PartialEq + Debug,
{
    /// Asserts that the command was accepted with exactly these events
    /// (`[]` for an accepted no-op).
    ///
    /// # Panics
    /// When the command was rejected or produced other events.
    #[track_caller]
    pub fn then<I: IntoIterator<Item = A::Event>>(self, expected: I) {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "the command produced other events");
                check_round_trip(&events);
                let folded = events.iter().fold(self.state, A::evolve);
                assert!(
                    folded.is_some() || events.is_empty(),
                    "the produced events do not fold into a state"
                );
            }
            Err(err) => {
                panic!("expected events {expected:?}, but the command was rejected: {err:?}")
            }
        }
    }

    /// Asserts that the command was rejected with `expected`.
    ///
    /// # Panics
    /// When the command was accepted or rejected otherwise.
    #[track_caller]
    pub fn then_error(self, expected: DomainError) {
        match self.result {
            Ok(events) => panic!("expected {expected:?}, but the command produced {events:?}"),
            Err(err) => assert_eq!(err, expected, "the command was rejected otherwise"),
        }
    }

    /// The raw result, for assertions the helpers do not cover.
    ///
    /// # Errors
    /// The command's rejection.
    pub fn result(self) -> Result<Vec<A::Event>, DomainError> {
        self.result
    }
}

#[track_caller]
fn check_round_trip<E: DomainEvent + PartialEq + Debug>(events: &[E]) {
    for e in events {
        let data = e.to_data();
        assert!(
            data.is_object(),
            "{} payload is not an object",
            e.event_type()
        );
        let back = E::from_stored(e.event_type(), e.schema_version(), data);
        assert_eq!(
            back.as_ref(),
            Ok(e),
            "the event does not survive its stored form"
        );
    }
}

/// Starts a cross-aggregate test from the histories of a conversation stream
/// and a run stream (either may be empty).
pub fn given_streams<C, R>(conversation: C, run: R) -> GivenStreams
where
    C: IntoIterator<Item = ConversationEvent>,
    R: IntoIterator<Item = RunEvent>,
{
    GivenStreams {
        conversation: conversation.into_iter().collect(),
        run: run.into_iter().collect(),
    }
}

/// Two histories, waiting for a cross-aggregate command.
#[derive(Debug)]
pub struct GivenStreams {
    conversation: Vec<ConversationEvent>,
    run: Vec<RunEvent>,
}

impl GivenStreams {
    /// Decides `command` with [`process::decide`].
    #[must_use]
    pub fn when(self, command: impl Into<ProcessCommand>) -> WhenStreams {
        let conversation = Conversation::fold(&self.conversation);
        let run = AgentRun::fold(&self.run);
        let result = process::decide(conversation.as_ref(), run.as_ref(), command.into());
        WhenStreams {
            conversation,
            run,
            result,
        }
    }
}

/// The outcome of a cross-aggregate command, waiting for assertions.
#[derive(Debug)]
pub struct WhenStreams {
    conversation: Option<Conversation>,
    run: Option<AgentRun>,
    result: Result<Decision, DomainError>,
}

impl WhenStreams {
    /// Asserts that the command was accepted with exactly these events for
    /// each stream.
    ///
    /// # Panics
    /// When the command was rejected or produced other events.
    #[track_caller]
    pub fn then<C, R>(self, conversation: C, run: R)
    where
        C: IntoIterator<Item = ConversationEvent>,
        R: IntoIterator<Item = RunEvent>,
    {
        let expected = Decision {
            conversation: conversation.into_iter().collect(),
            run: run.into_iter().collect(),
        };
        match self.result {
            Ok(decision) => {
                assert_eq!(decision, expected, "the command produced other events");
                check_round_trip(&decision.conversation);
                check_round_trip(&decision.run);
                let conv = decision
                    .conversation
                    .iter()
                    .fold(self.conversation, Conversation::evolve);
                let run = decision.run.iter().fold(self.run, AgentRun::evolve);
                if !decision.is_empty() {
                    assert!(conv.is_some() && run.is_some(), "the events do not fold");
                }
            }
            Err(err) => panic!("expected {expected:?}, but the command was rejected: {err:?}"),
        }
    }

    /// Asserts that the command was rejected with `expected`.
    ///
    /// # Panics
    /// When the command was accepted or rejected otherwise.
    #[track_caller]
    pub fn then_error(self, expected: DomainError) {
        match self.result {
            Ok(decision) => panic!("expected {expected:?}, but the command produced {decision:?}"),
            Err(err) => assert_eq!(err, expected, "the command was rejected otherwise"),
        }
    }

    /// The raw result.
    ///
    /// # Errors
    /// The command's rejection.
    pub fn result(self) -> Result<Decision, DomainError> {
        self.result
    }
}

/// Fixed ids and ready-made events, so tests read as sentences.
///
/// The conversation ([`conversation_id`](fixtures::conversation_id)) belongs
/// to [`owner`](fixtures::owner); it was started with system prompt
/// `Be brief.` and model `gemini-2.5-flash`. Runs are requested by the owner,
/// use key label `primary`, and complete with [`usage`](fixtures::usage).
pub mod fixtures {
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    use crate::conversation::{
        Author, ConversationArchived, ConversationEvent, ConversationRenamed, ConversationStarted,
        MessageDeleted, MessageEdited, MessageSent, RunClosed, RunOpened, RunOutcome,
    };
    use crate::ids::{ConversationId, MessageId, RunId, UserId};
    use crate::run::{
        RunCancelled, RunCompleted, RunEvent, RunFailed, RunRequested, RunRetryScheduled,
        RunStarted, Usage,
    };
    use crate::text::MessageText;

    /// The conversation under test.
    #[must_use]
    pub const fn conversation_id() -> ConversationId {
        ConversationId::from_uuid(Uuid::from_u128(0xC0_0000))
    }

    /// Its owner.
    #[must_use]
    pub const fn owner() -> UserId {
        UserId::from_uuid(Uuid::from_u128(0xA11CE))
    }

    /// Some other user.
    #[must_use]
    pub const fn stranger() -> UserId {
        UserId::from_uuid(Uuid::from_u128(0xB0B))
    }

    /// Message number `n`.
    #[must_use]
    pub const fn m(n: u128) -> MessageId {
        MessageId::from_uuid(Uuid::from_u128(0x3E55_0000 + n))
    }

    /// Run number `n`.
    #[must_use]
    pub const fn r(n: u128) -> RunId {
        RunId::from_uuid(Uuid::from_u128(0x2C40_0000 + n))
    }

    /// A valid message text.
    ///
    /// # Panics
    /// When `s` is not a valid message text.
    #[must_use]
    pub fn text(s: &str) -> MessageText {
        MessageText::parse(s.to_owned()).expect("fixture text must be valid")
    }

    /// 2025-01-01T00:00:00Z plus `seconds`.
    ///
    /// # Panics
    /// Never for reasonable `seconds`.
    #[must_use]
    pub fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_735_689_600 + seconds, 0).expect("fixture time in range")
    }

    /// `ConversationStarted` by [`owner`], no title.
    #[must_use]
    pub fn started() -> ConversationEvent {
        ConversationStarted {
            conversation_id: conversation_id(),
            owner: owner(),
            title: None,
            system_prompt: Some("Be brief.".to_owned()),
            model: Some("gemini-2.5-flash".to_owned()),
            redacted: false,
        }
        .into()
    }

    /// `ConversationStarted` with a title.
    #[must_use]
    pub fn started_with_title(title: &str) -> ConversationEvent {
        let mut e = started();
        if let ConversationEvent::ConversationStarted(s) = &mut e {
            s.title = Some(title.to_owned());
        }
        e
    }

    /// The owner's message `id` saying `hello`.
    #[must_use]
    pub fn user_message(id: MessageId) -> ConversationEvent {
        user_message_with(id, "hello")
    }

    /// The owner's message `id` saying `text`.
    #[must_use]
    pub fn user_message_with(id: MessageId, text: &str) -> ConversationEvent {
        MessageSent {
            message_id: id,
            author: Author::User,
            author_id: Some(owner()),
            text: text.to_owned(),
            reply_to: None,
            run_id: None,
            redacted: false,
        }
        .into()
    }

    /// The assistant's reply `id` from `run` to `reply_to`, saying
    /// `Here is an answer.`.
    #[must_use]
    pub fn assistant_message(id: MessageId, run: RunId, reply_to: MessageId) -> ConversationEvent {
        MessageSent {
            message_id: id,
            author: Author::Assistant,
            author_id: None,
            text: "Here is an answer.".to_owned(),
            reply_to: Some(reply_to),
            run_id: Some(run),
            redacted: false,
        }
        .into()
    }

    /// `MessageEdited`.
    #[must_use]
    pub fn message_edited(id: MessageId, text: &str) -> ConversationEvent {
        MessageEdited {
            message_id: id,
            text: text.to_owned(),
            redacted: false,
        }
        .into()
    }

    /// `MessageDeleted`.
    #[must_use]
    pub fn message_deleted(id: MessageId) -> ConversationEvent {
        MessageDeleted { message_id: id }.into()
    }

    /// `ConversationRenamed`.
    #[must_use]
    pub fn renamed(title: &str) -> ConversationEvent {
        ConversationRenamed {
            title: title.to_owned(),
            redacted: false,
        }
        .into()
    }

    /// `ConversationArchived`.
    #[must_use]
    pub fn archived() -> ConversationEvent {
        ConversationArchived {}.into()
    }

    /// `RunOpened`.
    #[must_use]
    pub fn run_opened(run: RunId, prompt: MessageId) -> ConversationEvent {
        RunOpened {
            run_id: run,
            prompt_message_id: prompt,
        }
        .into()
    }

    /// `RunClosed`.
    #[must_use]
    pub fn run_closed(run: RunId, outcome: RunOutcome) -> ConversationEvent {
        RunClosed {
            run_id: run,
            outcome,
        }
        .into()
    }

    /// `RunRequested` by [`owner`] in [`conversation_id`], with the
    /// conversation's model and no instructions.
    #[must_use]
    pub fn run_requested(run: RunId, prompt: MessageId) -> RunEvent {
        RunRequested {
            run_id: run,
            conversation_id: conversation_id(),
            prompt_message_id: prompt,
            model: Some("gemini-2.5-flash".to_owned()),
            instructions: None,
            requested_by: owner(),
            redacted: false,
        }
        .into()
    }

    /// `RunStarted` with key label `primary`.
    #[must_use]
    pub fn run_started(attempt: u32) -> RunEvent {
        RunStarted {
            attempt,
            key_label: "primary".to_owned(),
        }
        .into()
    }

    /// `RunRetryScheduled` because `model overloaded`.
    #[must_use]
    pub fn run_retry_scheduled(attempt: u32, not_before: DateTime<Utc>) -> RunEvent {
        run_retry_scheduled_because(attempt, "model overloaded", not_before)
    }

    /// `RunRetryScheduled` with a reason.
    #[must_use]
    pub fn run_retry_scheduled_because(
        attempt: u32,
        reason: &str,
        not_before: DateTime<Utc>,
    ) -> RunEvent {
        RunRetryScheduled {
            attempt,
            reason: reason.to_owned(),
            not_before,
        }
        .into()
    }

    /// Token usage of 12 + 30 = 42.
    #[must_use]
    pub const fn usage() -> Usage {
        Usage {
            prompt_tokens: 12,
            candidates_tokens: 30,
            total_tokens: 42,
            thoughts_tokens: None,
        }
    }

    /// `RunCompleted` with finish reason `STOP` and [`usage`].
    #[must_use]
    pub fn run_completed(attempt: u32, reply: MessageId) -> RunEvent {
        RunCompleted {
            attempt,
            reply_message_id: reply,
            finish_reason: "STOP".to_owned(),
            usage: usage(),
        }
        .into()
    }

    /// `RunFailed`.
    #[must_use]
    pub fn run_failed(reason: &str, attempts: u32) -> RunEvent {
        RunFailed {
            reason: reason.to_owned(),
            attempts,
        }
        .into()
    }

    /// `RunCancelled`.
    #[must_use]
    pub fn run_cancelled(by: UserId) -> RunEvent {
        RunCancelled { by }.into()
    }
}
