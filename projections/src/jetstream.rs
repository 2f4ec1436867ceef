//! Following the fan-out: one durable pull consumer per projection on the JetStream
//! stream, and the log as the authority (architecture rule 7). Each message carries
//! the position of the previous event (`Colloquy-Previous`); when that is beyond the
//! checkpoint something was lost (NATS lost an acknowledged write, the stream was
//! purged or recreated), and the missing range is read from the log before going on.
//! When the fan-out is silent while the log has moved on (the relay or NATS is down,
//! or the tail was lost), the runner catches up from the log too.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::DeliverPolicy, consumer::pull};
use colloquy_eventstore::{RecordedEvent, wire};
use futures::{FutureExt as _, StreamExt as _};
use tokio_util::sync::CancellationToken;

use crate::runner::Runner;

/// Where to consume from.
#[derive(Debug, Clone)]
pub struct FanOut {
    pub jetstream: jetstream::Context,
    /// The JetStream stream name.
    pub stream: String,
    /// The subject prefix.
    pub prefix: String,
}

/// How long a fetch waits for messages before the runner checks the log itself.
const IDLE: Duration = Duration::from_millis(500);

fn header_i64(message: &async_nats::jetstream::Message, name: &str) -> Option<i64> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .and_then(|v| v.as_str().parse().ok())
}

impl Runner {
    /// The durable consumer's name for this projection.
    pub fn consumer_name(&self) -> String {
        format!("projection-{}", self.projection().name())
    }

    /// Follows the fan-out until `shutdown`, healing from the log. Never returns on a
    /// transient error: it logs, falls back to the log and tries NATS again.
    pub async fn follow_jetstream(
        &self,
        fan_out: FanOut,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.consume(&fan_out, &shutdown).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    tracing::warn!(projection = self.projection().name(), error = %error, "fan-out consumer failed; catching up from the log");
                    if let Err(error) = self.catch_up(None).await {
                        tracing::warn!(projection = self.projection().name(), error = %error, "catching up from the log failed");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        Ok(())
    }

    async fn consume(&self, fan_out: &FanOut, shutdown: &CancellationToken) -> anyhow::Result<()> {
        // The log first: whatever the stream holds or lost, start from the truth.
        let mut checkpoint = self.catch_up(None).await?;
        let stream = fan_out.jetstream.get_stream(&fan_out.stream).await?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                &self.consumer_name(),
                pull::Config {
                    durable_name: Some(self.consumer_name()),
                    filter_subject: wire::filter(&fan_out.prefix, None),
                    ack_policy: AckPolicy::Explicit,
                    // What came before is read from the log; gaps heal the rest.
                    deliver_policy: DeliverPolicy::New,
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await?;
        // A continuous pull: messages arrive as soon as they are published (a batched
        // fetch would hold them until the batch fills or expires).
        let mut incoming = consumer
            .stream()
            .max_messages_per_batch(crate::runner::BATCH)
            .messages()
            .await?;
        let mut idle_behind = false;
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                next = tokio::time::timeout(IDLE, incoming.next()) => next,
            };
            let mut messages = Vec::new();
            match first {
                Ok(Some(message)) => messages.push(message.map_err(|e| anyhow::anyhow!(e))?),
                Ok(None) => anyhow::bail!("the JetStream consumer stream ended"),
                Err(_) => {
                    // Silent fan-out: if the log is ahead twice in a row, catch up from it.
                    let head = self.store().head().await?;
                    if head > checkpoint && idle_behind {
                        checkpoint = self.catch_up(None).await?;
                        idle_behind = false;
                    } else {
                        idle_behind = head > checkpoint;
                    }
                    continue;
                }
            }
            // Whatever else has already arrived joins the batch, without waiting.
            while messages.len() < crate::runner::BATCH {
                match incoming.next().now_or_never() {
                    Some(Some(message)) => messages.push(message.map_err(|e| anyhow::anyhow!(e))?),
                    _ => break,
                }
            }
            idle_behind = false;
            let mut pending: Vec<RecordedEvent> = Vec::with_capacity(messages.len());
            for message in &messages {
                let payload: wire::Payload = match serde_json::from_slice(&message.payload) {
                    Ok(p) => p,
                    Err(error) => {
                        tracing::warn!(error = %error, subject = %message.subject, "skipping a fan-out message that is not an event");
                        continue;
                    }
                };
                let position = payload.global_position;
                let previous = header_i64(message, wire::PREVIOUS).unwrap_or(0);
                let known = pending.last().map_or(checkpoint, |e| e.global_position);
                if position <= known {
                    continue; // already applied: a redelivery
                }
                if previous > known {
                    // A gap: apply what we have, then read the missing range from the log.
                    if !pending.is_empty() {
                        checkpoint = self.apply(&pending).await?;
                        pending.clear();
                    }
                    tracing::info!(
                        projection = self.projection().name(),
                        from = checkpoint,
                        to = previous,
                        "healing a gap in the fan-out from the log"
                    );
                    checkpoint = self.catch_up(Some(previous)).await?;
                    if position <= checkpoint {
                        continue;
                    }
                }
                pending.push(payload.into());
            }
            if !pending.is_empty() {
                checkpoint = self.apply(&pending).await?;
            }
            // Acknowledge only after the commit: a crash before this redelivers, and
            // the checkpoint makes the redelivery change nothing.
            for message in messages {
                message.ack().await.map_err(|e| anyhow::anyhow!(e))?;
            }
        }
    }
}
