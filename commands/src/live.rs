//! Live signals that are not events: the agent's token deltas for a run, sent over
//! core NATS on `<prefix>.live.run.<run id>` (at most once, never stored, never
//! replayed) and turned into `event: token` / `event: reset` by the gateway's run
//! stream. Durable progress is in the log; these only make a reply appear as it is
//! written.

use serde::{Deserialize, Serialize};
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

#[cfg(test)]
mod tests {
    use super::*;

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
