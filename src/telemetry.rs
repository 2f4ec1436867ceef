//! All of Colloquy's telemetry set-up in one place: `tracing` with readable output on a
//! terminal and JSON lines otherwise, filtered by `RUST_LOG`; an OpenTelemetry OTLP
//! exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, flushed by [`Telemetry`]'s drop;
//! and a quiet subscriber for tests.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The default filter: our own crates at info, chatty dependencies at warn.
pub const DEFAULT_FILTER: &str =
    "info,sqlx=warn,async_nats=warn,hyper=warn,h2=warn,tower_http=info";

/// Keeps the exporter alive; dropping it flushes pending spans.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("failed to flush traces: {error}");
        }
    }
}

/// Installs the global subscriber. `rust_log` overrides [`DEFAULT_FILTER`].
pub fn init(rust_log: Option<&str>, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    init_for_roles(rust_log, otlp_endpoint, None)
}

/// [`init`] for `serve`: the exported spans' resource names the process's roles
/// (`colloquy.roles`, e.g. `gateway,projector`) beside its `service.name` (`colloquy`,
/// or `OTEL_SERVICE_NAME`) and `process.pid`, so a trace shows which process did what.
pub fn init_for_roles(
    rust_log: Option<&str>,
    otlp_endpoint: Option<&str>,
    roles: Option<&str>,
) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_new(rust_log.unwrap_or(DEFAULT_FILTER))
        .map_err(|e| anyhow::anyhow!("RUST_LOG is not a valid filter: {e}"))?;
    let fmt = if std::io::stderr().is_terminal() {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed()
    };
    let mut telemetry = Telemetry::default();
    let otel = match otlp_endpoint {
        Some(endpoint) => {
            let provider = otlp_provider(endpoint, roles)?;
            let tracer = provider.tracer("colloquy");
            telemetry.provider = Some(provider.clone());
            opentelemetry::global::set_tracer_provider(provider);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
        None => None,
    };
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("failed to install the tracing subscriber: {e}"))?;
    Ok(telemetry)
}

fn otlp_provider(endpoint: &str, roles: Option<&str>) -> anyhow::Result<SdkTracerProvider> {
    let traces = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces)
        .build()
        .map_err(|e| {
            anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the exporter: {e}")
        })?;
    // The builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; without a
    // service name it would say `unknown_service`.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("colloquy");
    }
    resource = resource.with_attribute(opentelemetry::KeyValue::new(
        "process.pid",
        i64::from(std::process::id()),
    ));
    if let Some(roles) = roles {
        resource = resource.with_attribute(opentelemetry::KeyValue::new(
            "colloquy.roles",
            roles.to_owned(),
        ));
    }
    let resource = resource.build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// For tests: silent unless `TEST_LOG` is set (then its value is the filter).
/// Safe to call from every test; only the first call installs anything.
pub fn init_for_tests() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(filter) = std::env::var("TEST_LOG") else {
            return;
        };
        let _ = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(if filter.is_empty() {
                "debug"
            } else {
                &filter
            }))
            .with_test_writer()
            .try_init();
    });
}
