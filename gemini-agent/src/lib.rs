//! The Gemini agent: answers runs.
//!
//! - [`worker`]: the [`Agent`](worker::Agent) (consumption, attempts, retries,
//!   completion) and its sweep.
//! - [`context`]: what is sent: the conversation within a token budget.
//! - [`gemini`]: the Gemini REST client and its error classification.
//! - [`keys`], [`budget`], [`backoff`], [`clock`]: the key pool with per-project
//!   budgets shared through JetStream key-value, and the retry policies.
//! - [`fake`]: a Gemini double speaking the real wire format, for tests and
//!   `colloquy dev fake-gemini`.

pub mod backoff;
pub mod budget;
pub mod clock;
pub mod context;
pub mod fake;
pub mod gemini;
pub mod keys;
pub mod worker;
