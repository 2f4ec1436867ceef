//! The storage interface every backend implements, and the catch-up subscription
//! built on it once for all backends.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::watch;

use crate::model::{
    AppendOutcome, GlobalPosition, LogFilter, RecordedEvent, StoreError, StreamAppend,
};

/// Which events a redaction rewrites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every event of these streams.
    Streams(Vec<String>),
    /// Every event whose metadata has `key` equal to `value` (e.g. the acting user).
    MetadataEquals { key: String, value: String },
}

/// What a redaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedactReport {
    /// Events whose data changed.
    pub changed: u64,
    /// Every stream with a selected event (changed or not), sorted.
    pub streams: Vec<String>,
}

/// Rewrites an event's data in place; returns whether it changed anything.
pub type Redactor = dyn Fn(&str, &mut Value) -> bool + Send + Sync;

/// One event a redaction selected: global position, stream name, type, data.
pub(crate) type Selected = (GlobalPosition, String, String, Option<Value>);

/// What every backend's redaction does with the events it selected (in one transaction,
/// locked): runs `redactor` over each, and returns the report and the new data of each
/// event it changed, for the backend to write back.
pub(crate) fn redact_selected(
    selected: Vec<Selected>,
    redactor: &Redactor,
) -> (RedactReport, Vec<(GlobalPosition, Value)>) {
    let mut report = RedactReport::default();
    let mut changed = Vec::new();
    for (position, stream, event_type, data) in selected {
        report.streams.push(stream);
        let Some(mut data) = data else { continue };
        if redactor(&event_type, &mut data) {
            changed.push((position, data));
        }
    }
    report.changed = changed.len() as u64;
    report.streams.sort_unstable();
    report.streams.dedup();
    (report, changed)
}

/// An append-only log of events in streams, with commit-ordered global positions.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends events to one or more streams atomically, each stream with its own
    /// expectation. Idempotent by event id (see [`AppendOutcome::replayed`]).
    async fn append(&self, appends: Vec<StreamAppend>) -> Result<AppendOutcome, StoreError>;

    /// Events of a stream from stream position `from` (inclusive), oldest first.
    async fn read_stream(
        &self,
        stream: &str,
        from: i64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Events of a stream below stream position `before` (or from its end), newest
    /// first: how the agent reads a conversation back from the prompt.
    async fn read_stream_backward(
        &self,
        stream: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Events after global position `after` (exclusive), in position order.
    async fn read_log(
        &self,
        filter: &LogFilter,
        after: GlobalPosition,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The stored events with these ids (any order; missing ids are left out).
    async fn read_events_by_id(&self, ids: &[uuid::Uuid])
    -> Result<Vec<RecordedEvent>, StoreError>;

    /// The version (last position) of a stream, or `None` if it has no events.
    async fn stream_version(&self, stream: &str) -> Result<Option<i64>, StoreError>;

    /// The highest committed global position (0 for an empty log).
    async fn head(&self) -> Result<GlobalPosition, StoreError>;

    /// A counter that changes whenever new events may have been committed, by this
    /// process or another. Subscriptions wait on it.
    fn appended(&self) -> watch::Receiver<u64>;

    /// Rewrites the data of the selected events in place (erasure). Positions, ids
    /// and types never change.
    async fn redact(
        &self,
        selection: &Selection,
        redactor: &Redactor,
    ) -> Result<RedactReport, StoreError>;
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriptionItem {
    Event(Box<RecordedEvent>),
    /// Everything committed when the subscription last looked has been delivered;
    /// sent once each time the subscription goes from reading history to waiting.
    CaughtUp(GlobalPosition),
}

/// A catch-up subscription: reads history in batches from an exclusive position,
/// then waits for wake-ups and keeps reading, in global-position order.
#[derive(Debug)]
pub struct Subscription {
    store: Arc<dyn EventStore>,
    filter: LogFilter,
    after: GlobalPosition,
    buffer: std::collections::VecDeque<RecordedEvent>,
    appended: watch::Receiver<u64>,
    caught_up_sent: bool,
    batch: usize,
    poll: Duration,
}

impl std::fmt::Debug for dyn EventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn EventStore")
    }
}

impl Subscription {
    /// Subscribes to `filter` after `after` (exclusive).
    pub fn new(store: Arc<dyn EventStore>, filter: LogFilter, after: GlobalPosition) -> Self {
        let appended = store.appended();
        Self {
            store,
            filter,
            after,
            buffer: std::collections::VecDeque::new(),
            appended,
            caught_up_sent: false,
            batch: 1_000,
            // A safety net only: wake-ups normally arrive within milliseconds.
            poll: Duration::from_secs(1),
        }
    }

    /// Changes the safety-net poll interval (wake-ups normally make it irrelevant).
    #[must_use]
    pub fn with_poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Changes how many events one read fetches.
    #[must_use]
    pub fn with_batch_size(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// The position of the last event delivered.
    pub fn position(&self) -> GlobalPosition {
        self.after
    }

    /// The next event, or a caught-up marker. Errors from the store are returned and
    /// the subscription can be polled again.
    pub async fn next(&mut self) -> Result<SubscriptionItem, StoreError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.after = event.global_position;
                return Ok(SubscriptionItem::Event(Box::new(event)));
            }
            // Mark the counter seen before reading, so an append that lands during the
            // read still wakes the wait below.
            self.appended.borrow_and_update();
            let events = self
                .store
                .read_log(&self.filter, self.after, self.batch)
                .await?;
            if !events.is_empty() {
                self.caught_up_sent = false;
                self.buffer.extend(events);
                continue;
            }
            if !self.caught_up_sent {
                self.caught_up_sent = true;
                return Ok(SubscriptionItem::CaughtUp(self.after));
            }
            if let Ok(Err(_)) = tokio::time::timeout(self.poll, self.appended.changed()).await {
                // The store is gone; fall back to polling rather than spinning.
                tokio::time::sleep(self.poll).await;
            }
        }
    }

    /// The next event, skipping caught-up markers.
    pub async fn next_event(&mut self) -> Result<RecordedEvent, StoreError> {
        loop {
            if let SubscriptionItem::Event(e) = self.next().await? {
                return Ok(*e);
            }
        }
    }
}
