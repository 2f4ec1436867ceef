//! The Conversation aggregate, stream `conversation-<uuid>`.
//!
//! A conversation has one owner, who alone sends, edits, deletes, renames,
//! archives and runs the agent in it. Once archived it accepts nothing new
//! from users; a run that was already open may still finish (see
//! [`crate::process`]).
//!
//! The conversation also records runs opening and closing ([`RunOpened`],
//! [`RunClosed`]), so "one active run per conversation" is decided inside this
//! one aggregate.
//!
//! **The state is small**: ids and flags, never texts. However long the
//! conversation grows, [`Conversation`] holds a few dozen bytes per message
//! (see [`Conversation::approx_heap_bytes`]). Texts live in the events, the
//! read models and the agent's context window.
//!
//! Event JSON (payload fields are camelCase; optional fields are omitted when
//! absent; `redacted` appears only once an event was redacted):
//!
//! | type | data |
//! |---|---|
//! | `ConversationStarted` v1 | `{conversationId, owner, title?, systemPrompt?, model?, redacted?}` |
//! | `MessageSent` v2 | `{messageId, author: "user"\|"assistant"\|"system", authorId?, text, replyTo?, runId?, redacted?}` |
//! | `MessageEdited` v1 | `{messageId, text, redacted?}` |
//! | `MessageDeleted` v1 | `{messageId}` |
//! | `ConversationRenamed` v1 | `{title, redacted?}` |
//! | `ConversationArchived` v1 | `{}` |
//! | `RunOpened` v1 | `{runId, promptMessageId}` |
//! | `RunClosed` v1 | `{runId, outcome: "succeeded"\|"failed"\|"cancelled"}` |

use std::collections::HashMap;
use std::mem::size_of;

use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, AggregateEvent};
use crate::error::DomainError;
use crate::event::domain_event_enum;
use crate::ids::{CONVERSATION_CATEGORY, ConversationId, MessageId, RunId, UserId};
use crate::text::{MessageText, ModelName, SystemPrompt, Title};

// ---------------------------------------------------------------- events --

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Author {
    /// The conversation's owner.
    User,
    /// The agent, answering in a run.
    Assistant,
    /// The system (notices; no command produces these yet).
    System,
}

/// How a run ended, as recorded in the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunOutcome {
    /// The agent replied; the reply is the `MessageSent` next to this event.
    Succeeded,
    /// The run gave up.
    Failed,
    /// The requester cancelled it.
    Cancelled,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_false(b: &bool) -> bool {
    !*b
}

/// A conversation was created. Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationStarted {
    /// The conversation (also the stream id).
    pub conversation_id: ConversationId,
    /// Its owner, the only user who may act in it.
    pub owner: UserId,
    /// The title, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The system prompt given to the agent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// The default model for runs of this conversation, if chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// True once the user-written fields were erased (see [`crate::event::redact`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub redacted: bool,
}

/// A message was added to the conversation. Schema v2 (v1 had `body` and no
/// `author`; see [`crate::event`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageSent {
    /// The new message.
    pub message_id: MessageId,
    /// Who wrote it.
    pub author: Author,
    /// The writing user, for user messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author_id: Option<UserId>,
    /// The text exactly as written (`""` once redacted).
    pub text: String,
    /// The message this one answers (assistant replies: the prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
    /// The run that produced it (assistant replies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<RunId>,
    /// True once the text was erased.
    #[serde(default, skip_serializing_if = "is_false")]
    pub redacted: bool,
}

/// A user message's text was replaced. Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageEdited {
    /// The edited message.
    pub message_id: MessageId,
    /// Its new text, as written (`""` once redacted).
    pub text: String,
    /// True once the text was erased.
    #[serde(default, skip_serializing_if = "is_false")]
    pub redacted: bool,
}

/// A user message was deleted (it stays in the log; readers hide it). Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageDeleted {
    /// The deleted message.
    pub message_id: MessageId,
}

/// The conversation got a new title. Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConversationRenamed {
    /// The new title (`""` once redacted).
    pub title: String,
    /// True once the title was erased.
    #[serde(default, skip_serializing_if = "is_false")]
    pub redacted: bool,
}

/// The conversation was archived; it accepts nothing new from users. Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationArchived {}

/// A run was opened to answer a message. Written together with the run's
/// `RunRequested`. Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunOpened {
    /// The run (stream `agentRun-<id>`).
    pub run_id: RunId,
    /// The user message it answers.
    pub prompt_message_id: MessageId,
}

/// A run ended. Written together with the run's terminal event. Schema v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunClosed {
    /// The run.
    pub run_id: RunId,
    /// How it ended.
    pub outcome: RunOutcome,
}

/// Everything that can happen in a conversation stream.
///
/// Type names are the variant names; see [`crate::event::DomainEvent`] for
/// schema versions and decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConversationEvent {
    /// See [`ConversationStarted`].
    ConversationStarted(ConversationStarted),
    /// See [`MessageSent`].
    MessageSent(MessageSent),
    /// See [`MessageEdited`].
    MessageEdited(MessageEdited),
    /// See [`MessageDeleted`].
    MessageDeleted(MessageDeleted),
    /// See [`ConversationRenamed`].
    ConversationRenamed(ConversationRenamed),
    /// See [`ConversationArchived`].
    ConversationArchived(ConversationArchived),
    /// See [`RunOpened`].
    RunOpened(RunOpened),
    /// See [`RunClosed`].
    RunClosed(RunClosed),
}

domain_event_enum!(ConversationEvent {
    ConversationStarted = 1,
    MessageSent = 2,
    MessageEdited = 1,
    MessageDeleted = 1,
    ConversationRenamed = 1,
    ConversationArchived = 1,
    RunOpened = 1,
    RunClosed = 1,
} upcast = crate::event::upcast_conversation);

// -------------------------------------------------------------- commands --

/// What a user (through the API) asks of a conversation.
///
/// Run requests, completions, failures and cancellations touch two streams
/// and live in [`crate::process`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConversationCommand {
    /// Create the conversation. `id` must be the stream's id.
    Start {
        /// The new conversation's id.
        id: ConversationId,
        /// Its owner (the acting user).
        owner: UserId,
        /// An optional title.
        title: Option<Title>,
        /// An optional system prompt for the agent.
        system_prompt: Option<SystemPrompt>,
        /// An optional default model.
        model: Option<ModelName>,
    },
    /// Add a user message.
    SendMessage {
        /// The new message's id (minted by the caller).
        message_id: MessageId,
        /// The acting user.
        by: UserId,
        /// What they wrote.
        text: MessageText,
    },
    /// Replace the text of one of the actor's own messages.
    EditMessage {
        /// The message.
        message_id: MessageId,
        /// The acting user.
        by: UserId,
        /// The new text.
        text: MessageText,
    },
    /// Delete one of the actor's own messages.
    DeleteMessage {
        /// The message.
        message_id: MessageId,
        /// The acting user.
        by: UserId,
    },
    /// Give the conversation a new title.
    Rename {
        /// The acting user.
        by: UserId,
        /// The new title.
        title: Title,
    },
    /// Archive the conversation. Archiving an archived conversation is an
    /// accepted no-op (no events), so `DELETE` is idempotent.
    Archive {
        /// The acting user.
        by: UserId,
    },
}

// ----------------------------------------------------------------- state --

/// What the conversation remembers about one message: who wrote it and
/// whether it is deleted. Never its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageInfo {
    /// Who wrote it.
    pub author: Author,
    /// The writing user, for user messages.
    pub author_id: Option<UserId>,
    /// Whether it was deleted.
    pub deleted: bool,
}

/// The state of one conversation, folded from its stream.
///
/// Holds ids and flags only — no titles, prompts or message texts — so its
/// size grows by a few dozen bytes per message, not by what was written. The
/// default model name (at most 100 ASCII characters) is kept so that
/// `RunRequested` can name the model the run will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    id: ConversationId,
    owner: UserId,
    model: Option<ModelName>,
    archived: bool,
    messages: HashMap<MessageId, MessageInfo>,
    /// User messages, oldest first (deleted ones included; see `messages`).
    user_messages: Vec<MessageId>,
    open_run: Option<RunId>,
    message_count: u64,
}

impl Conversation {
    /// The conversation's id.
    #[must_use]
    pub const fn id(&self) -> ConversationId {
        self.id
    }

    /// Its owner.
    #[must_use]
    pub const fn owner(&self) -> UserId {
        self.owner
    }

    /// The default model chosen at start, if any.
    #[must_use]
    pub const fn model(&self) -> Option<&ModelName> {
        self.model.as_ref()
    }

    /// Whether it was archived.
    #[must_use]
    pub const fn is_archived(&self) -> bool {
        self.archived
    }

    /// The run currently open in it, if any.
    #[must_use]
    pub const fn open_run(&self) -> Option<RunId> {
        self.open_run
    }

    /// How many messages were ever sent (deleted ones included).
    #[must_use]
    pub const fn message_count(&self) -> u64 {
        self.message_count
    }

    /// What is known about one message.
    #[must_use]
    pub fn message(&self, id: MessageId) -> Option<MessageInfo> {
        self.messages.get(&id).copied()
    }

    /// The latest user message that is not deleted: what a run would answer.
    #[must_use]
    pub fn latest_user_message(&self) -> Option<MessageId> {
        self.user_messages
            .iter()
            .rev()
            .copied()
            .find(|id| self.messages.get(id).is_some_and(|m| !m.deleted))
    }

    /// An estimate of the heap memory this state holds, in bytes. It depends
    /// on the number of messages only, never on their texts.
    #[must_use]
    pub fn approx_heap_bytes(&self) -> usize {
        // hashbrown: one control byte per bucket plus the entries.
        self.messages.capacity() * (size_of::<(MessageId, MessageInfo)>() + 1)
            + self.user_messages.capacity() * size_of::<MessageId>()
            + self.model.as_ref().map_or(0, |m| m.as_str().len())
    }

    pub(crate) fn ensure_owner(&self, by: UserId) -> Result<(), DomainError> {
        if by == self.owner {
            Ok(())
        } else {
            Err(DomainError::NotOwner)
        }
    }

    /// Owner check first (a stranger must not learn that it is archived),
    /// then the archive check.
    pub(crate) fn ensure_open_for(&self, by: UserId) -> Result<(), DomainError> {
        self.ensure_owner(by)?;
        if self.archived {
            return Err(DomainError::Archived);
        }
        Ok(())
    }

    pub(crate) fn ensure_new_message_id(&self, message_id: MessageId) -> Result<(), DomainError> {
        if self.messages.contains_key(&message_id) {
            return Err(DomainError::MessageAlreadyExists { message_id });
        }
        Ok(())
    }

    fn ensure_editable(&self, message_id: MessageId, by: UserId) -> Result<(), DomainError> {
        let info = self
            .messages
            .get(&message_id)
            .filter(|m| !m.deleted)
            .ok_or(DomainError::MessageNotFound { message_id })?;
        if info.author != Author::User || info.author_id != Some(by) {
            return Err(DomainError::NotEditable { message_id });
        }
        Ok(())
    }

    fn existing(state: Option<&Self>) -> Result<&Self, DomainError> {
        state.ok_or(DomainError::NotFound)
    }
}

impl Aggregate for Conversation {
    type Command = ConversationCommand;
    type Event = ConversationEvent;
    const CATEGORY: &'static str = CONVERSATION_CATEGORY;

    fn decide(
        state: Option<&Self>,
        command: ConversationCommand,
    ) -> Result<Vec<ConversationEvent>, DomainError> {
        use ConversationCommand as C;
        let event: ConversationEvent = match command {
            C::Start {
                id,
                owner,
                title,
                system_prompt,
                model,
            } => {
                if state.is_some() {
                    return Err(DomainError::AlreadyExists);
                }
                ConversationStarted {
                    conversation_id: id,
                    owner,
                    title: title.map(Title::into_string),
                    system_prompt: system_prompt.map(SystemPrompt::into_string),
                    model: model.map(ModelName::into_string),
                    redacted: false,
                }
                .into()
            }
            C::SendMessage {
                message_id,
                by,
                text,
            } => {
                let conv = Self::existing(state)?;
                conv.ensure_open_for(by)?;
                conv.ensure_new_message_id(message_id)?;
                MessageSent {
                    message_id,
                    author: Author::User,
                    author_id: Some(by),
                    text: text.into_string(),
                    reply_to: None,
                    run_id: None,
                    redacted: false,
                }
                .into()
            }
            C::EditMessage {
                message_id,
                by,
                text,
            } => {
                let conv = Self::existing(state)?;
                conv.ensure_open_for(by)?;
                conv.ensure_editable(message_id, by)?;
                MessageEdited {
                    message_id,
                    text: text.into_string(),
                    redacted: false,
                }
                .into()
            }
            C::DeleteMessage { message_id, by } => {
                let conv = Self::existing(state)?;
                conv.ensure_open_for(by)?;
                conv.ensure_editable(message_id, by)?;
                MessageDeleted { message_id }.into()
            }
            C::Rename { by, title } => {
                let conv = Self::existing(state)?;
                conv.ensure_open_for(by)?;
                ConversationRenamed {
                    title: title.into_string(),
                    redacted: false,
                }
                .into()
            }
            C::Archive { by } => {
                let conv = Self::existing(state)?;
                conv.ensure_owner(by)?;
                if conv.archived {
                    return Ok(Vec::new());
                }
                ConversationArchived {}.into()
            }
        };
        Ok(vec![event])
    }

    fn evolve(state: Option<Self>, event: &ConversationEvent) -> Option<Self> {
        use ConversationEvent as E;
        let Some(mut conv) = state else {
            return match event {
                E::ConversationStarted(e) => Some(Self {
                    id: e.conversation_id,
                    owner: e.owner,
                    // A stored model name that no longer parses is dropped:
                    // runs then use the configured default.
                    model: e.model.clone().and_then(|m| ModelName::parse(m).ok()),
                    archived: false,
                    messages: HashMap::new(),
                    user_messages: Vec::new(),
                    open_run: None,
                    message_count: 0,
                }),
                _ => None,
            };
        };
        match event {
            E::ConversationStarted(_) | E::MessageEdited(_) | E::ConversationRenamed(_) => {}
            E::MessageSent(e) => {
                conv.messages.insert(
                    e.message_id,
                    MessageInfo {
                        author: e.author,
                        author_id: e.author_id,
                        deleted: false,
                    },
                );
                if e.author == Author::User {
                    conv.user_messages.push(e.message_id);
                }
                conv.message_count += 1;
            }
            E::MessageDeleted(e) => {
                if let Some(m) = conv.messages.get_mut(&e.message_id) {
                    m.deleted = true;
                }
            }
            E::ConversationArchived(_) => conv.archived = true,
            E::RunOpened(e) => conv.open_run = Some(e.run_id),
            E::RunClosed(e) => {
                if conv.open_run == Some(e.run_id) {
                    conv.open_run = None;
                }
            }
        }
        Some(conv)
    }
}

impl AggregateEvent for ConversationEvent {
    type Aggregate = Conversation;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testing::fixtures::*;
    use crate::testing::{given, given_nothing};

    fn send(m: MessageId, by: UserId, s: &str) -> ConversationCommand {
        ConversationCommand::SendMessage {
            message_id: m,
            by,
            text: text(s),
        }
    }

    fn edit(m: MessageId, by: UserId, s: &str) -> ConversationCommand {
        ConversationCommand::EditMessage {
            message_id: m,
            by,
            text: text(s),
        }
    }

    fn delete(m: MessageId, by: UserId) -> ConversationCommand {
        ConversationCommand::DeleteMessage { message_id: m, by }
    }

    fn rename(by: UserId, t: &str) -> ConversationCommand {
        ConversationCommand::Rename {
            by,
            title: Title::parse(t.to_owned()).unwrap(),
        }
    }

    fn start() -> ConversationCommand {
        ConversationCommand::Start {
            id: conversation_id(),
            owner: owner(),
            title: Some(Title::parse("  Trip plans ".to_owned()).unwrap()),
            system_prompt: Some(SystemPrompt::parse("Be brief.".to_owned()).unwrap()),
            model: Some(ModelName::parse("gemini-2.5-flash".to_owned()).unwrap()),
        }
    }

    // ---- starting

    #[test]
    fn a_new_conversation_can_be_started() {
        given_nothing::<Conversation>()
            .when(start())
            .then([ConversationStarted {
                conversation_id: conversation_id(),
                owner: owner(),
                title: Some("Trip plans".to_owned()),
                system_prompt: Some("Be brief.".to_owned()),
                model: Some("gemini-2.5-flash".to_owned()),
                redacted: false,
            }
            .into()]);
    }

    #[test]
    fn a_conversation_cannot_be_started_twice() {
        given([started()])
            .when(start())
            .then_error(DomainError::AlreadyExists);
    }

    #[test]
    fn commands_on_a_conversation_that_does_not_exist_are_not_found() {
        for cmd in [
            send(m(1), owner(), "hi"),
            edit(m(1), owner(), "hi"),
            delete(m(1), owner()),
            rename(owner(), "t"),
            ConversationCommand::Archive { by: owner() },
        ] {
            given_nothing::<Conversation>()
                .when(cmd)
                .then_error(DomainError::NotFound);
        }
    }

    // ---- sending

    #[test]
    fn the_owner_can_send_a_message() {
        given([started()])
            .when(send(m(1), owner(), "  <b>hi</b> 👋 "))
            .then([MessageSent {
                message_id: m(1),
                author: Author::User,
                author_id: Some(owner()),
                text: "  <b>hi</b> 👋 ".to_owned(),
                reply_to: None,
                run_id: None,
                redacted: false,
            }
            .into()]);
    }

    #[test]
    fn a_message_from_someone_else_is_rejected_as_not_found() {
        given([started()])
            .when(send(m(1), stranger(), "hi"))
            .then_error(DomainError::NotOwner);
        assert_eq!(DomainError::NotOwner.http_status(), 404);
    }

    #[test]
    fn a_message_to_an_archived_conversation_is_rejected() {
        given([started(), archived()])
            .when(send(m(1), owner(), "hi"))
            .then_error(DomainError::Archived);
    }

    #[test]
    fn a_stranger_does_not_learn_that_a_conversation_is_archived() {
        given([started(), archived()])
            .when(send(m(1), stranger(), "hi"))
            .then_error(DomainError::NotOwner);
    }

    #[test]
    fn a_message_id_cannot_be_reused() {
        given([started(), user_message(m(1))])
            .when(send(m(1), owner(), "again"))
            .then_error(DomainError::MessageAlreadyExists { message_id: m(1) });
    }

    #[test]
    fn messages_can_be_sent_while_a_run_is_open() {
        given([started(), user_message(m(1)), run_opened(r(1), m(1))])
            .when(send(m(2), owner(), "also"))
            .then([user_message_with(m(2), "also")]);
    }

    // ---- editing and deleting

    #[test]
    fn the_author_can_edit_their_message() {
        given([started(), user_message(m(1))])
            .when(edit(m(1), owner(), "better"))
            .then([MessageEdited {
                message_id: m(1),
                text: "better".to_owned(),
                redacted: false,
            }
            .into()]);
    }

    #[test]
    fn the_author_can_delete_their_message() {
        given([started(), user_message(m(1))])
            .when(delete(m(1), owner()))
            .then([message_deleted(m(1))]);
    }

    #[test]
    fn an_assistant_message_cannot_be_edited_or_deleted() {
        let history = [
            started(),
            user_message(m(1)),
            run_opened(r(1), m(1)),
            assistant_message(m(2), r(1), m(1)),
            run_closed(r(1), RunOutcome::Succeeded),
        ];
        given(history.clone())
            .when(edit(m(2), owner(), "nope"))
            .then_error(DomainError::NotEditable { message_id: m(2) });
        given(history)
            .when(delete(m(2), owner()))
            .then_error(DomainError::NotEditable { message_id: m(2) });
    }

    #[test]
    fn someone_elses_message_cannot_be_edited_or_deleted() {
        // Only reachable through history written by another path (e.g. a
        // system import); the rule holds regardless of who owns the conversation.
        let foreign = MessageSent {
            message_id: m(1),
            author: Author::User,
            author_id: Some(stranger()),
            text: "theirs".to_owned(),
            reply_to: None,
            run_id: None,
            redacted: false,
        };
        given([started(), foreign.clone().into()])
            .when(edit(m(1), owner(), "mine now"))
            .then_error(DomainError::NotEditable { message_id: m(1) });
        given([started(), foreign.into()])
            .when(delete(m(1), owner()))
            .then_error(DomainError::NotEditable { message_id: m(1) });
    }

    #[test]
    fn a_stranger_cannot_edit_or_delete_the_owners_message() {
        given([started(), user_message(m(1))])
            .when(edit(m(1), stranger(), "x"))
            .then_error(DomainError::NotOwner);
        given([started(), user_message(m(1))])
            .when(delete(m(1), stranger()))
            .then_error(DomainError::NotOwner);
    }

    #[test]
    fn a_deleted_message_cannot_be_edited_or_deleted_again() {
        given([started(), user_message(m(1)), message_deleted(m(1))])
            .when(edit(m(1), owner(), "x"))
            .then_error(DomainError::MessageNotFound { message_id: m(1) });
        given([started(), user_message(m(1)), message_deleted(m(1))])
            .when(delete(m(1), owner()))
            .then_error(DomainError::MessageNotFound { message_id: m(1) });
    }

    #[test]
    fn an_unknown_message_cannot_be_edited_or_deleted() {
        given([started(), user_message(m(1))])
            .when(edit(m(9), owner(), "x"))
            .then_error(DomainError::MessageNotFound { message_id: m(9) });
        given([started()])
            .when(delete(m(9), owner()))
            .then_error(DomainError::MessageNotFound { message_id: m(9) });
    }

    #[test]
    fn nothing_can_be_edited_in_an_archived_conversation() {
        given([started(), user_message(m(1)), archived()])
            .when(edit(m(1), owner(), "x"))
            .then_error(DomainError::Archived);
        given([started(), user_message(m(1)), archived()])
            .when(delete(m(1), owner()))
            .then_error(DomainError::Archived);
    }

    // ---- renaming and archiving

    #[test]
    fn the_owner_can_rename_the_conversation() {
        given([started()])
            .when(rename(owner(), " New name "))
            .then([ConversationRenamed {
                title: "New name".to_owned(),
                redacted: false,
            }
            .into()]);
    }

    #[test]
    fn a_stranger_cannot_rename_the_conversation() {
        given([started()])
            .when(rename(stranger(), "Mine"))
            .then_error(DomainError::NotOwner);
    }

    #[test]
    fn an_archived_conversation_cannot_be_renamed() {
        given([started(), archived()])
            .when(rename(owner(), "Late"))
            .then_error(DomainError::Archived);
    }

    #[test]
    fn the_owner_can_archive_the_conversation() {
        given([started(), user_message(m(1))])
            .when(ConversationCommand::Archive { by: owner() })
            .then([archived()]);
    }

    #[test]
    fn archiving_twice_is_an_accepted_no_op() {
        given([started(), archived()])
            .when(ConversationCommand::Archive { by: owner() })
            .then([]);
    }

    #[test]
    fn a_stranger_cannot_archive_the_conversation() {
        given([started()])
            .when(ConversationCommand::Archive { by: stranger() })
            .then_error(DomainError::NotOwner);
        given([started(), archived()])
            .when(ConversationCommand::Archive { by: stranger() })
            .then_error(DomainError::NotOwner);
    }

    // ---- state

    #[test]
    fn the_latest_user_message_skips_deleted_and_assistant_messages() {
        let conv = Conversation::fold(&[
            started(),
            user_message(m(1)),
            user_message(m(2)),
            run_opened(r(1), m(2)),
            assistant_message(m(3), r(1), m(2)),
            run_closed(r(1), RunOutcome::Succeeded),
            message_deleted(m(2)),
        ])
        .unwrap();
        assert_eq!(conv.latest_user_message(), Some(m(1)));
        assert_eq!(conv.open_run(), None);
        assert_eq!(conv.message_count(), 3);
        assert_eq!(
            conv.model().map(ModelName::as_str),
            Some("gemini-2.5-flash")
        );
    }

    #[test]
    fn state_stays_small_however_much_is_written() {
        fn fold_with(text_len: usize) -> Conversation {
            let body = "x".repeat(text_len);
            let mut events = vec![started()];
            for i in 0..10_000u128 {
                events.push(match i % 4 {
                    0 | 1 => user_message_with(m(i), &body),
                    2 => MessageEdited {
                        message_id: m(i - 1),
                        text: body.clone(),
                        redacted: false,
                    }
                    .into(),
                    _ => ConversationRenamed {
                        title: body.clone(),
                        redacted: false,
                    }
                    .into(),
                });
            }
            Conversation::fold(&events).unwrap()
        }
        let small = fold_with(1);
        let large = fold_with(1_000);
        assert_eq!(small.message_count(), 5_000);
        // The state's size depends on how many messages there are, not on
        // what they say: 10 MB of text adds nothing.
        assert_eq!(small.approx_heap_bytes(), large.approx_heap_bytes());
        assert!(
            large.approx_heap_bytes() < 5_000 * 128,
            "{} bytes",
            large.approx_heap_bytes()
        );
    }

    #[test]
    fn evolve_ignores_events_that_cannot_apply() {
        assert_eq!(Conversation::fold(&[user_message(m(1))]), None);
        let once = Conversation::fold(&[started()]).unwrap();
        let twice = Conversation::fold(&[started(), started()]).unwrap();
        assert_eq!(once, twice);
    }
}
