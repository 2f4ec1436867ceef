//! Read models built from the log, on Postgres or SQLite ([`Database`]). Each
//! projection is a dumb fold of events into its own tables (a Postgres schema; on
//! SQLite tables named `<schema>_<table>`), with its checkpoint beside them, written in
//! the same transaction as the rows it changes: a redelivered event changes nothing.
//!
//! - [`projection`]: the [`Projection`] trait and [`Conn`], and the [`messages`],
//!   [`runs`] and [`search`] projections. Their rules are written once (a fold over the
//!   rows a batch touches); only loading and writing rows is SQL per backend.
//! - [`runner`]: applies batches with their checkpoint, catches up from the log,
//!   follows the log; [`jetstream`] consumes the fan-out and heals gaps from the log.
//! - [`replay`]: rebuilds into scratch tables and swaps them in; `--verify` diffs.
//! - [`erasure`]: rewrites the rows copied from conversations whose events were
//!   redacted.
//! - [`wait`]: position waits (architecture rule 5).
//!
//! [`Database`]: colloquy_eventstore::Database

pub mod erasure;
pub mod jetstream;
pub mod messages;
pub mod projection;
pub mod replay;
pub mod runner;
pub mod runs;
pub mod search;
pub mod wait;

pub use projection::{Conn, Projection, all_projections, by_name};
pub use runner::Runner;
