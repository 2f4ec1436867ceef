//! Read models built from the log. Each projection is a dumb fold of events into
//! tables in its own schema, with its checkpoint in the same schema, written in the
//! same transaction as the rows it changes: a redelivered event changes nothing.
//!
//! - [`projection`]: the [`Projection`] trait, and the [`messages`], [`runs`] and
//!   [`search`] projections.
//! - [`runner`]: applies batches with their checkpoint, catches up from the log,
//!   consumes JetStream and heals gaps from the log.
//! - [`replay`]: rebuilds into a scratch schema and swaps it in; `--verify` diffs.
//! - [`wait`]: position waits (architecture rule 5).

pub mod jetstream;
pub mod messages;
pub mod projection;
pub mod replay;
pub mod runner;
pub mod runs;
pub mod search;
pub mod wait;

pub use projection::{Projection, all_projections, by_name};
pub use runner::Runner;
