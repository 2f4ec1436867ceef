//! The agent: takes runs, calls Gemini, and records what happened.
//!
//! - **Consumption.** Every instance pulls from one shared durable JetStream consumer
//!   on `<prefix>.ev.agentRun.*.RunRequested`, so runs spread across instances. Each
//!   instance runs `concurrency` runs at once; a run's message is kept alive with
//!   in-progress acks and acked when the run is settled (completed, failed,
//!   cancelled or scheduled for a retry), so a killed agent's run is redelivered.
//! - **Retries driven by the log.** A failed attempt is retried within the attempt
//!   (full-jitter backoff honouring the server's hint, another project after a 429);
//!   when that is used up, or no key is ready, the run gets `RunRetryScheduled` with a
//!   not-before time from the escalation schedule, and the [`sweep`](Agent::sweep)
//!   brings due runs back (it also finds runs requested but never started, and
//!   attempts whose agent stopped). After the last delay the run fails: a dead letter.
//! - **Exactly once.** Completion appends `RunCompleted`, the reply's `MessageSent`
//!   and `RunClosed` in one multi-stream append with expected versions, and the domain
//!   only accepts it for the running attempt; a run already settled is recognised from
//!   the log and acked without calling Gemini.
//! - **Without a broker** (the embedded mode, [`Transport::Log`]): the agent tails the
//!   log's `agentRun` category with the store's catch-up subscription from a durable
//!   checkpoint, watches for cancellations the same way, and sends token deltas in
//!   memory. A run taken when the process stops is found again by the sweep, as a
//!   lost JetStream message is.
//!
//! Metrics: every run handled, by outcome (`colloquy_agent_runs_total`); retries, within
//! an attempt or scheduled in the log (`colloquy_agent_retries_total`); failed Gemini
//! calls by kind (`colloquy_gemini_failures_total`); tokens Gemini reported
//! (`colloquy_gemini_tokens_total`). docs/OPERATIONS.md lists them all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use chrono::Utc;
use colloquy_commands::live::{LocalSignals, RunSignal, RunSignals};
use colloquy_commands::{CommandError, Commands, Context};
use colloquy_domain::process::{CompleteRun, FailRun, ProcessCommand};
use colloquy_domain::run::Usage;
use colloquy_domain::{
    AgentRun, AssistantText, DomainError, MessageId, Milestone, RunCommand, RunId, RunStatus,
};
use colloquy_eventstore::{GlobalPosition, LogFilter, Subscription, SubscriptionItem, wire};
use futures::StreamExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::backoff::{Backoff, RetryDecision, RetrySchedule};
use crate::context::{ContextError, build_request, estimate_tokens};
use crate::gemini::{
    CallFailure, GeminiClient, KeyEffect, QuotaScope, RetryTimeouts, StreamEvent, UsageMetadata,
};
use crate::keys::{AcquireError, KeyPool, KeyProbe, Outcome, ProbeError, QuotaLimit};

/// The failure recorded when no key is configured: never a silent success.
pub const NO_KEYS: &str = "no Gemini API keys configured";
/// The most conversation events read for a context.
const MAX_CONVERSATION_EVENTS: usize = 100_000;
/// The prefix of a dead letter's failure reason (the domain owns it: only a dead
/// letter may be revived).
pub use colloquy_domain::run::DEAD_LETTER_PREFIX;

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// NATS subject prefix (the relay's).
    pub prefix: String,
    /// The JetStream stream the relay publishes to.
    pub stream: String,
    /// The shared durable consumer's name.
    pub consumer: String,
    /// Runs at once in this instance.
    pub concurrency: usize,
    /// The model when neither run nor conversation names one.
    pub default_model: String,
    /// Escalating delays between attempts (`COLLOQUY_RETRY_DELAYS`).
    pub retry_delays: RetrySchedule,
    /// Retries within an attempt.
    pub backoff: Backoff,
    /// Whether 504s and time limits are retried (they may be billed).
    pub retry_timeouts: RetryTimeouts,
    /// The context budget in (estimated) tokens.
    pub context_tokens: u64,
    /// How long a delivered run may go without an in-progress ack.
    pub ack_wait: Duration,
    /// A running attempt with no event for this long belongs to a stopped agent.
    pub stale_after: Duration,
    /// A requested run not started for this long lost its message.
    pub lost_after: Duration,
    /// How often the sweep looks for due runs.
    pub sweep_every: Duration,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            prefix: "colloquy".into(),
            stream: "COLLOQUY".into(),
            consumer: "agent".into(),
            concurrency: 8,
            default_model: "gemini-2.5-flash".into(),
            retry_delays: RetrySchedule::default(),
            backoff: Backoff::default(),
            retry_timeouts: RetryTimeouts::No,
            context_tokens: 32_000,
            ack_wait: Duration::from_secs(30),
            stale_after: Duration::from_secs(600),
            lost_after: Duration::from_secs(30),
            sweep_every: Duration::from_secs(5),
        }
    }
}

/// Where the sweep finds runs to look at (the runs read model, in the application).
#[async_trait::async_trait]
pub trait DueRuns: Send + Sync + std::fmt::Debug {
    /// Runs that may need the agent now: retries due, requests never started,
    /// attempts silent for `stale_after`.
    async fn due(
        &self,
        lost_after: Duration,
        stale_after: Duration,
    ) -> Result<Vec<RunId>, Box<dyn std::error::Error + Send + Sync>>;
}

/// An error of a collaborator outside this crate (a database, a broker).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The agent's durable place in the log when it tails it ([`Transport::Log`]).
#[async_trait::async_trait]
pub trait Checkpoint: Send + Sync + std::fmt::Debug {
    /// The last position dispatched (0 at first).
    async fn load(&self) -> Result<GlobalPosition, BoxError>;
    /// Records that everything up to `position` has been dispatched.
    async fn save(&self, position: GlobalPosition) -> Result<(), BoxError>;
}

/// How runs reach the agent, and how its live signals leave it.
#[derive(Debug, Clone)]
pub enum Transport {
    /// The shared durable JetStream consumer; cancellations and token deltas on core
    /// NATS (the external mode).
    Nats(async_nats::Client),
    /// The log itself, tailed from `checkpoint`; token deltas to `signals` (the
    /// embedded mode: the gateway in this process relays them).
    Log {
        signals: LocalSignals,
        checkpoint: Arc<dyn Checkpoint>,
    },
}

impl From<async_nats::Client> for Transport {
    fn from(client: async_nats::Client) -> Self {
        Self::Nats(client)
    }
}

/// The category the agent consumes.
const RUN_CATEGORY: &str = "agentRun";

/// How a run came to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Its request, delivered the first time.
    Delivered,
    /// Its request again: the instance that had it stopped acking.
    Redelivered,
    /// The sweep: a retry is due, a request was lost, or an attempt went silent.
    Sweep,
}

/// How handling one run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Nothing to do: settled already, not due, or another agent has it.
    Skipped(&'static str),
    /// The reply was recorded.
    Completed,
    /// The run failed for good (reason).
    Failed(String),
    /// A later attempt was scheduled (reason).
    Retrying(String),
    /// The requester cancelled it.
    Cancelled,
}

/// The agent (cheap to clone).
#[derive(Debug, Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    commands: Commands,
    client: GeminiClient,
    pool: Option<Arc<KeyPool>>,
    transport: Transport,
    signals: RunSignals,
    settings: AgentSettings,
    permits: Arc<Semaphore>,
}

/// Why the agent could not go on with a run; the message is redelivered later.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The log could not be read or written.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The key pool's shared budget store failed.
    #[error(transparent)]
    Budget(#[from] crate::budget::StoreError),
}

/// What one call attempt came to.
enum CallEnd {
    Reply {
        text: String,
        finish_reason: String,
        usage: Option<UsageMetadata>,
    },
    Failed(CallFailure),
    Cancelled,
}

impl Agent {
    /// An agent over `commands`, calling Gemini with `client` and keys from `pool`
    /// (`None`: no keys are configured, and runs fail at once saying so).
    pub fn new(
        commands: Commands,
        client: GeminiClient,
        pool: Option<Arc<KeyPool>>,
        transport: impl Into<Transport>,
        settings: AgentSettings,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        let transport = transport.into();
        let signals = match &transport {
            Transport::Nats(client) => RunSignals::Nats {
                client: client.clone(),
                prefix: settings.prefix.clone(),
            },
            Transport::Log { signals, .. } => RunSignals::Local(signals.clone()),
        };
        Self {
            inner: Arc::new(Inner {
                commands,
                client,
                pool,
                transport,
                signals,
                settings,
                permits,
            }),
        }
    }

    /// Re-probes disabled keys every `every` until `shutdown` (nothing without keys).
    pub fn spawn_key_reprobe(
        &self,
        every: Duration,
        shutdown: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let pool = self.inner.pool.as_ref()?;
        let probe: Arc<dyn KeyProbe> = Arc::new(ClientProbe(self.inner.client.clone()));
        Some(pool.spawn_reprobe(probe, every, shutdown))
    }

    /// Consumes runs and sweeps until `shutdown`; NATS or database trouble is retried.
    pub async fn run(self, due: Option<Arc<dyn DueRuns>>, shutdown: CancellationToken) {
        let mut tasks = Vec::new();
        if let Some(due) = due {
            let agent = self.clone();
            let token = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                agent.sweep_loop(due, token).await;
            }));
        }
        if let Transport::Log { checkpoint, .. } = &self.inner.transport {
            let checkpoint = Arc::clone(checkpoint);
            self.follow_log(checkpoint, &shutdown).await;
            futures::future::join_all(tasks).await;
            return;
        }
        let consumer = loop {
            match self.consumer().await {
                Ok(consumer) => break consumer,
                Err(error) => {
                    tracing::warn!(error = %error, "agent: cannot open the run consumer yet; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        for _ in 0..self.inner.settings.concurrency.max(1) {
            let agent = self.clone();
            let consumer = consumer.clone();
            let token = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                agent.pull_loop(consumer, token).await;
            }));
        }
        futures::future::join_all(tasks).await;
    }

    /// The embedded mode's consumption: every `RunRequested` after the checkpoint, in
    /// log order, each handled within the concurrency limit. The checkpoint moves once
    /// a run is dispatched; one taken when the process stops is the sweep's (a request
    /// never started, an attempt gone silent), as with a lost JetStream message.
    async fn follow_log(&self, checkpoint: Arc<dyn Checkpoint>, shutdown: &CancellationToken) {
        let start = loop {
            match checkpoint.load().await {
                Ok(position) => break position,
                Err(error) => {
                    tracing::warn!(error = %error, "agent: cannot read its checkpoint yet; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let store = Arc::clone(self.inner.commands.store());
        let mut subscription =
            Subscription::new(store, LogFilter::Category(RUN_CATEGORY.into()), start);
        let mut saved = start;
        loop {
            let item = tokio::select! {
                () = shutdown.cancelled() => break,
                item = subscription.next() => item,
            };
            let event = match item {
                Ok(SubscriptionItem::Event(event)) => event,
                Ok(SubscriptionItem::CaughtUp(position)) => {
                    if position > saved {
                        match checkpoint.save(position).await {
                            Ok(()) => saved = position,
                            Err(error) => {
                                tracing::warn!(error = %error, "agent: cannot save its checkpoint");
                            }
                        }
                    }
                    continue;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "agent: cannot read the log; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            };
            if event.event_type != "RunRequested" {
                continue;
            }
            let Some(run) = event
                .stream_name
                .strip_prefix("agentRun-")
                .and_then(|id| Uuid::try_parse(id).ok())
            else {
                continue;
            };
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                permit = Arc::clone(&self.inner.permits).acquire_owned() => permit,
            };
            let Ok(permit) = permit else { break };
            let agent = self.clone();
            let token = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    result = agent.handle(RunId::from_uuid(run), Trigger::Delivered) => match result {
                        Ok(handled) => tracing::debug!(run.id = %run, ?handled, "agent: run settled"),
                        Err(error) => tracing::warn!(run.id = %run, error = %error, "agent: run not settled; the sweep will bring it back"),
                    },
                    () = token.cancelled() => {}
                }
            });
        }
    }

    async fn consumer(&self) -> Result<jetstream::consumer::Consumer<pull::Config>, BoxError> {
        let settings = &self.inner.settings;
        let Transport::Nats(nats) = &self.inner.transport else {
            return Err("the agent has no NATS connection".into());
        };
        let js = jetstream::new(nats.clone());
        let stream = js.get_stream(&settings.stream).await?;
        let filter = format!(
            "{}.ev.{}.*.{}",
            settings.prefix,
            wire::encode_token("agentRun"),
            wire::encode_token("RunRequested")
        );
        let consumer = stream
            .get_or_create_consumer(
                &settings.consumer,
                pull::Config {
                    durable_name: Some(settings.consumer.clone()),
                    filter_subject: filter,
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: settings.ack_wait,
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await?;
        Ok(consumer)
    }

    /// One of `concurrency` loops: fetch one run, handle it, ack it.
    ///
    /// A failed fetch is retried after a pause with the consumer opened again (created
    /// if need be): a NATS server that came back without its JetStream data has neither
    /// the stream (the relay creates it again) nor this consumer.
    async fn pull_loop(
        &self,
        mut consumer: jetstream::consumer::Consumer<pull::Config>,
        shutdown: CancellationToken,
    ) {
        while !shutdown.is_cancelled() {
            let batch = consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_secs(5))
                .messages()
                .await;
            let error = match batch {
                Ok(mut batch) => {
                    let next = tokio::select! {
                        () = shutdown.cancelled() => return,
                        next = batch.next() => next,
                    };
                    match next {
                        Some(Ok(message)) => {
                            self.take_message(message, &shutdown).await;
                            continue;
                        }
                        // No run within the fetch's wait.
                        None => continue,
                        Some(Err(error)) => error,
                    }
                }
                Err(error) => error.into(),
            };
            tracing::warn!(error = %error, "agent: fetch failed; retrying");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match self.consumer().await {
                Ok(reopened) => consumer = reopened,
                Err(error) => {
                    tracing::debug!(error = %error, "agent: cannot open the run consumer yet");
                }
            }
        }
    }

    async fn take_message(&self, message: jetstream::Message, shutdown: &CancellationToken) {
        let run = message
            .headers
            .as_ref()
            .and_then(|h| h.get(wire::STREAM))
            .and_then(|s| s.as_str().strip_prefix("agentRun-"))
            .and_then(|id| Uuid::try_parse(id).ok());
        let Some(run) = run else {
            tracing::warn!(subject = %message.subject, "agent: a run message without a run id; dropped");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        let trigger = if message.info().is_ok_and(|i| i.delivered > 1) {
            Trigger::Redelivered
        } else {
            Trigger::Delivered
        };
        let keep_alive = {
            let message = message.clone();
            let every = self.inner.settings.ack_wait / 3;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if message.ack_with(AckKind::Progress).await.is_err() {
                        return;
                    }
                }
            })
        };
        let result = tokio::select! {
            result = self.handle(RunId::from_uuid(run), trigger) => Some(result),
            () = shutdown.cancelled() => None,
        };
        keep_alive.abort();
        match result {
            Some(Ok(handled)) => {
                tracing::debug!(run.id = %run, ?handled, "agent: run settled");
                let _ = message.ack().await;
            }
            Some(Err(error)) => {
                tracing::warn!(run.id = %run, error = %error, "agent: run not settled; it will be redelivered");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                    .await;
            }
            None => {
                // Shutting down: let another instance have it now.
                let _ = message.ack_with(AckKind::Nak(None)).await;
            }
        }
    }

    async fn sweep_loop(&self, due: Arc<dyn DueRuns>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.settings.sweep_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.sweep(due.as_ref()).await {
                tracing::warn!(error = %error, "agent: sweep failed");
            }
        }
    }

    /// Brings back every due run once (each handled within the concurrency limit).
    ///
    /// # Errors
    /// The read model could not be queried.
    pub async fn sweep(
        &self,
        due: &dyn DueRuns,
    ) -> Result<Vec<(RunId, Handled)>, Box<dyn std::error::Error + Send + Sync>> {
        let settings = &self.inner.settings;
        let runs = due.due(settings.lost_after, settings.stale_after).await?;
        let mut handled = Vec::new();
        for run in runs {
            let _permit = self.inner.permits.acquire().await?;
            match self.handle(run, Trigger::Sweep).await {
                Ok(outcome) => handled.push((run, outcome)),
                Err(error) => {
                    tracing::warn!(run.id = %run, error = %error, "agent: sweep could not settle a run");
                }
            }
        }
        Ok(handled)
    }

    /// Handles one run: whatever state the log says it is in. `trigger` says how it
    /// came: a running attempt is taken over on a redelivery (its holder stopped
    /// acking) or, from the sweep, once it has been silent for `stale_after`.
    ///
    /// # Errors
    /// The log or the budget store failed; nothing was settled.
    #[tracing::instrument(skip(self), fields(run.id = %run))]
    pub async fn handle(&self, run: RunId, trigger: Trigger) -> Result<Handled, AgentError> {
        let result = self.settle(run, trigger).await;
        let outcome = match &result {
            Ok(Handled::Completed) => "completed",
            Ok(Handled::Failed(reason)) if reason.starts_with(DEAD_LETTER_PREFIX) => "dead_letter",
            Ok(Handled::Failed(_)) => "failed",
            Ok(Handled::Retrying(_)) => "retrying",
            Ok(Handled::Cancelled) => "cancelled",
            Ok(Handled::Skipped(_)) => "skipped",
            Err(_) => "error",
        };
        metrics::counter!("colloquy_agent_runs_total", "outcome" => outcome).increment(1);
        result
    }

    /// [`Agent::handle`], uncounted.
    async fn settle(&self, run: RunId, trigger: Trigger) -> Result<Handled, AgentError> {
        let commands = &self.inner.commands;
        let mut loaded = commands.load_run(run).await?;
        if loaded.state.as_ref().is_some_and(AgentRun::is_dead_letter) {
            // The one settled state that can change: an operator may have revived it
            // since this process cached it (the sweep brings revived runs here).
            loaded = commands.reload_run(run).await?;
        }
        let Some(state) = loaded.state else {
            return Ok(Handled::Skipped("no such run"));
        };
        match state.status() {
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled => {
                return Ok(Handled::Skipped("already settled"));
            }
            RunStatus::RetryScheduled if state.not_before().is_some_and(|t| t > Utc::now()) => {
                return Ok(Handled::Skipped("not due yet"));
            }
            _ => {}
        }
        // Read once, only for a run there is work on: the request's model, instructions
        // and trace.
        let requested = commands
            .store()
            .read_stream(&run.stream_name(), 0, 1)
            .await
            .map_err(CommandError::from)?;
        let request_data = requested
            .first()
            .map(|e| e.data.clone())
            .unwrap_or_default();
        // The work is a span in the request's trace, and the events it appends carry
        // it on (the requester's context).
        let traceparent = requested
            .first()
            .and_then(wire::traceparent)
            .map(str::to_owned);
        let span = tracing::info_span!("agent.run", run.id = %run, attempt = state.attempt());
        colloquy_eventstore::trace::continue_from(&span, traceparent.as_deref());
        async move {
            let ctx = Context::new(state.requested_by())
                .with_traceparent(colloquy_eventstore::trace::current().or(traceparent));
            if state.status() == RunStatus::Running {
                let take_over = match trigger {
                    Trigger::Delivered => false,
                    Trigger::Redelivered => true,
                    Trigger::Sweep => {
                        self.silent_for(run, self.inner.settings.stale_after)
                            .await?
                    }
                };
                if !take_over {
                    return Ok(Handled::Skipped("another agent is running it"));
                }
                // Its agent stopped mid-attempt: close that attempt, retry now.
                let attempt = state.attempt();
                match commands
                    .run(
                        run,
                        RunCommand::ScheduleRetry {
                            attempt,
                            reason: format!("the agent running attempt {attempt} stopped"),
                            not_before: Utc::now(),
                        },
                        &ctx,
                    )
                    .await
                {
                    Ok(_) => retried("taken_over"),
                    Err(CommandError::Domain(_)) => return Ok(Handled::Skipped("moved on")),
                    Err(error) => return Err(error.into()),
                }
            }
            let Some(pool) = self.inner.pool.clone() else {
                return self.fail(&state, NO_KEYS.to_owned(), &ctx).await;
            };
            self.attempt(&state, &request_data, &pool, &ctx).await
        }
        .instrument(span)
        .await
    }

    /// Whether the run's last event is older than `quiet`.
    async fn silent_for(&self, run: RunId, quiet: Duration) -> Result<bool, AgentError> {
        let store = self.inner.commands.store();
        let last = store
            .read_stream_backward(&run.stream_name(), None, 1)
            .await
            .map_err(CommandError::from)?;
        Ok(last.first().is_none_or(|event| {
            Utc::now() - event.time > chrono::Duration::from_std(quiet).unwrap_or_default()
        }))
    }

    /// One attempt: start, build the context, call (with short retries), record.
    async fn attempt(
        &self,
        run: &AgentRun,
        request_data: &serde_json::Value,
        pool: &KeyPool,
        ctx: &Context,
    ) -> Result<Handled, AgentError> {
        let commands = &self.inner.commands;
        let settings = &self.inner.settings;
        let run_id = run.id();
        // The conversation, read now: the prompt, the history, the system prompt.
        let conversation = run.conversation_id();
        let events = commands
            .store()
            .read_stream(&conversation.stream_name(), 0, MAX_CONVERSATION_EVENTS)
            .await
            .map_err(CommandError::from)?;
        let instructions = request_data
            .get("instructions")
            .and_then(serde_json::Value::as_str);
        let model = request_data
            .get("model")
            .and_then(serde_json::Value::as_str)
            .unwrap_or(&settings.default_model)
            .to_owned();
        let request = match build_request(
            &events,
            run.prompt_message_id(),
            instructions,
            None,
            settings.context_tokens,
        ) {
            Ok(request) => request,
            Err(ContextError::PromptMissing) => {
                return self
                    .fail(run, "the message to answer was deleted".into(), ctx)
                    .await;
            }
            Err(error) => return self.fail(run, error.to_string(), ctx).await,
        };
        let estimate: u64 = request
            .contents
            .iter()
            .map(|c| estimate_tokens(&c.text()))
            .sum();
        let mut lease = match pool.acquire(estimate).await {
            Ok(lease) => lease,
            Err(AcquireError::NotReady { until }) => {
                return self
                    .retry_later(
                        run.into(),
                        "no Gemini key has budget now".into(),
                        Some(until),
                        ctx,
                    )
                    .await;
            }
            Err(AcquireError::NoUsableKey) => {
                // An outage only an operator can end (keys revoked, projects
                // suspended): each wait moves along the schedule, so a run that waits
                // past its last delay dead-letters instead of waiting for good.
                return self
                    .retry_later(
                        waiting_for_a_key(run),
                        "every Gemini key is disabled".into(),
                        None,
                        ctx,
                    )
                    .await;
            }
            Err(AcquireError::Store(error)) => return Err(error.into()),
        };
        let attempt = run.next_attempt();
        match commands
            .run(
                run_id,
                RunCommand::Start {
                    attempt,
                    key_label: lease.label().to_owned(),
                    // `loading_context`: the attempt prepares its call (the conversation
                    // was read and fitted before the lease, which needs its token
                    // estimate); `waiting_for_model`: the call is next. Both in the start's
                    // append: one commit between the request and the call.
                    milestones: vec![
                        Milestone::new("loading_context", 5),
                        Milestone::new("waiting_for_model", 10),
                    ],
                },
                ctx,
            )
            .await
        {
            Ok(_) => {}
            Err(CommandError::Domain(_)) => {
                pool.report(lease, Outcome::NotSent).await?;
                return Ok(Handled::Skipped("another agent started it"));
            }
            Err(error) => {
                pool.report(lease, Outcome::NotSent).await?;
                return Err(error.into());
            }
        }
        // The milestones after the start's two: `streaming` (from the first token, then at
        // most once a second), `saving`.
        let mut retries = settings.backoff.start();
        let mut tokens_sent = false;
        loop {
            let started = Instant::now();
            let end = self
                .call(
                    run_id,
                    attempt,
                    lease.key(),
                    &model,
                    &request,
                    &mut tokens_sent,
                    ctx,
                )
                .await;
            tracing::debug!(elapsed = ?started.elapsed(), "agent: call ended");
            let failure = match end {
                CallEnd::Reply {
                    text,
                    finish_reason,
                    usage,
                } => {
                    if let Some(usage) = &usage {
                        metrics::counter!("colloquy_gemini_tokens_total", "kind" => "prompt")
                            .increment(usage.prompt_token_count);
                        metrics::counter!("colloquy_gemini_tokens_total", "kind" => "candidates")
                            .increment(usage.candidates_token_count);
                    }
                    let tokens = usage.as_ref().map_or(estimate, |u| u.prompt_token_count);
                    // The reply is in hand (and paid for): an unrecorded usage (the budget
                    // store away, NATS down) leaves the window at the estimate, and is no
                    // reason to lose the reply and call Gemini again.
                    if let Err(error) = pool.report(lease, Outcome::Success { tokens }).await {
                        tracing::warn!(error = %error, "agent: the call's usage was not recorded");
                    }
                    return self
                        .complete(run, attempt, text, finish_reason, usage, ctx)
                        .await;
                }
                CallEnd::Cancelled => {
                    pool.report(lease, Outcome::RequestFailed).await?;
                    return Ok(Handled::Cancelled);
                }
                CallEnd::Failed(failure) => failure,
            };
            metrics::counter!("colloquy_gemini_failures_total", "kind" => failure.kind())
                .increment(1);
            let reason = failure.reason();
            tracing::info!(attempt, reason = %reason, "agent: Gemini call failed");
            let effect = failure.key_effect();
            pool.report(lease, outcome_of(&failure)).await?;
            if tokens_sent {
                self.signal(
                    run_id,
                    RunSignal::Reset {
                        attempt: attempt + 1,
                    },
                )
                .await;
                tokens_sent = false;
            }
            if !failure.is_retryable(settings.retry_timeouts) {
                return self.fail(run, reason, ctx).await;
            }
            let hint = match effect {
                // Another project may be ready now: no wait for the hint.
                KeyEffect::CoolProject { .. }
                | KeyEffect::ExhaustProjectForDay
                | KeyEffect::DisableKey { .. } => Some(Duration::ZERO),
                _ => failure.retry_after(),
            };
            let Some(delay) = retries.next_delay(hint) else {
                return self
                    .retry_later(run_attempted(run, attempt), reason, None, ctx)
                    .await;
            };
            retried("in_attempt");
            tokio::time::sleep(delay).await;
            lease = match pool.acquire(estimate).await {
                Ok(lease) => lease,
                Err(AcquireError::NotReady { until }) => {
                    return self
                        .retry_later(run_attempted(run, attempt), reason, Some(until), ctx)
                        .await;
                }
                Err(AcquireError::NoUsableKey) => {
                    return self
                        .retry_later(run_attempted(run, attempt), reason, None, ctx)
                        .await;
                }
                Err(AcquireError::Store(error)) => return Err(error.into()),
            };
        }
    }

    /// One streamed call: tokens go out live, progress moves, cancellation stops it.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        run: RunId,
        attempt: u32,
        key: &secrecy::SecretString,
        model: &str,
        request: &crate::gemini::GenerateContentRequest,
        tokens_sent: &mut bool,
        ctx: &Context,
    ) -> CallEnd {
        let cancelled = self.watch_cancel(run).await;
        // However the call ends, the watchers of its cancellation end with it (each holds
        // a subscription, on NATS or to the log, that would otherwise outlive the call).
        let _stop_watching = cancelled.clone().drop_guard();
        let call = async {
            let mut stream = match self.inner.client.stream_generate(key, model, request).await {
                Ok(stream) => stream,
                Err(failure) => return CallEnd::Failed(failure),
            };
            let mut text = String::new();
            let mut usage = None;
            // `None` until the first token, which is recorded at once.
            let mut last_progress: Option<Instant> = None;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(StreamEvent::Text(delta)) => {
                        text.push_str(&delta);
                        *tokens_sent = true;
                        self.signal(
                            run,
                            RunSignal::Token {
                                attempt,
                                text: delta,
                            },
                        )
                        .await;
                        if last_progress.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                            last_progress = Some(Instant::now());
                            // 20 → 90 as the reply grows (a guess: replies of ~2,000
                            // characters are typical).
                            let percent = 20 + (text.len().min(2_000) * 70 / 2_000) as u8;
                            self.progress(run, attempt, "streaming", percent, ctx).await;
                        }
                    }
                    Ok(StreamEvent::Usage(running)) => usage = Some(running),
                    Ok(StreamEvent::Finished {
                        reason,
                        usage: last,
                    }) => {
                        return CallEnd::Reply {
                            text,
                            finish_reason: reason.as_str().to_owned(),
                            usage: last.or(usage),
                        };
                    }
                    Err(failure) => return CallEnd::Failed(failure),
                }
            }
            CallEnd::Failed(CallFailure::Incomplete)
        }
        .instrument(tracing::info_span!(
            "gemini.stream_generate",
            otel.kind = "client",
            gemini.model = model,
            attempt,
        ));
        tokio::select! {
            end = call => end,
            () = cancelled.cancelled() => CallEnd::Cancelled,
        }
    }

    /// A token cancelled when the run's `RunCancelled` goes by (on NATS, or in the log).
    async fn watch_cancel(&self, run: RunId) -> CancellationToken {
        let token = CancellationToken::new();
        let nats = match &self.inner.transport {
            Transport::Nats(nats) => nats,
            Transport::Log { .. } => {
                self.watch_cancel_in_log(run, &token).await;
                return token;
            }
        };
        let subject = wire::subject(
            &self.inner.settings.prefix,
            &run.stream_name(),
            "RunCancelled",
        );
        if let Ok(mut subscriber) = nats.subscribe(subject).await {
            let token = token.clone();
            let guard = token.clone().drop_guard();
            tokio::spawn(async move {
                let _guard = guard;
                tokio::select! {
                    _ = subscriber.next() => {}
                    () = token.cancelled() => {}
                }
            });
        }
        // While NATS is out of reach no `RunCancelled` comes by: look in the run's own
        // stream instead, every couple of seconds, for as long as the outage lasts.
        let (nats, store, token_for_log) = (
            nats.clone(),
            Arc::clone(self.inner.commands.store()),
            token.clone(),
        );
        let stream = run.stream_name();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = token_for_log.cancelled() => return,
                    () = tokio::time::sleep(CANCEL_CHECK_WHILE_NATS_IS_DOWN) => {}
                }
                if nats.connection_state() == async_nats::connection::State::Connected {
                    continue;
                }
                if let Ok(last) = store.read_stream_backward(&stream, None, 1).await
                    && last.first().is_some_and(|e| e.event_type == "RunCancelled")
                {
                    token_for_log.cancel();
                    return;
                }
            }
        });
        token
    }

    /// Cancels `token` when the run's `RunCancelled` is appended (a subscription to the
    /// run category from the head; the caller checked the run's state before).
    async fn watch_cancel_in_log(&self, run: RunId, token: &CancellationToken) {
        let store = Arc::clone(self.inner.commands.store());
        let Ok(head) = store.head().await else { return };
        let mut subscription =
            Subscription::new(store, LogFilter::Category(RUN_CATEGORY.into()), head);
        let stream = run.stream_name();
        let token = token.clone();
        let guard = token.clone().drop_guard();
        tokio::spawn(async move {
            let _guard = guard;
            let cancelled = async {
                loop {
                    match subscription.next_event().await {
                        Ok(e) if e.stream_name == stream && e.event_type == "RunCancelled" => {
                            return;
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
            };
            tokio::select! {
                () = cancelled => {}
                () = token.cancelled() => {}
            }
        });
    }

    async fn signal(&self, run: RunId, signal: RunSignal) {
        // At most once, in order: a lost token is only a flicker; the reply is durable.
        self.inner.signals.publish(run.as_uuid(), &signal).await;
    }

    async fn progress(&self, run: RunId, attempt: u32, stage: &str, percent: u8, ctx: &Context) {
        let command = RunCommand::Progress {
            attempt,
            stage: stage.to_owned(),
            percent,
        };
        if let Err(error) = self.inner.commands.run(run, command, ctx).await {
            tracing::debug!(error = %error, "agent: progress not recorded");
        }
    }

    async fn complete(
        &self,
        run: &AgentRun,
        attempt: u32,
        text: String,
        finish_reason: String,
        usage: Option<UsageMetadata>,
        ctx: &Context,
    ) -> Result<Handled, AgentError> {
        let Ok(text) = AssistantText::parse(text) else {
            return self
                .fail(run, "the model returned no usable text".into(), ctx)
                .await;
        };
        self.progress(run.id(), attempt, "saving", 95, ctx).await;
        let usage = usage.map(|u| Usage {
            prompt_tokens: u.prompt_token_count,
            candidates_tokens: u.candidates_token_count,
            total_tokens: u.total_token_count,
            thoughts_tokens: (u.thoughts_token_count > 0).then_some(u.thoughts_token_count),
        });
        let command = ProcessCommand::CompleteRun(CompleteRun {
            attempt,
            reply_message_id: reply_id(run.id(), attempt),
            text,
            finish_reason,
            usage: usage.unwrap_or_default(),
        });
        match self
            .inner
            .commands
            .process(run.conversation_id(), run.id(), command, ctx)
            .await
        {
            Ok(_) => Ok(Handled::Completed),
            Err(CommandError::Domain(DomainError::RunTerminal { .. })) => {
                Ok(Handled::Skipped("settled meanwhile"))
            }
            Err(CommandError::Domain(error)) => {
                tracing::info!(error = %error, "agent: the reply was not recorded");
                Ok(Handled::Skipped("the run moved on"))
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn fail(
        &self,
        run: &AgentRun,
        reason: String,
        ctx: &Context,
    ) -> Result<Handled, AgentError> {
        let command = ProcessCommand::FailRun(FailRun {
            reason: reason.clone(),
        });
        match self
            .inner
            .commands
            .process(run.conversation_id(), run.id(), command, ctx)
            .await
        {
            Ok(_) => Ok(Handled::Failed(reason)),
            Err(CommandError::Domain(_)) => Ok(Handled::Skipped("settled meanwhile")),
            Err(error) => Err(error.into()),
        }
    }

    /// Schedules the next attempt per the escalation (no earlier than `until`), or,
    /// when the schedule is used up, fails the run: a dead letter.
    async fn retry_later(
        &self,
        run: RunProgress,
        reason: String,
        until: Option<chrono::DateTime<Utc>>,
        ctx: &Context,
    ) -> Result<Handled, AgentError> {
        let RunProgress {
            run,
            attempt,
            waits,
        } = run;
        let retry = attempt.max(1).saturating_add(waits);
        let delay = match self.inner.settings.retry_delays.decide(retry) {
            RetryDecision::RetryAfter(delay) => delay,
            RetryDecision::DeadLetter => {
                let waited = match waits {
                    0 => String::new(),
                    1 => " and 1 wait for a usable key".to_owned(),
                    n => format!(" and {n} waits for a usable key"),
                };
                let reason =
                    format!("{DEAD_LETTER_PREFIX} after {attempt} attempts{waited}: {reason}");
                return self.fail(&run, reason, ctx).await;
            }
        };
        let escalated = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        let not_before = until.map_or(escalated, |u| u.max(escalated));
        match self
            .inner
            .commands
            .run(
                run.id(),
                RunCommand::ScheduleRetry {
                    attempt,
                    reason: reason.clone(),
                    not_before,
                },
                ctx,
            )
            .await
        {
            Ok(_) => {
                retried("scheduled");
                Ok(Handled::Retrying(reason))
            }
            Err(CommandError::Domain(_)) => Ok(Handled::Skipped("settled meanwhile")),
            Err(error) => Err(error.into()),
        }
    }
}

/// The cheap call that tells whether Gemini takes a key again (`GET /v1beta/models`):
/// a key is rejected only when the failure would disable it; anything else (a network
/// error, an overload) is inconclusive and leaves it as it was.
#[derive(Debug, Clone)]
pub struct ClientProbe(pub GeminiClient);

#[async_trait::async_trait]
impl KeyProbe for ClientProbe {
    async fn probe(&self, key: &secrecy::SecretString) -> Result<(), ProbeError> {
        match self.0.probe(key).await {
            Ok(()) => Ok(()),
            Err(failure) => match failure.key_effect() {
                KeyEffect::DisableKey { reason } => Err(ProbeError::Rejected(reason)),
                _ => Err(ProbeError::Inconclusive(failure.reason())),
            },
        }
    }
}

/// How often a call under way looks in its run's stream for a cancellation while NATS,
/// which carries them, is out of reach.
const CANCEL_CHECK_WHILE_NATS_IS_DOWN: Duration = Duration::from_secs(2);

/// A run and the attempt it is at (the current one, which may have just failed), and
/// how many steps of the retry schedule it has already waited since that attempt
/// started beyond the attempt's own (see [`waiting_for_a_key`]).
struct RunProgress {
    run: AgentRun,
    attempt: u32,
    waits: u32,
}

impl From<&AgentRun> for RunProgress {
    fn from(run: &AgentRun) -> Self {
        Self {
            run: run.clone(),
            attempt: run.attempt(),
            waits: 0,
        }
    }
}

fn run_attempted(run: &AgentRun, attempt: u32) -> RunProgress {
    RunProgress {
        run: run.clone(),
        attempt,
        waits: 0,
    }
}

/// A run that found every key disabled: the retries it was scheduled since its
/// latest attempt started count as steps of the schedule, so its waits grow (1 min,
/// 10 min, 1 h, 1 day by default) and it dead-letters after the last. A run that only
/// waits for budget (keys cooling, quotas spent) is not escalated: its wait ends at a
/// known time without anyone acting.
fn waiting_for_a_key(run: &AgentRun) -> RunProgress {
    RunProgress {
        run: run.clone(),
        attempt: run.attempt(),
        waits: run.waits(),
    }
}

/// The reply's message id: derived from run and attempt, so a repeated completion
/// append is the same append.
pub fn reply_id(run: RunId, attempt: u32) -> MessageId {
    MessageId::from_uuid(Uuid::new_v5(
        &run.as_uuid(),
        format!("reply-{attempt}").as_bytes(),
    ))
}

/// Counts a retry: `in_attempt` (the same attempt calls Gemini again after a backoff),
/// `scheduled` (`RunRetryScheduled`: a later attempt, from the escalation schedule) or
/// `taken_over` (an attempt whose agent stopped, closed to be retried now).
fn retried(kind: &'static str) {
    metrics::counter!("colloquy_agent_retries_total", "kind" => kind).increment(1);
}

/// What a failure means for the key pool.
fn outcome_of(failure: &CallFailure) -> Outcome {
    let quota = |failure: &CallFailure| match failure {
        CallFailure::RateLimited {
            quota_id: Some(id),
            quota_value: Some(value),
            ..
        } => QuotaLimit::from_violation(id, *value),
        _ => None,
    };
    match failure {
        CallFailure::RateLimited {
            scope: QuotaScope::PerDay,
            ..
        } => Outcome::DailyExhausted {
            quota: quota(failure),
        },
        CallFailure::RateLimited { retry_after, .. } => Outcome::RateLimited {
            retry_after: *retry_after,
            quota: quota(failure),
        },
        CallFailure::KeyInvalid { .. } => Outcome::KeyInvalid {
            reason: failure.reason(),
        },
        CallFailure::KeyUnusable { .. } | CallFailure::Precondition { .. } => {
            Outcome::KeyUnusable {
                reason: failure.reason(),
            }
        }
        _ => match failure.key_effect() {
            KeyEffect::Backoff { .. } => Outcome::ServerError {
                detail: failure.reason(),
            },
            _ => Outcome::RequestFailed,
        },
    }
}
