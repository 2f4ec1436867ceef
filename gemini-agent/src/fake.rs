//! [`FakeGemini`]: an HTTP server that speaks Gemini's v1beta wire format, for tests and for
//! running the whole system without Google (`colloquy dev fake-gemini`).
//!
//! It answers the calls the agent makes (`:streamGenerateContent?alt=sse`,
//! `:generateContent`, `:countTokens`, `GET /v1beta/models`) the way Gemini does, including
//! the ways Gemini fails:
//!
//! - **Keys and projects.** Each key belongs to a project. An unknown key gets 400
//!   `API_KEY_INVALID`, a suspended one 403 `CONSUMER_SUSPENDED` (whose message quotes the
//!   key, as Google's does, so that redaction is tested).
//! - **Quotas** per project and model: requests per minute (a fixed window from the first
//!   request) and per day (24 hours from the first request; Google resets at midnight US
//!   Pacific, which tests do not need: [`FakeGemini::reset_quotas`] starts a new day). Going
//!   over gives 429 with `QuotaFailure` and `RetryInfo` as Google sends them, or the older
//!   shapes ([`QuotaErrorStyle`]).
//! - **Faults**, scripted ([`FakeGemini::push_fault`], consumed one per generation call, in
//!   order, optionally only by one key or project) or random with a seeded generator
//!   ([`RandomFaults`]): server errors, an error chunk or a dropped connection mid-stream, a
//!   stream that ends without a finish reason, blocked prompts and replies, latency, CRLF
//!   framing, thought parts. See [`Fault`].
//!
//! The reply is deterministic: `echo: <last user text>` in several chunks with running
//! `usageMetadata` (one token per four characters) and `finishReason: STOP` on the last.
//!
//! Every request is recorded ([`FakeGemini::requests`]) with the key header, the model and
//! the body, so tests can check what was sent, and answers are counted by status.
//!
//! Its JSON is written by hand rather than with the client's [`wire`](crate::gemini::wire)
//! types, so a mistake in those types shows up in tests instead of being mirrored here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::gemini::wire::GenerateContentRequest;

/// The models the fake serves unless configured otherwise.
pub const DEFAULT_MODELS: &[&str] = &[
    "gemini-2.5-flash",
    "gemini-2.5-flash-lite",
    "gemini-2.5-pro",
];

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// A key the fake accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeKey {
    /// The key as sent in `x-goog-api-key`.
    pub key: String,
    /// The project whose quota it spends.
    pub project: String,
    /// Whether calls get 403 `CONSUMER_SUSPENDED`.
    pub suspended: bool,
}

impl FakeKey {
    /// An active key of `project`.
    pub fn new(key: impl Into<String>, project: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            project: project.into(),
            suspended: false,
        }
    }
}

/// A project's limits per model; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Requests per day.
    pub rpd: Option<u32>,
}

/// The shape of a 429, as Google has sent them over time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QuotaErrorStyle {
    /// `QuotaFailure` (quota id and value), `Help` and `RetryInfo` details, as today.
    #[default]
    Detailed,
    /// No details; the message ends with "Please retry in N.NNs.".
    MessageOnly,
    /// No details and no hint at all, as the oldest 429s.
    Bare,
}

/// How stream events are framed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Framing {
    /// `data: …\n\n`, as the Gemini API sends.
    #[default]
    Lf,
    /// `data: …\r\n\r\n`, as Vertex AI sends.
    Crlf,
}

/// How replies look when no fault says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyShape {
    /// How many chunks the reply text is split into (at least one).
    pub chunks: usize,
    /// Line endings of the stream.
    pub framing: Framing,
    /// Whether a thought part comes before the reply.
    pub thoughts: bool,
    /// Wait before the response starts (its status line and headers).
    pub first_byte_delay: Duration,
    /// Wait between stream chunks.
    pub chunk_delay: Duration,
}

impl Default for ReplyShape {
    fn default() -> Self {
        Self {
            chunks: 3,
            framing: Framing::Lf,
            thoughts: false,
            first_byte_delay: Duration::ZERO,
            chunk_delay: Duration::ZERO,
        }
    }
}

/// Something to go wrong (or differently) in one generation call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 500 `INTERNAL`.
    Internal,
    /// 503 `UNAVAILABLE`, "The model is overloaded. Please try again later.".
    Overloaded,
    /// 504 `DEADLINE_EXCEEDED`.
    DeadlineExceeded,
    /// Any error envelope.
    Status {
        /// The HTTP status.
        code: u16,
        /// The status word, e.g. `FAILED_PRECONDITION`.
        status: String,
        /// The message.
        message: String,
    },
    /// A 429 whatever the quotas say, in the configured [`QuotaErrorStyle`]. Its
    /// `quotaValue` is the project's configured limit, or absent if it has none.
    RateLimited {
        /// A per-day quota rather than a per-minute one.
        per_day: bool,
        /// The retry hint.
        retry_after: Duration,
    },
    /// Half the reply, then an `{"error": …}` chunk (500 `INTERNAL`) and the end. A
    /// unary call gets a plain 500.
    ErrorMidStream,
    /// Half the reply, then the connection is cut.
    DropMidStream,
    /// The whole reply, but the last chunk has no `finishReason`.
    EndWithoutFinish,
    /// 200 with no candidates and `promptFeedback.blockReason: SAFETY`.
    PromptBlocked,
    /// Half the reply, then `finishReason: SAFETY`.
    SafetyFinish,
    /// A normal reply, slowed.
    Latency {
        /// Wait before the response starts.
        before_first_byte: Duration,
        /// Wait between chunks.
        between_chunks: Duration,
    },
    /// A normal reply framed with CRLF.
    Crlf,
    /// A normal reply with a thought part first.
    Thoughts,
}

/// Which calls a scripted fault may hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultTarget {
    /// Any call.
    Any,
    /// Calls with this key.
    Key(String),
    /// Calls with any key of this project.
    Project(String),
}

/// Faults drawn at random, repeatably: the same seed and the same calls give the same
/// faults.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomFaults {
    /// The generator's seed.
    pub seed: u64,
    /// The chance, 0.0 to 1.0, that a call gets a fault.
    pub probability: f64,
    /// The faults to draw from, equally likely.
    pub faults: Vec<Fault>,
}

/// Everything the fake starts with. Most of it can be changed while it runs.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// The keys it accepts.
    pub keys: Vec<FakeKey>,
    /// The models it serves; calls to others get 404. Empty serves any name.
    pub models: Vec<String>,
    /// The limits of projects without their own.
    pub default_quota: Quota,
    /// Limits by project.
    pub project_quotas: HashMap<String, Quota>,
    /// How 429s look.
    pub quota_errors: QuotaErrorStyle,
    /// How replies look.
    pub reply: ReplyShape,
    /// Random faults, if any.
    pub random_faults: Option<RandomFaults>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            models: DEFAULT_MODELS
                .iter()
                .map(|&model| model.to_owned())
                .collect(),
            default_quota: Quota::default(),
            project_quotas: HashMap::new(),
            quota_errors: QuotaErrorStyle::default(),
            reply: ReplyShape::default(),
            random_faults: None,
        }
    }
}

impl FakeConfig {
    /// Adds an active key of `project`.
    #[must_use]
    pub fn key(mut self, key: impl Into<String>, project: impl Into<String>) -> Self {
        self.keys.push(FakeKey::new(key, project));
        self
    }

    /// Sets the limits of one project.
    #[must_use]
    pub fn quota(mut self, project: impl Into<String>, quota: Quota) -> Self {
        self.project_quotas.insert(project.into(), quota);
        self
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The HTTP method.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string, if any (the client must never put the key here).
    pub query: Option<String>,
    /// The `x-goog-api-key` header.
    pub api_key: Option<String>,
    /// Whether a `key=` query parameter was sent.
    pub key_in_query: bool,
    /// The model named in the path, without `models/`.
    pub model: Option<String>,
    /// The method after the colon (`streamGenerateContent`, ...), or `list` for the model
    /// list.
    pub action: Option<String>,
    /// The body as JSON, if it was JSON.
    pub body: Option<Value>,
    /// The body as a generation request, if it was one.
    pub request: Option<GenerateContentRequest>,
    /// The status answered (200 for streams, whatever happened after).
    pub status: u16,
    /// When it arrived (on Tokio's clock), so tests can tell how calls were spaced.
    pub received: Instant,
}

impl RecordedRequest {
    fn new(method: &Method, uri: &Uri, headers: &HeaderMap) -> Self {
        let query = uri.query().map(str::to_owned);
        let key_in_query = query
            .as_deref()
            .is_some_and(|query| query.split('&').any(|pair| pair.starts_with("key=")));
        Self {
            method: method.to_string(),
            path: uri.path().to_owned(),
            query,
            api_key: headers
                .get("x-goog-api-key")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned),
            key_in_query,
            model: None,
            action: None,
            body: None,
            request: None,
            status: 0,
            received: Instant::now(),
        }
    }

    /// The key the request authenticated with: the header, else the `key=` parameter.
    fn key(&self) -> Option<String> {
        self.api_key.clone().or_else(|| {
            self.query.as_deref().and_then(|query| {
                query
                    .split('&')
                    .find_map(|pair| pair.strip_prefix("key="))
                    .map(str::to_owned)
            })
        })
    }
}

/// A running fake Gemini server. Dropping it stops the server.
#[derive(Debug)]
pub struct FakeGemini {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<io::Result<()>>>,
}

/// Runs a fake Gemini server on `listener` until `shutdown` is cancelled. For a command
/// that serves until stopped; tests use [`FakeGemini::start`] to keep the control handle.
pub async fn serve(
    listener: TcpListener,
    config: FakeConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let fake = FakeGemini::from_listener(listener, config)?;
    shutdown.cancelled().await;
    fake.shutdown().await
}

impl FakeGemini {
    /// Starts a fake on a free port of 127.0.0.1.
    pub async fn start(config: FakeConfig) -> io::Result<Self> {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// Starts a fake on `addr`.
    pub async fn bind(addr: SocketAddr, config: FakeConfig) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Self::from_listener(listener, config)
    }

    /// Starts a fake on a bound listener. Must be called within a Tokio runtime.
    pub fn from_listener(listener: TcpListener, config: FakeConfig) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(FakeState::new(config)),
            shutdown: CancellationToken::new(),
        });
        let app = Router::new()
            .route("/v1beta/models", get(list_models))
            .route("/v1beta/models/{target}", post(model_call))
            .fallback(unknown_path)
            .with_state(Arc::clone(&shared));
        let stop = shared.shutdown.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        Ok(Self {
            addr,
            shared,
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:port`, the client's base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the server: streams in progress end, and it waits for connections to close.
    pub async fn shutdown(mut self) -> io::Result<()> {
        self.shared.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Forgets the recorded requests and status counts.
    pub fn clear_requests(&self) {
        let mut state = self.shared.lock();
        state.requests.clear();
        state.statuses.clear();
    }

    /// How many answers had each HTTP status.
    pub fn status_counts(&self) -> BTreeMap<u16, u64> {
        self.shared.lock().statuses.clone()
    }

    /// Queues a fault for the next generation call.
    pub fn push_fault(&self, fault: Fault) {
        self.push_fault_for(FaultTarget::Any, fault);
    }

    /// Queues a fault for the next generation call that `target` matches.
    pub fn push_fault_for(&self, target: FaultTarget, fault: Fault) {
        self.shared.lock().faults.push_back((target, fault));
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// How many queued faults are still to be used.
    pub fn pending_faults(&self) -> usize {
        self.shared.lock().faults.len()
    }

    /// Starts (or with `None` stops) random faults, with a fresh generator from the seed.
    pub fn set_random_faults(&self, random: Option<RandomFaults>) {
        self.shared.lock().random = random.map(RandomState::new);
    }

    /// Adds a key, or replaces the one with the same text.
    pub fn add_key(&self, key: FakeKey) {
        self.shared.lock().keys.insert(key.key.clone(), key);
    }

    /// Makes calls with `key` get 403 `CONSUMER_SUSPENDED`. `false` if the key is unknown.
    pub fn suspend_key(&self, key: &str) -> bool {
        self.set_suspended(key, true)
    }

    /// Makes `key` usable again. `false` if the key is unknown.
    pub fn unsuspend_key(&self, key: &str) -> bool {
        self.set_suspended(key, false)
    }

    fn set_suspended(&self, key: &str, suspended: bool) -> bool {
        match self.shared.lock().keys.get_mut(key) {
            Some(entry) => {
                entry.suspended = suspended;
                true
            }
            None => false,
        }
    }

    /// Forgets all quota use: every minute and day starts afresh.
    pub fn reset_quotas(&self) {
        self.shared.lock().usage.clear();
    }

    /// Sets the limits of one project from now on (its use so far still counts).
    pub fn set_quota(&self, project: &str, quota: Quota) {
        self.shared
            .lock()
            .project_quotas
            .insert(project.to_owned(), quota);
    }

    /// Sets the limits of projects without their own.
    pub fn set_default_quota(&self, quota: Quota) {
        self.shared.lock().default_quota = quota;
    }

    /// Sets how 429s look.
    pub fn set_quota_errors(&self, style: QuotaErrorStyle) {
        self.shared.lock().quota_errors = style;
    }

    /// Sets how replies look from now on.
    pub fn set_reply_shape(&self, shape: ReplyShape) {
        self.shared.lock().reply = shape;
    }

    /// How replies look now.
    pub fn reply_shape(&self) -> ReplyShape {
        self.shared.lock().reply
    }
}

impl Drop for FakeGemini {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<FakeState>,
    shutdown: CancellationToken,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FakeState> {
        // The state stays consistent between statements; a panicking test thread must not
        // take the server down with it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
struct RandomState {
    config: RandomFaults,
    rng: StdRng,
}

impl RandomState {
    fn new(config: RandomFaults) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    fn draw(&mut self) -> Option<Fault> {
        if self.config.faults.is_empty() {
            return None;
        }
        let probability = self.config.probability.clamp(0.0, 1.0);
        if !self.rng.random_bool(probability) {
            return None;
        }
        let index = self.rng.random_range(0..self.config.faults.len());
        self.config.faults.get(index).cloned()
    }
}

/// A fixed window of counted requests.
#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    count: u32,
}

#[derive(Debug, Default)]
struct ProjectUsage {
    minute: Option<Window>,
    day: Option<Window>,
}

#[derive(Debug)]
struct FakeState {
    keys: HashMap<String, FakeKey>,
    models: Vec<String>,
    default_quota: Quota,
    project_quotas: HashMap<String, Quota>,
    quota_errors: QuotaErrorStyle,
    reply: ReplyShape,
    faults: VecDeque<(FaultTarget, Fault)>,
    random: Option<RandomState>,
    /// By project and model.
    usage: HashMap<(String, String), ProjectUsage>,
    requests: Vec<RecordedRequest>,
    statuses: BTreeMap<u16, u64>,
    responses: u64,
}

impl FakeState {
    fn new(config: FakeConfig) -> Self {
        Self {
            keys: config
                .keys
                .into_iter()
                .map(|key| (key.key.clone(), key))
                .collect(),
            models: config.models,
            default_quota: config.default_quota,
            project_quotas: config.project_quotas,
            quota_errors: config.quota_errors,
            reply: config.reply,
            faults: VecDeque::new(),
            random: config.random_faults.map(RandomState::new),
            usage: HashMap::new(),
            requests: Vec::new(),
            statuses: BTreeMap::new(),
            responses: 0,
        }
    }

    fn record(&mut self, mut request: RecordedRequest, status: u16) {
        request.status = status;
        self.requests.push(request);
        *self.statuses.entry(status).or_default() += 1;
    }

    /// The project of the request's key, or the error answer.
    fn authenticate(&self, key: Option<&str>) -> Result<String, Answer> {
        let Some(key) = key else {
            return Err(Answer::error(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established \
                 identity). Please use API Key or other form of API consumer identity to call \
                 this API.",
                vec![],
            ));
        };
        match self.keys.get(key) {
            None => Err(Answer::error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                vec![
                    json!({
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    }),
                    json!({
                        "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                        "locale": "en-US",
                        "message": "API key not valid. Please pass a valid API key.",
                    }),
                ],
            )),
            Some(entry) if entry.suspended => Err(Answer::error(
                403,
                "PERMISSION_DENIED",
                &format!("Permission denied: Consumer 'api_key:{key}' has been suspended."),
                vec![json!({
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "CONSUMER_SUSPENDED",
                    "domain": "googleapis.com",
                    "metadata": {
                        "service": "generativelanguage.googleapis.com",
                        "consumer": format!("projects/{}", entry.project),
                    },
                })],
            )),
            Some(entry) => Ok(entry.project.clone()),
        }
    }

    fn check_model(&self, model: &str, method: &str) -> Result<(), Answer> {
        if self.models.is_empty() || self.models.iter().any(|known| known == model) {
            return Ok(());
        }
        Err(Answer::error(
            404,
            "NOT_FOUND",
            &format!(
                "models/{model} is not found for API version v1beta, or is not supported for \
                 {method}. Call ListModels to see the list of available models and their \
                 supported methods."
            ),
            vec![],
        ))
    }

    /// Counts one request against the project's limits, or answers 429 without counting.
    fn charge(&mut self, project: &str, model: &str, now: Instant) -> Result<(), Answer> {
        let quota = self.quota_of(project);
        let usage = self
            .usage
            .entry((project.to_owned(), model.to_owned()))
            .or_default();
        let day = current(&mut usage.day, now, DAY);
        let minute = current(&mut usage.minute, now, MINUTE);
        if let Some(limit) = quota.rpd
            && day.count >= limit
        {
            let wait = (day.started + DAY).saturating_duration_since(now);
            return Err(rate_limited(
                self.quota_errors,
                true,
                Some(limit),
                model,
                wait,
            ));
        }
        if let Some(limit) = quota.rpm
            && minute.count >= limit
        {
            let wait = (minute.started + MINUTE).saturating_duration_since(now);
            return Err(rate_limited(
                self.quota_errors,
                false,
                Some(limit),
                model,
                wait,
            ));
        }
        day.count += 1;
        minute.count += 1;
        Ok(())
    }

    /// The limits of a project.
    fn quota_of(&self, project: &str) -> Quota {
        self.project_quotas
            .get(project)
            .copied()
            .unwrap_or(self.default_quota)
    }

    /// The fault for this call: the first queued one it matches, else a random one.
    fn take_fault(&mut self, key: &str, project: &str) -> Option<Fault> {
        let position = self.faults.iter().position(|(target, _)| match target {
            FaultTarget::Any => true,
            FaultTarget::Key(wanted) => wanted == key,
            FaultTarget::Project(wanted) => wanted == project,
        });
        if let Some(fault) = position.and_then(|at| self.faults.remove(at)) {
            return Some(fault.1);
        }
        self.random.as_mut().and_then(RandomState::draw)
    }
}

/// The window in force at `now`, starting a new one if the last has ended.
fn current(window: &mut Option<Window>, now: Instant, length: Duration) -> &mut Window {
    let expired = window.is_none_or(|window| now.duration_since(window.started) >= length);
    if expired {
        *window = Some(Window {
            started: now,
            count: 0,
        });
    }
    window.get_or_insert(Window {
        started: now,
        count: 0,
    })
}

/// A 429 in `style`. `limit` becomes `quotaValue` when known; without it the violation has
/// none, so that a scripted 429 teaches the client no made-up limit.
fn rate_limited(
    style: QuotaErrorStyle,
    per_day: bool,
    limit: Option<u32>,
    model: &str,
    wait: Duration,
) -> Answer {
    let seconds = wait.as_secs_f64();
    let (quota_id, period) = if per_day {
        ("GenerateRequestsPerDayPerProjectPerModel-FreeTier", "day")
    } else {
        (
            "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
            "minute",
        )
    };
    let metric = "generativelanguage.googleapis.com/generate_content_free_tier_requests";
    let shown_limit = limit.map_or_else(|| "?".to_owned(), |limit| limit.to_string());
    let mut violation = json!({
        "quotaMetric": metric,
        "quotaId": quota_id,
        "quotaDimensions": {"location": "global", "model": model},
    });
    if let Some(limit) = limit {
        violation["quotaValue"] = json!(limit.to_string());
    }
    match style {
        QuotaErrorStyle::Detailed => Answer::error(
            429,
            "RESOURCE_EXHAUSTED",
            &format!(
                "You exceeded your current quota, please check your plan and billing details. \
                 For more information on this error, head to: \
                 https://ai.google.dev/gemini-api/docs/rate-limits.\n* Quota exceeded for \
                 metric: {metric}, limit: {shown_limit}, model: {model}\nPlease retry in {seconds:.2}s."
            ),
            vec![
                json!({
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [violation],
                }),
                json!({
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [{
                        "description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                    }],
                }),
                json!({
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    // Whole seconds, rounded up, as Google sends them.
                    "retryDelay": format!("{}s", seconds.ceil()),
                }),
            ],
        ),
        QuotaErrorStyle::MessageOnly => Answer::error(
            429,
            "RESOURCE_EXHAUSTED",
            &format!(
                "Resource has been exhausted (requests per {period}). Please retry in \
                 {seconds:.2}s."
            ),
            vec![],
        ),
        QuotaErrorStyle::Bare => Answer::error(
            429,
            "RESOURCE_EXHAUSTED",
            "Resource has been exhausted (e.g. check quota).",
            vec![],
        ),
    }
}

/// What to send back.
#[derive(Debug)]
enum Answer {
    /// A JSON body (an error envelope or a unary result) after a delay.
    Json {
        status: u16,
        body: Value,
        delay: Duration,
    },
    /// A 200 whose body is sent in pieces, with pauses, possibly cut off.
    Chunked {
        content_type: &'static str,
        pieces: Vec<Piece>,
        first_byte_delay: Duration,
        between: Duration,
    },
}

/// One piece of a chunked body.
#[derive(Debug)]
enum Piece {
    Bytes(Vec<u8>),
    /// Cut the connection.
    Drop,
}

impl Answer {
    fn error(status: u16, word: &str, message: &str, details: Vec<Value>) -> Self {
        let mut error = json!({"code": status, "message": message, "status": word});
        if !details.is_empty() {
            error["details"] = Value::Array(details);
        }
        Self::Json {
            status,
            body: json!({"error": error}),
            delay: Duration::ZERO,
        }
    }

    fn status(&self) -> u16 {
        match self {
            Self::Json { status, .. } => *status,
            Self::Chunked { .. } => 200,
        }
    }

    async fn into_response(self, shutdown: CancellationToken) -> Response {
        match self {
            Self::Json {
                status,
                body,
                delay,
            } => {
                pause(delay, &shutdown).await;
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                (
                    status,
                    [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
                    body.to_string(),
                )
                    .into_response()
            }
            Self::Chunked {
                content_type,
                pieces,
                first_byte_delay,
                between,
            } => {
                pause(first_byte_delay, &shutdown).await;
                let body = Body::from_stream(chunked_body(pieces, between, shutdown));
                ([(header::CONTENT_TYPE, content_type)], body).into_response()
            }
        }
    }
}

async fn pause(delay: Duration, shutdown: &CancellationToken) {
    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

/// The pieces in order, with pauses between them. Before cutting the connection it yields
/// once, so the server flushes what was sent before: the client sees the text, then the cut.
fn chunked_body(
    pieces: Vec<Piece>,
    between: Duration,
    shutdown: CancellationToken,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send {
    let state = (VecDeque::from(pieces), false, shutdown);
    futures::stream::unfold(state, move |(mut pieces, started, shutdown)| async move {
        if shutdown.is_cancelled() {
            return None;
        }
        let piece = pieces.pop_front()?;
        if started {
            pause(between, &shutdown).await;
        }
        match piece {
            Piece::Bytes(bytes) => Some((Ok(Bytes::from(bytes)), (pieces, true, shutdown))),
            Piece::Drop => {
                tokio::task::yield_now().await;
                tokio::task::yield_now().await;
                let cut = io::Error::new(io::ErrorKind::ConnectionReset, "fake: connection cut");
                Some((Err(cut), (VecDeque::new(), true, shutdown)))
            }
        }
    })
}

async fn list_models(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let mut record = RecordedRequest::new(&method, &uri, &headers);
    record.action = Some("list".to_owned());
    let answer = {
        let mut state = shared.lock();
        let answer = match state.authenticate(record.key().as_deref()) {
            Err(answer) => answer,
            Ok(_) => model_page(&state.models, uri.query().unwrap_or_default()),
        };
        state.record(record, answer.status());
        answer
    };
    answer.into_response(shared.shutdown.clone()).await
}

fn model_page(models: &[String], query: &str) -> Answer {
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .and_then(|value| value.parse::<usize>().ok())
    };
    let size = param("pageSize").filter(|&size| size > 0).unwrap_or(50);
    let start = param("pageToken").unwrap_or(0);
    let page: Vec<Value> = models
        .iter()
        .skip(start)
        .take(size)
        .map(|model| {
            json!({
                "name": format!("models/{model}"),
                "displayName": model,
                "inputTokenLimit": 1_048_576,
                "outputTokenLimit": 65_536,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
            })
        })
        .collect();
    let mut body = json!({"models": page});
    if start + size < models.len() {
        body["nextPageToken"] = json!((start + size).to_string());
    }
    Answer::Json {
        status: 200,
        body,
        delay: Duration::ZERO,
    }
}

async fn model_call(
    State(shared): State<Arc<Shared>>,
    Path(target): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut record = RecordedRequest::new(&method, &uri, &headers);
    record.body = serde_json::from_slice(&body).ok();
    let (model, action) = match target.rsplit_once(':') {
        Some((model, action)) => (model.to_owned(), action.to_owned()),
        None => (target.clone(), String::new()),
    };
    record.model = Some(model.clone());
    record.action = Some(action.clone());
    if matches!(action.as_str(), "generateContent" | "streamGenerateContent") {
        record.request = record
            .body
            .clone()
            .and_then(|body| serde_json::from_value(body).ok());
    }
    let answer = {
        let mut state = shared.lock();
        let answer = answer_model_call(&mut state, &record, &model, &action);
        state.record(record, answer.status());
        answer
    };
    answer.into_response(shared.shutdown.clone()).await
}

fn answer_model_call(
    state: &mut FakeState,
    record: &RecordedRequest,
    model: &str,
    action: &str,
) -> Answer {
    let key = record.key();
    let project = match state.authenticate(key.as_deref()) {
        Ok(project) => project,
        Err(answer) => return answer,
    };
    let stream = match action {
        "streamGenerateContent" => true,
        "generateContent" => false,
        "countTokens" => return count_tokens(state, record, model),
        _ => {
            return Answer::error(
                404,
                "NOT_FOUND",
                &format!("Method not found: {action}"),
                vec![],
            );
        }
    };
    if let Err(answer) = state.check_model(model, action) {
        return answer;
    }
    let question = match validate_request(record.body.as_ref()) {
        Ok(question) => question,
        Err(answer) => return answer,
    };
    if let Err(answer) = state.charge(&project, model, Instant::now()) {
        return answer;
    }
    let fault = state.take_fault(key.as_deref().unwrap_or_default(), &project);
    state.responses += 1;
    let reply = Reply::plan(
        state.reply,
        fault.as_ref(),
        model,
        &question,
        record.body.as_ref(),
        state.responses,
    );
    match fault {
        Some(Fault::Internal) => internal_error(),
        Some(Fault::Overloaded) => Answer::error(
            503,
            "UNAVAILABLE",
            "The model is overloaded. Please try again later.",
            vec![],
        ),
        Some(Fault::DeadlineExceeded) => Answer::error(
            504,
            "DEADLINE_EXCEEDED",
            "Deadline expired before operation could complete.",
            vec![],
        ),
        Some(Fault::Status {
            code,
            status,
            message,
        }) => Answer::error(code, &status, &message, vec![]),
        Some(Fault::RateLimited {
            per_day,
            retry_after,
        }) => {
            let quota = state.quota_of(&project);
            let limit = if per_day { quota.rpd } else { quota.rpm };
            rate_limited(state.quota_errors, per_day, limit, model, retry_after)
        }
        Some(Fault::ErrorMidStream) if !stream => internal_error(),
        _ if stream => reply.stream(fault.as_ref()),
        _ => reply.unary(fault.as_ref()),
    }
}

fn internal_error() -> Answer {
    Answer::error(
        500,
        "INTERNAL",
        "An internal error has occurred. Please retry or report in \
         https://developers.generativeai.google/guide/troubleshooting",
        vec![],
    )
}

fn count_tokens(state: &FakeState, record: &RecordedRequest, model: &str) -> Answer {
    if let Err(answer) = state.check_model(model, "countTokens") {
        return answer;
    }
    let body = record.body.as_ref();
    // Either {"contents": …} or {"generateContentRequest": {"model", "contents", …}}.
    let request = body
        .and_then(|body| body.get("generateContentRequest"))
        .or(body);
    let Some(request) = request else {
        return Answer::error(
            400,
            "INVALID_ARGUMENT",
            "Invalid JSON payload received.",
            vec![],
        );
    };
    Answer::Json {
        status: 200,
        body: json!({"totalTokens": prompt_tokens(request)}),
        delay: Duration::ZERO,
    }
}

/// Checks a generation request as Gemini does and returns the last user text.
fn validate_request(body: Option<&Value>) -> Result<String, Answer> {
    let bad = |message: &str| Answer::error(400, "INVALID_ARGUMENT", message, vec![]);
    let Some(body) = body else {
        return Err(bad("Invalid JSON payload received."));
    };
    let contents = body
        .get("contents")
        .and_then(Value::as_array)
        .filter(|contents| !contents.is_empty())
        .ok_or_else(|| bad("* GenerateContentRequest.contents: contents is not specified\n"))?;
    let mut question = None;
    for content in contents {
        match content.get("role").and_then(Value::as_str) {
            Some("user") | None => question = Some(texts(content)),
            Some("model") => {}
            Some(_) => return Err(bad("Please use a valid role: user, model.")),
        }
    }
    Ok(question.unwrap_or_default())
}

/// The text parts of a content, concatenated.
fn texts(content: &Value) -> String {
    content
        .get("parts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|part| part.get("text").and_then(Value::as_str))
        .collect()
}

/// One token per four characters, at least one: close enough for budgets in tests.
fn tokens(text: &str) -> u64 {
    let chars = u64::try_from(text.chars().count()).unwrap_or(u64::MAX);
    chars.div_ceil(4).max(1)
}

fn prompt_tokens(request: &Value) -> u64 {
    let contents = request
        .get("contents")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    let system = request.get("systemInstruction").into_iter();
    contents
        .chain(system)
        .map(|content| tokens(&texts(content)))
        .sum()
}

/// The reply to one generation call, before faults shape how it is sent.
struct Reply {
    shape: ReplyShape,
    model: String,
    pieces: Vec<String>,
    thought: Option<String>,
    prompt_tokens: u64,
    response_id: String,
}

impl Reply {
    fn plan(
        mut shape: ReplyShape,
        fault: Option<&Fault>,
        model: &str,
        question: &str,
        body: Option<&Value>,
        number: u64,
    ) -> Self {
        match fault {
            Some(Fault::Crlf) => shape.framing = Framing::Crlf,
            Some(Fault::Thoughts) => shape.thoughts = true,
            Some(Fault::Latency {
                before_first_byte,
                between_chunks,
            }) => {
                shape.first_byte_delay = *before_first_byte;
                shape.chunk_delay = *between_chunks;
            }
            _ => {}
        }
        let text = format!("echo: {question}");
        Self {
            pieces: split(&text, shape.chunks.max(1)),
            thought: shape
                .thoughts
                .then(|| format!("The user wrote {} characters.", question.chars().count())),
            shape,
            model: model.to_owned(),
            prompt_tokens: body.map(prompt_tokens).unwrap_or_default(),
            response_id: format!("fake-{number}"),
        }
    }

    fn usage(&self, reply_so_far: &str, thought: bool) -> Value {
        let candidates = if reply_so_far.is_empty() {
            0
        } else {
            tokens(reply_so_far)
        };
        let thoughts = match (&self.thought, thought) {
            (Some(text), true) => tokens(text),
            _ => 0,
        };
        let mut usage = json!({
            "promptTokenCount": self.prompt_tokens,
            "totalTokenCount": self.prompt_tokens + candidates + thoughts,
        });
        if candidates > 0 {
            usage["candidatesTokenCount"] = json!(candidates);
        }
        if thoughts > 0 {
            usage["thoughtsTokenCount"] = json!(thoughts);
        }
        usage
    }

    fn response(&self, parts: Vec<Value>, finish: Option<&str>, usage: Value) -> Value {
        let mut candidate = json!({
            "content": {"role": "model", "parts": parts},
            "index": 0,
        });
        if let Some(finish) = finish {
            candidate["finishReason"] = json!(finish);
        }
        if finish == Some("SAFETY") {
            candidate["safetyRatings"] = json!([
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": true},
            ]);
        }
        json!({
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": self.model,
            "responseId": self.response_id,
        })
    }

    fn blocked_prompt(&self) -> Value {
        json!({
            "promptFeedback": {
                "blockReason": "SAFETY",
                "safetyRatings": [
                    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "HIGH"},
                ],
            },
            "usageMetadata": {
                "promptTokenCount": self.prompt_tokens,
                "totalTokenCount": self.prompt_tokens,
            },
            "modelVersion": self.model,
            "responseId": self.response_id,
        })
    }

    /// How many pieces go out before a mid-stream fault: half, at least one.
    fn half(&self) -> usize {
        self.pieces.len().div_ceil(2)
    }

    fn stream(&self, fault: Option<&Fault>) -> Answer {
        let mut events = Vec::new();
        let mut cut = false;
        if matches!(fault, Some(Fault::PromptBlocked)) {
            events.push(self.blocked_prompt());
        } else {
            if let Some(thought) = &self.thought {
                let part = json!({"text": thought, "thought": true});
                events.push(self.response(vec![part], None, self.usage("", true)));
            }
            let (sent, ending) = match fault {
                Some(Fault::ErrorMidStream) => (self.half(), Ending::ErrorChunk),
                Some(Fault::DropMidStream) => (self.half(), Ending::Cut),
                Some(Fault::SafetyFinish) => (self.half(), Ending::Finish("SAFETY")),
                Some(Fault::EndWithoutFinish) => (self.pieces.len(), Ending::Nothing),
                _ => (self.pieces.len(), Ending::Finish("STOP")),
            };
            let mut so_far = String::new();
            for (index, piece) in self.pieces.iter().take(sent).enumerate() {
                so_far.push_str(piece);
                let usage = self.usage(&so_far, true);
                // A normal reply's last chunk carries both text and the finish reason.
                let finish = match ending {
                    Ending::Finish("STOP") if index + 1 == self.pieces.len() => Some("STOP"),
                    _ => None,
                };
                events.push(self.response(vec![json!({"text": piece})], finish, usage));
            }
            match ending {
                Ending::ErrorChunk => events.push(json!({"error": {
                    "code": 500,
                    "message": "An internal error has occurred. Please retry or report in \
                                https://developers.generativeai.google/guide/troubleshooting",
                    "status": "INTERNAL",
                }})),
                Ending::Cut => cut = true,
                Ending::Finish(reason) if reason != "STOP" => {
                    // A filtered reply ends with a chunk without parts.
                    let usage = self.usage(&so_far, true);
                    events.push(self.response(vec![], Some(reason), usage));
                }
                Ending::Finish(_) | Ending::Nothing => {}
            }
        }
        let line_end = match self.shape.framing {
            Framing::Lf => "\n",
            Framing::Crlf => "\r\n",
        };
        let mut pieces: Vec<Piece> = events
            .iter()
            .map(|event| Piece::Bytes(format!("data: {event}{line_end}{line_end}").into_bytes()))
            .collect();
        if cut {
            pieces.push(Piece::Drop);
        }
        Answer::Chunked {
            content_type: "text/event-stream",
            pieces,
            first_byte_delay: self.shape.first_byte_delay,
            between: self.shape.chunk_delay,
        }
    }

    fn unary(&self, fault: Option<&Fault>) -> Answer {
        let (sent, finish) = match fault {
            Some(Fault::PromptBlocked) => {
                return Answer::Json {
                    status: 200,
                    body: self.blocked_prompt(),
                    delay: self.shape.first_byte_delay,
                };
            }
            Some(Fault::SafetyFinish) => (self.half(), Some("SAFETY")),
            Some(Fault::EndWithoutFinish) => (self.pieces.len(), None),
            _ => (self.pieces.len(), Some("STOP")),
        };
        let text: String = self.pieces.iter().take(sent).map(String::as_str).collect();
        let mut parts = Vec::new();
        if let Some(thought) = &self.thought {
            parts.push(json!({"text": thought, "thought": true}));
        }
        parts.push(json!({"text": text}));
        let body = self.response(parts, finish, self.usage(&text, true));
        if matches!(fault, Some(Fault::DropMidStream)) {
            let bytes = body.to_string().into_bytes();
            let half = bytes.len() / 2;
            return Answer::Chunked {
                content_type: "application/json; charset=UTF-8",
                pieces: vec![Piece::Bytes(bytes[..half].to_vec()), Piece::Drop],
                first_byte_delay: self.shape.first_byte_delay,
                between: Duration::ZERO,
            };
        }
        Answer::Json {
            status: 200,
            body,
            delay: self.shape.first_byte_delay,
        }
    }
}

/// How a stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// With this finish reason.
    Finish(&'static str),
    /// With an error chunk.
    ErrorChunk,
    /// With the connection cut.
    Cut,
    /// Cleanly, but without a finish reason.
    Nothing,
}

/// Splits a text into `count` pieces of about equal length, at character boundaries.
fn split(text: &str, count: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = chars.len().div_ceil(count).max(1);
    let pieces: Vec<String> = chars
        .chunks(size)
        .map(|chunk| chunk.iter().collect())
        .collect();
    if pieces.is_empty() {
        vec![String::new()]
    } else {
        pieces
    }
}

async fn unknown_path(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let record = RecordedRequest::new(&method, &uri, &headers);
    let answer = Answer::error(
        404,
        "NOT_FOUND",
        &format!(
            "The requested URL {} was not found on this server.",
            uri.path()
        ),
        vec![],
    );
    shared.lock().record(record, answer.status());
    answer.into_response(shared.shutdown.clone()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_split_into_the_asked_number_of_pieces() {
        assert_eq!(split("echo: hello", 3), ["echo", ": he", "llo"]);
        assert_eq!(split("é✓🎉", 2), ["é✓", "🎉"]);
        assert_eq!(split("ab", 5), ["a", "b"]);
        assert_eq!(split("", 3), [""]);
    }

    #[test]
    fn a_fixed_window_counts_until_its_length_has_passed() {
        let start = Instant::now();
        let mut window = None;

        current(&mut window, start, MINUTE).count += 1;
        current(&mut window, start + Duration::from_secs(59), MINUTE).count += 1;
        assert_eq!(window.map(|window| window.count), Some(2));

        let renewed = current(&mut window, start + MINUTE, MINUTE);
        assert_eq!(renewed.count, 0);
        assert_eq!(renewed.started, start + MINUTE);
    }

    #[test]
    fn quotas_answer_429_per_minute_then_per_day() {
        let config = FakeConfig::default().key("k", "p").quota(
            "p",
            Quota {
                rpm: Some(2),
                rpd: Some(3),
            },
        );
        let mut state = FakeState::new(config);
        let start = Instant::now();

        assert!(state.charge("p", "m", start).is_ok());
        assert!(state.charge("p", "m", start).is_ok());
        let Err(Answer::Json { status, body, .. }) = state.charge("p", "m", start) else {
            panic!("third call in a minute was allowed");
        };
        assert_eq!(status, 429);
        assert!(body.to_string().contains("PerMinute"));
        // Another model has its own windows.
        assert!(state.charge("p", "other", start).is_ok());

        assert!(state.charge("p", "m", start + MINUTE).is_ok());
        let Err(Answer::Json { body, .. }) = state.charge("p", "m", start + MINUTE) else {
            panic!("fourth call in a day was allowed");
        };
        assert!(body.to_string().contains("PerDay"));
    }

    #[test]
    fn scripted_faults_go_to_the_first_matching_call_in_order() {
        let mut state = FakeState::new(FakeConfig::default());
        state
            .faults
            .push_back((FaultTarget::Project("b".into()), Fault::Internal));
        state
            .faults
            .push_back((FaultTarget::Any, Fault::Overloaded));
        state
            .faults
            .push_back((FaultTarget::Key("k3".into()), Fault::Crlf));

        assert_eq!(state.take_fault("k1", "a"), Some(Fault::Overloaded));
        assert_eq!(state.take_fault("k1", "a"), None);
        assert_eq!(state.take_fault("k2", "b"), Some(Fault::Internal));
        assert_eq!(state.take_fault("k3", "c"), Some(Fault::Crlf));
        assert!(state.faults.is_empty());
    }

    #[test]
    fn random_faults_repeat_for_the_same_seed() {
        let config = RandomFaults {
            seed: 7,
            probability: 0.5,
            faults: vec![Fault::Internal, Fault::Overloaded, Fault::DropMidStream],
        };
        let draw = |config: &RandomFaults| {
            let mut random = RandomState::new(config.clone());
            (0..50).map(|_| random.draw()).collect::<Vec<_>>()
        };

        let first = draw(&config);

        assert_eq!(first, draw(&config));
        assert!(first.iter().any(Option::is_none));
        assert!(first.iter().any(Option::is_some));
    }

    #[test]
    fn requests_are_validated_like_gemini() {
        let ok = json!({"contents": [
            {"role": "user", "parts": [{"text": "first"}]},
            {"role": "model", "parts": [{"text": "reply"}]},
            {"role": "user", "parts": [{"text": "second"}, {"text": " part"}]},
        ]});
        assert_eq!(
            validate_request(Some(&ok)).ok().as_deref(),
            Some("second part")
        );

        let assistant = json!({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]});
        assert!(validate_request(Some(&assistant)).is_err());
        assert!(validate_request(Some(&json!({"contents": []}))).is_err());
        assert!(validate_request(None).is_err());
    }
}
