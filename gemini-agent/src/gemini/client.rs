//! [`GeminiClient`]: the HTTP calls to Gemini's v1beta REST API, with every way they can
//! fail turned into a [`CallFailure`].
//!
//! The client holds no keys: each call takes the key the pool leased, and sends it only
//! in the `x-goog-api-key` header, marked sensitive so that the HTTP stack never logs it.
//! It never goes into a URL (where proxies and logs would keep it), and failures remove
//! it from anything Gemini echoes back.
//!
//! Time limits: `connect_timeout` for making a connection, `request_timeout` for a whole
//! unary call (`generate`, `count_tokens`, `probe`), and `stream_idle_timeout` for the
//! longest silence of a stream, including the wait for its first byte. A stream has no
//! overall limit: a long reply that keeps arriving is fine.
//!
//! Metrics: every call is counted by method and the class of its HTTP status
//! (`colloquy_gemini_calls_total`; `timeout` or `transport` when there was no answer)
//! and timed to its response head (`colloquy_gemini_call_duration_seconds`).

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use reqwest::header::HeaderValue;
use reqwest::{RequestBuilder, Response, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{ApiError, BlockedBy, CallFailure, TransportKind};
use super::sse::{self, SseError};
use super::wire::{
    CountTokensRequest, CountTokensResponse, CountedRequest, FinishReason, GenerateContentRequest,
    GenerateContentResponse, ListModelsResponse, UsageMetadata,
};

/// Google's endpoint, the default base URL.
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";

/// The header that carries the key.
const API_KEY_HEADER: &str = "x-goog-api-key";

/// The most of an error body that is read; Gemini's are a few kilobytes.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The longest model name accepted; Gemini's are far shorter.
const MAX_MODEL_NAME: usize = 128;

/// An HTTP status as the `status_class` label: `2xx` … `5xx`.
fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// How to reach Gemini.
#[derive(Clone)]
pub struct GeminiConfig {
    /// Scheme, host and optional path prefix, without `/v1beta` (e.g. the fake server's
    /// address in tests).
    pub base_url: String,
    /// An HTTP(S) proxy for every call. `None` connects directly, ignoring proxy
    /// environment variables, so that the configuration alone decides.
    pub proxy: Option<String>,
    /// The longest wait for a connection.
    pub connect_timeout: Duration,
    /// The longest a unary call may take, body included.
    pub request_timeout: Duration,
    /// The longest silence of a stream: before its first byte and between chunks.
    pub stream_idle_timeout: Duration,
}

impl Default for GeminiConfig {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            proxy: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            stream_idle_timeout: Duration::from_secs(60),
        }
    }
}

impl fmt::Debug for GeminiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A proxy URL can carry a password.
        f.debug_struct("GeminiConfig")
            .field("base_url", &self.base_url)
            .field("proxy", &self.proxy.as_ref().map(|_| "[set]"))
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .finish()
    }
}

/// Why a [`GeminiClient`] could not be built. Each names the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    /// The process installed no rustls crypto provider (the workspace builds reqwest
    /// without one, so that one provider serves every TLS user of the process).
    #[error(
        "no TLS crypto provider is installed: call \
         rustls::crypto::ring::default_provider().install_default() at start"
    )]
    NoCryptoProvider,
    /// `base_url` is not an `http`/`https` URL without query or fragment.
    #[error("gemini base_url {0:?} must be an http(s) URL without query or fragment")]
    InvalidBaseUrl(String),
    /// `proxy` is not a usable proxy URL.
    #[error("gemini proxy is not a valid proxy URL")]
    InvalidProxy(#[source] reqwest::Error),
    /// The HTTP client refused the settings.
    #[error("building the Gemini HTTP client failed")]
    Http(#[source] reqwest::Error),
}

/// A client of Gemini's REST API. Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub struct GeminiClient {
    http: reqwest::Client,
    base_url: String,
    request_timeout: Duration,
    stream_idle_timeout: Duration,
}

/// One step of a streamed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// New reply text (thought parts left out). Never empty.
    Text(String),
    /// Token counts so far, from a chunk that did not finish the reply.
    Usage(UsageMetadata),
    /// The reply is complete. Always the last event of a successful stream.
    Finished {
        /// Why it ended: `STOP`, or `MAX_TOKENS` for a reply cut at the length limit, ...
        /// (never a content-filter reason: those end the stream with
        /// [`CallFailure::Blocked`]).
        reason: FinishReason,
        /// The final token counts, if any chunk carried them.
        usage: Option<UsageMetadata>,
    },
}

/// A streamed reply: [`StreamEvent`]s, ending after [`StreamEvent::Finished`] or after
/// the first error.
pub struct ReplyStream {
    inner: Pin<Box<dyn Stream<Item = Result<StreamEvent, CallFailure>> + Send>>,
}

impl fmt::Debug for ReplyStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplyStream")
    }
}

impl Stream for ReplyStream {
    type Item = Result<StreamEvent, CallFailure>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().inner.as_mut().poll_next(cx)
    }
}

/// A whole reply, gathered from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply text.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The final token counts, if Gemini sent them.
    pub usage: Option<UsageMetadata>,
}

impl ReplyStream {
    /// Reads the stream to its end and returns the whole reply, or the failure that ended
    /// it (the text received before a failure is lost).
    pub async fn into_reply(mut self) -> Result<Reply, CallFailure> {
        let mut text = String::new();
        while let Some(event) = self.next().await {
            match event? {
                StreamEvent::Text(delta) => text.push_str(&delta),
                StreamEvent::Usage(_) => {}
                StreamEvent::Finished { reason, usage } => {
                    return Ok(Reply {
                        text,
                        finish_reason: reason,
                        usage,
                    });
                }
            }
        }
        Err(CallFailure::Incomplete)
    }
}

impl GeminiClient {
    /// Builds a client. Fails if the settings are unusable or the process installed no
    /// TLS crypto provider.
    pub fn new(config: GeminiConfig) -> Result<Self, ClientBuildError> {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            return Err(ClientBuildError::NoCryptoProvider);
        }
        let base_url = parse_base_url(&config.base_url)?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("colloquy/", env!("CARGO_PKG_VERSION")));
        builder = match &config.proxy {
            Some(proxy) => {
                builder.proxy(reqwest::Proxy::all(proxy).map_err(ClientBuildError::InvalidProxy)?)
            }
            None => builder.no_proxy(),
        };
        let http = builder.build().map_err(ClientBuildError::Http)?;
        Ok(Self {
            http,
            base_url,
            request_timeout: config.request_timeout,
            stream_idle_timeout: config.stream_idle_timeout,
        })
    }

    /// The base URL calls go to.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Starts a streamed reply (`:streamGenerateContent?alt=sse`).
    ///
    /// An `Err` means nothing was generated: the HTTP answer was an error, or there was no
    /// answer. Once the stream is returned, text can arrive before a failure (an error
    /// chunk, a dropped connection, a content filter); the stream then ends with it. A
    /// stream that ends without a finish reason ends with [`CallFailure::Incomplete`].
    pub async fn stream_generate(
        &self,
        key: &SecretString,
        model: &str,
        request: &GenerateContentRequest,
    ) -> Result<ReplyStream, CallFailure> {
        let mut url = self.model_url(model, "streamGenerateContent")?;
        url.set_query(Some("alt=sse"));
        let builder = self.http.post(url).json(request);
        let response = self
            .send(
                "stream_generate_content",
                key,
                builder,
                self.stream_idle_timeout,
                "the stream to start",
            )
            .await?;
        let events = sse::data_events(response.bytes_stream());
        let state = StreamState {
            events: Box::pin(events),
            ready: VecDeque::new(),
            done: false,
            usage: None,
            idle_timeout: self.stream_idle_timeout,
            key: key.clone(),
        };
        let inner = futures::stream::unfold(state, |mut state| async move {
            let event = state.next_event().await?;
            Some((event, state))
        });
        Ok(ReplyStream {
            inner: Box::pin(inner),
        })
    }

    /// Asks for a whole reply in one response (`:generateContent`). Fails as a stream
    /// would: a blocked prompt or reply is [`CallFailure::Blocked`], a response without a
    /// finish reason [`CallFailure::Incomplete`].
    pub async fn generate(
        &self,
        key: &SecretString,
        model: &str,
        request: &GenerateContentRequest,
    ) -> Result<GenerateContentResponse, CallFailure> {
        let url = self.model_url(model, "generateContent")?;
        let builder = self.http.post(url).json(request);
        let response: GenerateContentResponse =
            self.unary("generate_content", key, builder).await?;
        if let Some(reason) = response.block_reason() {
            return Err(CallFailure::Blocked {
                by: BlockedBy::Prompt(reason.clone()),
            });
        }
        match response.finish_reason() {
            Some(reason) if reason.is_blocked() => Err(CallFailure::Blocked {
                by: BlockedBy::Reply(reason.clone()),
            }),
            Some(_) => Ok(response),
            None => Err(CallFailure::Incomplete),
        }
    }

    /// Counts the input tokens of a request (`:countTokens`), system instruction included.
    /// Free of charge and quota-light: fit for checking a prompt against the budget.
    pub async fn count_tokens(
        &self,
        key: &SecretString,
        model: &str,
        request: &GenerateContentRequest,
    ) -> Result<u64, CallFailure> {
        let name = valid_model(model)?;
        let url = self.model_url(model, "countTokens")?;
        let body = CountTokensRequest {
            generate_content_request: CountedRequest {
                model: format!("models/{name}"),
                request: request.clone(),
            },
        };
        let builder = self.http.post(url).json(&body);
        let response: CountTokensResponse = self.unary("count_tokens", key, builder).await?;
        Ok(response.total_tokens)
    }

    /// Checks that Gemini accepts a key with the cheapest call there is (listing one
    /// model), to bring a disabled key back. `Ok` means the key works; a failure's
    /// [`key_effect`](CallFailure::key_effect) says whether it is still rejected.
    pub async fn probe(&self, key: &SecretString) -> Result<(), CallFailure> {
        let mut url = self.url("models")?;
        url.set_query(Some("pageSize=1"));
        let builder = self.http.get(url);
        let _: ListModelsResponse = self.unary("list_models", key, builder).await?;
        Ok(())
    }

    /// A unary call (`method`, for metrics): sends, checks the status, reads and parses
    /// the body, all within the request timeout.
    async fn unary<T: DeserializeOwned>(
        &self,
        method: &'static str,
        key: &SecretString,
        builder: RequestBuilder,
    ) -> Result<T, CallFailure> {
        let builder = builder.timeout(self.request_timeout);
        let response = self
            .send(method, key, builder, self.request_timeout, "the response")
            .await?;
        let body = response
            .bytes()
            .await
            .map_err(|error| transport_failure(error, key))?;
        let value: Value = serde_json::from_slice(&body).map_err(|error| {
            CallFailure::malformed(
                &format!("response is not JSON: {error}"),
                Some(key.expose_secret()),
            )
        })?;
        if value.get("error").is_some()
            && let Some(error) = ApiError::from_value(&value)
        {
            return Err(CallFailure::from_api_error(
                &error,
                None,
                Some(key.expose_secret()),
            ));
        }
        serde_json::from_value(value).map_err(|error| {
            CallFailure::malformed(
                &format!("unexpected response shape: {error}"),
                Some(key.expose_secret()),
            )
        })
    }

    /// Sends a request with the key in its header and returns the response if its status
    /// is a success; otherwise reads the error body and classifies it. Counts and times
    /// the call as `method`.
    async fn send(
        &self,
        method: &'static str,
        key: &SecretString,
        builder: RequestBuilder,
        wait: Duration,
        waiting_for: &str,
    ) -> Result<Response, CallFailure> {
        let mut header =
            HeaderValue::from_str(key.expose_secret()).map_err(|_| CallFailure::KeyInvalid {
                reason: "MALFORMED_KEY".to_owned(),
                message: "the key has characters an HTTP header cannot carry".to_owned(),
            })?;
        header.set_sensitive(true);
        let request = builder.header(API_KEY_HEADER, header).send();
        let started = Instant::now();
        let answer = tokio::time::timeout(wait, request).await;
        let status_class = match &answer {
            Ok(Ok(response)) => status_class(response.status().as_u16()),
            Ok(Err(_)) => "transport",
            Err(_) => "timeout",
        };
        metrics::counter!(
            "colloquy_gemini_calls_total",
            "method" => method,
            "status_class" => status_class,
        )
        .increment(1);
        metrics::histogram!("colloquy_gemini_call_duration_seconds", "method" => method)
            .record(started.elapsed());
        let response = answer
            .map_err(|_| {
                CallFailure::transport(
                    TransportKind::Timeout,
                    &format!("no answer within {wait:?} waiting for {waiting_for}"),
                    None,
                )
            })?
            .map_err(|error| transport_failure(error, key))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = tokio::time::timeout(wait, read_limited(response, MAX_ERROR_BODY))
            .await
            .unwrap_or_default();
        Err(CallFailure::from_http(
            status.as_u16(),
            &body,
            Some(key.expose_secret()),
        ))
    }

    fn url(&self, path: &str) -> Result<Url, CallFailure> {
        Url::parse(&format!("{}/v1beta/{path}", self.base_url)).map_err(|error| {
            CallFailure::BadRequest {
                message: format!("cannot build the request URL: {error}"),
            }
        })
    }

    fn model_url(&self, model: &str, method: &str) -> Result<Url, CallFailure> {
        let name = valid_model(model)?;
        self.url(&format!("models/{name}:{method}"))
    }
}

/// Checks a model name (with or without its `models/` prefix) and returns it without the
/// prefix. Only letters, digits, `-`, `.` and `_` are allowed, starting with a letter or
/// digit, so that a name can never change the path or add a query.
fn valid_model(model: &str) -> Result<&str, CallFailure> {
    let name = model.strip_prefix("models/").unwrap_or(model);
    let valid = !name.is_empty()
        && name.len() <= MAX_MODEL_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if valid {
        Ok(name)
    } else {
        Err(CallFailure::BadRequest {
            message: super::error::sanitize(
                &format!("invalid model name {model:?}: use letters, digits, '-', '.', '_'"),
                None,
            ),
        })
    }
}

fn parse_base_url(base_url: &str) -> Result<String, ClientBuildError> {
    let invalid = || ClientBuildError::InvalidBaseUrl(base_url.to_owned());
    let url = Url::parse(base_url).map_err(|_| invalid())?;
    let usable = matches!(url.scheme(), "http" | "https")
        && url.host().is_some()
        && url.query().is_none()
        && url.fragment().is_none()
        && url.username().is_empty()
        && url.password().is_none();
    if !usable {
        return Err(invalid());
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Reads at most `limit` bytes of a body; a body that breaks off gives what arrived.
async fn read_limited(mut response: Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = limit - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    body
}

/// Classifies an error of the HTTP client, with its causes as the detail.
fn transport_failure(error: reqwest::Error, key: &SecretString) -> CallFailure {
    let kind = if error.is_timeout() {
        TransportKind::Timeout
    } else if error.is_connect() {
        TransportKind::Connect
    } else if error.is_body() || error.is_decode() {
        TransportKind::Dropped
    } else {
        TransportKind::Other
    };
    let error = error.without_url();
    let mut detail = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    CallFailure::transport(kind, &detail, Some(key.expose_secret()))
}

type DataEvents = Pin<Box<dyn Stream<Item = Result<String, SseError<reqwest::Error>>> + Send>>;

/// The state of a [`ReplyStream`] between chunks.
struct StreamState {
    events: DataEvents,
    ready: VecDeque<Result<StreamEvent, CallFailure>>,
    done: bool,
    usage: Option<UsageMetadata>,
    idle_timeout: Duration,
    key: SecretString,
}

impl StreamState {
    async fn next_event(&mut self) -> Option<Result<StreamEvent, CallFailure>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            match tokio::time::timeout(self.idle_timeout, self.events.next()).await {
                Err(_) => self.fail(CallFailure::transport(
                    TransportKind::Timeout,
                    &format!("the stream was silent for {:?}", self.idle_timeout),
                    None,
                )),
                Ok(Some(Ok(data))) => self.on_data(&data),
                Ok(Some(Err(SseError::Body(error)))) => {
                    let failure = transport_failure(error, &self.key);
                    self.fail(failure);
                }
                Ok(Some(Err(SseError::Decode(error)))) => {
                    let failure = CallFailure::malformed(&error.to_string(), None);
                    self.fail(failure);
                }
                Ok(None) => self.fail(CallFailure::Incomplete),
            }
        }
    }

    fn fail(&mut self, failure: CallFailure) {
        self.ready.push_back(Err(failure));
        self.done = true;
    }

    /// Turns one chunk into events.
    fn on_data(&mut self, data: &str) {
        if data.trim().is_empty() {
            return;
        }
        let key = Some(self.key.expose_secret());
        let value: Value = match serde_json::from_str(data) {
            Ok(value) => value,
            Err(error) => {
                let failure = CallFailure::malformed(&format!("chunk is not JSON: {error}"), key);
                return self.fail(failure);
            }
        };
        if value.get("error").is_some()
            && let Some(error) = ApiError::from_value(&value)
        {
            let failure = CallFailure::from_api_error(&error, None, key);
            return self.fail(failure);
        }
        let chunk: GenerateContentResponse = match serde_json::from_value(value) {
            Ok(chunk) => chunk,
            Err(error) => {
                let failure =
                    CallFailure::malformed(&format!("unexpected chunk shape: {error}"), key);
                return self.fail(failure);
            }
        };
        if let Some(reason) = chunk.block_reason() {
            return self.fail(CallFailure::Blocked {
                by: BlockedBy::Prompt(reason.clone()),
            });
        }
        let text = chunk.text();
        if !text.is_empty() {
            self.ready.push_back(Ok(StreamEvent::Text(text)));
        }
        if let Some(usage) = chunk.usage_metadata {
            self.usage = Some(usage);
        }
        match chunk.finish_reason() {
            Some(reason) if reason.is_blocked() => self.fail(CallFailure::Blocked {
                by: BlockedBy::Reply(reason.clone()),
            }),
            Some(reason) => {
                self.ready.push_back(Ok(StreamEvent::Finished {
                    reason: reason.clone(),
                    usage: self.usage,
                }));
                self.done = true;
            }
            None => {
                if let Some(usage) = chunk.usage_metadata {
                    self.ready.push_back(Ok(StreamEvent::Usage(usage)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_cannot_change_the_path() {
        assert_eq!(valid_model("gemini-2.5-flash").unwrap(), "gemini-2.5-flash");
        assert_eq!(
            valid_model("models/gemini-2.0-flash_001").unwrap(),
            "gemini-2.0-flash_001"
        );
        for bad in [
            "",
            "models/",
            "../v1/models",
            "a/b",
            "gemini?key=x",
            "gemini#x",
            "gemini:generateContent",
            "gemini%2F",
            ".hidden",
            "gemini flash",
            "ĝemini",
        ] {
            assert!(
                matches!(valid_model(bad), Err(CallFailure::BadRequest { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn base_urls_are_checked_and_trimmed() {
        assert_eq!(
            parse_base_url("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            parse_base_url("https://gw.example/gemini/").unwrap(),
            "https://gw.example/gemini"
        );
        for bad in [
            "ftp://x",
            "http://x/?key=1",
            "not a url",
            "http://user:pw@x",
        ] {
            assert!(parse_base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_config_debug_hides_the_proxy() {
        let config = GeminiConfig {
            proxy: Some("http://user:secret@proxy:3128".into()),
            ..GeminiConfig::default()
        };

        assert!(!format!("{config:?}").contains("secret"));
    }
}
