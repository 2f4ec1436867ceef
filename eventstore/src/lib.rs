//! Colloquy's event store: an append-only log of events in streams, whose global
//! positions are commit order (no reader ever sees an event appear below a position it
//! has already seen).
//!
//! - [`model`]: events, expectations, errors and input validation.
//! - [`store`]: the [`EventStore`] trait every backend implements, and the catch-up
//!   [`Subscription`] built on it.
//! - [`batch`] and [`batcher`]: group commit, shared by the backends.
//! - [`postgres`]: the Postgres backend on Message DB's schema.
//! - [`sqlite`]: the SQLite backend of the embedded mode (one file, WAL), on the same
//!   table shape; [`sqlite::open`] opens and migrates the file.
//! - [`database`]: [`Database`], the pool of either backend, for SQL outside the store.

pub mod batch;
pub mod batcher;
#[cfg(any(test, feature = "testing"))]
pub mod contract;
pub mod database;
pub mod model;
pub mod postgres;
pub mod sqlite;
pub mod store;
pub mod trace;
pub mod wire;

pub use database::{Backend, Database};
pub use model::{
    AppendOutcome, ExpectedVersion, GlobalPosition, InvalidInput, Limits, LogFilter, NewEvent,
    RecordedEvent, StoreError, StreamAppend, StreamWritten, category, database_unavailable,
    unavailable_cause,
};
pub use postgres::{PgEventStore, PgOptions};
pub use sqlite::{SqliteEventStore, SqliteOptions};
pub use store::{EventStore, RedactReport, Redactor, Selection, Subscription, SubscriptionItem};
