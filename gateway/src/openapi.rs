//! The OpenAPI 3.1 document of the HTTP API, generated from the code, and where it is
//! served: `GET /openapi.json` (the document) and `GET /docs` (a browsable reference).
//! Neither needs a token.
//!
//! Where the document comes from:
//! - Each module's handlers carry their description (`#[utoipa::path]`: path, method,
//!   parameters, request and response bodies, statuses, headers), and the module
//!   registers each route together with its description (`utoipa_axum::routes!`), so
//!   the router that serves and the document that describes are built from the same
//!   list: [`crate::health::api`], [`crate::metrics::api`], `crate::auth`'s
//!   `AuthState::openapi`, [`crate::routes::api`] and [`crate::live::api`].
//! - Bodies are the handlers' own types (`ToSchema`): a response is serialised from
//!   the very struct its schema is derived from.
//! - [`ApiDoc`] adds what is common: the API's description, the `bearer` security
//!   scheme, [`Problem`], and the admin routes (see [`admin`]).
//! - [`ProblemResponses`] fills in what every error response shares, so that handlers
//!   list only their statuses and why: the `application/problem+json` body, `Retry-After`
//!   on 429 and 503, `WWW-Authenticate` on 401, a 401 on every operation that needs a
//!   token, a 503 on every operation (the request timeout answers any route), and on
//!   every operation with a JSON body the 408, 413 and 415 its reading can answer.
//!
//! `/docs` is a small HTML page that loads the Scalar API reference viewer from its
//! CDN (jsDelivr) in the browser and points it at `/openapi.json`: nothing is bundled
//! or downloaded at build time, and the gateway itself never fetches anything.

use std::sync::LazyLock;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::Response as ApiResponse;
use utoipa::openapi::schema::Schema;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, RefOr};
use utoipa::{Modify, OpenApi, PartialSchema};

use crate::GatewayState;
use crate::error::{FieldError, PROBLEM_JSON, Problem};

/// The media type of the document.
const OPENAPI_JSON: &str = "application/json";

/// The API's description and what every operation shares.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Colloquy",
        description = "Event-sourced chat with a Gemini agent.\n\n\
            All bodies are JSON (UTF-8). Every path under `/v1` needs a bearer token \
            (`Authorization: Bearer <access token>` from `POST /v1/auth/login`) unless it is \
            marked otherwise.\n\n\
            **Commands** answer with `X-Colloquy-Position`: the global position of their last \
            event. Pass it to a query as `X-Colloquy-Min-Position` (or `?min_position=`) to read \
            your own writes: the query waits, bounded, for its read model to get there. Every \
            command accepts `Idempotency-Key`.\n\n\
            **Errors** are `application/problem+json` (RFC 9457): `{type, title, status, detail, \
            code, request_id}`, plus `errors` naming each field for 422. `code` is stable. \
            Another user's conversation, run or stream is 404, never 403. Unknown paths are a \
            problem+json 404 and unknown methods a problem+json 405.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        admin::projections,
        admin::rebuild,
        admin::stream,
        admin::keys,
        admin::dead_letters,
        admin::retry,
        admin::forget,
        openapi_json,
        docs,
    ),
    components(schemas(Problem, FieldError)),
    modifiers(&BearerScheme),
    tags(
        (name = "auth", description = "Accounts and tokens"),
        (name = "conversations", description = "Conversations (commands and queries)"),
        (name = "messages", description = "Messages of a conversation"),
        (name = "runs", description = "Agent runs"),
        (name = "search", description = "Full-text search"),
        (name = "live", description = "Server-sent events"),
        (name = "admin", description = "Operators (the `admin` role)"),
        (name = "operations", description = "Probes, metrics and this document (no token)"),
    )
)]
pub struct ApiDoc;

/// The whole document: every route the gateway serves.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::health::api().into_openapi());
    doc.merge(crate::metrics::api().into_openapi());
    doc.merge(crate::auth::AuthState::openapi());
    doc.merge(crate::routes::api().into_openapi());
    doc.merge(crate::live::api().into_openapi());
    ProblemResponses.modify(&mut doc);
    doc
}

/// The document, rendered once.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    document()
        .to_json()
        .expect("BUG: the OpenAPI document always serialises")
});

/// `GET /openapi.json` and `GET /docs`.
pub fn routes() -> Router<GatewayState> {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(docs))
}

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    operation_id = "openapi",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json", body = Object))
)]
async fn openapi_json() -> Response {
    let mut response = DOCUMENT.as_str().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(OPENAPI_JSON));
    response
}

/// `GET /docs`.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "operations",
    operation_id = "docs",
    responses((status = 200, description = "A browsable reference of this document (loads its viewer from a CDN)", content_type = "text/html", body = String))
)]
async fn docs() -> Html<&'static str> {
    Html(DOCS_PAGE)
}

/// The reference page. `openapi.json` is relative, so the page also works behind a
/// proxy that serves the API under a path prefix.
const DOCS_PAGE: &str = r#"<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <title>Colloquy API reference</title>
  </head>
  <body>
    <div id="app"></div>
    <noscript>The reference needs JavaScript; the document itself is at <a href="openapi.json">openapi.json</a>.</noscript>
    <script src="https://cdn.jsdelivr.net/npm/@scalar/api-reference@1"></script>
    <script>Scalar.createApiReference('#app', { url: 'openapi.json' })</script>
  </body>
</html>
"#;

/// Adds the `bearer` security scheme the operations refer to.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "An access token from `POST /v1/auth/login` or `POST /v1/auth/refresh`",
                    ))
                    .build(),
            ),
        );
    }
}

/// What every error response shares (see the module docs).
struct ProblemResponses;

impl Modify for ProblemResponses {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for item in doc.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                complete(operation);
            }
        }
    }
}

fn complete(operation: &mut Operation) {
    let needs_token = operation
        .security
        .as_ref()
        .is_some_and(|requirements| !requirements.is_empty());
    let has_body = operation.request_body.is_some();
    let responses = &mut operation.responses.responses;
    if has_body {
        // Every JSON body goes through `error::json_body_bytes`.
        for (status, description) in [
            (
                "408",
                "The request body did not arrive within 10 s (`request_timeout`)",
            ),
            ("413", "Body too large"),
            ("415", "Body is not `application/json`"),
        ] {
            responses
                .entry(status.to_owned())
                .or_insert_with(|| RefOr::T(ApiResponse::new(description)));
        }
    }
    if needs_token && !responses.contains_key("401") {
        responses.insert(
            "401".to_owned(),
            RefOr::T(ApiResponse::new("No valid bearer token")),
        );
    }
    responses.entry("503".to_owned()).or_insert_with(|| {
        RefOr::T(ApiResponse::new(
            "The request took too long, or a dependency is unavailable; see `Retry-After`",
        ))
    });
    for (status, response) in responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        if !status.starts_with(['4', '5']) || !response.content.is_empty() {
            continue;
        }
        response.content.insert(
            PROBLEM_JSON.to_owned(),
            RefOr::T(
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            ),
        );
        let header = |schema: RefOr<Schema>, description: &str| {
            RefOr::T(
                HeaderBuilder::new()
                    .schema(Some(schema))
                    .description(Some(description))
                    .build(),
            )
        };
        match status.as_str() {
            "401" => {
                response.headers.insert(
                    "WWW-Authenticate".to_owned(),
                    header(
                        String::schema(),
                        "`Bearer realm=\"colloquy\"` (missing or invalid bearer token)",
                    ),
                );
            }
            "429" | "503" => {
                response.headers.insert(
                    "Retry-After".to_owned(),
                    header(u64::schema(), "Seconds to wait before retrying"),
                );
            }
            _ => {}
        }
    }
}

/// The admin routes (`/v1/admin`, the `admin` role). Their handlers build their bodies
/// with `json!`, so the shapes here are written out from those handlers' doc comments;
/// the extra properties they may gain are allowed.
pub mod admin {
    #![allow(dead_code, reason = "documentation only: never called")]

    use chrono::{DateTime, Utc};
    use serde::Serialize;
    use utoipa::ToSchema;
    use uuid::Uuid;

    use crate::routes::{Idempotency, MinPosition};

    /// A projection's state.
    #[derive(Debug, Serialize, ToSchema)]
    #[schema(as = AdminProjection)]
    pub struct Projection {
        name: String,
        /// The last global position applied.
        checkpoint: i64,
        /// Events in the log after the checkpoint (approximate).
        lag_events: i64,
        /// Age of the oldest event not yet applied (0 when caught up).
        lag_seconds: f64,
        /// `rebuilding`, `catching_up` or `live`.
        #[schema(pattern = "^(rebuilding|catching_up|live)$")]
        state: String,
        /// The last rebuild this process started, if any.
        last_rebuild: Option<Rebuild>,
    }

    /// A rebuild started through the admin routes.
    #[derive(Debug, Serialize, ToSchema)]
    #[schema(as = AdminRebuild)]
    pub struct Rebuild {
        /// `running`, `succeeded` or `failed`.
        #[schema(pattern = "^(running|succeeded|failed)$")]
        status: String,
        started_at: DateTime<Utc>,
        finished_at: Option<DateTime<Utc>>,
        /// The position the swapped-in read model had reached.
        position: Option<i64>,
    }

    /// Every projection.
    #[derive(Debug, Serialize, ToSchema)]
    #[schema(as = AdminProjections)]
    pub struct Projections {
        items: Vec<Projection>,
    }

    /// A rebuild has started.
    #[derive(Debug, Serialize, ToSchema)]
    #[schema(as = AdminRebuildStarted)]
    pub struct RebuildStarted {
        name: String,
        #[schema(pattern = "^rebuilding$")]
        state: String,
        rebuild: Rebuild,
    }

    /// One event, as stored.
    #[derive(Debug, Serialize, ToSchema)]
    #[schema(as = AdminStoredEvent)]
    pub struct StoredEvent {
        global_position: i64,
        position: i64,
        time: DateTime<Utc>,
        #[serde(rename = "type")]
        event_type: String,
        #[schema(value_type = Object)]
        data: serde_json::Value,
        #[schema(value_type = Option<Object>)]
        metadata: Option<serde_json::Value>,
        id: Uuid,
    }

    /// A page of a stream.
    #[derive(Debug, Serialize, ToSchema)]
    #[schema(as = AdminStreamPage)]
    pub struct StreamPage {
        items: Vec<StoredEvent>,
        /// Where the next page starts; `null` when this page was the end.
        next_from: Option<i64>,
    }

    /// The agent's key pool: labels, budgets and health, never a key.
    #[derive(Debug, Serialize, ToSchema)]
    #[schema(as = AdminKeys)]
    pub struct Keys {
        /// Per key: `label`, `project`, `state` (`ready`, `cooling`, `exhausted_today`,
        /// `disabled`), `cooldown_until`, `requests_this_minute`, `requests_today`,
        /// `tokens_this_minute`, `limits`, `disabled_reason`, `last_error`,
        /// `last_error_at`.
        #[schema(value_type = Vec<Object>)]
        items: Vec<serde_json::Value>,
    }

    /// A run whose retries ran out.
    #[derive(Debug, Serialize, ToSchema)]
    #[schema(as = AdminDeadLetter)]
    pub struct DeadLetter {
        id: Uuid,
        conversation_id: Uuid,
        error: String,
        attempts: i32,
        finished_at: DateTime<Utc>,
        position: i64,
    }

    /// A page of dead letters, newest first.
    #[derive(Debug, Serialize, ToSchema)]
    #[schema(as = AdminDeadLetters)]
    pub struct DeadLetters {
        items: Vec<DeadLetter>,
        next_cursor: Option<String>,
    }

    /// A dead letter is `retrying` again.
    #[derive(Debug, Serialize, ToSchema)]
    #[schema(as = AdminRetried)]
    pub struct Retried {
        run_id: Uuid,
        position: i64,
    }

    pub use crate::admin::users::Erasure as Forgotten;

    #[utoipa::path(
        get,
        path = "/v1/admin/projections",
        tag = "admin",
        operation_id = "admin_projections",
        security(("bearer" = [])),
        responses(
            (status = 200, description = "Each read model's checkpoint, lag and state", body = Projections),
            (status = 403, description = "The token lacks the admin role"),
        )
    )]
    pub fn projections() {}

    #[utoipa::path(
        post,
        path = "/v1/admin/projections/{name}/rebuild",
        tag = "admin",
        operation_id = "admin_rebuild_projection",
        description = "Starts a rebuild in the background: the log is projected into a scratch \
                       schema while the live tables keep serving, then swapped in.",
        security(("bearer" = [])),
        params(("name" = String, Path, description = "The projection (`messages`, `runs`, `search`, …)")),
        responses(
            (status = 202, description = "Started", body = RebuildStarted),
            (status = 403, description = "The token lacks the admin role"),
            (status = 404, description = "No such projection"),
            (status = 409, description = "A rebuild of it is already running (`rebuild_in_progress`)"),
        )
    )]
    pub fn rebuild() {}

    #[utoipa::path(
        get,
        path = "/v1/admin/streams/{stream_name}",
        tag = "admin",
        operation_id = "admin_read_stream",
        description = "A stream's events exactly as stored, oldest first. A stream with no events \
                       reads as empty.",
        security(("bearer" = [])),
        params(
            ("stream_name" = String, Path, description = "Any stream name (percent-encoded)"),
            ("from" = Option<i64>, Query, minimum = 0, description = "The first stream position (default 0)"),
            ("limit" = Option<i64>, Query, description = "Page size: default 100, clamped to 1..=1000"),
        ),
        responses(
            (status = 200, description = "A page of the stream", body = StreamPage),
            (status = 400, description = "A malformed query parameter"),
            (status = 403, description = "The token lacks the admin role"),
        )
    )]
    pub fn stream() {}

    #[utoipa::path(
        get,
        path = "/v1/admin/agent/keys",
        tag = "admin",
        operation_id = "admin_agent_keys",
        security(("bearer" = [])),
        responses(
            (status = 200, description = "The key pool (`items: []` when no keys are configured)", body = Keys),
            (status = 403, description = "The token lacks the admin role"),
            (status = 503, description = "The shared budgets cannot be read; see `Retry-After`"),
        )
    )]
    pub fn keys() {}

    #[utoipa::path(
        get,
        path = "/v1/admin/runs/dead-letters",
        tag = "admin",
        operation_id = "admin_dead_letters",
        security(("bearer" = [])),
        params(
            ("limit" = Option<i64>, Query, description = "Page size: default 50, clamped to 1..=200"),
            ("cursor" = Option<String>, Query, description = "A `next_cursor` from the previous page"),
            MinPosition,
        ),
        responses(
            (status = 200, description = "A page of dead letters", body = DeadLetters),
            (status = 400, description = "A malformed query parameter or cursor"),
            (status = 403, description = "The token lacks the admin role"),
        )
    )]
    pub fn dead_letters() {}

    #[utoipa::path(
        post,
        path = "/v1/admin/runs/{run_id}/retry",
        tag = "admin",
        operation_id = "admin_retry_run",
        description = "Brings a dead letter back: `retrying` again, due now.",
        security(("bearer" = [])),
        params(("run_id" = Uuid, Path, description = "The run"), Idempotency),
        responses(
            (status = 202, description = "Revived", body = Retried,
                headers(("X-Colloquy-Position" = i64, description = "Global position of the command's last event"))),
            (status = 400, description = "Malformed `Idempotency-Key`"),
            (status = 403, description = "The token lacks the admin role"),
            (status = 404, description = "No such run"),
            (status = 409, description = "Not a dead letter, another run of its conversation is open, or the conversation is archived"),
            (status = 422, description = "The `Idempotency-Key` was used for another request"),
        )
    )]
    pub fn retry() {}

    #[utoipa::path(
        post,
        path = "/v1/admin/users/{user_id}/forget",
        tag = "admin",
        operation_id = "admin_forget_user",
        description = "Erasure: deletes the user's account and refresh tokens; redacts, in the \
                       log, every event the user wrote and every event of the conversations they \
                       own; rewrites those conversations in the read models from the redacted \
                       log; and purges their messages from the JetStream stream.",
        security(("bearer" = [])),
        params(("user_id" = Uuid, Path, description = "The user")),
        responses(
            (status = 200, description = "Redacted", body = Forgotten),
            (status = 403, description = "The token lacks the admin role"),
            (status = 404, description = "No such user"),
        )
    )]
    pub fn forget() {}
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    fn doc() -> Value {
        serde_json::from_str(&DOCUMENT).unwrap()
    }

    /// Every operation of the document: `(METHOD, path)`.
    fn operations(doc: &Value) -> BTreeSet<(String, String)> {
        doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| ["get", "put", "post", "patch", "delete"].contains(&k.as_str()))
                    .map(move |method| (method.to_uppercase(), path.clone()))
            })
            .collect()
    }

    /// The public interface's HTTP routes: what `/openapi.json` must describe.
    const CONTRACT: &[(&str, &str)] = &[
        ("POST", "/v1/auth/register"),
        ("POST", "/v1/auth/login"),
        ("POST", "/v1/auth/refresh"),
        ("POST", "/v1/auth/logout"),
        ("GET", "/v1/me"),
        ("POST", "/v1/conversations"),
        ("GET", "/v1/conversations"),
        ("GET", "/v1/conversations/{id}"),
        ("PATCH", "/v1/conversations/{id}"),
        ("DELETE", "/v1/conversations/{id}"),
        ("POST", "/v1/conversations/{id}/messages"),
        ("GET", "/v1/conversations/{id}/messages"),
        ("PATCH", "/v1/conversations/{id}/messages/{message_id}"),
        ("DELETE", "/v1/conversations/{id}/messages/{message_id}"),
        ("POST", "/v1/conversations/{id}/runs"),
        ("GET", "/v1/runs/{run_id}"),
        ("POST", "/v1/runs/{run_id}/cancel"),
        ("GET", "/v1/search"),
        ("GET", "/v1/conversations/{id}/events"),
        ("GET", "/v1/runs/{run_id}/events"),
        ("GET", "/v1/events"),
        ("GET", "/v1/admin/projections"),
        ("POST", "/v1/admin/projections/{name}/rebuild"),
        ("GET", "/v1/admin/streams/{stream_name}"),
        ("GET", "/v1/admin/agent/keys"),
        ("GET", "/v1/admin/runs/dead-letters"),
        ("POST", "/v1/admin/runs/{run_id}/retry"),
        ("POST", "/v1/admin/users/{user_id}/forget"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/.well-known/jwks.json"),
    ];

    #[test]
    fn the_document_describes_exactly_the_contract() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        let expected: BTreeSet<_> = CONTRACT
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        let documented = operations(&doc);
        let missing: Vec<_> = expected.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&expected).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "missing {missing:?}, not in the contract {extra:?}"
        );
    }

    #[test]
    fn operations_are_named_and_their_path_parameters_declared() {
        let doc = doc();
        let mut ids = BTreeSet::new();
        for (method, path) in operations(&doc) {
            let operation = &doc["paths"][&path][method.to_lowercase()];
            let id = operation["operationId"].as_str().unwrap().to_owned();
            assert!(ids.insert(id.clone()), "operationId {id} is used twice");
            let declared: BTreeSet<&str> = operation["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            let templated: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            assert_eq!(declared, templated, "{method} {path}");
            assert!(operation["tags"].is_array(), "{method} {path} has a tag");
        }
    }

    /// Every `$ref` points into `components`.
    #[test]
    fn references_resolve() {
        fn walk<'a>(value: &'a Value, refs: &mut Vec<&'a str>) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(target)) = map.get("$ref") {
                        refs.push(target);
                    }
                    map.values().for_each(|v| walk(v, refs));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, refs)),
                _ => {}
            }
        }
        let doc = doc();
        let mut refs = Vec::new();
        walk(&doc, &mut refs);
        assert!(!refs.is_empty());
        for target in refs {
            let pointer = target.strip_prefix('#').unwrap();
            assert!(doc.pointer(pointer).is_some(), "{target} does not resolve");
        }
    }

    #[test]
    fn errors_are_problems_with_their_headers() {
        let doc = doc();
        for (method, path) in operations(&doc) {
            let operation = &doc["paths"][&path][method.to_lowercase()];
            let responses = operation["responses"].as_object().unwrap();
            assert!(responses.contains_key("503"), "{method} {path}: 503");
            if operation["requestBody"].is_object() {
                for status in ["408", "413", "415"] {
                    assert!(responses.contains_key(status), "{method} {path}: {status}");
                }
            }
            let secured = operation["security"]
                .as_array()
                .is_some_and(|s| !s.is_empty());
            let public = !path.starts_with("/v1/")
                || ["/v1/auth/register", "/v1/auth/login", "/v1/auth/refresh"]
                    .contains(&path.as_str());
            assert_eq!(secured, !public, "{method} {path}: bearer security");
            let checks_credentials =
                ["/v1/auth/login", "/v1/auth/refresh"].contains(&path.as_str());
            assert_eq!(
                responses.contains_key("401"),
                secured || checks_credentials,
                "{method} {path}: 401 exactly where a token or a credential is checked"
            );
            for (status, response) in responses {
                if !status.starts_with(['4', '5']) || path == "/readyz" {
                    continue;
                }
                assert_eq!(
                    response["content"][PROBLEM_JSON]["schema"]["$ref"],
                    "#/components/schemas/Problem",
                    "{method} {path} {status}"
                );
                if status == "429" || status == "503" {
                    assert!(
                        response["headers"]["Retry-After"].is_object(),
                        "{method} {path} {status}: Retry-After"
                    );
                }
            }
        }
    }

    #[test]
    fn spot_checks() {
        let doc = doc();
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let problem = &schemas["Problem"];
        for field in [
            "type",
            "title",
            "status",
            "detail",
            "code",
            "request_id",
            "errors",
        ] {
            assert!(problem["properties"][field].is_object(), "Problem.{field}");
        }
        let send = &doc["paths"]["/v1/conversations/{id}/messages"]["post"];
        assert_eq!(
            send["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/NewMessage"
        );
        assert_eq!(
            schemas["NewMessage"]["properties"]["text"]["maxLength"],
            32_000
        );
        let created = &send["responses"]["201"];
        assert!(created["headers"]["X-Colloquy-Position"].is_object());
        let committed = &schemas["MessageCommitted"];
        let required: BTreeSet<&str> = committed["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            required,
            BTreeSet::from(["message_id", "position", "version"])
        );
        let events = &doc["paths"]["/v1/events"]["get"];
        assert!(events["responses"]["200"]["content"]["text/event-stream"].is_object());
        assert!(
            events["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "Last-Event-ID" && p["in"] == "header")
        );
        let rename = &doc["paths"]["/v1/conversations/{id}"]["patch"];
        let headers: BTreeSet<&str> = rename["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "header")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(headers, BTreeSet::from(["If-Match", "Idempotency-Key"]));
        assert!(rename["responses"]["412"].is_object());
        let list = &doc["paths"]["/v1/conversations"]["get"];
        assert!(
            list["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "X-Colloquy-Min-Position")
        );
        assert!(doc["paths"]["/v1/auth/login"]["post"]["security"].is_null());
    }
}
