//! Gemini's errors: the `{"error": {...}}` envelope as sent, and [`CallFailure`], what a
//! failed call means for the caller (retry or not) and for the key pool (cool the project,
//! disable the key, nothing).
//!
//! Classification follows the status table of the design notes: the `status` word
//! (`RESOURCE_EXHAUSTED`, `PERMISSION_DENIED`, ...) decides first because it also appears in
//! error chunks that arrive after a 200, then the HTTP code. The retry hint comes from
//! `google.rpc.RetryInfo` and, when that is missing, from "Please retry in 47.17s." in the
//! message; Gemini sends no `Retry-After` header.
//!
//! Every text kept in a [`CallFailure`] is sanitised when it is built: API keys (the one
//! used, anything shaped like a Google key, anything after `api_key:`) are replaced, line
//! breaks are flattened and length is capped, so a failure can be logged, shown and stored
//! in an event as it is.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::wire::{BlockReason, FinishReason};

/// The replacement for a key found in an error text.
const REDACTED: &str = "[redacted]";

/// The longest message kept in a failure. Gemini's 429 messages run to several hundred
/// characters of links; the head says what happened.
const MAX_MESSAGE_CHARS: usize = 300;

/// The longest free text in [`CallFailure::reason`].
const MAX_REASON_TEXT_CHARS: usize = 120;

/// The error envelope, `{"error": {"code", "message", "status", "details"}}`, with the
/// details this code understands parsed and the rest kept by type name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status code Gemini meant (also inside error chunks of a 200 stream).
    pub code: u16,
    /// The human message, as sent (it may contain the key: sanitise before keeping it).
    pub message: String,
    /// The canonical status word, e.g. `RESOURCE_EXHAUSTED`.
    pub status: String,
    /// The typed details.
    pub details: Vec<ErrorDetail>,
}

/// One entry of `error.details`, by its `@type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorDetail {
    /// `google.rpc.RetryInfo`: how long to wait. `None` if the delay did not parse.
    RetryInfo {
        /// The delay.
        retry_delay: Option<Duration>,
    },
    /// `google.rpc.QuotaFailure`: which quotas were exceeded.
    QuotaFailure {
        /// One per exceeded quota.
        violations: Vec<QuotaViolation>,
    },
    /// `google.rpc.ErrorInfo`: a machine-readable reason such as `API_KEY_INVALID`.
    ErrorInfo {
        /// The reason, e.g. `CONSUMER_SUSPENDED`.
        reason: String,
        /// The domain, e.g. `googleapis.com`.
        domain: String,
        /// Extra facts (service, consumer); values that were not strings are kept as JSON.
        metadata: BTreeMap<String, String>,
    },
    /// `google.rpc.Help`: links for people.
    Help {
        /// The links.
        links: Vec<HelpLink>,
    },
    /// Any other detail (`LocalizedMessage`, `BadRequest`, ...), kept by type only.
    Other {
        /// The `@type` URL.
        type_url: String,
    },
}

/// One exceeded quota of a `google.rpc.QuotaFailure`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaViolation {
    /// E.g. `GenerateRequestsPerMinutePerProjectPerModel-FreeTier`; says the period.
    pub quota_id: Option<String>,
    /// E.g. `generativelanguage.googleapis.com/generate_content_free_tier_requests`.
    pub quota_metric: Option<String>,
    /// The limit in force, which may be lower than configured: Google cuts free tiers.
    /// Sent as a string or a number; `None` if it was neither a whole number.
    pub quota_value: Option<u64>,
    /// A free-text description, in older responses.
    pub description: Option<String>,
}

impl QuotaViolation {
    /// The period this quota counts over, from its id (or its description).
    pub fn scope(&self) -> QuotaScope {
        let text = [&self.quota_id, &self.description, &self.quota_metric]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(" ");
        QuotaScope::from_text(&text)
    }

    /// Whether the quota counts tokens rather than requests.
    pub fn is_tokens(&self) -> bool {
        [&self.quota_id, &self.quota_metric]
            .into_iter()
            .flatten()
            .any(|text| text.to_ascii_lowercase().contains("token"))
    }
}

/// A link of a `google.rpc.Help`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HelpLink {
    /// What the link is about.
    pub description: String,
    /// Where it goes.
    pub url: String,
}

#[derive(Deserialize)]
struct Envelope {
    error: RawError,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(default)]
    code: Option<Value>,
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<Value>,
}

impl ApiError {
    /// Parses an error body. Accepts the envelope alone or as the first element of an array
    /// (the shape of a stream requested without `alt=sse`). `None` if it is neither.
    pub fn from_json(body: &[u8]) -> Option<Self> {
        let value: Value = serde_json::from_slice(body).ok()?;
        Self::from_value(&value)
    }

    /// Parses an already-parsed JSON value, e.g. an error chunk of a stream.
    pub fn from_value(value: &Value) -> Option<Self> {
        let value = match value {
            Value::Array(items) => items.first()?,
            other => other,
        };
        let envelope = Envelope::deserialize(value).ok()?;
        let raw = envelope.error;
        let code = raw
            .code
            .as_ref()
            .and_then(value_as_u64)
            .and_then(|code| u16::try_from(code).ok())
            .unwrap_or(0);
        Some(Self {
            code,
            message: raw.message,
            status: raw.status,
            details: raw.details.iter().map(ErrorDetail::from_value).collect(),
        })
    }

    /// The server's hint of when to retry: `RetryInfo` first, then "retry in …" in the
    /// message.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.details
            .iter()
            .find_map(|detail| match detail {
                ErrorDetail::RetryInfo { retry_delay } => *retry_delay,
                _ => None,
            })
            .or_else(|| retry_delay_in_message(&self.message))
    }

    /// The `ErrorInfo` reason, e.g. `API_KEY_INVALID`.
    pub fn reason(&self) -> Option<&str> {
        self.details.iter().find_map(|detail| match detail {
            ErrorDetail::ErrorInfo { reason, .. } if !reason.is_empty() => Some(reason.as_str()),
            _ => None,
        })
    }

    /// Every quota violation of every `QuotaFailure`.
    pub fn quota_violations(&self) -> impl Iterator<Item = &QuotaViolation> {
        self.details
            .iter()
            .filter_map(|detail| match detail {
                ErrorDetail::QuotaFailure { violations } => Some(violations),
                _ => None,
            })
            .flatten()
    }
}

impl ErrorDetail {
    fn from_value(value: &Value) -> Self {
        let type_url = string_field(value, "@type").unwrap_or_default();
        let short = type_url.rsplit('/').next().unwrap_or_default();
        match short {
            "google.rpc.RetryInfo" => Self::RetryInfo {
                retry_delay: string_field(value, "retryDelay")
                    .as_deref()
                    .and_then(parse_duration),
            },
            "google.rpc.QuotaFailure" => Self::QuotaFailure {
                violations: array_field(value, "violations")
                    .iter()
                    .map(|violation| QuotaViolation {
                        quota_id: string_field(violation, "quotaId"),
                        quota_metric: string_field(violation, "quotaMetric"),
                        quota_value: violation.get("quotaValue").and_then(value_as_u64),
                        description: string_field(violation, "description"),
                    })
                    .collect(),
            },
            "google.rpc.ErrorInfo" => Self::ErrorInfo {
                reason: string_field(value, "reason").unwrap_or_default(),
                domain: string_field(value, "domain").unwrap_or_default(),
                metadata: value
                    .get("metadata")
                    .and_then(Value::as_object)
                    .map(|map| {
                        map.iter()
                            .map(|(name, value)| {
                                let text = value
                                    .as_str()
                                    .map_or_else(|| value.to_string(), str::to_owned);
                                (name.clone(), text)
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            },
            "google.rpc.Help" => Self::Help {
                links: array_field(value, "links")
                    .iter()
                    .map(|link| HelpLink {
                        description: string_field(link, "description").unwrap_or_default(),
                        url: string_field(link, "url").unwrap_or_default(),
                    })
                    .collect(),
            },
            _ => Self::Other { type_url },
        }
    }
}

fn string_field(value: &Value, name: &str) -> Option<String> {
    value.get(name).and_then(Value::as_str).map(str::to_owned)
}

fn array_field<'a>(value: &'a Value, name: &str) -> &'a [Value] {
    value
        .get(name)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// A whole number sent as a JSON number or a string (`quotaValue` comes both ways).
fn value_as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// Parses a protobuf `Duration` in its JSON form: seconds with up to nine decimals and an
/// `s`, such as `"22s"`, `"0.5s"` or `"45.837906927s"`. Negative or malformed values are
/// `None`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let number = text.trim().strip_suffix('s')?;
    parse_seconds(number)
}

/// Seconds as a decimal number, exact to the nanosecond.
fn parse_seconds(number: &str) -> Option<Duration> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let all_digits = |text: &str| text.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let seconds = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let digits = &fraction[..fraction.len().min(9)];
    let nanos = if digits.is_empty() {
        0
    } else {
        let scale = 10u32.pow(9 - u32::try_from(digits.len()).ok()?);
        digits.parse::<u32>().ok()? * scale
    };
    Some(Duration::new(seconds, nanos))
}

/// Finds "retry in 47.17s" (or "retry after 3s", or milliseconds as "565.8ms") in a
/// message, the hint of 429s that carry no `RetryInfo`.
pub fn retry_delay_in_message(message: &str) -> Option<Duration> {
    let lower = message.to_ascii_lowercase();
    ["retry in ", "retry after "].iter().find_map(|marker| {
        lower.match_indices(marker).find_map(|(at, _)| {
            let rest = &lower[at + marker.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let number = rest[..end].trim_end_matches('.');
            let unit = &rest[number.len()..];
            let seconds = parse_seconds(number)?;
            if unit.starts_with("ms") {
                Some(seconds / 1000)
            } else if unit.starts_with('s') {
                Some(seconds)
            } else if unit.starts_with("min") {
                seconds.checked_mul(60)
            } else {
                None
            }
        })
    })
}

/// Removes API keys from a text Gemini sent (its 403s quote the key) and shortens it, so
/// the text can be logged and stored.
///
/// Removes the key that was used (when known), anything shaped like a Google API key
/// (`AIza` and 35 more characters) and whatever follows `api_key:`. Line breaks become
/// spaces and the text is cut to a few hundred characters.
pub fn sanitize(text: &str, key: Option<&str>) -> String {
    let mut text = text.to_owned();
    if let Some(key) = key.filter(|key| !key.is_empty()) {
        text = text.replace(key, REDACTED);
    }
    text = redact_after(&text, "api_key:");
    text = redact_google_keys(&text);
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    truncate(&flat, MAX_MESSAGE_CHARS)
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Replaces the token after every `marker` (up to a character that cannot be in a key).
fn redact_after(text: &str, marker: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(marker) {
        let after = &rest[at + marker.len()..];
        let end = after.find(|c: char| !is_key_char(c)).unwrap_or(after.len());
        out.push_str(&rest[..at + marker.len()]);
        if end > 0 {
            out.push_str(REDACTED);
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Replaces `AIza` followed by 35 key characters, the shape of Google API keys.
fn redact_google_keys(text: &str) -> String {
    const PREFIX: &str = "AIza";
    const REST: usize = 35;
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        let after = &rest[at + PREFIX.len()..];
        let run = after.find(|c: char| !is_key_char(c)).unwrap_or(after.len());
        out.push_str(&rest[..at]);
        if run >= REST {
            out.push_str(REDACTED);
        } else {
            out.push_str(&rest[at..at + PREFIX.len() + run]);
        }
        rest = &after[run..];
    }
    out.push_str(rest);
    out
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The period a 429 counts over, which decides what happens to the project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaScope {
    /// A per-minute quota (requests or input tokens): the project cools for a while.
    PerMinute,
    /// A per-day quota: the project is done until the daily reset (midnight US Pacific).
    PerDay,
    /// The 429 did not say (older responses have no details): treated as per-minute.
    Unknown,
}

impl QuotaScope {
    fn from_text(text: &str) -> Self {
        let lower = text.to_ascii_lowercase();
        if lower.contains("perday") || lower.contains("per day") {
            Self::PerDay
        } else if lower.contains("perminute") || lower.contains("per minute") {
            Self::PerMinute
        } else {
            Self::Unknown
        }
    }
}

impl fmt::Display for QuotaScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PerMinute => "per minute",
            Self::PerDay => "per day",
            Self::Unknown => "unknown period",
        })
    }
}

/// What stopped a reply for content reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockedBy {
    /// The prompt was refused before anything was generated (`promptFeedback.blockReason`).
    Prompt(BlockReason),
    /// The reply was cut by a content filter (a safety-type `finishReason`).
    Reply(FinishReason),
}

/// How a request failed below HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// No connection could be made (refused, DNS, TLS, proxy).
    Connect,
    /// A time limit passed: the whole call, or the wait for the next bytes of a stream.
    Timeout,
    /// The connection broke while the body was being read.
    Dropped,
    /// Anything else the HTTP client reported.
    Other,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connection failed",
            Self::Timeout => "timed out",
            Self::Dropped => "connection dropped mid-response",
            Self::Other => "transport error",
        })
    }
}

/// Why a Gemini call did not produce a complete reply, classified by what to do next.
///
/// [`is_retryable`](Self::is_retryable) tells the caller whether to try again,
/// [`key_effect`](Self::key_effect) tells the key pool what the failure says about the key
/// and its project, and [`reason`](Self::reason) is a short text for events. No text in it
/// contains an API key (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFailure {
    /// 429 `RESOURCE_EXHAUSTED`: a quota of the key's project is used up.
    RateLimited {
        /// The server's hint (`RetryInfo`, else the message).
        retry_after: Option<Duration>,
        /// Per minute, per day, or not said.
        scope: QuotaScope,
        /// The `quotaId` of the violation that decided the scope (it tells requests from
        /// tokens), e.g. `GenerateRequestsPerMinutePerProjectPerModel-FreeTier`.
        quota_id: Option<String>,
        /// That quota's limit in force, which may be lower than configured.
        quota_value: Option<u64>,
        /// Gemini's message, sanitised.
        message: String,
    },
    /// 400 `API_KEY_INVALID` (or 401): the key is wrong, deleted or expired.
    KeyInvalid {
        /// The `ErrorInfo` reason, else the status word.
        reason: String,
        /// Gemini's message, sanitised.
        message: String,
    },
    /// 403 `PERMISSION_DENIED`: the key exists but cannot be used (`CONSUMER_SUSPENDED`, a
    /// key reported as leaked, `API_KEY_SERVICE_BLOCKED`, the API disabled in its project).
    KeyUnusable {
        /// The `ErrorInfo` reason, else the status word.
        reason: String,
        /// Gemini's message, sanitised.
        message: String,
    },
    /// 400 `FAILED_PRECONDITION`: the project cannot use this API as it is (no free tier in
    /// the region, billing required).
    Precondition {
        /// Gemini's message, sanitised.
        message: String,
    },
    /// 400 `INVALID_ARGUMENT` for the request itself (too long, bad field): the same
    /// request fails again with any key.
    BadRequest {
        /// Gemini's message, sanitised.
        message: String,
    },
    /// 404: the model (or method) does not exist.
    NotFound {
        /// Gemini's message, sanitised.
        message: String,
    },
    /// 500 `INTERNAL`: a server error, sometimes a context too long for the model.
    Internal {
        /// Gemini's message, sanitised.
        message: String,
    },
    /// 503 `UNAVAILABLE`, "The model is overloaded": load on Google's side, not quota.
    Overloaded {
        /// Gemini's message, sanitised.
        message: String,
        /// The server's hint, if it gave one.
        retry_after: Option<Duration>,
    },
    /// 504 `DEADLINE_EXCEEDED`: the request took too long on Google's side. A retry may be
    /// billed again.
    DeadlineExceeded {
        /// Gemini's message, sanitised.
        message: String,
    },
    /// No HTTP answer, or the answer broke off: connect error, time limit, dropped
    /// connection.
    Transport {
        /// Which.
        kind: TransportKind,
        /// The HTTP client's explanation, sanitised.
        detail: String,
    },
    /// The prompt was refused or the reply cut by a content filter. Deterministic for the
    /// same prompt: not retried, and not the key's fault.
    Blocked {
        /// What blocked it.
        by: BlockedBy,
    },
    /// The stream ended cleanly but without a `finishReason`: the reply may be cut short.
    Incomplete,
    /// The body could not be understood.
    Malformed {
        /// What was wrong, sanitised.
        detail: String,
    },
    /// An HTTP status outside the table (e.g. 502 from a proxy, 413).
    Unexpected {
        /// The HTTP status.
        status: u16,
        /// The message or the start of the body, sanitised.
        message: String,
    },
}

/// What a failure says about the key and its project, for the key pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyEffect {
    /// Nothing: the request was at fault, or the reply was blocked.
    None,
    /// The project hit a per-minute limit: use none of its keys for `retry_after` (the
    /// pool's default cooldown if `None`).
    CoolProject {
        /// The server's hint.
        retry_after: Option<Duration>,
    },
    /// The project's daily quota is gone: use none of its keys until the daily reset.
    ExhaustProjectForDay,
    /// This key cannot be used until a probe says otherwise.
    DisableKey {
        /// Why, sanitised; fit for an admin view.
        reason: String,
    },
    /// Google's side or the network failed: no penalty for the key, but wait before trying
    /// again (`retry_after` if the server said).
    Backoff {
        /// The server's hint.
        retry_after: Option<Duration>,
    },
}

/// Whether [`CallFailure::is_retryable`] counts 504s and time limits as retryable. They
/// can be billed even though no reply arrived, so it is a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryTimeouts {
    /// Retry after 504 `DEADLINE_EXCEEDED` and client-side time limits.
    Yes,
    /// Fail the call on them.
    No,
}

impl CallFailure {
    /// Classifies a non-2xx HTTP answer from its status and body. `key` is the key used,
    /// so that it can be removed from Gemini's message.
    pub fn from_http(status: u16, body: &[u8], key: Option<&str>) -> Self {
        match ApiError::from_json(body) {
            Some(error) => Self::from_api_error(&error, Some(status), key),
            None => {
                let text = sanitize(&String::from_utf8_lossy(body), key);
                let error = ApiError {
                    code: status,
                    message: text,
                    status: String::new(),
                    details: Vec::new(),
                };
                Self::from_api_error(&error, Some(status), key)
            }
        }
    }

    /// Classifies a parsed error envelope. `http_status` is the HTTP status when the
    /// envelope was a response body, `None` for an error chunk inside a 200 stream (then the
    /// envelope's own code counts).
    pub fn from_api_error(error: &ApiError, http_status: Option<u16>, key: Option<&str>) -> Self {
        let code = http_status.unwrap_or(error.code);
        let message = sanitize(&error.message, key);
        let reason = error.reason().map(|reason| sanitize(reason, key));
        let named = |status: &str| reason.clone().unwrap_or_else(|| status.to_owned());
        let key_invalid_reason = matches!(
            reason.as_deref(),
            Some("API_KEY_INVALID" | "API_KEY_EXPIRED")
        );
        if key_invalid_reason {
            return Self::KeyInvalid {
                reason: named("INVALID_ARGUMENT"),
                message,
            };
        }
        match (error.status.as_str(), code) {
            ("RESOURCE_EXHAUSTED", _) | ("", 429) => rate_limited(error, message),
            ("UNAUTHENTICATED", _) | ("", 401) => Self::KeyInvalid {
                reason: named("UNAUTHENTICATED"),
                message,
            },
            ("PERMISSION_DENIED", _) | ("", 403) => Self::KeyUnusable {
                reason: named("PERMISSION_DENIED"),
                message,
            },
            ("FAILED_PRECONDITION", _) => Self::Precondition { message },
            ("INVALID_ARGUMENT", _) | ("", 400) => {
                let lower = message.to_ascii_lowercase();
                if lower.contains("api key not valid") || lower.contains("api key expired") {
                    Self::KeyInvalid {
                        reason: named("INVALID_ARGUMENT"),
                        message,
                    }
                } else {
                    Self::BadRequest { message }
                }
            }
            ("NOT_FOUND", _) | ("", 404) => Self::NotFound { message },
            ("INTERNAL", _) | ("", 500) => Self::Internal { message },
            ("UNAVAILABLE", _) | ("", 503) => Self::Overloaded {
                message,
                retry_after: error.retry_delay(),
            },
            ("DEADLINE_EXCEEDED", _) | ("", 504) => Self::DeadlineExceeded { message },
            _ => Self::Unexpected {
                status: code,
                message,
            },
        }
    }

    /// A transport failure with the HTTP client's explanation, sanitised.
    pub fn transport(kind: TransportKind, detail: &str, key: Option<&str>) -> Self {
        Self::Transport {
            kind,
            detail: sanitize(detail, key),
        }
    }

    /// A body that could not be understood.
    pub fn malformed(detail: &str, key: Option<&str>) -> Self {
        Self::Malformed {
            detail: sanitize(detail, key),
        }
    }

    /// Whether sending the same request again may succeed, once
    /// [`key_effect`](Self::key_effect) has been applied: possibly later, possibly with another key.
    /// Bad requests and blocked content fail the same way every time; 504s and time
    /// limits count only if `timeouts` says so, because they may be billed.
    pub fn is_retryable(&self, timeouts: RetryTimeouts) -> bool {
        match self {
            Self::RateLimited { .. }
            | Self::KeyInvalid { .. }
            | Self::KeyUnusable { .. }
            | Self::Precondition { .. }
            | Self::Internal { .. }
            | Self::Overloaded { .. }
            | Self::Incomplete => true,
            Self::DeadlineExceeded { .. }
            | Self::Transport {
                kind: TransportKind::Timeout,
                ..
            } => timeouts == RetryTimeouts::Yes,
            Self::Transport { .. } => true,
            Self::BadRequest { .. }
            | Self::NotFound { .. }
            | Self::Blocked { .. }
            | Self::Malformed { .. } => false,
            Self::Unexpected { status, .. } => *status >= 500 || *status == 408,
        }
    }

    /// What this failure says about the key and its project.
    pub fn key_effect(&self) -> KeyEffect {
        match self {
            Self::RateLimited {
                scope: QuotaScope::PerDay,
                ..
            } => KeyEffect::ExhaustProjectForDay,
            Self::RateLimited { retry_after, .. } => KeyEffect::CoolProject {
                retry_after: *retry_after,
            },
            Self::KeyInvalid { .. } | Self::KeyUnusable { .. } | Self::Precondition { .. } => {
                KeyEffect::DisableKey {
                    reason: self.reason(),
                }
            }
            Self::Overloaded { retry_after, .. } => KeyEffect::Backoff {
                retry_after: *retry_after,
            },
            Self::Internal { .. }
            | Self::DeadlineExceeded { .. }
            | Self::Transport { .. }
            | Self::Incomplete => KeyEffect::Backoff { retry_after: None },
            Self::Unexpected { status, .. } if *status >= 500 => {
                KeyEffect::Backoff { retry_after: None }
            }
            Self::BadRequest { .. }
            | Self::NotFound { .. }
            | Self::Blocked { .. }
            | Self::Malformed { .. }
            | Self::Unexpected { .. } => KeyEffect::None,
        }
    }

    /// The server's retry hint, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::Overloaded { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The failure's kind in one word, as a metrics label (`colloquy_gemini_failures_total`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RateLimited {
                scope: QuotaScope::PerDay,
                ..
            } => "rate_limited_per_day",
            Self::RateLimited { .. } => "rate_limited",
            Self::KeyInvalid { .. } => "key_invalid",
            Self::KeyUnusable { .. } => "key_unusable",
            Self::Precondition { .. } => "precondition",
            Self::BadRequest { .. } => "bad_request",
            Self::NotFound { .. } => "not_found",
            Self::Internal { .. } => "internal",
            Self::Overloaded { .. } => "overloaded",
            Self::DeadlineExceeded { .. } => "deadline_exceeded",
            Self::Transport {
                kind: TransportKind::Timeout,
                ..
            } => "timeout",
            Self::Transport { .. } => "transport",
            Self::Blocked { .. } => "blocked",
            Self::Incomplete => "incomplete",
            Self::Malformed { .. } => "malformed",
            Self::Unexpected { .. } => "unexpected",
        }
    }

    /// A short, stable description without keys, fit for an event or an admin view, e.g.
    /// `rate limited per minute (limit 10), retry in 22s` or `key unusable
    /// (CONSUMER_SUSPENDED)`.
    pub fn reason(&self) -> String {
        let short = |text: &str| truncate(text, MAX_REASON_TEXT_CHARS);
        match self {
            Self::RateLimited {
                retry_after,
                scope,
                quota_value,
                ..
            } => {
                let mut text = match scope {
                    QuotaScope::PerDay => "daily quota exhausted".to_owned(),
                    QuotaScope::PerMinute => "rate limited per minute".to_owned(),
                    QuotaScope::Unknown => "rate limited".to_owned(),
                };
                if let Some(value) = quota_value {
                    text.push_str(&format!(" (limit {value})"));
                }
                if let Some(delay) = retry_after {
                    text.push_str(&format!(", retry in {}", format_delay(*delay)));
                }
                text
            }
            Self::KeyInvalid { reason, .. } => format!("key invalid ({reason})"),
            Self::KeyUnusable { reason, .. } => format!("key unusable ({reason})"),
            Self::Precondition { message } => format!("failed precondition: {}", short(message)),
            Self::BadRequest { message } => format!("bad request: {}", short(message)),
            Self::NotFound { message } => format!("not found: {}", short(message)),
            Self::Internal { .. } => "Gemini internal error".to_owned(),
            Self::Overloaded { .. } => "Gemini overloaded".to_owned(),
            Self::DeadlineExceeded { .. } => "Gemini deadline exceeded".to_owned(),
            Self::Transport { kind, .. } => kind.to_string(),
            Self::Blocked {
                by: BlockedBy::Prompt(reason),
            } => format!("prompt blocked ({reason})"),
            Self::Blocked {
                by: BlockedBy::Reply(reason),
            } => format!("reply blocked ({reason})"),
            Self::Incomplete => "stream ended without a finish reason".to_owned(),
            Self::Malformed { .. } => "malformed response".to_owned(),
            Self::Unexpected { status, .. } => format!("unexpected HTTP status {status}"),
        }
    }

    /// The sanitised message or detail behind the failure, if any.
    fn detail(&self) -> Option<&str> {
        match self {
            Self::RateLimited { message, .. }
            | Self::KeyInvalid { message, .. }
            | Self::KeyUnusable { message, .. }
            | Self::Precondition { message }
            | Self::BadRequest { message }
            | Self::NotFound { message }
            | Self::Internal { message }
            | Self::Overloaded { message, .. }
            | Self::DeadlineExceeded { message }
            | Self::Unexpected { message, .. } => Some(message),
            Self::Transport { detail, .. } | Self::Malformed { detail } => Some(detail),
            Self::Blocked { .. } | Self::Incomplete => None,
        }
    }
}

fn rate_limited(error: &ApiError, message: String) -> CallFailure {
    let violations: Vec<&QuotaViolation> = error.quota_violations().collect();
    let pick = |scope: QuotaScope| {
        violations
            .iter()
            .find(|violation| violation.scope() == scope)
            .map(|violation| (scope, Some((*violation).clone())))
    };
    let (scope, quota): (QuotaScope, Option<QuotaViolation>) = pick(QuotaScope::PerDay)
        .or_else(|| pick(QuotaScope::PerMinute))
        .unwrap_or_else(|| {
            (
                QuotaScope::from_text(&error.message),
                violations.first().map(|violation| (*violation).clone()),
            )
        });
    let quota = quota.unwrap_or_default();
    CallFailure::RateLimited {
        retry_after: error.retry_delay(),
        scope,
        quota_id: quota.quota_id.map(|id| sanitize(&id, None)),
        quota_value: quota.quota_value,
        message,
    }
}

fn format_delay(delay: Duration) -> String {
    if delay.subsec_millis() == 0 {
        format!("{}s", delay.as_secs())
    } else {
        format!("{:.1}s", delay.as_secs_f64())
    }
}

impl fmt::Display for CallFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason())?;
        match self.detail() {
            Some(detail) if !detail.is_empty() => write!(f, ": {detail}"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for CallFailure {}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const KEY: &str = "AIzaSyA1234567890abcdefghijklmnopqrstuv";

    fn envelope(code: u16, status: &str, message: &str, details: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"error": {
            "code": code, "message": message, "status": status, "details": details,
        }}))
        .unwrap()
    }

    #[test]
    fn durations_parse_as_protobuf_writes_them() {
        assert_eq!(parse_duration("22s"), Some(Duration::from_secs(22)));
        assert_eq!(parse_duration("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(
            parse_duration("45.837906927s"),
            Some(Duration::new(45, 837_906_927))
        );
        assert_eq!(parse_duration("1.0000000019s"), Some(Duration::new(1, 1)));
        assert_eq!(parse_duration(".25s"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("22"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1e3s"), None);
    }

    #[test]
    fn the_message_gives_a_retry_hint_when_details_do_not() {
        assert_eq!(
            retry_delay_in_message("Quota exceeded.\nPlease retry in 47.17s."),
            Some(Duration::from_millis(47_170))
        );
        assert_eq!(
            retry_delay_in_message("retry in 3s"),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_delay_in_message("Please retry in 565.5ms."),
            Some(Duration::from_micros(565_500))
        );
        assert_eq!(retry_delay_in_message("Please retry later."), None);
        assert_eq!(retry_delay_in_message("retry in 5 hours"), None);
    }

    #[test]
    fn a_per_minute_429_cools_the_project_for_the_retry_delay() {
        let body = envelope(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota. Please retry in 21.9s.",
            json!([
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
                    "quotaValue": "10",
                }]},
                {"@type": "type.googleapis.com/google.rpc.Help", "links": [{"description": "docs", "url": "https://example.invalid"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "22s"},
            ]),
        );

        let failure = CallFailure::from_http(429, &body, None);

        let CallFailure::RateLimited {
            retry_after,
            scope,
            quota_id,
            quota_value,
            ..
        } = &failure
        else {
            panic!("not rate limited: {failure:?}");
        };
        // RetryInfo wins over the message.
        assert_eq!(*retry_after, Some(Duration::from_secs(22)));
        assert_eq!(*scope, QuotaScope::PerMinute);
        assert_eq!(
            quota_id.as_deref(),
            Some("GenerateRequestsPerMinutePerProjectPerModel-FreeTier")
        );
        assert_eq!(*quota_value, Some(10));
        assert_eq!(
            failure.key_effect(),
            KeyEffect::CoolProject {
                retry_after: Some(Duration::from_secs(22))
            }
        );
        assert!(failure.is_retryable(RetryTimeouts::No));
        assert_eq!(
            failure.reason(),
            "rate limited per minute (limit 10), retry in 22s"
        );
    }

    #[test]
    fn a_per_day_violation_exhausts_the_project_even_beside_a_per_minute_one() {
        let body = envelope(
            429,
            "RESOURCE_EXHAUSTED",
            "quota",
            json!([{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                {"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "quotaValue": 10},
                {"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier", "quotaValue": 250},
            ]}]),
        );

        let failure = CallFailure::from_http(429, &body, None);

        assert_eq!(failure.key_effect(), KeyEffect::ExhaustProjectForDay);
        let CallFailure::RateLimited {
            scope, quota_value, ..
        } = failure
        else {
            panic!("not rate limited");
        };
        assert_eq!(scope, QuotaScope::PerDay);
        assert_eq!(quota_value, Some(250));
    }

    #[test]
    fn a_429_without_details_takes_the_hint_from_the_message() {
        let body = envelope(
            429,
            "RESOURCE_EXHAUSTED",
            "Resource has been exhausted. Please retry in 47.17s.",
            json!(null),
        );

        let failure = CallFailure::from_http(429, &body, None);

        assert_eq!(failure.retry_after(), Some(Duration::from_millis(47_170)));
        assert!(matches!(
            failure,
            CallFailure::RateLimited {
                scope: QuotaScope::Unknown,
                quota_id: None,
                quota_value: None,
                ..
            }
        ));
    }

    #[test]
    fn token_quotas_are_recognised() {
        let violation = QuotaViolation {
            quota_id: Some("GenerateContentInputTokensPerModelPerMinute-FreeTier".into()),
            ..QuotaViolation::default()
        };

        assert!(violation.is_tokens());
        assert_eq!(violation.scope(), QuotaScope::PerMinute);
    }

    #[test]
    fn an_invalid_key_disables_it() {
        let body = envelope(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            json!([
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": "API key not valid."},
            ]),
        );

        let failure = CallFailure::from_http(400, &body, None);

        assert!(
            matches!(&failure, CallFailure::KeyInvalid { reason, .. } if reason == "API_KEY_INVALID")
        );
        assert_eq!(
            failure.key_effect(),
            KeyEffect::DisableKey {
                reason: "key invalid (API_KEY_INVALID)".into()
            }
        );
    }

    #[test]
    fn an_invalid_key_without_error_info_is_recognised_by_its_message() {
        let body = envelope(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            json!([]),
        );

        assert!(matches!(
            CallFailure::from_http(400, &body, None),
            CallFailure::KeyInvalid { .. }
        ));
    }

    #[test]
    fn a_suspended_key_is_unusable_and_its_key_never_shows() {
        let body = envelope(
            403,
            "PERMISSION_DENIED",
            &format!("Permission denied: Consumer 'api_key:{KEY}' has been suspended."),
            json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "CONSUMER_SUSPENDED",
                    "domain": "googleapis.com", "metadata": {"consumer": "projects/123", "containerInfo": 5}}]),
        );

        let failure = CallFailure::from_http(403, &body, None);

        assert!(
            matches!(&failure, CallFailure::KeyUnusable { reason, .. } if reason == "CONSUMER_SUSPENDED")
        );
        assert!(matches!(failure.key_effect(), KeyEffect::DisableKey { .. }));
        let shown = format!("{failure} {failure:?} {}", failure.reason());
        assert!(!shown.contains(KEY), "{shown}");
        assert!(!shown.contains("AIza"), "{shown}");
        assert!(shown.contains("has been suspended"), "{shown}");
    }

    #[test]
    fn other_400s_fail_the_call_and_keep_the_key() {
        let body = envelope(
            400,
            "INVALID_ARGUMENT",
            "Request contains an invalid argument.",
            json!([]),
        );
        let failure = CallFailure::from_http(400, &body, None);
        assert!(matches!(failure, CallFailure::BadRequest { .. }));
        assert_eq!(failure.key_effect(), KeyEffect::None);
        assert!(!failure.is_retryable(RetryTimeouts::Yes));

        let body = envelope(404, "NOT_FOUND", "models/nope is not found", json!([]));
        let failure = CallFailure::from_http(404, &body, None);
        assert!(matches!(failure, CallFailure::NotFound { .. }));
        assert_eq!(failure.key_effect(), KeyEffect::None);
    }

    #[test]
    fn failed_precondition_disables_the_key_for_this_use() {
        let body = envelope(
            400,
            "FAILED_PRECONDITION",
            "Gemini API free tier is not available in your country. Please enable billing.",
            json!([]),
        );

        let failure = CallFailure::from_http(400, &body, None);

        assert!(matches!(failure, CallFailure::Precondition { .. }));
        assert!(matches!(failure.key_effect(), KeyEffect::DisableKey { .. }));
    }

    #[test]
    fn server_errors_back_off_without_penalty() {
        let cases = [
            (500, "INTERNAL", true),
            (503, "UNAVAILABLE", true),
            (504, "DEADLINE_EXCEEDED", false),
        ];
        for (code, status, retryable_without_timeouts) in cases {
            let failure =
                CallFailure::from_http(code, &envelope(code, status, "x", json!([])), None);
            assert_eq!(
                failure.key_effect(),
                KeyEffect::Backoff { retry_after: None },
                "{status}"
            );
            assert_eq!(
                failure.is_retryable(RetryTimeouts::No),
                retryable_without_timeouts,
                "{status}"
            );
            assert!(failure.is_retryable(RetryTimeouts::Yes), "{status}");
        }
        assert!(matches!(
            CallFailure::from_http(
                503,
                &envelope(503, "UNAVAILABLE", "The model is overloaded.", json!([])),
                None
            ),
            CallFailure::Overloaded { .. }
        ));
    }

    #[test]
    fn an_error_chunk_is_classified_by_its_own_code() {
        let value = json!({"error": {"code": 500, "message": "An internal error has occurred.", "status": "INTERNAL"}});

        let error = ApiError::from_value(&value).unwrap();
        let failure = CallFailure::from_api_error(&error, None, None);

        assert!(matches!(failure, CallFailure::Internal { .. }));
    }

    #[test]
    fn a_body_that_is_not_an_envelope_is_classified_by_status() {
        let failure = CallFailure::from_http(502, b"<html>Bad Gateway</html>", None);
        assert!(
            matches!(&failure, CallFailure::Unexpected { status: 502, message } if message.contains("Bad Gateway"))
        );
        assert!(failure.is_retryable(RetryTimeouts::No));

        let failure = CallFailure::from_http(429, b"Too Many Requests", None);
        assert!(matches!(failure, CallFailure::RateLimited { .. }));
    }

    #[test]
    fn an_envelope_inside_an_array_parses() {
        let body =
            br#"[{"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}]"#;
        assert_eq!(ApiError::from_json(body).unwrap().code, 503);
    }

    #[test]
    fn sanitising_removes_keys_of_every_shape() {
        let text = format!("a {KEY} b api_key:secret-thing' c custom-key-123\n d");

        let clean = sanitize(&text, Some("custom-key-123"));

        assert_eq!(clean, "a [redacted] b api_key:[redacted]' c [redacted] d");
        // Short runs after AIza are not keys.
        assert_eq!(sanitize("AIzaShort", None), "AIzaShort");
    }

    #[test]
    fn sanitising_caps_the_length() {
        let clean = sanitize(&"é".repeat(1000), None);
        assert_eq!(clean.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(clean.ends_with('…'));
    }

    #[test]
    fn blocked_content_is_final_and_not_the_keys_fault() {
        let failure = CallFailure::Blocked {
            by: BlockedBy::Prompt(BlockReason::Safety),
        };
        assert!(!failure.is_retryable(RetryTimeouts::Yes));
        assert_eq!(failure.key_effect(), KeyEffect::None);
        assert_eq!(failure.reason(), "prompt blocked (SAFETY)");
    }

    #[test]
    fn transport_timeouts_follow_the_setting() {
        let timeout = CallFailure::transport(TransportKind::Timeout, "deadline", None);
        let dropped = CallFailure::transport(TransportKind::Dropped, "reset", None);

        assert!(!timeout.is_retryable(RetryTimeouts::No));
        assert!(timeout.is_retryable(RetryTimeouts::Yes));
        assert!(dropped.is_retryable(RetryTimeouts::No));
        assert_eq!(
            dropped.key_effect(),
            KeyEffect::Backoff { retry_after: None }
        );
    }
}
