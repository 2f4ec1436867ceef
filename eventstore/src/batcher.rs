//! Group commit: concurrent appends queue here and a writer task takes them as one
//! batch, so one ordering lock, one round of reads and one commit (one WAL flush on
//! Postgres) serve many appends. See docs/adr/0002-commit-ordered-positions.md.
//!
//! Every append through here is counted (`colloquy_appends_total` by outcome,
//! `colloquy_appended_events_total`) and timed from queueing to its result
//! (`colloquy_append_duration_seconds`); each batch's size is observed
//! (`colloquy_append_batch_appends`). docs/OPERATIONS.md lists the metrics.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::model::{AppendOutcome, StoreError, StreamAppend};

/// A backend's half of group commit: write a batch under the ordering lock.
#[async_trait]
pub trait BatchWriter: Send + Sync + 'static {
    /// Writes the requests as one transaction and returns one result per request, in
    /// order. An `Err` means the transaction as a whole failed (nothing was written,
    /// or, if the commit itself failed, it is unknown whether it was).
    async fn write_batch(
        &self,
        requests: &[&[StreamAppend]],
    ) -> Result<Vec<Result<AppendOutcome, StoreError>>, StoreError>;
}

struct Request {
    appends: Vec<StreamAppend>,
    reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
}

/// Handle that queues appends for the writer tasks.
#[derive(Debug, Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Request>,
}

/// Tuning for group commit.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Writer tasks (each holds one connection while it writes). One is the default:
    /// with two, the writer waiting for the ordering lock has already fixed its batch,
    /// so batches halve and throughput drops (measured in docs/PERFORMANCE.md).
    pub writers: usize,
    /// Most appends in one batch.
    pub max_requests: usize,
    /// Most events in one batch (a large append still goes alone).
    pub max_events: usize,
    /// How many times, at most, the writer yields to the runtime before taking a batch
    /// when the previous batch had company (more than one append), so that the callers
    /// it just answered can queue their next appends and join this batch (0: never).
    /// Yielding stops as soon as one yield adds nothing to the queue.
    pub gather_yields: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            writers: 1,
            max_requests: 256,
            max_events: 2_000,
            gather_yields: 8,
        }
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("streams", &self.appends.len())
            .finish_non_exhaustive()
    }
}

impl Batcher {
    /// Starts the writer tasks. `appended` is bumped after every commit so in-process
    /// subscribers wake without waiting for a database notification.
    pub fn start(
        writer: Arc<dyn BatchWriter>,
        config: BatchConfig,
        appended: watch::Sender<u64>,
    ) -> Self {
        let (queue, rx) = mpsc::channel::<Request>(config.max_requests * 4);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let appended = Arc::new(appended);
        for n in 0..config.writers.max(1) {
            let rx = Arc::clone(&rx);
            let writer = Arc::clone(&writer);
            let appended = Arc::clone(&appended);
            tokio::spawn(
                async move {
                    let mut company = false;
                    loop {
                        let batch = {
                            let mut rx = rx.lock().await;
                            let Some(first) = rx.recv().await else { return };
                            if company {
                                gather(&rx, config.gather_yields).await;
                            }
                            let mut events: usize =
                                first.appends.iter().map(|a| a.events.len()).sum();
                            let mut batch = vec![first];
                            while batch.len() < config.max_requests && events < config.max_events {
                                match rx.try_recv() {
                                    Ok(next) => {
                                        events += next
                                            .appends
                                            .iter()
                                            .map(|a| a.events.len())
                                            .sum::<usize>();
                                        batch.push(next);
                                    }
                                    Err(_) => break,
                                }
                            }
                            batch
                        };
                        company = batch.len() > 1;
                        run_batch(writer.as_ref(), batch).await;
                        appended.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
                .instrument(tracing::debug_span!("append_writer", writer = n)),
            );
        }
        Self { queue }
    }

    /// Queues an append and waits for its result.
    pub async fn append(&self, appends: Vec<StreamAppend>) -> Result<AppendOutcome, StoreError> {
        let started = Instant::now();
        let events: usize = appends.iter().map(|a| a.events.len()).sum();
        let (reply, result) = oneshot::channel();
        let result = match self.queue.send(Request { appends, reply }).await {
            Ok(()) => result.await.unwrap_or(Err(StoreError::Closed)),
            Err(_) => Err(StoreError::Closed),
        };
        observe(&result, events, started);
        result
    }
}

/// Lets the callers of the batch just answered queue again before the next batch is
/// taken. They were woken by their replies and usually append again at once (the next
/// message of a busy client, a writer loop); a batch taken immediately would leave them
/// for the batch after, so under steady concurrency batches alternate between two
/// halves of the callers, and each commit serves half of them. A yield lets every task
/// the runtime has ready run first (tokio defers a yielded task until the worker has
/// polled its queue and the I/O driver); it costs microseconds, where a timer waits a
/// millisecond at least. See docs/adr/0002-commit-ordered-positions.md.
async fn gather(rx: &mpsc::Receiver<Request>, yields: usize) {
    let mut queued = rx.len();
    for _ in 0..yields {
        tokio::task::yield_now().await;
        let now = rx.len();
        if now == queued {
            break;
        }
        queued = now;
    }
}

/// Counts and times one append (see the module docs).
fn observe(result: &Result<AppendOutcome, StoreError>, events: usize, started: Instant) {
    let outcome = match result {
        Ok(outcome) if outcome.replayed => "replayed",
        Ok(_) => "ok",
        Err(StoreError::WrongExpectedVersion { .. }) => "wrong_expected_version",
        Err(StoreError::DuplicateEventId { .. }) => "duplicate_event_id",
        Err(_) => "error",
    };
    metrics::counter!("colloquy_appends_total", "outcome" => outcome).increment(1);
    if matches!(result, Ok(outcome) if !outcome.replayed) {
        metrics::counter!("colloquy_appended_events_total").increment(events as u64);
    }
    metrics::histogram!("colloquy_append_duration_seconds").record(started.elapsed());
}

async fn run_batch(writer: &dyn BatchWriter, mut batch: Vec<Request>) {
    // An append whose caller has gone (its request timed out or was cancelled while it
    // queued, as during an outage) is not written: nobody would learn it was.
    batch.retain(|request| !request.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    metrics::histogram!("colloquy_append_batch_appends").record(batch.len() as f64);
    let requests: Vec<&[StreamAppend]> = batch.iter().map(|r| r.appends.as_slice()).collect();
    match writer.write_batch(&requests).await {
        Ok(results) => {
            for (request, result) in batch.into_iter().zip(results) {
                let _ = request.reply.send(result);
            }
        }
        Err(error) if batch.len() == 1 => {
            let request = batch
                .into_iter()
                .next()
                .expect("BUG: batch has one request");
            let _ = request.reply.send(Err(error));
        }
        Err(error) if error.is_unavailable() => {
            // The database is out of reach, which no one request caused: writing each
            // alone would wait out the same outage once per request (an acquire timeout
            // each) while new appends queue behind. Every caller gets the failure at
            // once and may retry (an ambiguous commit is recognised as a replay).
            tracing::warn!(error = %error, requests = batch.len(), "batch failed: the database is unavailable");
            let text = match std::error::Error::source(&error) {
                Some(cause) => error_chain(cause),
                None => error.to_string(),
            };
            let mut batch = batch.into_iter();
            if let Some(first) = batch.next() {
                let _ = first.reply.send(Err(error));
            }
            for request in batch {
                let copy = std::io::Error::new(std::io::ErrorKind::NotConnected, text.clone());
                let _ = request
                    .reply
                    .send(Err(StoreError::from(sqlx::Error::Io(copy))));
            }
        }
        Err(error) => {
            // One bad request must not fail its neighbours: write each alone. If the
            // failure was an ambiguous commit, the ids that did land are recognised as
            // replays, so nothing is written twice.
            tracing::warn!(error = %error, requests = batch.len(), "batch failed; writing its appends one by one");
            for request in batch {
                let result = match writer.write_batch(&[request.appends.as_slice()]).await {
                    Ok(mut results) => results.pop().unwrap_or(Err(StoreError::Closed)),
                    Err(e) => Err(e),
                };
                let _ = request.reply.send(result);
            }
        }
    }
}

/// `error: cause: cause…`.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::model::{ExpectedVersion, NewEvent};

    /// A writer that counts its batches and always finds the database out of reach.
    #[derive(Debug, Default)]
    struct Unreachable {
        batches: AtomicUsize,
    }

    #[async_trait]
    impl BatchWriter for Unreachable {
        async fn write_batch(
            &self,
            _: &[&[StreamAppend]],
        ) -> Result<Vec<Result<AppendOutcome, StoreError>>, StoreError> {
            self.batches.fetch_add(1, Ordering::Relaxed);
            Err(sqlx::Error::PoolTimedOut.into())
        }
    }

    fn request() -> (
        Request,
        oneshot::Receiver<Result<AppendOutcome, StoreError>>,
    ) {
        let (reply, result) = oneshot::channel();
        let appends = vec![StreamAppend::new(
            "thing-1",
            ExpectedVersion::Any,
            vec![NewEvent::new(
                uuid::Uuid::new_v4(),
                "Happened",
                serde_json::json!({}),
            )],
        )];
        (Request { appends, reply }, result)
    }

    /// A writer that records each batch's size and lets other tasks run while it
    /// "writes", as a round trip to the database would.
    #[derive(Debug, Default)]
    struct Recording {
        sizes: std::sync::Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl BatchWriter for Recording {
        async fn write_batch(
            &self,
            requests: &[&[StreamAppend]],
        ) -> Result<Vec<Result<AppendOutcome, StoreError>>, StoreError> {
            self.sizes.lock().unwrap().push(requests.len());
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            let outcome = AppendOutcome {
                streams: Vec::new(),
                positions: Vec::new(),
                last_position: 0,
                replayed: false,
            };
            Ok(requests.iter().map(|_| Ok(outcome.clone())).collect())
        }
    }

    /// Batch sizes when `callers` tasks append in a loop, one of them starting first:
    /// its lone first batch puts it out of step with the others.
    async fn batch_sizes(gather_yields: usize, callers: usize) -> Vec<usize> {
        let writer = Arc::new(Recording::default());
        let config = BatchConfig {
            gather_yields,
            ..BatchConfig::default()
        };
        let batcher = Batcher::start(writer.clone(), config, watch::channel(0).0);
        let caller = |batcher: Batcher| async move {
            for _ in 0..20 {
                let (request, _) = request();
                batcher.append(request.appends).await.unwrap();
            }
        };
        let first = tokio::spawn(caller(batcher.clone()));
        tokio::task::yield_now().await;
        let others: Vec<_> = (1..callers)
            .map(|_| tokio::spawn(caller(batcher.clone())))
            .collect();
        first.await.unwrap();
        for task in others {
            task.await.unwrap();
        }
        writer.sizes.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn callers_just_answered_join_the_next_batch() {
        let sizes = batch_sizes(BatchConfig::default().gather_yields, 8).await;
        // After the first caller's lone batch and the batch of the seven others, every
        // batch serves all eight.
        let full = sizes.iter().filter(|&&n| n == 8).count();
        assert!(full >= 18, "batch sizes {sizes:?}");
    }

    #[tokio::test]
    async fn without_gathering_batches_split_the_callers() {
        // The negative control of the test above: the writer takes the queue as it
        // finds it, and the caller that started first stays out of step.
        let sizes = batch_sizes(0, 8).await;
        let full = sizes.iter().filter(|&&n| n == 8).count();
        assert!(full < 5, "batch sizes {sizes:?}");
    }

    #[tokio::test]
    async fn an_unreachable_database_fails_a_batch_at_once() {
        let writer = Unreachable::default();
        let (requests, results): (Vec<_>, Vec<_>) = (0..3).map(|_| request()).unzip();
        run_batch(&writer, requests).await;
        assert_eq!(writer.batches.load(Ordering::Relaxed), 1, "not one by one");
        for result in results {
            let error = result.await.unwrap().unwrap_err();
            assert!(error.is_unavailable(), "{error:?}");
        }
    }

    #[tokio::test]
    async fn appends_whose_callers_left_are_not_written() {
        let writer = Unreachable::default();
        let (gone, result) = request();
        drop(result);
        run_batch(&writer, vec![gone]).await;
        assert_eq!(writer.batches.load(Ordering::Relaxed), 0);
    }
}
