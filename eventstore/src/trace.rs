//! W3C trace context across processes: an event's metadata and its NATS headers carry a
//! `traceparent` ([`crate::wire::traceparent`]), and the process that handles the event
//! makes its span a child of it, so one user action is one trace from the HTTP request
//! through the relay, the projectors and the agent. Without an OpenTelemetry exporter
//! (no `OTEL_EXPORTER_OTLP_ENDPOINT`) these do nothing.

use std::collections::HashMap;

use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Makes `span` (not yet entered) a child of `traceparent`, when that is a valid W3C
/// trace context. Call it right after creating the span.
pub fn continue_from(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = HashMap::from([(crate::wire::TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    if parent.span().span_context().is_valid() {
        // Fails only when no exporter is installed or the span is filtered out.
        let _ = span.set_parent(parent);
    }
}

/// Links `span` to another trace context (e.g. the other events of a batch its parent
/// is one of).
pub fn link_to(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(crate::wire::TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let other = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let context = other.span().span_context().clone();
    if context.is_valid() {
        span.add_link(context);
    }
}

/// The `traceparent` of the current span, to record in the events a command appends;
/// `None` without an exporter.
pub fn current() -> Option<String> {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier.remove(crate::wire::TRACEPARENT)
}
