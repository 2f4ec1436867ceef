//! Faults and hostile input: outages of Postgres, NATS and Gemini, crashed processes,
//! and abusive clients, each shown to lose and duplicate nothing (docs/RELIABILITY.md).
//!
//! A separate test binary from `api`: every test here needs the external mode (Postgres
//! and NATS), and most start private instances of them (or of the application's
//! processes) that they stop, kill or starve on purpose, never the services other tests
//! share. `scripts/test` runs it in the full run only against Postgres and NATS.

#![allow(clippy::unwrap_used, reason = "test code")]

#[path = "../api/helpers.rs"]
#[allow(
    dead_code,
    reason = "shared with the api suite; not every helper is used here"
)]
mod helpers;

mod crashes;
mod gemini_storms;
mod hostile;
mod nats_outage;
mod postgres_outage;
