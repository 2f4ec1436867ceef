//! The AgentRun aggregate, stream `agentRun-<uuid>`: one request for the
//! agent to answer one user message.
//!
//! ```text
//!            Start(1)            Complete(n)
//!   queued ───────────▶ running ────────────▶ succeeded
//!     │                 │  ▲  │
//!     │ ScheduleRetry   │  │  │ ScheduleRetry(n)
//!     ▼                 │  │  ▼
//!   retrying ◀──────────┘  └── retrying ── Start(n+1) ──▶ running …
//!
//!   Fail: any non-terminal ──▶ failed      Cancel: any non-terminal ──▶ cancelled
//!   Revive: failed as a dead letter ──▶ retrying (same attempt; Start(n+1) next)
//! ```
//!
//! Attempts count from 1. `Start` must name the next attempt (current + 1);
//! `Progress`, `Complete` and a `ScheduleRetry` from `running` must name the
//! current attempt, so an agent that lost its attempt (killed mid-call, then
//! retried elsewhere) gets [`DomainError::StaleAttempt`] and records nothing.
//!
//! Nothing leaves a terminal state ([`DomainError::RunTerminal`]), with two
//! exceptions:
//!
//! * a `Complete` that repeats the recorded completion (same attempt, same
//!   reply message id) is accepted with no events, so an agent that crashed
//!   after appending its completion but before acknowledging the request can
//!   safely complete again — exactly one completion is ever recorded;
//! * a **dead letter** — a run that failed because the agent's retry schedule
//!   ran out (its reason starts with [`DEAD_LETTER_PREFIX`]) — can be revived
//!   by an operator once the cause is fixed (a key replaced, an outage over).
//!   `Revive` records a `RunRetryScheduled` for the current attempt, so the
//!   run is `retrying` again and the agent's sweep starts attempt n + 1. Any
//!   other failure is a verdict about the request itself (a blocked prompt, no
//!   keys configured) and stays final.
//!
//! `Complete`, `Fail`, `Cancel` and `Revive` also close or reopen the run in
//! its conversation; the command layer should go through [`crate::process`],
//! which decides both halves for one atomic multi-stream append. The commands
//! here are the run's half.
//!
//! Event JSON (camelCase):
//!
//! | type | data |
//! |---|---|
//! | `RunRequested` v1 | `{runId, conversationId, promptMessageId, model?, instructions?, requestedBy, redacted?}` |
//! | `RunStarted` v1 | `{attempt, keyLabel}` |
//! | `RunProgressed` v1 | `{attempt, stage, percent}` |
//! | `RunRetryScheduled` v1 | `{attempt, reason, notBefore}` (RFC 3339, `Z`) |
//! | `RunCompleted` v1 | `{attempt, replyMessageId, finishReason, usage: {promptTokens, candidatesTokens, totalTokens, thoughtsTokens?}}` |
//! | `RunFailed` v1 | `{reason, attempts}` |
//! | `RunCancelled` v1 | `{by}` |

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, AggregateEvent};
use crate::error::DomainError;
use crate::event::domain_event_enum;
use crate::ids::{ConversationId, MessageId, RUN_CATEGORY, RunId, UserId};
use crate::text::{Rule, ValidationError};

/// The start of a dead letter's failure reason. The agent writes it when a
/// run's retry schedule is used up; it is defined here because the rule that
/// reads it — only a dead letter may be revived — is the domain's.
pub const DEAD_LETTER_PREFIX: &str = "retries exhausted";

/// The reason recorded on the `RunRetryScheduled` that revives a dead letter.
pub const REVIVED_REASON: &str = "retried by an operator";

// ---------------------------------------------------------------- events --

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_false(b: &bool) -> bool {
    !*b
}

/// The agent was asked to answer a message. Written together with the
/// conversation's `RunOpened`. Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRequested {
    /// The run (also the stream id).
    pub run_id: RunId,
    /// The conversation it answers in.
    pub conversation_id: ConversationId,
    /// The user message it answers.
    pub prompt_message_id: MessageId,
    /// The model to use: the request's, else the conversation's default;
    /// absent means the agent's configured default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Extra instructions appended to the system prompt (`""` once redacted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    /// The user who asked (the only one who may cancel).
    pub requested_by: UserId,
    /// True once the instructions were erased.
    #[serde(default, skip_serializing_if = "is_false")]
    pub redacted: bool,
}

/// An agent began an attempt. Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunStarted {
    /// The attempt, from 1.
    pub attempt: u32,
    /// The label of the API key used — never the key.
    pub key_label: String,
}

/// A milestone within an attempt. Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunProgressed {
    /// The attempt.
    pub attempt: u32,
    /// The stage, e.g. `loading_context`, `waiting_for_model`, `streaming`,
    /// `saving`.
    pub stage: String,
    /// Rough progress, 0 to 100.
    pub percent: u8,
}

/// An attempt did not finish; the run will be retried (by the sweeper) no
/// earlier than `not_before`. Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRetryScheduled {
    /// The attempt that did not finish (0 if none had started).
    pub attempt: u32,
    /// Why (for operators; no user text).
    pub reason: String,
    /// Earliest time to start the next attempt (UTC).
    pub not_before: DateTime<Utc>,
}

/// Token usage of the successful attempt, as the model reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u64,
    /// Tokens in the answer.
    pub candidates_tokens: u64,
    /// Total billed tokens.
    pub total_tokens: u64,
    /// Tokens spent thinking, when the model reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thoughts_tokens: Option<u64>,
}

/// The agent answered. Written together with the assistant's `MessageSent`
/// and the conversation's `RunClosed`. Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunCompleted {
    /// The attempt that succeeded.
    pub attempt: u32,
    /// The assistant message holding the reply.
    pub reply_message_id: MessageId,
    /// The model's finish reason, e.g. `STOP`, `MAX_TOKENS`.
    pub finish_reason: String,
    /// Token usage.
    pub usage: Usage,
}

/// The run gave up. Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunFailed {
    /// Why (for operators and the user; no user text).
    pub reason: String,
    /// How many attempts were started.
    pub attempts: u32,
}

/// The requester cancelled the run. Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunCancelled {
    /// Who cancelled.
    pub by: UserId,
}

/// Everything that can happen in a run stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEvent {
    /// See [`RunRequested`].
    RunRequested(RunRequested),
    /// See [`RunStarted`].
    RunStarted(RunStarted),
    /// See [`RunProgressed`].
    RunProgressed(RunProgressed),
    /// See [`RunRetryScheduled`].
    RunRetryScheduled(RunRetryScheduled),
    /// See [`RunCompleted`].
    RunCompleted(RunCompleted),
    /// See [`RunFailed`].
    RunFailed(RunFailed),
    /// See [`RunCancelled`].
    RunCancelled(RunCancelled),
}

domain_event_enum!(RunEvent {
    RunRequested = 1,
    RunStarted = 1,
    RunProgressed = 1,
    RunRetryScheduled = 1,
    RunCompleted = 1,
    RunFailed = 1,
    RunCancelled = 1,
} upcast = crate::event::upcast_run);

// -------------------------------------------------------------- commands --

/// A progress milestone: a stage name (1 to 64 characters of `[a-z0-9_]`) and a
/// percentage (0 to 100).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Milestone {
    /// 1 to 64 characters of `[a-z0-9_]`.
    pub stage: String,
    /// 0 to 100.
    pub percent: u8,
}

impl Milestone {
    /// A milestone of `stage` at `percent`.
    #[must_use]
    pub fn new(stage: impl Into<String>, percent: u8) -> Self {
        Self {
            stage: stage.into(),
            percent,
        }
    }
}

/// What the agent, the sweeper or the requester asks of a run. A run is
/// created by [`crate::process::request_run`], not by a command here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunCommand {
    /// Begin the next attempt (from `queued` or `retrying`).
    Start {
        /// Must be the current attempt + 1.
        attempt: u32,
        /// The label of the API key the attempt uses (1 to 64 printable ASCII
        /// characters; something that looks like a Gemini key is refused).
        key_label: String,
        /// Milestones the attempt has already reached as it starts (each checked as
        /// [`RunCommand::Progress`] would), recorded after `RunStarted` in the same
        /// append, so that they cost no commit of their own.
        milestones: Vec<Milestone>,
    },
    /// Record a milestone of the running attempt.
    Progress {
        /// Must be the current, running attempt.
        attempt: u32,
        /// 1 to 64 characters of `[a-z0-9_]`.
        stage: String,
        /// 0 to 100.
        percent: u8,
    },
    /// Give up on this attempt for now; retry no earlier than `not_before`.
    /// Allowed from `running` (the current attempt failed), `queued` (no
    /// attempt could start, `attempt` = 0) and `retrying` (postpone again,
    /// e.g. no budget when the sweeper re-dispatched it).
    ScheduleRetry {
        /// Must be the current attempt.
        attempt: u32,
        /// Why (sanitized: NUL replaced, at most 2,000 characters).
        reason: String,
        /// Earliest time for the next attempt.
        not_before: DateTime<Utc>,
    },
    /// The run's half of a completion (see [`crate::process::complete_run`]).
    Complete {
        /// Must be the current, running attempt.
        attempt: u32,
        /// The assistant message that will hold the reply.
        reply_message_id: MessageId,
        /// The model's finish reason (sanitized like `reason`).
        finish_reason: String,
        /// Token usage.
        usage: Usage,
    },
    /// Give up for good (from any non-terminal status).
    Fail {
        /// Why (sanitized: NUL replaced, at most 2,000 characters).
        reason: String,
    },
    /// Cancel (from any non-terminal status; only the requester).
    Cancel {
        /// The acting user.
        by: UserId,
    },
    /// Bring a dead letter back (an operator's decision): the run's half of
    /// [`crate::process::revive_run`]. Only from `failed` with a dead-letter
    /// reason; anything else is [`DomainError::NotADeadLetter`].
    Revive {
        /// Earliest time for the next attempt (usually now).
        not_before: DateTime<Utc>,
    },
}

impl RunCommand {
    /// The command's name, for [`DomainError::InvalidTransition`].
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Start { .. } => "Start",
            Self::Progress { .. } => "Progress",
            Self::ScheduleRetry { .. } => "ScheduleRetry",
            Self::Complete { .. } => "Complete",
            Self::Fail { .. } => "Fail",
            Self::Cancel { .. } => "Cancel",
            Self::Revive { .. } => "Revive",
        }
    }
}

// ----------------------------------------------------------------- state --

/// Where a run is in its life. Serializes as the API's status names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Requested, no attempt started yet.
    Queued,
    /// An attempt is under way.
    Running,
    /// Waiting for a retry (`retrying` in the API).
    #[serde(rename = "retrying")]
    RetryScheduled,
    /// Answered. Terminal.
    Succeeded,
    /// Gave up. Terminal.
    Failed,
    /// Cancelled by the requester. Terminal.
    Cancelled,
}

impl RunStatus {
    /// Whether nothing can happen to the run any more.
    #[must_use]
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The API's name for the status.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::RetryScheduled => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of one run, folded from its stream. Ids, counters and a status;
/// the instructions and reply text stay in the events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRun {
    id: RunId,
    conversation_id: ConversationId,
    prompt_message_id: MessageId,
    requested_by: UserId,
    status: RunStatus,
    attempt: u32,
    not_before: Option<DateTime<Utc>>,
    completion: Option<(u32, MessageId)>,
    /// Failed because its retries ran out (and not revived since).
    dead_letter: bool,
    /// Retries scheduled since the latest attempt started (or since the request).
    waits: u32,
}

impl AgentRun {
    /// The run's id.
    #[must_use]
    pub const fn id(&self) -> RunId {
        self.id
    }

    /// The conversation it answers in.
    #[must_use]
    pub const fn conversation_id(&self) -> ConversationId {
        self.conversation_id
    }

    /// The user message it answers.
    #[must_use]
    pub const fn prompt_message_id(&self) -> MessageId {
        self.prompt_message_id
    }

    /// Who asked for it.
    #[must_use]
    pub const fn requested_by(&self) -> UserId {
        self.requested_by
    }

    /// Its status.
    #[must_use]
    pub const fn status(&self) -> RunStatus {
        self.status
    }

    /// The latest attempt started (0 before the first).
    #[must_use]
    pub const fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The attempt a `Start` must name.
    #[must_use]
    pub const fn next_attempt(&self) -> u32 {
        self.attempt.saturating_add(1)
    }

    /// When a scheduled retry is due (while `retrying`).
    #[must_use]
    pub const fn not_before(&self) -> Option<DateTime<Utc>> {
        self.not_before
    }

    /// Retries scheduled since the latest attempt started, or since the request if none
    /// has (a revival starts the count again). Each attempt's failure schedules one; the
    /// rest are waits for a usable key, which the agent counts towards its schedule.
    #[must_use]
    pub const fn waits(&self) -> u32 {
        self.waits
    }

    /// Whether the run is a dead letter: failed because its retry schedule
    /// ran out, and not revived since.
    #[must_use]
    pub const fn is_dead_letter(&self) -> bool {
        self.dead_letter
    }

    /// The reply message, once succeeded.
    #[must_use]
    pub fn reply_message_id(&self) -> Option<MessageId> {
        self.completion.map(|(_, id)| id)
    }

    fn terminal_error(&self) -> Result<(), DomainError> {
        if self.status.is_terminal() {
            Err(DomainError::RunTerminal {
                status: self.status,
            })
        } else {
            Ok(())
        }
    }

    /// The command must name the current attempt, and it must be running.
    fn ensure_running_attempt(&self, attempt: u32) -> Result<(), DomainError> {
        if self.status == RunStatus::Running && attempt == self.attempt {
            Ok(())
        } else {
            Err(DomainError::StaleAttempt {
                current: self.attempt,
                given: attempt,
            })
        }
    }
}

/// Most characters kept of a reason or finish reason.
pub const REASON_MAX_CHARS: usize = 2_000;

/// Makes a reason always recordable: a failure must never be refused for its
/// wording, or the run would be stuck. NUL (which Postgres `jsonb` cannot
/// hold) becomes U+FFFD, the text is cut to [`REASON_MAX_CHARS`], and a blank
/// reason becomes `unspecified`.
#[must_use]
pub fn sanitize_reason(reason: &str) -> String {
    let cleaned: String = reason
        .chars()
        .take(REASON_MAX_CHARS)
        .map(|c| if c == '\0' { '\u{FFFD}' } else { c })
        .collect();
    if cleaned.trim().is_empty() {
        "unspecified".to_owned()
    } else {
        cleaned
    }
}

fn validate_key_label(label: &str) -> Result<(), ValidationError> {
    const FIELD: &str = "key_label";
    if label.is_empty() {
        return Err(ValidationError::new(FIELD, Rule::Blank));
    }
    if label.chars().count() > 64 {
        return Err(ValidationError::new(FIELD, Rule::TooLong { max: 64 }));
    }
    if !label.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ValidationError::new(
            FIELD,
            Rule::InvalidCharacter {
                allowed: "printable ASCII without spaces",
            },
        ));
    }
    // Gemini API keys are 39 characters starting with "AIza".
    if label.starts_with("AIza") && label.len() >= 30 {
        return Err(ValidationError::new(FIELD, Rule::LooksLikeSecret));
    }
    Ok(())
}

fn validate_progress(stage: &str, percent: u8) -> Result<(), ValidationError> {
    if stage.is_empty() {
        return Err(ValidationError::new("stage", Rule::Blank));
    }
    if stage.len() > 64 {
        return Err(ValidationError::new("stage", Rule::TooLong { max: 64 }));
    }
    if !stage
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(ValidationError::new(
            "stage",
            Rule::InvalidCharacter {
                allowed: "a-z, 0-9 and '_'",
            },
        ));
    }
    if percent > 100 {
        return Err(ValidationError::new(
            "percent",
            Rule::OutOfRange { min: 0, max: 100 },
        ));
    }
    Ok(())
}

impl Aggregate for AgentRun {
    type Command = RunCommand;
    type Event = RunEvent;
    const CATEGORY: &'static str = RUN_CATEGORY;

    fn decide(state: Option<&Self>, command: RunCommand) -> Result<Vec<RunEvent>, DomainError> {
        let run = state.ok_or(DomainError::NotFound)?;
        let command_name = command.name();
        let event: RunEvent = match command {
            RunCommand::Start {
                attempt,
                key_label,
                milestones,
            } => {
                run.terminal_error()?;
                match run.status {
                    RunStatus::Queued | RunStatus::RetryScheduled => {}
                    status => {
                        return Err(DomainError::InvalidTransition {
                            status,
                            command: command_name,
                        });
                    }
                }
                if attempt != run.next_attempt() {
                    return Err(DomainError::StaleAttempt {
                        current: run.attempt,
                        given: attempt,
                    });
                }
                validate_key_label(&key_label)?;
                let mut events = vec![RunStarted { attempt, key_label }.into()];
                for Milestone { stage, percent } in milestones {
                    validate_progress(&stage, percent)?;
                    events.push(
                        RunProgressed {
                            attempt,
                            stage,
                            percent,
                        }
                        .into(),
                    );
                }
                return Ok(events);
            }
            RunCommand::Progress {
                attempt,
                stage,
                percent,
            } => {
                run.terminal_error()?;
                run.ensure_running_attempt(attempt)?;
                validate_progress(&stage, percent)?;
                RunProgressed {
                    attempt,
                    stage,
                    percent,
                }
                .into()
            }
            RunCommand::ScheduleRetry {
                attempt,
                reason,
                not_before,
            } => {
                run.terminal_error()?;
                if attempt != run.attempt {
                    return Err(DomainError::StaleAttempt {
                        current: run.attempt,
                        given: attempt,
                    });
                }
                RunRetryScheduled {
                    attempt,
                    reason: sanitize_reason(&reason),
                    not_before,
                }
                .into()
            }
            RunCommand::Complete {
                attempt,
                reply_message_id,
                finish_reason,
                usage,
            } => {
                if run.status == RunStatus::Succeeded
                    && run.completion == Some((attempt, reply_message_id))
                {
                    // The same completion again (a redelivery after a crash):
                    // accepted, nothing new to record.
                    return Ok(Vec::new());
                }
                run.terminal_error()?;
                run.ensure_running_attempt(attempt)?;
                RunCompleted {
                    attempt,
                    reply_message_id,
                    finish_reason: sanitize_reason(&finish_reason),
                    usage,
                }
                .into()
            }
            RunCommand::Fail { reason } => {
                run.terminal_error()?;
                RunFailed {
                    reason: sanitize_reason(&reason),
                    attempts: run.attempt,
                }
                .into()
            }
            RunCommand::Cancel { by } => {
                if by != run.requested_by {
                    return Err(DomainError::NotOwner);
                }
                run.terminal_error()?;
                RunCancelled { by }.into()
            }
            RunCommand::Revive { not_before } => {
                if !run.dead_letter {
                    return Err(DomainError::NotADeadLetter { status: run.status });
                }
                RunRetryScheduled {
                    attempt: run.attempt,
                    reason: REVIVED_REASON.to_owned(),
                    not_before,
                }
                .into()
            }
        };
        Ok(vec![event])
    }

    fn evolve(state: Option<Self>, event: &RunEvent) -> Option<Self> {
        let Some(mut run) = state else {
            return match event {
                RunEvent::RunRequested(e) => Some(Self {
                    id: e.run_id,
                    conversation_id: e.conversation_id,
                    prompt_message_id: e.prompt_message_id,
                    requested_by: e.requested_by,
                    status: RunStatus::Queued,
                    attempt: 0,
                    not_before: None,
                    completion: None,
                    dead_letter: false,
                    waits: 0,
                }),
                _ => None,
            };
        };
        if run.status.is_terminal() {
            // The one way out of a terminal state: a dead letter revived.
            if let RunEvent::RunRetryScheduled(e) = event
                && run.dead_letter
            {
                run.status = RunStatus::RetryScheduled;
                run.not_before = Some(e.not_before);
                run.dead_letter = false;
                run.waits = 0;
            }
            return Some(run);
        }
        match event {
            RunEvent::RunRequested(_) | RunEvent::RunProgressed(_) => {}
            RunEvent::RunStarted(e) => {
                run.status = RunStatus::Running;
                run.attempt = e.attempt;
                run.not_before = None;
                run.waits = 0;
            }
            RunEvent::RunRetryScheduled(e) => {
                run.status = RunStatus::RetryScheduled;
                run.not_before = Some(e.not_before);
                run.waits = run.waits.saturating_add(1);
            }
            RunEvent::RunCompleted(e) => {
                run.status = RunStatus::Succeeded;
                run.completion = Some((e.attempt, e.reply_message_id));
                run.not_before = None;
            }
            RunEvent::RunFailed(e) => {
                run.status = RunStatus::Failed;
                run.not_before = None;
                run.dead_letter = e.reason.starts_with(DEAD_LETTER_PREFIX);
            }
            RunEvent::RunCancelled(_) => {
                run.status = RunStatus::Cancelled;
                run.not_before = None;
            }
        }
        Some(run)
    }
}

impl AggregateEvent for RunEvent {
    type Aggregate = AgentRun;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testing::fixtures::*;
    use crate::testing::{given, given_nothing};

    fn start(attempt: u32) -> RunCommand {
        RunCommand::Start {
            attempt,
            key_label: "primary".to_owned(),
            milestones: Vec::new(),
        }
    }

    fn progress(attempt: u32, percent: u8) -> RunCommand {
        RunCommand::Progress {
            attempt,
            stage: "streaming".to_owned(),
            percent,
        }
    }

    fn retry(attempt: u32) -> RunCommand {
        RunCommand::ScheduleRetry {
            attempt,
            reason: "429 from model".to_owned(),
            not_before: at(60),
        }
    }

    fn complete(attempt: u32) -> RunCommand {
        RunCommand::Complete {
            attempt,
            reply_message_id: m(2),
            finish_reason: "STOP".to_owned(),
            usage: usage(),
        }
    }

    fn fail() -> RunCommand {
        RunCommand::Fail {
            reason: "gave up".to_owned(),
        }
    }

    fn queued() -> Vec<RunEvent> {
        vec![run_requested(r(1), m(1))]
    }

    fn running(attempt: u32) -> Vec<RunEvent> {
        let mut events = queued();
        for a in 1..=attempt {
            if a > 1 {
                events.push(run_retry_scheduled(a - 1, at(60)));
            }
            events.push(run_started(a));
        }
        events
    }

    fn retrying(after_attempt: u32) -> Vec<RunEvent> {
        let mut events = running(after_attempt);
        events.push(run_retry_scheduled(after_attempt, at(60)));
        events
    }

    fn completed_events(attempt: u32) -> Vec<RunEvent> {
        let mut events = running(attempt);
        events.push(run_completed(attempt, m(2)));
        events
    }

    fn terminal_histories() -> Vec<(RunStatus, Vec<RunEvent>)> {
        let mut failed = running(1);
        failed.push(run_failed("gave up", 1));
        let mut cancelled = queued();
        cancelled.push(run_cancelled(owner()));
        vec![
            (RunStatus::Succeeded, completed_events(1)),
            (RunStatus::Failed, failed),
            (RunStatus::Cancelled, cancelled),
        ]
    }

    // ---- start

    #[test]
    fn a_queued_run_starts_its_first_attempt() {
        given(queued()).when(start(1)).then([run_started(1)]);
    }

    #[test]
    fn a_retrying_run_starts_the_next_attempt() {
        given(retrying(1)).when(start(2)).then([run_started(2)]);
    }

    #[test]
    fn a_start_that_skips_or_repeats_an_attempt_is_stale() {
        given(queued())
            .when(start(2))
            .then_error(DomainError::StaleAttempt {
                current: 0,
                given: 2,
            });
        given(retrying(1))
            .when(start(1))
            .then_error(DomainError::StaleAttempt {
                current: 1,
                given: 1,
            });
    }

    #[test]
    fn a_running_run_cannot_be_started_again() {
        given(running(1))
            .when(start(2))
            .then_error(DomainError::InvalidTransition {
                status: RunStatus::Running,
                command: "Start",
            });
    }

    #[test]
    fn a_start_records_its_milestones_in_the_same_decision() {
        let start = |milestones| RunCommand::Start {
            attempt: 1,
            key_label: "primary".to_owned(),
            milestones,
        };
        let progressed = |stage: &str, percent| -> RunEvent {
            RunProgressed {
                attempt: 1,
                stage: stage.to_owned(),
                percent,
            }
            .into()
        };
        given(queued())
            .when(start(vec![
                Milestone::new("loading_context", 5),
                Milestone::new("waiting_for_model", 10),
            ]))
            .then([
                run_started(1),
                progressed("loading_context", 5),
                progressed("waiting_for_model", 10),
            ]);
        // One bad milestone refuses the whole start.
        given(queued())
            .when(start(vec![
                Milestone::new("loading_context", 5),
                Milestone::new("Bad Stage", 10),
            ]))
            .then_error(
                ValidationError::new(
                    "stage",
                    Rule::InvalidCharacter {
                        allowed: "a-z, 0-9 and '_'",
                    },
                )
                .into(),
            );
    }

    #[test]
    fn a_key_is_never_accepted_as_a_key_label() {
        given(queued())
            .when(RunCommand::Start {
                attempt: 1,
                key_label: "AIzaSyA-1234567890abcdefghijklmnopqrstu".to_owned(),
                milestones: Vec::new(),
            })
            .then_error(ValidationError::new("key_label", Rule::LooksLikeSecret).into());
        given(queued())
            .when(RunCommand::Start {
                attempt: 1,
                key_label: String::new(),
                milestones: Vec::new(),
            })
            .then_error(ValidationError::new("key_label", Rule::Blank).into());
    }

    // ---- progress

    #[test]
    fn a_running_attempt_records_progress() {
        given(running(1))
            .when(progress(1, 40))
            .then([RunProgressed {
                attempt: 1,
                stage: "streaming".to_owned(),
                percent: 40,
            }
            .into()]);
    }

    #[test]
    fn progress_of_an_old_attempt_is_stale() {
        given(running(2))
            .when(progress(1, 40))
            .then_error(DomainError::StaleAttempt {
                current: 2,
                given: 1,
            });
    }

    #[test]
    fn progress_before_the_run_starts_is_stale() {
        given(queued())
            .when(progress(0, 0))
            .then_error(DomainError::StaleAttempt {
                current: 0,
                given: 0,
            });
        given(retrying(1))
            .when(progress(1, 10))
            .then_error(DomainError::StaleAttempt {
                current: 1,
                given: 1,
            });
    }

    #[test]
    fn progress_over_one_hundred_percent_is_invalid() {
        given(running(1)).when(progress(1, 101)).then_error(
            ValidationError::new("percent", Rule::OutOfRange { min: 0, max: 100 }).into(),
        );
        given(running(1))
            .when(RunCommand::Progress {
                attempt: 1,
                stage: "Bad Stage".to_owned(),
                percent: 1,
            })
            .then_error(
                ValidationError::new(
                    "stage",
                    Rule::InvalidCharacter {
                        allowed: "a-z, 0-9 and '_'",
                    },
                )
                .into(),
            );
    }

    // ---- retry

    #[test]
    fn a_running_attempt_can_schedule_a_retry() {
        given(running(1))
            .when(retry(1))
            .then([run_retry_scheduled_because(1, "429 from model", at(60))]);
    }

    #[test]
    fn a_queued_run_can_schedule_a_retry_before_any_attempt() {
        given(queued())
            .when(retry(0))
            .then([run_retry_scheduled_because(0, "429 from model", at(60))]);
    }

    #[test]
    fn a_retrying_run_can_be_postponed_again() {
        given(retrying(1))
            .when(retry(1))
            .then([run_retry_scheduled_because(1, "429 from model", at(60))]);
    }

    #[test]
    fn a_retry_for_an_old_attempt_is_stale() {
        given(running(2))
            .when(retry(1))
            .then_error(DomainError::StaleAttempt {
                current: 2,
                given: 1,
            });
    }

    #[test]
    fn reasons_are_made_recordable() {
        given(running(1))
            .when(RunCommand::ScheduleRetry {
                attempt: 1,
                reason: format!("bad\0{}", "x".repeat(5_000)),
                not_before: at(5),
            })
            .then([run_retry_scheduled_because(
                1,
                &format!("bad\u{FFFD}{}", "x".repeat(1_996)),
                at(5),
            )]);
        assert_eq!(sanitize_reason("  "), "unspecified");
    }

    // ---- complete

    #[test]
    fn the_running_attempt_completes_the_run() {
        given(running(1))
            .when(complete(1))
            .then([run_completed(1, m(2))]);
    }

    #[test]
    fn a_completion_from_an_old_attempt_is_stale() {
        given(running(2))
            .when(complete(1))
            .then_error(DomainError::StaleAttempt {
                current: 2,
                given: 1,
            });
        given(retrying(1))
            .when(complete(1))
            .then_error(DomainError::StaleAttempt {
                current: 1,
                given: 1,
            });
        given(queued())
            .when(complete(1))
            .then_error(DomainError::StaleAttempt {
                current: 0,
                given: 1,
            });
    }

    #[test]
    fn a_repeated_completion_is_accepted_without_new_events() {
        given(completed_events(1)).when(complete(1)).then([]);
    }

    #[test]
    fn a_different_completion_of_a_succeeded_run_is_rejected() {
        given(completed_events(1))
            .when(RunCommand::Complete {
                attempt: 1,
                reply_message_id: m(3),
                finish_reason: "STOP".to_owned(),
                usage: usage(),
            })
            .then_error(DomainError::RunTerminal {
                status: RunStatus::Succeeded,
            });
    }

    // ---- fail and cancel

    #[test]
    fn a_run_can_fail_from_any_live_status() {
        given(queued())
            .when(fail())
            .then([run_failed("gave up", 0)]);
        given(running(2))
            .when(fail())
            .then([run_failed("gave up", 2)]);
        given(retrying(3))
            .when(fail())
            .then([run_failed("gave up", 3)]);
    }

    #[test]
    fn the_requester_can_cancel_a_live_run() {
        for history in [queued(), running(1), retrying(1)] {
            given(history)
                .when(RunCommand::Cancel { by: owner() })
                .then([run_cancelled(owner())]);
        }
    }

    #[test]
    fn only_the_requester_can_cancel_a_run() {
        given(running(1))
            .when(RunCommand::Cancel { by: stranger() })
            .then_error(DomainError::NotOwner);
    }

    // ---- revive

    fn dead_letter_reason(attempts: u32) -> String {
        format!("{DEAD_LETTER_PREFIX} after {attempts} attempts: 500 from model")
    }

    /// A run whose retries ran out after `attempts` attempts.
    fn dead_letter(attempts: u32) -> Vec<RunEvent> {
        let mut events = running(attempts);
        events.push(run_failed(&dead_letter_reason(attempts), attempts));
        events
    }

    fn revive() -> RunCommand {
        RunCommand::Revive { not_before: at(90) }
    }

    fn revived(attempts: u32) -> Vec<RunEvent> {
        let mut events = dead_letter(attempts);
        events.push(run_retry_scheduled_because(
            attempts,
            REVIVED_REASON,
            at(90),
        ));
        events
    }

    #[test]
    fn an_operator_can_revive_a_dead_letter() {
        given(dead_letter(3))
            .when(revive())
            .then([run_retry_scheduled_because(3, REVIVED_REASON, at(90))]);
    }

    #[test]
    fn a_revived_run_is_retrying_and_starts_its_next_attempt() {
        let run = AgentRun::fold(&revived(3)).unwrap();
        assert_eq!(run.status(), RunStatus::RetryScheduled);
        assert_eq!(run.attempt(), 3);
        assert_eq!(run.not_before(), Some(at(90)));
        assert!(!run.is_dead_letter());
        given(revived(3)).when(start(4)).then([run_started(4)]);
    }

    #[test]
    fn waits_count_the_retries_since_the_latest_attempt_started() {
        let waits = |events: &[RunEvent]| AgentRun::fold(events).unwrap().waits();
        let mut history = queued();
        assert_eq!(waits(&history), 0);
        // Waiting for a key before any attempt.
        history.push(run_retry_scheduled(0, at(60)));
        history.push(run_retry_scheduled(0, at(120)));
        assert_eq!(waits(&history), 2);
        history.push(run_started(1));
        assert_eq!(waits(&history), 0, "an attempt starts the count again");
        history.push(run_retry_scheduled(1, at(180)));
        assert_eq!(waits(&history), 1, "the attempt's own failure");
        history.push(run_retry_scheduled(1, at(240)));
        assert_eq!(waits(&history), 2);
        // A dead letter revived starts again too.
        let mut revived_history = revived(1);
        assert_eq!(waits(&revived_history), 0);
        revived_history.push(run_retry_scheduled(1, at(300)));
        assert_eq!(waits(&revived_history), 1);
    }

    #[test]
    fn a_revived_run_that_runs_out_again_can_be_revived_again() {
        let mut history = revived(1);
        history.push(run_started(2));
        history.push(run_failed(&dead_letter_reason(2), 2));
        assert!(AgentRun::fold(&history).unwrap().is_dead_letter());
        given(history)
            .when(revive())
            .then([run_retry_scheduled_because(2, REVIVED_REASON, at(90))]);
    }

    #[test]
    fn a_run_that_failed_for_another_reason_cannot_be_revived() {
        let mut history = running(1);
        history.push(run_failed("the prompt was blocked", 1));
        assert!(!AgentRun::fold(&history).unwrap().is_dead_letter());
        // Even a stray retry event in the log does not bring it back.
        let mut stray = history.clone();
        stray.push(run_retry_scheduled(1, at(90)));
        assert_eq!(AgentRun::fold(&stray).unwrap().status(), RunStatus::Failed);
        given(history)
            .when(revive())
            .then_error(DomainError::NotADeadLetter {
                status: RunStatus::Failed,
            });
    }

    #[test]
    fn only_a_dead_letter_can_be_revived() {
        let mut cancelled = queued();
        cancelled.push(run_cancelled(owner()));
        for (status, history) in [
            (RunStatus::Queued, queued()),
            (RunStatus::Running, running(1)),
            (RunStatus::RetryScheduled, retrying(1)),
            (RunStatus::RetryScheduled, revived(2)),
            (RunStatus::Succeeded, completed_events(1)),
            (RunStatus::Cancelled, cancelled),
        ] {
            given(history)
                .when(revive())
                .then_error(DomainError::NotADeadLetter { status });
        }
    }

    // ---- terminal

    #[test]
    fn nothing_leaves_a_terminal_state() {
        for (status, history) in terminal_histories() {
            for cmd in [
                start(2),
                progress(1, 50),
                retry(1),
                fail(),
                RunCommand::Cancel { by: owner() },
            ] {
                given(history.clone())
                    .when(cmd)
                    .then_error(DomainError::RunTerminal { status });
            }
        }
        let mut failed = running(1);
        failed.push(run_failed("x", 1));
        given(failed)
            .when(complete(1))
            .then_error(DomainError::RunTerminal {
                status: RunStatus::Failed,
            });
    }

    #[test]
    fn commands_on_a_run_that_does_not_exist_are_not_found() {
        given_nothing::<AgentRun>()
            .when(start(1))
            .then_error(DomainError::NotFound);
    }

    #[test]
    fn the_state_follows_the_lifecycle() {
        let run = AgentRun::fold(&retrying(2)).unwrap();
        assert_eq!(run.status(), RunStatus::RetryScheduled);
        assert_eq!(run.attempt(), 2);
        assert_eq!(run.next_attempt(), 3);
        assert_eq!(run.not_before(), Some(at(60)));
        let done = AgentRun::fold(&completed_events(1)).unwrap();
        assert_eq!(done.status(), RunStatus::Succeeded);
        assert_eq!(done.reply_message_id(), Some(m(2)));
        assert_eq!(done.requested_by(), owner());
        assert_eq!(done.status().to_string(), "succeeded");
        assert_eq!(
            serde_json::to_value(RunStatus::RetryScheduled).unwrap(),
            serde_json::json!("retrying")
        );
    }
}
