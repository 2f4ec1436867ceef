//! [`Commands`]: load → decide → append, with the aggregate cache, bounded retry on
//! version conflicts, command idempotency and erasure.
//!
//! Every command is counted by aggregate, command and outcome
//! (`colloquy_commands_total`), every version conflict on append
//! (`colloquy_command_conflicts_total`) and every decision made again
//! (`colloquy_command_retries_total`, by reason). docs/OPERATIONS.md lists the metrics.

use std::sync::Arc;

use colloquy_domain::process::{self, ProcessCommand};
use colloquy_domain::{
    AgentRun, Aggregate, CONVERSATION_CATEGORY, Conversation, ConversationCommand, ConversationId,
    DecodeError, DomainError, RunCommand, RunId, UserId,
};
use colloquy_eventstore::{
    AppendOutcome, EventStore, ExpectedVersion, GlobalPosition, NewEvent, Selection, StoreError,
    StreamAppend, StreamWritten,
};
use tracing::instrument;

use crate::cache::{AggregateCache, CacheConfig, Loaded};
use crate::codec;
use crate::context::Context;

/// How many times a command is decided again after a version conflict.
const MAX_ATTEMPTS: usize = 10;

/// Waits a random time before retrying after a conflict with another process, so
/// competing writers spread out (full jitter, capped).
async fn back_off(attempt: usize) {
    let cap = 1_u64 << attempt.min(6);
    let millis = rand::random_range(0..=cap);
    tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
}

/// Most events one command appends (bounds the idempotency look-up).
const MAX_EVENTS_PER_COMMAND: usize = 8;

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Global position of the command's last event (or of the stream's last event
    /// when the command changed nothing): what responses hand back.
    pub position: GlobalPosition,
    /// Each touched stream's version afterwards.
    pub streams: Vec<StreamWritten>,
    /// True when this repeats an earlier request (same idempotency key): nothing
    /// was appended and the first request's result is returned.
    pub replayed: bool,
}

impl Committed {
    /// The version of `stream` after the command.
    pub fn version_of(&self, stream: &str) -> Option<i64> {
        self.streams
            .iter()
            .find(|s| s.stream == stream)
            .map(|s| s.version)
    }
}

impl From<AppendOutcome> for Committed {
    fn from(o: AppendOutcome) -> Self {
        Self {
            position: o.last_position,
            streams: o.streams,
            replayed: o.replayed,
        }
    }
}

/// Errors of command handling.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The domain refused the command (its own status mapping).
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The idempotency key was used before with a different request (422).
    #[error("the idempotency key was already used for a different request")]
    IdempotencyMismatch,
    /// The caller's expected stream version (HTTP `If-Match`) is not the stream's (412).
    #[error("stream {stream} is at version {actual}, not {expected}")]
    VersionMismatch {
        stream: String,
        expected: i64,
        actual: i64,
    },
    /// Conflicting writers kept winning (409; the client may retry).
    #[error("stream {stream} kept changing; gave up after {MAX_ATTEMPTS} attempts")]
    Conflict { stream: String },
    /// A stored event could not be read (500: the log holds something this build
    /// cannot decode).
    #[error("cannot decode event at {stream}/{position}")]
    Decode {
        stream: String,
        position: i64,
        #[source]
        source: DecodeError,
    },
    /// The store failed (503 when unavailable, else 500).
    #[error("event store failure")]
    Store(#[from] StoreError),
}

impl CommandError {
    /// The `outcome` label of `colloquy_commands_total` for this error.
    fn outcome(&self) -> &'static str {
        match self {
            Self::Domain(_) => "refused",
            Self::IdempotencyMismatch => "idempotency_mismatch",
            Self::VersionMismatch { .. } => "version_mismatch",
            Self::Conflict { .. } => "conflict",
            Self::Decode { .. } | Self::Store(_) => "error",
        }
    }
}

/// Counts a handled command: `aggregate` (`conversation`, `run`, `process`), the
/// command's name, and how it ended (`accepted`, including a command that changed
/// nothing; `replayed`, a repeated idempotency key; or the error's kind).
fn observe(
    aggregate: &'static str,
    command: &'static str,
    result: &Result<Committed, CommandError>,
) {
    let outcome = match result {
        Ok(committed) if committed.replayed => "replayed",
        Ok(_) => "accepted",
        Err(error) => error.outcome(),
    };
    metrics::counter!(
        "colloquy_commands_total",
        "aggregate" => aggregate,
        "command" => command,
        "outcome" => outcome,
    )
    .increment(1);
}

/// Counts a decision made again: after a version conflict on append (`conflict`, also
/// counted in `colloquy_command_conflicts_total`) or after a refusal by a cached state
/// that may be stale (`stale_cache`).
fn retried(aggregate: &'static str, reason: &'static str) {
    if reason == "conflict" {
        metrics::counter!("colloquy_command_conflicts_total", "aggregate" => aggregate)
            .increment(1);
    }
    metrics::counter!(
        "colloquy_command_retries_total",
        "aggregate" => aggregate,
        "reason" => reason,
    )
    .increment(1);
}

/// What erasure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgetReport {
    pub events_redacted: u64,
    pub streams: Vec<String>,
}

/// The command side: every write to the log goes through here.
#[derive(Debug, Clone)]
pub struct Commands {
    store: Arc<dyn EventStore>,
    conversations: AggregateCache<Conversation>,
    runs: AggregateCache<AgentRun>,
    /// Commands on one stream in this process take turns, so they never conflict
    /// with each other; only other processes' writes cause retries.
    locks: moka::future::Cache<String, Arc<tokio::sync::Mutex<()>>>,
}

impl Commands {
    pub fn new(store: Arc<dyn EventStore>, cache: CacheConfig) -> Self {
        Self {
            store,
            conversations: AggregateCache::new(cache),
            runs: AggregateCache::new(cache),
            locks: moka::future::Cache::builder()
                .time_to_idle(std::time::Duration::from_secs(60))
                .build(),
        }
    }

    async fn lock(&self, stream: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.locks
            .get_with_by_ref(stream, async { Arc::new(tokio::sync::Mutex::new(())) })
            .await
            .lock_owned()
            .await
    }

    /// The store commands write to.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Handles a command on one conversation.
    #[instrument(skip_all, fields(conversation.id = %id, command = command_name(&command)))]
    pub async fn conversation(
        &self,
        id: ConversationId,
        command: ConversationCommand,
        ctx: &Context,
    ) -> Result<Committed, CommandError> {
        let name = command_name(&command);
        let result = self
            .single_at(&self.conversations, &id.stream_name(), command, None, ctx)
            .await;
        observe("conversation", name, &result);
        result
    }

    /// Handles a command on one conversation only if the stream is at `expected`
    /// (HTTP `If-Match`). The check is the append's own expectation, so it is atomic:
    /// a concurrent write makes this fail with [`CommandError::VersionMismatch`], never
    /// slip through.
    #[instrument(skip_all, fields(conversation.id = %id, command = command_name(&command)))]
    pub async fn conversation_expecting(
        &self,
        id: ConversationId,
        command: ConversationCommand,
        expected: i64,
        ctx: &Context,
    ) -> Result<Committed, CommandError> {
        let name = command_name(&command);
        let result = self
            .single_at(
                &self.conversations,
                &id.stream_name(),
                command,
                Some(expected),
                ctx,
            )
            .await;
        observe("conversation", name, &result);
        result
    }

    /// Handles a command on one run.
    #[instrument(skip_all, fields(run.id = %id))]
    pub async fn run(
        &self,
        id: RunId,
        command: RunCommand,
        ctx: &Context,
    ) -> Result<Committed, CommandError> {
        let name = run_command_name(&command);
        let result = self
            .single_at(&self.runs, &id.stream_name(), command, None, ctx)
            .await;
        observe("run", name, &result);
        result
    }

    /// Handles a command that spans a conversation and a run, appending to both in
    /// one atomic, multi-stream append (conversation events first, so the run's last
    /// event is the command's last position).
    #[instrument(skip_all, fields(conversation.id = %conversation, run.id = %run))]
    pub async fn process(
        &self,
        conversation: ConversationId,
        run: RunId,
        command: ProcessCommand,
        ctx: &Context,
    ) -> Result<Committed, CommandError> {
        let name = process_command_name(&command);
        let result = self.process_at(conversation, run, command, ctx).await;
        observe("process", name, &result);
        result
    }

    async fn process_at(
        &self,
        conversation: ConversationId,
        run: RunId,
        command: ProcessCommand,
        ctx: &Context,
    ) -> Result<Committed, CommandError> {
        if let Some(done) = self.replayed(ctx).await? {
            return Ok(done);
        }
        let conv_stream = conversation.stream_name();
        let run_stream = run.stream_name();
        // Always the conversation first, then the run: one order, no deadlock.
        let _conv_turn = self.lock(&conv_stream).await;
        let _run_turn = self.lock(&run_stream).await;
        let mut fresh = false;
        for attempt in 0..MAX_ATTEMPTS {
            let conv = self.load(&self.conversations, &conv_stream, fresh).await?;
            let run_state = self.load(&self.runs, &run_stream, fresh).await?;
            let decision = match process::decide(
                conv.state.as_ref(),
                run_state.state.as_ref(),
                command.clone(),
            ) {
                Ok(d) => d,
                Err(_) if !fresh => {
                    // The cached state may be stale: decide once more on the log's.
                    fresh = true;
                    retried("process", "stale_cache");
                    continue;
                }
                Err(e) => return self.refused(ctx, e).await,
            };
            if decision.is_empty() {
                return Ok(Committed {
                    position: conv.position.max(run_state.position),
                    streams: vec![
                        StreamWritten {
                            stream: conv_stream,
                            version: conv.version,
                        },
                        StreamWritten {
                            stream: run_stream,
                            version: run_state.version,
                        },
                    ],
                    replayed: false,
                });
            }
            let conv_events: Vec<NewEvent> = decision
                .conversation
                .iter()
                .enumerate()
                .map(|(i, e)| codec::encode(e, ctx, i))
                .collect();
            let offset = conv_events.len();
            let run_events: Vec<NewEvent> = decision
                .run
                .iter()
                .enumerate()
                .map(|(i, e)| codec::encode(e, ctx, offset + i))
                .collect();
            let mut appends = Vec::new();
            if !conv_events.is_empty() {
                appends.push(StreamAppend::new(
                    conv_stream.clone(),
                    ExpectedVersion::Exact(conv.version),
                    conv_events,
                ));
            }
            if !run_events.is_empty() {
                appends.push(StreamAppend::new(
                    run_stream.clone(),
                    ExpectedVersion::Exact(run_state.version),
                    run_events,
                ));
            }
            match self.store.append(appends).await {
                Ok(outcome) => {
                    if outcome.replayed {
                        self.conversations.invalidate(&conv_stream).await;
                        self.runs.invalidate(&run_stream).await;
                    } else {
                        remember(
                            &self.conversations,
                            &conv_stream,
                            conv,
                            &decision.conversation,
                            &outcome,
                        )
                        .await;
                        remember(&self.runs, &run_stream, run_state, &decision.run, &outcome).await;
                    }
                    return Ok(outcome.into());
                }
                Err(StoreError::WrongExpectedVersion { .. }) => {
                    fresh = true;
                    retried("process", "conflict");
                    back_off(attempt).await;
                }
                Err(StoreError::DuplicateEventId { .. }) => return self.duplicate(ctx).await,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CommandError::Conflict {
            stream: conv_stream,
        })
    }

    /// Loads a conversation (for queries that need the aggregate, e.g. ownership).
    pub async fn load_conversation(
        &self,
        id: ConversationId,
    ) -> Result<Loaded<Conversation>, CommandError> {
        self.load(&self.conversations, &id.stream_name(), false)
            .await
    }

    /// Loads a run.
    pub async fn load_run(&self, id: RunId) -> Result<Loaded<AgentRun>, CommandError> {
        self.load(&self.runs, &id.stream_name(), false).await
    }

    /// Loads a run, catching the cached state up with the log first. For a reader
    /// that acts on a state no append of its own would contradict: a dead letter
    /// cached here may have been revived by another process.
    pub async fn reload_run(&self, id: RunId) -> Result<Loaded<AgentRun>, CommandError> {
        self.load(&self.runs, &id.stream_name(), true).await
    }

    /// Erasure: redacts, in place, the text of every event the user wrote and of
    /// every event in the conversations they own (the assistant's replies echo
    /// them). Ids, types and positions stay; see docs/adr/0003.
    #[instrument(skip_all, fields(user.id = %user))]
    pub async fn forget_user(&self, user: UserId) -> Result<ForgetReport, CommandError> {
        let redactor = |event_type: &str, data: &mut serde_json::Value| {
            colloquy_domain::redact(event_type, data)
        };
        let own = self
            .store
            .redact(
                &Selection::MetadataEquals {
                    key: "userId".into(),
                    value: user.to_string(),
                },
                &redactor,
            )
            .await?;
        let conversations: Vec<String> = own
            .streams
            .iter()
            .filter(|s| colloquy_eventstore::category(s) == CONVERSATION_CATEGORY)
            .cloned()
            .collect();
        let replies = self
            .store
            .redact(&Selection::Streams(conversations), &redactor)
            .await?;
        let mut streams = own.streams;
        streams.extend(replies.streams);
        streams.sort_unstable();
        streams.dedup();
        Ok(ForgetReport {
            events_redacted: own.changed + replies.changed,
            streams,
        })
    }

    async fn single_at<A>(
        &self,
        cache: &AggregateCache<A>,
        stream: &str,
        command: A::Command,
        expected: Option<i64>,
        ctx: &Context,
    ) -> Result<Committed, CommandError>
    where
        A: Aggregate + Send + Sync + 'static,
        A::Command: Clone,
    {
        if let Some(done) = self.replayed(ctx).await? {
            return Ok(done);
        }
        let _turn = self.lock(stream).await;
        // With an expectation, decide on the log's state, not a possibly stale cache.
        let mut fresh = expected.is_some();
        for attempt in 0..MAX_ATTEMPTS {
            let loaded = self.load(cache, stream, fresh).await?;
            if let Some(expected) = expected
                && expected != loaded.version
            {
                return Err(CommandError::VersionMismatch {
                    stream: stream.to_owned(),
                    expected,
                    actual: loaded.version,
                });
            }
            let events = match A::decide(loaded.state.as_ref(), command.clone()) {
                Ok(events) => events,
                Err(_) if !fresh => {
                    fresh = true;
                    retried(aggregate_name::<A>(), "stale_cache");
                    continue;
                }
                Err(e) => return self.refused(ctx, e).await,
            };
            if events.is_empty() {
                return Ok(Committed {
                    position: loaded.position,
                    streams: vec![StreamWritten {
                        stream: stream.to_owned(),
                        version: loaded.version,
                    }],
                    replayed: false,
                });
            }
            let new_events = events
                .iter()
                .enumerate()
                .map(|(i, e)| codec::encode(e, ctx, i))
                .collect();
            let append =
                StreamAppend::new(stream, ExpectedVersion::Exact(loaded.version), new_events);
            match self.store.append(vec![append]).await {
                Ok(outcome) => {
                    if outcome.replayed {
                        cache.invalidate(stream).await;
                    } else {
                        remember(cache, stream, loaded, &events, &outcome).await;
                    }
                    return Ok(outcome.into());
                }
                Err(StoreError::WrongExpectedVersion { .. }) => {
                    fresh = true;
                    retried(aggregate_name::<A>(), "conflict");
                    back_off(attempt).await;
                }
                Err(StoreError::DuplicateEventId { .. }) => return self.duplicate(ctx).await,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CommandError::Conflict {
            stream: stream.to_owned(),
        })
    }

    /// A state from the cache, or (when `fresh`, or on a miss) caught up from the log
    /// starting after the cached version.
    async fn load<A>(
        &self,
        cache: &AggregateCache<A>,
        stream: &str,
        fresh: bool,
    ) -> Result<Loaded<A>, CommandError>
    where
        A: Aggregate + Send + Sync + 'static,
    {
        let cached = cache.get(stream).await;
        if !fresh && let Some(hit) = cached {
            return Ok(hit);
        }
        let mut loaded = cached.unwrap_or(Loaded {
            state: None,
            version: -1,
            position: 0,
        });
        loop {
            let page = self
                .store
                .read_stream(stream, loaded.version + 1, 1_000)
                .await?;
            let done = page.len() < 1_000;
            for recorded in &page {
                let event =
                    codec::decode::<A::Event>(recorded).map_err(|source| CommandError::Decode {
                        stream: stream.to_owned(),
                        position: recorded.position,
                        source,
                    })?;
                if let Some(event) = event {
                    loaded.state = A::evolve(loaded.state.take(), &event);
                }
                loaded.version = recorded.position;
                loaded.position = recorded.global_position;
            }
            if done {
                break;
            }
        }
        cache.put(stream, loaded.clone()).await;
        Ok(loaded)
    }

    /// The first result of a request repeated with the same idempotency key, if it
    /// was applied; an error if the key was used for a different request.
    async fn replayed(&self, ctx: &Context) -> Result<Option<Committed>, CommandError> {
        let Some(ids) = ctx.idempotent_event_ids(MAX_EVENTS_PER_COMMAND) else {
            return Ok(None);
        };
        let stored = self.store.read_events_by_id(&ids).await?;
        let Some(first) = stored.first() else {
            return Ok(None);
        };
        let fingerprint = first
            .metadata
            .as_ref()
            .and_then(|m| m.get("requestFingerprint"))
            .and_then(serde_json::Value::as_str);
        let expected = ctx.idempotency.as_ref().map(|i| i.fingerprint.as_str());
        if fingerprint != expected {
            return Err(CommandError::IdempotencyMismatch);
        }
        let mut streams: Vec<StreamWritten> = Vec::new();
        for e in &stored {
            match streams.iter_mut().find(|s| s.stream == e.stream_name) {
                Some(s) => s.version = s.version.max(e.position),
                None => streams.push(StreamWritten {
                    stream: e.stream_name.clone(),
                    version: e.position,
                }),
            }
        }
        Ok(Some(Committed {
            position: stored.iter().map(|e| e.global_position).max().unwrap_or(0),
            streams,
            replayed: true,
        }))
    }

    /// A domain refusal, unless the refusal is because this very request was
    /// already applied (a repeat racing the first).
    async fn refused(&self, ctx: &Context, error: DomainError) -> Result<Committed, CommandError> {
        match self.replayed(ctx).await? {
            Some(done) => Ok(done),
            None => Err(error.into()),
        }
    }

    async fn duplicate(&self, ctx: &Context) -> Result<Committed, CommandError> {
        match self.replayed(ctx).await? {
            Some(done) => Ok(done),
            None => Err(CommandError::IdempotencyMismatch),
        }
    }
}

/// Caches the state after a successful append.
async fn remember<A>(
    cache: &AggregateCache<A>,
    stream: &str,
    before: Loaded<A>,
    events: &[A::Event],
    outcome: &AppendOutcome,
) where
    A: Aggregate + Send + Sync + 'static,
{
    let Some(written) = outcome.streams.iter().find(|s| s.stream == stream) else {
        return;
    };
    let state = events.iter().fold(before.state, A::evolve);
    let position = outcome.last_position;
    cache
        .put(
            stream,
            Loaded {
                state,
                version: written.version,
                position,
            },
        )
        .await;
}

/// The `aggregate` label of an aggregate's commands.
fn aggregate_name<A: Aggregate>() -> &'static str {
    match A::CATEGORY {
        CONVERSATION_CATEGORY => "conversation",
        _ => "run",
    }
}

/// A run command's name, as a label.
fn run_command_name(command: &RunCommand) -> &'static str {
    match command {
        RunCommand::Start { .. } => "start",
        RunCommand::Progress { .. } => "progress",
        RunCommand::ScheduleRetry { .. } => "schedule_retry",
        RunCommand::Complete { .. } => "complete",
        RunCommand::Fail { .. } => "fail",
        RunCommand::Cancel { .. } => "cancel",
        RunCommand::Revive { .. } => "revive",
    }
}

/// A command spanning a conversation and a run, named as a label.
fn process_command_name(command: &ProcessCommand) -> &'static str {
    match command {
        ProcessCommand::RequestRun(_) => "request_run",
        ProcessCommand::SendAndRequestRun(_) => "send_and_request_run",
        ProcessCommand::CompleteRun(_) => "complete_run",
        ProcessCommand::FailRun(_) => "fail_run",
        ProcessCommand::CancelRun(_) => "cancel_run",
        ProcessCommand::ReviveRun(_) => "revive_run",
    }
}

/// A conversation command's name, as a label and a span field.
fn command_name(command: &ConversationCommand) -> &'static str {
    match command {
        ConversationCommand::Start { .. } => "start",
        ConversationCommand::SendMessage { .. } => "send_message",
        ConversationCommand::EditMessage { .. } => "edit_message",
        ConversationCommand::DeleteMessage { .. } => "delete_message",
        ConversationCommand::Rename { .. } => "rename",
        ConversationCommand::Archive { .. } => "archive",
    }
}
