//! Black-box tests of the whole application, compiled into one test binary: each
//! test starts the real application on port 0 against its own Postgres database and
//! its own NATS subject prefix (see `helpers`).

#![allow(clippy::unwrap_used, reason = "test code")]

mod admin;
mod agent;
mod auth;
mod cli;
mod conversations;
mod edges;
mod fanout;
mod fuzz;
mod health;
mod helpers;
mod live;
mod message_db;
mod metrics;
mod readme;
mod slow_client;
mod traces;
