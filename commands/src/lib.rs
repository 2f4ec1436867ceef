//! Command handling: load an aggregate (from the cache or the log), `decide`, append
//! with the loaded version as the expectation, and retry on a conflict.
//!
//! - [`handler`]: [`Commands`], the entry point the gateway and the agent call.
//! - [`context`]: who acts, idempotency, correlation and trace context, and the event
//!   metadata they become.
//! - [`cache`]: the moka cache of aggregate states.
//! - [`codec`]: domain events to and from stored events.
//!
//! Command idempotency is built on the store's idempotent append: with an
//! `Idempotency-Key`, event ids (and the ids the command creates) are derived from
//! the user, the key and an index, so a repeat writes nothing and is recognised
//! atomically with the append.

pub mod cache;
pub mod codec;
pub mod context;
pub mod handler;
pub mod live;
pub mod relay;

pub use context::{Causation, Context, Idempotency};
pub use handler::{CommandError, Commands, Committed, ForgetReport};
