//! Live signals that are not events: the agent's token deltas for a run, sent over
//! core NATS on `<prefix>.live.run.<run id>` (at most once, never stored, never
//! replayed) and turned into `event: token` / `event: reset` by the gateway's run
//! stream. Durable progress is in the log; these only make a reply appear as it is
//! written.
//!
//! [`RunSignals`] carries them: over core NATS between processes, or in memory in the
//! embedded mode, where the agent and the gateway share one process.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use uuid::Uuid;

/// The subject of one run's live signals.
pub fn run_subject(prefix: &str, run_id: Uuid) -> String {
    format!("{prefix}.live.run.{run_id}")
}

/// One live signal of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RunSignal {
    /// New reply text of `attempt` (a delta: append it to what came before).
    Token {
        /// The attempt the text belongs to.
        attempt: u32,
        /// The new text.
        text: String,
    },
    /// `attempt` starts over: text shown for an earlier attempt is void.
    Reset {
        /// The attempt that restarts.
        attempt: u32,
    },
}

/// A run's signals as they come (`Sync`, so a response body can hold it).
pub type SignalStream = Pin<Box<dyn Stream<Item = RunSignal> + Send + Sync>>;

/// Where run signals travel (cheap to clone).
#[derive(Debug, Clone)]
pub enum RunSignals {
    /// Core NATS, `<prefix>.live.run.<run id>`: every gateway sees every agent's signals.
    Nats {
        client: async_nats::Client,
        prefix: String,
    },
    /// In this process only (the embedded mode).
    Local(LocalSignals),
}

impl RunSignals {
    /// Sends `signal` for `run`, at most once: a lost token is only a flicker, the reply
    /// itself is durable. Signals of one sender arrive in the order they were sent (this
    /// only queues them on the connection; it never waits for the server).
    pub async fn publish(&self, run: Uuid, signal: &RunSignal) {
        match self {
            Self::Nats { client, prefix } => {
                let Ok(payload) = serde_json::to_vec(signal) else {
                    return;
                };
                let _ = client
                    .publish(run_subject(prefix, run), payload.into())
                    .await;
            }
            Self::Local(local) => local.publish(run, signal.clone()),
        }
    }

    /// The signals of `run` sent from now on. Undecodable NATS messages are skipped; a
    /// subscriber that falls behind the in-memory buffer loses the oldest (as a slow
    /// NATS subscriber would).
    ///
    /// # Errors
    /// The NATS subscription could not be made.
    pub async fn subscribe(&self, run: Uuid) -> Result<SignalStream, async_nats::SubscribeError> {
        match self {
            Self::Nats { client, prefix } => {
                let subscriber = client.subscribe(run_subject(prefix, run)).await?;
                Ok(Box::pin(subscriber.filter_map(|m| async move {
                    serde_json::from_slice(&m.payload).ok()
                })))
            }
            Self::Local(local) => Ok(local.subscribe(run)),
        }
    }
}

/// In-memory run signals: one broadcast channel per run that has subscribers.
#[derive(Debug, Clone, Default)]
pub struct LocalSignals {
    runs: Arc<Mutex<HashMap<Uuid, broadcast::Sender<RunSignal>>>>,
}

/// Signals buffered per subscriber before the oldest are dropped.
const LOCAL_BUFFER: usize = 1024;

impl LocalSignals {
    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, broadcast::Sender<RunSignal>>> {
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self, run: Uuid, signal: RunSignal) {
        let mut runs = self.runs();
        if let Some(sender) = runs.get(&run)
            && sender.send(signal).is_err()
        {
            // Every subscriber has gone.
            runs.remove(&run);
        }
    }

    fn subscribe(&self, run: Uuid) -> SignalStream {
        let mut runs = self.runs();
        // Channels of runs whose subscribers all left without another signal coming.
        if runs.len() > 1024 {
            runs.retain(|_, sender| sender.receiver_count() > 0);
        }
        let receiver = runs
            .entry(run)
            .or_insert_with(|| broadcast::channel(LOCAL_BUFFER).0)
            .subscribe();
        Box::pin(futures::stream::unfold(
            receiver,
            |mut receiver| async move {
                loop {
                    match receiver.recv().await {
                        Ok(signal) => return Some((signal, receiver)),
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_signals_reach_the_runs_subscribers_only() {
        let signals = RunSignals::Local(LocalSignals::default());
        let (run, other) = (Uuid::new_v4(), Uuid::new_v4());
        let mut stream = signals.subscribe(run).await.unwrap();
        let mut other_stream = signals.subscribe(other).await.unwrap();
        let token = RunSignal::Token {
            attempt: 1,
            text: "he".into(),
        };
        signals.publish(run, &token).await;
        signals.publish(run, &RunSignal::Reset { attempt: 2 }).await;
        assert_eq!(stream.next().await, Some(token));
        assert_eq!(stream.next().await, Some(RunSignal::Reset { attempt: 2 }));
        signals
            .publish(other, &RunSignal::Reset { attempt: 1 })
            .await;
        assert_eq!(
            other_stream.next().await,
            Some(RunSignal::Reset { attempt: 1 }),
            "the other run's subscriber saw only its own signal"
        );
        drop(stream);
        // With no subscriber left, the run's channel goes at the next signal.
        signals.publish(run, &RunSignal::Reset { attempt: 3 }).await;
        let RunSignals::Local(local) = &signals else {
            unreachable!()
        };
        assert!(!local.runs().contains_key(&run));
    }

    #[test]
    fn signals_have_a_stable_wire_form() {
        let token = RunSignal::Token {
            attempt: 2,
            text: "hi".into(),
        };
        assert_eq!(
            serde_json::to_string(&token).unwrap(),
            r#"{"kind":"token","attempt":2,"text":"hi"}"#
        );
        let reset: RunSignal = serde_json::from_str(r#"{"kind":"reset","attempt":3}"#).unwrap();
        assert_eq!(reset, RunSignal::Reset { attempt: 3 });
        let id = Uuid::nil();
        assert_eq!(
            run_subject("colloquy", id),
            format!("colloquy.live.run.{id}")
        );
    }
}
