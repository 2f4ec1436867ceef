//! The hub: this process's one subscription to the event feed, fanned out in memory.
//!
//! The feed is the relay's subjects (`<prefix>.ev.>`) on core NATS: one subscription
//! per gateway process, no per-client broker state. NATS is not trusted alone
//! (architecture rule 7): each message names the global position of the event before
//! it (`Colloquy-Previous`); when that is not the last position the hub passed on, it
//! reads the missing range from the log first, and when the feed is quiet it compares
//! its position with the log's head, so an event NATS lost (or a NATS outage) delays
//! delivery but never drops it. The hub passes events on in position order, each once.
//!
//! Each event is annotated once (its conversation, run and owner) and shared as an
//! `Arc` through its owner's `tokio::sync::broadcast` ring: every stream is one user's
//! (a conversation, a run or everything of theirs), so an event wakes only its owner's
//! streams, not every stream of the gateway. Memory is a ring per user with open
//! streams, not a queue per client; a client that falls more than the ring behind is
//! told to reconnect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use colloquy_commands::Commands;
use colloquy_commands::live::{LocalSignals, RunSignals};
use colloquy_domain::{ConversationId, RunId, UserId};
use colloquy_eventstore::wire::{self, Payload};
use colloquy_eventstore::{GlobalPosition, LogFilter, RecordedEvent};
use futures::StreamExt as _;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Live-feed settings.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    /// NATS subject prefix (the relay's).
    pub prefix: String,
    /// Events held per user with open streams (the user's ring); a client further
    /// behind is disconnected with a `retry:` hint.
    pub buffer: usize,
    /// Concurrent SSE streams per user (429 above it).
    pub max_streams_per_user: usize,
    /// Concurrent SSE streams of all users (429 above it).
    pub max_streams: usize,
    /// How long the feed may be quiet before the hub checks the log's head.
    pub idle_check: Duration,
    /// Heartbeat comment interval (at most 15 s by contract).
    pub heartbeat: Duration,
    /// The reconnect delay sent in `retry:` when the server ends a stream.
    pub retry_hint: Duration,
}

impl LiveSettings {
    /// The default cap on one gateway's streams: 10,000, about 230 MB of memory at the
    /// 23 KB a stream costs (docs/PERFORMANCE.md, `bench sse`).
    pub const DEFAULT_MAX_STREAMS: usize = 10_000;
}

impl Default for LiveSettings {
    fn default() -> Self {
        Self {
            prefix: "colloquy".into(),
            buffer: 256,
            max_streams_per_user: 16,
            max_streams: Self::DEFAULT_MAX_STREAMS,
            idle_check: Duration::from_millis(500),
            heartbeat: Duration::from_secs(10),
            retry_hint: Duration::from_secs(2),
        }
    }
}

/// One event as live clients see it, annotated once for all of them.
#[derive(Debug)]
pub struct LiveEvent {
    /// Global position: the SSE `id:`.
    pub position: GlobalPosition,
    /// The real stream name.
    pub stream_name: String,
    /// The event type: the SSE `event:`.
    pub event_type: String,
    /// The conversation it belongs to (its stream, or its run's).
    pub conversation_id: Option<Uuid>,
    /// The run, for `agentRun-…` events.
    pub run_id: Option<Uuid>,
    /// The conversation's owner: who may see it.
    pub owner: Option<UserId>,
    /// The event's data with `conversationId` (and `runId`) added: the SSE `data:`.
    pub data: String,
}

/// The handle every SSE route shares (cheap to clone).
#[derive(Debug, Clone)]
pub struct LiveHub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: LiveSettings,
    commands: Commands,
    nats: Option<async_nats::Client>,
    /// Where the agent's token deltas come from (`None`: no run tokens).
    signals: Option<RunSignals>,
    /// Each user's ring, while they have open streams.
    rings: Mutex<HashMap<UserId, broadcast::Sender<Arc<LiveEvent>>>>,
    /// The last position passed on (or, before the first, the log's head at start).
    position: AtomicI64,
    owners: moka::sync::Cache<Uuid, UserId>,
    run_conversations: moka::sync::Cache<Uuid, Uuid>,
    /// Open streams per user, and of all users.
    streams: Mutex<(HashMap<UserId, usize>, usize)>,
    closed: CancellationToken,
}

/// A place in the per-user stream count; released on drop.
#[derive(Debug)]
pub struct StreamSlot {
    hub: LiveHub,
    user: UserId,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self
            .hub
            .inner
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (per_user, total) = &mut *streams;
        *total = total.saturating_sub(1);
        let mut last = false;
        if let Some(count) = per_user.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_user.remove(&self.user);
                last = true;
            }
        }
        drop(streams);
        if last {
            self.hub.release_ring(self.user);
        }
    }
}

const READ_BATCH: usize = 1000;

impl LiveHub {
    /// A hub over `commands`' store; `nats` is the feed and carries run tokens (`None`:
    /// the log alone, woken by the store's appends, and no tokens).
    pub fn new(
        commands: Commands,
        nats: Option<async_nats::Client>,
        settings: LiveSettings,
    ) -> Self {
        let signals = nats.clone().map(|client| RunSignals::Nats {
            client,
            prefix: settings.prefix.clone(),
        });
        Self::build(commands, nats, signals, settings)
    }

    /// The embedded mode's hub: the log alone, woken in-process by appends, with run
    /// tokens from `signals` (the agent of this process).
    pub fn embedded(commands: Commands, signals: LocalSignals, settings: LiveSettings) -> Self {
        Self::build(commands, None, Some(RunSignals::Local(signals)), settings)
    }

    fn build(
        commands: Commands,
        nats: Option<async_nats::Client>,
        signals: Option<RunSignals>,
        settings: LiveSettings,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                commands,
                nats,
                signals,
                rings: Mutex::new(HashMap::new()),
                position: AtomicI64::new(-1),
                owners: moka::sync::Cache::new(100_000),
                run_conversations: moka::sync::Cache::new(100_000),
                streams: Mutex::new((HashMap::new(), 0)),
                closed: CancellationToken::new(),
            }),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &LiveSettings {
        &self.inner.settings
    }

    /// Where run tokens come from.
    pub(crate) fn signals(&self) -> Option<&RunSignals> {
        self.inner.signals.as_ref()
    }

    /// The command side (loads and the store).
    pub(crate) fn commands(&self) -> &Commands {
        &self.inner.commands
    }

    /// The last position passed on to clients (-1 before the hub started).
    pub fn position(&self) -> GlobalPosition {
        self.inner.position.load(Ordering::Acquire)
    }

    /// Clients connected to the feed.
    pub fn subscribers(&self) -> usize {
        self.rings()
            .values()
            .map(broadcast::Sender::receiver_count)
            .sum()
    }

    /// A receiver of everything of `user`'s passed on from now.
    pub(crate) fn subscribe(&self, user: UserId) -> broadcast::Receiver<Arc<LiveEvent>> {
        let buffer = self.inner.settings.buffer.max(16);
        self.rings()
            .entry(user)
            .or_insert_with(|| broadcast::channel(buffer).0)
            .subscribe()
    }

    fn rings(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<UserId, broadcast::Sender<Arc<LiveEvent>>>> {
        self.inner
            .rings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops `user`'s ring once none of their streams listens to it.
    fn release_ring(&self, user: UserId) {
        let mut rings = self.rings();
        if rings
            .get(&user)
            .is_some_and(|ring| ring.receiver_count() == 0)
        {
            rings.remove(&user);
        }
    }

    /// Cancelled when the hub closes (shutdown): streams end with a `retry:` hint.
    pub(crate) fn closed(&self) -> &CancellationToken {
        &self.inner.closed
    }

    /// Ends every stream (with a `retry:` hint) and stops the hub.
    pub fn close(&self) {
        self.inner.closed.cancel();
    }

    /// Takes one of `user`'s stream slots, or `None` at the user's cap or the
    /// gateway's.
    pub(crate) fn acquire_slot(&self, user: UserId) -> Option<StreamSlot> {
        let mut streams = self
            .inner
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (per_user, total) = &mut *streams;
        if *total >= self.inner.settings.max_streams {
            return None;
        }
        let count = per_user.entry(user).or_insert(0);
        if *count >= self.inner.settings.max_streams_per_user {
            return None;
        }
        *count += 1;
        *total += 1;
        Some(StreamSlot {
            hub: self.clone(),
            user,
        })
    }

    /// Follows the feed until [`LiveHub::close`] or `shutdown`. Never fails: while
    /// Postgres or NATS is away it retries, and clients wait.
    pub async fn run(self, shutdown: CancellationToken) {
        let closed = self.inner.closed.clone();
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = closed.cancelled() => {}
            () = self.follow() => {}
        }
        self.close();
    }

    async fn follow(&self) {
        // Start at the head: live clients see events from the moment they subscribe;
        // older ones come from the log (`Last-Event-ID`).
        let mut delay = Duration::from_millis(100);
        loop {
            match self.inner.commands.store().head().await {
                Ok(head) => {
                    self.inner.position.store(head, Ordering::Release);
                    break;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "live feed: cannot read the log's head; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        let mut feed = match &self.inner.nats {
            Some(nats) => loop {
                match nats
                    .subscribe(wire::filter(&self.inner.settings.prefix, None))
                    .await
                {
                    Ok(subscriber) => break Some(subscriber),
                    Err(error) => {
                        tracing::warn!(error = %error, "live feed: cannot subscribe; following the log meanwhile");
                        self.heal(None).await;
                        tokio::time::sleep(self.inner.settings.idle_check).await;
                    }
                }
            },
            None => None,
        };
        let mut idle = tokio::time::interval(self.inner.settings.idle_check);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Without NATS, the store's own wake-up says when to look (at once in the
        // embedded mode, where every append is made in this process).
        let mut appended = self.inner.commands.store().appended();
        loop {
            let message = match feed.as_mut() {
                Some(subscriber) => tokio::select! {
                    message = subscriber.next() => message,
                    _ = idle.tick() => {
                        self.heal(None).await;
                        continue;
                    }
                },
                None => {
                    tokio::select! {
                        _ = idle.tick() => {}
                        _ = appended.changed() => {}
                    }
                    self.heal(None).await;
                    continue;
                }
            };
            let Some(message) = message else {
                tracing::warn!("live feed: the NATS subscription ended; following the log");
                feed = None;
                continue;
            };
            idle.reset();
            let event: RecordedEvent = match serde_json::from_slice::<Payload>(&message.payload) {
                Ok(payload) => payload.into(),
                Err(error) => {
                    tracing::warn!(error = %error, subject = %message.subject, "live feed: undecodable message; the log will fill in");
                    continue;
                }
            };
            let last = self.position();
            if event.global_position <= last {
                continue;
            }
            let previous = message
                .headers
                .as_ref()
                .and_then(|h| h.get(wire::PREVIOUS))
                .and_then(|v| v.as_str().parse::<GlobalPosition>().ok());
            if previous != Some(last) {
                // Something between is missing here (or the header is): the log has it.
                self.heal(Some(event.global_position - 1)).await;
                if event.global_position <= self.position() {
                    continue;
                }
            }
            self.pass_on(event).await;
        }
    }

    /// Passes on what the log holds after the hub's position, up to `until` (or the
    /// head). Errors are logged; the next quiet moment tries again.
    async fn heal(&self, until: Option<GlobalPosition>) {
        let store = self.inner.commands.store();
        loop {
            let after = self.position();
            if until.is_some_and(|u| after >= u) {
                return;
            }
            let batch = match store.read_log(&LogFilter::All, after, READ_BATCH).await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(error = %error, "live feed: cannot read the log");
                    return;
                }
            };
            let full = batch.len() == READ_BATCH;
            for event in batch {
                if until.is_some_and(|u| event.global_position > u) {
                    return;
                }
                self.pass_on(event).await;
            }
            if !full {
                return;
            }
        }
    }

    async fn pass_on(&self, event: RecordedEvent) {
        let position = event.global_position;
        let live = self.annotate(event).await;
        // Only its owner's streams can show an event; an owner with no open stream has
        // no ring, and an event without an owner concerns no stream.
        if let Some(owner) = live.owner
            && let Some(ring) = self.rings().get(&owner)
        {
            // No receivers is fine: the last stream is closing.
            let _ = ring.send(Arc::new(live));
        }
        self.inner.position.store(position, Ordering::Release);
    }

    /// Annotates an event with its conversation, run and owner.
    pub(crate) async fn annotate(&self, event: RecordedEvent) -> LiveEvent {
        let (category, id) = event
            .stream_name
            .split_once('-')
            .unwrap_or((event.stream_name.as_str(), ""));
        let id = Uuid::try_parse(id).ok();
        let mut data = event.data;
        let (conversation_id, run_id) = match (category, id) {
            ("conversation", Some(conversation)) => {
                if event.event_type == "ConversationStarted"
                    && let Some(owner) = data
                        .get("owner")
                        .and_then(Value::as_str)
                        .and_then(|o| Uuid::try_parse(o).ok())
                {
                    self.inner
                        .owners
                        .insert(conversation, UserId::from_uuid(owner));
                }
                (Some(conversation), None)
            }
            ("agentRun", Some(run)) => {
                if let Some(conversation) = data
                    .get("conversationId")
                    .and_then(Value::as_str)
                    .and_then(|c| Uuid::try_parse(c).ok())
                {
                    self.inner.run_conversations.insert(run, conversation);
                }
                (self.run_conversation(run).await, Some(run))
            }
            _ => (None, None),
        };
        let owner = match conversation_id {
            Some(conversation) => self.owner(conversation).await,
            None => None,
        };
        if let Value::Object(object) = &mut data {
            if let Some(conversation) = conversation_id {
                object
                    .entry("conversationId")
                    .or_insert_with(|| Value::String(conversation.to_string()));
            }
            if let Some(run) = run_id {
                object
                    .entry("runId")
                    .or_insert_with(|| Value::String(run.to_string()));
            }
        }
        LiveEvent {
            position: event.global_position,
            stream_name: event.stream_name,
            event_type: event.event_type,
            conversation_id,
            run_id,
            owner,
            data: data.to_string(),
        }
    }

    /// The owner of a conversation (cached; owners never change).
    pub(crate) async fn owner(&self, conversation: Uuid) -> Option<UserId> {
        if let Some(owner) = self.inner.owners.get(&conversation) {
            return Some(owner);
        }
        let loaded = self
            .inner
            .commands
            .load_conversation(ConversationId::from_uuid(conversation))
            .await
            .ok()?;
        let owner = loaded.state?.owner();
        self.inner.owners.insert(conversation, owner);
        Some(owner)
    }

    /// The conversation of a run (cached).
    pub(crate) async fn run_conversation(&self, run: Uuid) -> Option<Uuid> {
        if let Some(conversation) = self.inner.run_conversations.get(&run) {
            return Some(conversation);
        }
        let loaded = self
            .inner
            .commands
            .load_run(RunId::from_uuid(run))
            .await
            .ok()?;
        let conversation = loaded.state?.conversation_id().as_uuid();
        self.inner.run_conversations.insert(run, conversation);
        Some(conversation)
    }
}
