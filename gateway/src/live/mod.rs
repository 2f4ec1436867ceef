//! The live feed: server-sent events (api.md, "Live").
//!
//! - `GET /v1/conversations/{id}/events`: the conversation's events from the moment
//!   of subscription, or after `Last-Event-ID`.
//! - `GET /v1/runs/{run_id}/events`: the run's events (from its start, or after
//!   `Last-Event-ID`), `token` deltas and `reset` signals while the agent writes, and
//!   a final `completed` / `failed` / `cancelled` (with the reply text), after which
//!   the stream ends.
//! - `GET /v1/events`: everything in the caller's conversations and runs.
//!
//! Durable events carry `id:` = global position, `event:` = the event type and
//! `data:` = the event's JSON with `conversationId` (and `runId`) added. A resumed
//! stream first reads the log after `Last-Event-ID` up to where the [`LiveHub`] was
//! when the client subscribed, then continues from the hub, skipping what it already
//! sent: no gap, no duplicate. Heartbeat comments keep proxies from closing idle
//! streams. A client that falls further behind than the hub's ring, and every stream
//! at shutdown, ends with a `retry:` hint so that the browser reconnects (and resumes).
//! Each stream follows the hub in a task of its own (`pump`), so a client that stops
//! reading altogether is cut off too, instead of holding its place until it reads.

mod hub;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use colloquy_commands::live::{RunSignal, SignalStream};
use colloquy_domain::{ConversationId, RunId, UserId};
use colloquy_eventstore::{GlobalPosition, LogFilter, RecordedEvent};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot};
use utoipa_axum::router::OpenApiRouter;
use uuid::Uuid;

pub use hub::{LiveEvent, LiveHub, LiveSettings, StreamSlot};

use crate::GatewayState;
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::routes::{parse_id, user_id};

/// How many log events a resume reads at a time.
const CATCH_UP_BATCH: usize = 500;
/// Events queued for one client's connection ahead of what it has taken (`pump`).
const SEND_QUEUE: usize = 16;
/// How often a stream whose client takes nothing checks how far behind it is.
const STALL_CHECK: Duration = Duration::from_millis(100);

/// The routes of this module.
pub(crate) fn routes() -> Router<GatewayState> {
    api().split_for_parts().0
}

/// The routes of this module with their OpenAPI descriptions.
pub(crate) fn api() -> OpenApiRouter<GatewayState> {
    OpenApiRouter::new()
        .routes(utoipa_axum::routes!(conversation_events))
        .routes(utoipa_axum::routes!(run_events))
        .routes(utoipa_axum::routes!(user_events))
}

/// What one stream shows.
#[derive(Debug, Clone, Copy)]
enum Scope {
    Conversation(Uuid),
    Run { run: Uuid, conversation: Uuid },
    User(UserId),
}

impl Scope {
    fn matches(&self, event: &LiveEvent) -> bool {
        match *self {
            Self::Conversation(id) => event.conversation_id == Some(id) && event.run_id.is_none(),
            Self::Run { run, .. } => event.run_id == Some(run),
            Self::User(user) => event.owner == Some(user),
        }
    }
}

/// `GET /v1/conversations/{id}/events`.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}/events",
    tag = "live",
    operation_id = "conversation_events",
    description = "Server-sent events: the conversation's events from the moment of subscription \
                   (or after `Last-Event-ID`), one per log event. `id:` is the global position, \
                   `event:` the event type, `data:` the event's JSON (for `MessageSent`: the message \
                   id, author and text). A comment heartbeat at least every 15 s; a stream the \
                   server ends closes with a `retry:` hint.",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The conversation"), ("Last-Event-ID" = Option<i64>, Header, minimum = 0,
            description = "Resume after this global position (the `id:` of the last event received): without loss or duplicates")),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such conversation (or another user's)"),
        (status = 400, description = "`Last-Event-ID` is not a non-negative integer"),
        (status = 401, description = "No valid bearer token"),
        (status = 429, description = "Too many open streams for this user, or on this gateway; see `Retry-After`"),
        (status = 503, description = "A dependency is unavailable; see `Retry-After`"),
    )
)]
async fn conversation_events(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let loaded = state
        .commands
        .load_conversation(ConversationId::from_uuid(id))
        .await?;
    match loaded.state {
        Some(conversation) if conversation.owner() == user_id(user) => {}
        _ => return Err(ApiError::NotFound),
    }
    let after = last_event_id(&headers)?;
    open(&state.live, user, Scope::Conversation(id), after).await
}

/// `GET /v1/runs/{run_id}/events`.
#[utoipa::path(
    get,
    path = "/v1/runs/{run_id}/events",
    tag = "live",
    operation_id = "run_events",
    description = "Server-sent events of one run, from its start (or after `Last-Event-ID`): \
                   progress milestones; `event: token` deltas while the agent writes (no `id:`, not \
                   replayed on resume) and `event: reset` when an attempt restarts; and a final \
                   `completed` (with the reply text), `failed` or `cancelled`, after which the \
                   stream ends.",
    security(("bearer" = [])),
    params(("run_id" = Uuid, Path, description = "The run"), ("Last-Event-ID" = Option<i64>, Header, minimum = 0,
            description = "Resume after this global position (the `id:` of the last event received): without loss or duplicates")),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such run (or another user's)"),
        (status = 400, description = "`Last-Event-ID` is not a non-negative integer"),
        (status = 401, description = "No valid bearer token"),
        (status = 429, description = "Too many open streams for this user, or on this gateway; see `Retry-After`"),
        (status = 503, description = "A dependency is unavailable; see `Retry-After`"),
    )
)]
async fn run_events(
    State(state): State<GatewayState>,
    user: AuthUser,
    Path(run_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let run = parse_id(&run_id)?;
    let Some(conversation) = state.live.run_conversation(run).await else {
        return Err(ApiError::NotFound);
    };
    if state.live.owner(conversation).await != Some(user_id(user)) {
        return Err(ApiError::NotFound);
    }
    // A run's history is short: without `Last-Event-ID` it is replayed from the start,
    // so a client that subscribes after requesting the run misses nothing.
    let after = last_event_id(&headers)?.or(Some(0));
    open(&state.live, user, Scope::Run { run, conversation }, after).await
}

/// `GET /v1/events`.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "live",
    operation_id = "user_events",
    description = "Server-sent events of all the caller's conversations and runs, from the moment \
                   of subscription (or after `Last-Event-ID`); the same framing as the \
                   conversation's stream.",
    security(("bearer" = [])),
    params(("Last-Event-ID" = Option<i64>, Header, minimum = 0,
            description = "Resume after this global position (the `id:` of the last event received): without loss or duplicates")),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "`Last-Event-ID` is not a non-negative integer"),
        (status = 401, description = "No valid bearer token"),
        (status = 429, description = "Too many open streams for this user, or on this gateway; see `Retry-After`"),
        (status = 503, description = "A dependency is unavailable; see `Retry-After`"),
    )
)]
async fn user_events(
    State(state): State<GatewayState>,
    user: AuthUser,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = last_event_id(&headers)?;
    open(&state.live, user, Scope::User(user_id(user)), after).await
}

/// `Last-Event-ID`, if sent: a global position.
fn last_event_id(headers: &HeaderMap) -> Result<Option<GlobalPosition>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<GlobalPosition>().ok())
        .filter(|p| *p >= 0)
        .map(Some)
        .ok_or_else(|| ApiError::BadRequest {
            code: "invalid_last_event_id",
            detail: "Last-Event-ID must be a global position (a non-negative integer)".into(),
        })
}

async fn open(
    hub: &LiveHub,
    user: AuthUser,
    scope: Scope,
    after: Option<GlobalPosition>,
) -> Result<Response, ApiError> {
    let Some(slot) = hub.acquire_slot(user_id(user)) else {
        return Err(ApiError::RateLimited {
            retry_after: hub.settings().retry_hint,
        });
    };
    // Subscribe before reading anything: whatever the hub passes on from here is in
    // the receiver, and what it passed on before is in the log.
    let rx = hub.subscribe(user_id(user));
    let tokens = match (scope, hub.signals()) {
        (Scope::Run { run, .. }, Some(signals)) => {
            match signals.subscribe(run).await {
                Ok(subscriber) => Some(subscriber),
                Err(error) => {
                    // Tokens are a nicety: the durable events still arrive.
                    tracing::warn!(error = %error, "live: cannot subscribe to run tokens");
                    None
                }
            }
        }
        _ => None,
    };
    let until = hub.position();
    let catch_up = after.filter(|a| *a < until).map(|a| (a, until));
    let feed = Feed {
        hub: hub.clone(),
        scope,
        rx,
        tokens,
        backlog: VecDeque::new(),
        catch_up,
        seen: after.unwrap_or(until),
        finished: false,
        _slot: slot,
    };
    // The feed is followed by a task of its own, not by the connection's writes: a client
    // that stops reading is noticed and cut off (see `pump`) even though nothing polls
    // its body any more.
    let (queue, queued) = mpsc::channel(SEND_QUEUE);
    let (last, last_event) = oneshot::channel();
    tokio::spawn(pump(feed, queue, last));
    let stream = futures::stream::unfold(queued, |mut queued| async move {
        let event = queued.recv().await?;
        Some((event, queued))
    })
    .chain(futures::stream::once(last_event).filter_map(|last| std::future::ready(last.ok())))
    .map(Ok::<_, Infallible>);
    let keep_alive = KeepAlive::new().interval(hub.settings().heartbeat);
    let mut response = Sse::new(stream).keep_alive(keep_alive).into_response();
    // Ask buffering proxies (nginx) to pass events on as they come.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// Moves one stream's events from its [`Feed`] to its connection, at most
/// [`SEND_QUEUE`] ahead of what the connection has taken.
///
/// A client that reads nothing fills its socket, then the connection's buffers, then
/// this queue; from then on it falls behind the hub's ring. Once it is further behind
/// than its user's ring holds (`COLLOQUY_SSE_BUFFER` events), or the server shuts down, the
/// stream ends: the feed (its ring receiver and its stream slot) is dropped at once,
/// and the connection gets the events already queued, then a `retry:` hint, then the
/// end of the response, whenever the client reads again. So a stuck client holds a
/// bounded amount of memory (this queue, the connection's buffers) and no slot, and
/// when it reads again it reconnects with `Last-Event-ID` and resumes from the log.
async fn pump(mut feed: Feed, queue: mpsc::Sender<Event>, last: oneshot::Sender<Event>) {
    loop {
        let event = tokio::select! {
            biased;
            // The client went away.
            () = queue.closed() => return,
            event = feed.next() => event,
        };
        let Some(event) = event else { return };
        let permit = tokio::select! {
            biased;
            permit = queue.reserve() => permit,
            ending = feed.stalled() => {
                tracing::info!(reason = %ending.1, "live: a stream whose client stopped reading is ended");
                let _ = last.send(ending.0);
                return;
            }
        };
        let Ok(permit) = permit else { return };
        permit.send(event);
        if feed.finished {
            return;
        }
    }
}

/// One client's stream: a resume from the log, then the hub.
struct Feed {
    hub: LiveHub,
    scope: Scope,
    rx: tokio::sync::broadcast::Receiver<Arc<LiveEvent>>,
    tokens: Option<SignalStream>,
    /// Events read from the log, not yet sent.
    backlog: VecDeque<Arc<LiveEvent>>,
    /// `(after, until)`: the log range still to read.
    catch_up: Option<(GlobalPosition, GlobalPosition)>,
    /// Everything at or below this was sent or does not concern this client.
    seen: GlobalPosition,
    finished: bool,
    _slot: StreamSlot,
}

impl Feed {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.finished {
                return None;
            }
            if let Some(event) = self.backlog.pop_front() {
                if event.position <= self.seen {
                    continue;
                }
                self.seen = event.position;
                if let Some(rendered) = self.render(&event).await {
                    return Some(rendered);
                }
                continue;
            }
            if let Some((after, until)) = self.catch_up {
                match self.read_log(after, until).await {
                    Ok(next) => self.catch_up = next,
                    Err(()) => return Some(self.end("the log cannot be read; reconnect")),
                }
                continue;
            }
            let closed = self.hub.closed().clone();
            tokio::select! {
                biased;
                () = closed.cancelled() => return Some(self.end("the server is shutting down")),
                received = self.rx.recv() => match received {
                    Ok(event) => {
                        if event.position > self.seen && self.scope.matches(&event) {
                            self.backlog.push_back(event);
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        return Some(self.end("this client fell behind; resume with Last-Event-ID"));
                    }
                    Err(RecvError::Closed) => return Some(self.end("the feed closed")),
                },
                Some(signal) = next_token(&mut self.tokens) => {
                    if let Some(event) = token_event(signal) {
                        return Some(event);
                    }
                }
            }
        }
    }

    /// Reads one batch of the log range; the rest of the range, if any.
    async fn read_log(
        &mut self,
        after: GlobalPosition,
        until: GlobalPosition,
    ) -> Result<Option<(GlobalPosition, GlobalPosition)>, ()> {
        let store = self.hub.commands().store().clone();
        let (events, full): (Vec<RecordedEvent>, bool) = match self.scope {
            Scope::Run { run, .. } => {
                // Short: read the whole stream once.
                let events = store
                    .read_stream(&RunId::from_uuid(run).stream_name(), 0, 10_000)
                    .await
                    .map_err(|error| tracing::warn!(error = %error, "live: resume failed"))?;
                (events, false)
            }
            Scope::Conversation(_) | Scope::User(_) => {
                let filter = match self.scope {
                    Scope::Conversation(_) => LogFilter::Category("conversation".into()),
                    _ => LogFilter::All,
                };
                let events = store
                    .read_log(&filter, after, CATCH_UP_BATCH)
                    .await
                    .map_err(|error| tracing::warn!(error = %error, "live: resume failed"))?;
                let full = events.len() == CATCH_UP_BATCH;
                (events, full)
            }
        };
        let mut last = after;
        for event in events {
            let position = event.global_position;
            if position <= after {
                continue;
            }
            if position > until {
                return Ok(None);
            }
            last = position;
            let live = self.hub.annotate(event).await;
            if self.scope.matches(&live) {
                self.backlog.push_back(Arc::new(live));
            }
        }
        Ok((full && last < until).then_some((last, until)))
    }

    /// The SSE event for a log event; for a run's last event, the final outcome.
    async fn render(&mut self, event: &LiveEvent) -> Option<Event> {
        let base = Event::default().id(event.position.to_string());
        if let Scope::Run { conversation, .. } = self.scope {
            let outcome = match event.event_type.as_str() {
                "RunCompleted" => Some("completed"),
                "RunFailed" => Some("failed"),
                "RunCancelled" => Some("cancelled"),
                _ => None,
            };
            if let Some(outcome) = outcome {
                self.finished = true;
                let mut data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                if outcome == "completed"
                    && let Some(reply) = data.get("replyMessageId").and_then(Value::as_str)
                {
                    let text = self.reply_text(conversation, reply).await;
                    if let (Value::Object(object), Some(text)) = (&mut data, text) {
                        object.insert("text".into(), Value::String(text));
                    }
                }
                return Some(base.event(outcome).data(data.to_string()));
            }
        }
        Some(base.event(&event.event_type).data(&event.data))
    }

    /// The text of the reply `message_id` (written with the completion).
    async fn reply_text(&self, conversation: Uuid, message_id: &str) -> Option<String> {
        let stream = ConversationId::from_uuid(conversation).stream_name();
        let events = self
            .hub
            .commands()
            .store()
            .read_stream_backward(&stream, None, 50)
            .await
            .ok()?;
        events
            .into_iter()
            .find(|e| {
                e.event_type == "MessageSent"
                    && e.data.get("messageId").and_then(Value::as_str) == Some(message_id)
            })
            .and_then(|e| {
                e.data
                    .get("text")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
    }

    /// Resolves while an event waits for the client to take it: once the client is
    /// further behind the hub than the ring holds, or the hub closes. The stream's last
    /// event, and why.
    async fn stalled(&mut self) -> (Event, &'static str) {
        let closed = self.hub.closed().clone();
        let mut check = tokio::time::interval(STALL_CHECK);
        loop {
            tokio::select! {
                () = closed.cancelled() => {
                    let why = "the server is shutting down";
                    return (self.end(why), why);
                }
                _ = check.tick() => {
                    if self.rx.len() > self.hub.settings().buffer {
                        let why = "this client fell behind; resume with Last-Event-ID";
                        return (self.end(why), why);
                    }
                }
            }
        }
    }

    /// The last event of a stream the server ends: a reconnect hint.
    fn end(&mut self, why: &str) -> Event {
        self.finished = true;
        Event::default()
            .retry(self.hub.settings().retry_hint)
            .comment(why)
    }
}

async fn next_token(tokens: &mut Option<SignalStream>) -> Option<RunSignal> {
    match tokens {
        Some(subscriber) => subscriber.next().await,
        None => std::future::pending().await,
    }
}

/// `event: token` / `event: reset` (no `id:`: not replayed).
fn token_event(signal: RunSignal) -> Option<Event> {
    match signal {
        RunSignal::Token { attempt, text } => Some(
            Event::default()
                .event("token")
                .data(json!({ "attempt": attempt, "text": text }).to_string()),
        ),
        RunSignal::Reset { attempt } => Some(
            Event::default()
                .event("reset")
                .data(json!({ "attempt": attempt }).to_string()),
        ),
    }
}
