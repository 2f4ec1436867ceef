//! The `colloquy` binary's library: configuration, telemetry, shutdown, the
//! [`Application`] that wires the roles together, and the command-line interface.
//! `main.rs` is a shim over [`cli::main`].
//!
//! - [`config`]: layered, validated settings.
//! - [`telemetry`]: tracing and OpenTelemetry set-up.
//! - [`metrics`]: the Prometheus recorder and the `/metrics` page.
//! - [`shutdown`]: the process's cancellation token and signals.
//! - [`app`]: [`Application::build`] and [`Application::run_until_stopped`].
//! - [`admin`]: `colloquy admin …`, the operators' tools.
//! - [`cli`]: the subcommands.

pub mod admin;
pub mod app;
pub mod bench;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod replay;
pub mod shutdown;
pub mod telemetry;

pub use app::{Application, Role};
pub use config::{Config, Settings};

/// Installs rustls' process-wide crypto provider (ring, the one NATS uses too), which
/// HTTPS clients (Gemini, the OTLP exporter) need. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
