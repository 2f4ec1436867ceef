//! Per-project request budgets and key health, in a store every agent instance shares.
//!
//! Gemini's quotas belong to a Google Cloud project, not to a key: requests per minute
//! (RPM), input tokens per minute (TPM) and requests per day (RPD, reset at midnight US
//! Pacific). Several agent instances spend the same quotas, so the counters live in one
//! [`BudgetStore`] and are spent with compare-and-set: an instance that loses a race reads
//! the new count and tries again, so two instances never spend one budget twice.
//!
//! Layout:
//! - [`Window`]: one counting window of one project (a 5-second slot of the per-minute
//!   budget, or a Pacific day) and its store key, `rpm.<project>.s<unix-seconds / 5>` or
//!   `rpd.<project>.<yyyy-mm-dd>`. A slot counts requests and tokens together, so RPM and
//!   TPM are checked and spent in one compare-and-set; the pool counts a minute as the
//!   slots of the last 60 seconds ([`Window::minute_slots`]), a window that slides.
//! - [`Health`]: what the instances learned from Gemini's answers (cooling and exhausted
//!   projects, learned lower quotas, disabled keys, last errors), one shared document.
//! - [`BudgetStore`]: the storage trait, with [`MemoryBudgetStore`] (tests, and a single
//!   process without NATS) and [`KvBudgetStore`] (a NATS JetStream key-value bucket).
//! - [`pacific_date`] and [`next_pacific_midnight`]: the daily reset, computed with the
//!   IANA time-zone database so daylight-saving days (23 and 25 hours) come out right.

mod kv;
mod memory;

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, LocalResult, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::America::Los_Angeles;
use serde::{Deserialize, Serialize};

pub use kv::{KvBudgetConfig, KvBudgetStore, KvOnceReachable, server_has_key_value_stores};
pub use memory::MemoryBudgetStore;

/// The calendar date in US Pacific time at `at`: the day a per-day quota counts in.
pub fn pacific_date(at: DateTime<Utc>) -> NaiveDate {
    at.with_timezone(&Los_Angeles).date_naive()
}

/// The first instant of the next US Pacific day after `at`, when Gemini resets per-day
/// quotas. Pacific days are 23 or 25 hours long on daylight-saving changes, so this is
/// computed in the time zone, never by adding 24 hours.
pub fn next_pacific_midnight(at: DateTime<Utc>) -> DateTime<Utc> {
    let today = pacific_date(at);
    let tomorrow = today.succ_opt().unwrap_or(today);
    start_of_pacific_day(tomorrow)
}

/// The instant a Pacific calendar day begins. Los Angeles changes its clocks at 02:00, so
/// midnight exists exactly once; should the rules ever move a change to midnight, the day
/// begins at its first local time that exists.
fn start_of_pacific_day(date: NaiveDate) -> DateTime<Utc> {
    let local = |time: NaiveTime| match Los_Angeles.from_local_datetime(&date.and_time(time)) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => Some(t.with_timezone(&Utc)),
        LocalResult::None => None,
    };
    (0..=3)
        .filter_map(|hour| NaiveTime::from_hms_opt(hour, 0, 0))
        .find_map(local)
        // Unreachable with any real rule set; UTC-8 is Pacific standard time.
        .unwrap_or_else(|| date.and_time(NaiveTime::MIN).and_utc() + chrono::Duration::hours(8))
}

/// Which quota a [`Window`] counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WindowKind {
    /// A UTC minute or a slot of one: requests (RPM) and input tokens (TPM).
    Minute,
    /// One US Pacific calendar day: requests (RPD).
    Day,
}

impl WindowKind {
    fn token(self) -> &'static str {
        match self {
            Self::Minute => "rpm",
            Self::Day => "rpd",
        }
    }
}

/// The length of a slot of a per-minute budget ([`Window::slot`]), in seconds.
pub const SLOT_SECONDS: i64 = 5;

/// One counting window of one project, e.g. project `alpha`'s requests in the minute
/// starting 12:34:00 UTC. A new window starts from zero, which is how budgets roll over.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Window {
    kind: WindowKind,
    project: String,
    id: String,
    ends: DateTime<Utc>,
}

impl Window {
    /// The minute window of `project` containing `at`; its id is the Unix minute.
    pub fn minute(project: &str, at: DateTime<Utc>) -> Self {
        let minute = at.timestamp().div_euclid(60);
        let ends = DateTime::from_timestamp(minute.saturating_add(1).saturating_mul(60), 0)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        Self {
            kind: WindowKind::Minute,
            project: project.to_owned(),
            id: minute.to_string(),
            ends,
        }
    }

    /// The [`SLOT_SECONDS`] slot of `project`'s per-minute budget containing `at`; its id
    /// is `s<unix-seconds / SLOT_SECONDS>`. The pool counts a minute as the sum of
    /// [`Window::minute_slots`], a window that slides with the slots.
    pub fn slot(project: &str, at: DateTime<Utc>) -> Self {
        let slot = at.timestamp().div_euclid(SLOT_SECONDS);
        let ends = DateTime::from_timestamp(slot.saturating_add(1).saturating_mul(SLOT_SECONDS), 0)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        Self {
            kind: WindowKind::Minute,
            project: project.to_owned(),
            id: format!("s{slot}"),
            ends,
        }
    }

    /// The slots a per-minute budget counts at `at`, oldest first: the slot containing
    /// `at` and the [`60 / SLOT_SECONDS`](SLOT_SECONDS) before it, so every call of the
    /// last 60 seconds (and up to one slot more) is counted. A provider whose minute starts
    /// at any moment (with a project's first call, say) then never sees more calls in its
    /// minute than the budget allows, as it can with windows on the UTC minute.
    pub fn minute_slots(project: &str, at: DateTime<Utc>) -> Vec<Self> {
        (0..=60 / SLOT_SECONDS)
            .rev()
            .map(|back| Self::slot(project, at - chrono::Duration::seconds(back * SLOT_SECONDS)))
            .collect()
    }

    /// Until when calls spent in this window count against a per-minute budget: a slot
    /// counts for a minute after it ends; any other window until it ends.
    pub fn counts_until(&self) -> DateTime<Utc> {
        if self.kind == WindowKind::Minute && self.id.starts_with('s') {
            self.ends + chrono::Duration::seconds(60)
        } else {
            self.ends
        }
    }

    /// The Pacific-day window of `project` containing `at`; its id is the date.
    pub fn day(project: &str, at: DateTime<Utc>) -> Self {
        Self {
            kind: WindowKind::Day,
            project: project.to_owned(),
            id: pacific_date(at).format("%Y-%m-%d").to_string(),
            ends: next_pacific_midnight(at),
        }
    }

    /// Minute or day.
    pub fn kind(&self) -> WindowKind {
        self.kind
    }

    /// The project whose budget this window counts.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The window's id within its project: a Unix minute or a Pacific date.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// When the next window begins, and this window's budget with it.
    pub fn ends(&self) -> DateTime<Utc> {
        self.ends
    }

    /// The store key below the store's own prefix: `rpm.<project>.<unix-minute>`,
    /// `rpm.<project>.s<slot>` or `rpd.<project>.<yyyy-mm-dd>`, the project name escaped
    /// by [`encode_token`].
    pub fn key(&self) -> String {
        format!(
            "{}.{}.{}",
            self.kind.token(),
            encode_token(&self.project),
            self.id
        )
    }
}

/// Escapes a name into one key token that NATS KV accepts (`[-_A-Za-z0-9]`, with `=` as
/// the escape): every other byte becomes `=XX`. Distinct names stay distinct, and a `.` in
/// a project name cannot split the key into more tokens.
pub fn encode_token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("={byte:02X}"));
        }
    }
    if out.is_empty() {
        out.push('=');
    }
    out
}

/// What a window has spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Requests granted in the window.
    #[serde(default)]
    pub requests: u64,
    /// Input tokens granted in the window (estimated at grant, corrected on report).
    #[serde(default)]
    pub tokens: u64,
}

impl Usage {
    /// Whether `add` more fits under `ceiling`. A single request estimated above the whole
    /// token ceiling is admitted into a window that has spent no tokens: the estimate is
    /// only an estimate, and refusing it would stall it forever; Gemini has the last word.
    pub fn admits(self, add: Usage, ceiling: Ceiling) -> bool {
        let requests_fit = ceiling
            .requests
            .is_none_or(|max| self.requests.saturating_add(add.requests) <= max);
        let tokens_fit = ceiling.tokens.is_none_or(|max| {
            self.tokens.saturating_add(add.tokens) <= max || (self.tokens == 0 && add.tokens > max)
        });
        requests_fit && tokens_fit
    }

    /// `self + add`, saturating.
    pub fn plus(self, add: Usage) -> Usage {
        Usage {
            requests: self.requests.saturating_add(add.requests),
            tokens: self.tokens.saturating_add(add.tokens),
        }
    }

    /// `self` moved by signed deltas, never below zero.
    pub fn adjusted(self, requests: i64, tokens: i64) -> Usage {
        Usage {
            requests: self.requests.saturating_add_signed(requests),
            tokens: self.tokens.saturating_add_signed(tokens),
        }
    }
}

/// The most a window may hold; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ceiling {
    /// Most requests in the window.
    pub requests: Option<u64>,
    /// Most tokens in the window.
    pub tokens: Option<u64>,
}

/// The answer to [`BudgetStore::try_spend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// Spent; the window's usage afterwards.
    Granted(Usage),
    /// Not spent because it would not fit; the window's usage as read.
    Refused(Usage),
}

/// Shared knowledge about projects and keys, learned from Gemini's answers. Stored whole
/// as one document and updated by compare-and-set; it changes only on errors, so
/// contention is rare, and every instance reads the whole of it in one round trip.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// By project name.
    #[serde(default)]
    pub projects: BTreeMap<String, ProjectHealth>,
    /// By key label.
    #[serde(default)]
    pub keys: BTreeMap<String, KeyHealth>,
}

/// What is known about one project's quota.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectHealth {
    /// A per-minute 429 cooled the project until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooling_until: Option<DateTime<Utc>>,
    /// A per-day 429 exhausted the project until then (the next Pacific midnight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exhausted_until: Option<DateTime<Utc>>,
    /// Quotas Gemini reported lower than configured.
    #[serde(default)]
    pub learned: LearnedLimits,
}

/// Limits learned from 429s (`QuotaFailure.violations[].quotaValue`). Each expires, so a
/// quota Google raises again is used again after a while.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedLimits {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<Learned>,
    /// Requests per day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpd: Option<Learned>,
    /// Input tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Learned>,
}

/// One learned limit and when it stops applying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learned {
    /// The limit Gemini reported.
    pub value: u64,
    /// When the configured limit applies again.
    pub until: DateTime<Utc>,
}

/// What is known about one key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHealth {
    /// Set while the key is out of use (invalid, suspended, blocked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<Disabled>,
    /// The last error a call with this key met (never contains the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<LastError>,
}

/// Why and since when a key is disabled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disabled {
    /// What Gemini said about the key.
    pub reason: String,
    /// When it was disabled.
    pub since: DateTime<Utc>,
}

/// An error and when it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    /// A short description, scrubbed of key material.
    pub message: String,
    /// When it happened.
    pub at: DateTime<Utc>,
}

/// A value and the store revision it was read at (`None`: not stored yet), for a later
/// compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The value (the default when nothing is stored).
    pub value: T,
    /// The revision to pass back to [`BudgetStore::save_health`].
    pub revision: Option<u64>,
}

/// Where budgets and health live. Every write is a compare-and-set, so any number of
/// pools, in one process or many, can share one store.
#[async_trait]
pub trait BudgetStore: Send + Sync + fmt::Debug {
    /// What `window` has spent so far (zero for a window never written).
    async fn usage(&self, window: &Window) -> Result<Usage, StoreError>;

    /// Adds `add` to `window` if the result stays under `ceiling` (see [`Usage::admits`]),
    /// atomically with respect to every other writer.
    async fn try_spend(
        &self,
        window: &Window,
        add: Usage,
        ceiling: Ceiling,
    ) -> Result<Spend, StoreError>;

    /// Moves `window`'s counters by signed deltas without a ceiling, never below zero:
    /// refunds for calls never sent, and corrections once the real token count is known.
    async fn adjust(&self, window: &Window, requests: i64, tokens: i64) -> Result<(), StoreError>;

    /// The shared health document and its revision.
    async fn load_health(&self) -> Result<Versioned<Health>, StoreError>;

    /// Replaces the health document if it is still at `revision` (`None`: if none is
    /// stored). `Ok(false)` means another writer came first: load and try again.
    async fn save_health(&self, health: &Health, revision: Option<u64>)
    -> Result<bool, StoreError>;
}

/// A budget store failure. Callers treat it as "no key now" and retry later.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing store failed or could not be reached.
    #[error("budget store: {operation} failed")]
    Backend {
        /// What was being done.
        operation: &'static str,
        /// The store's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Other writers kept changing the entry; every attempt lost its compare-and-set.
    #[error("budget store: {key} stayed contended after {attempts} attempts")]
    Contended {
        /// The contended key.
        key: String,
        /// How many attempts were made.
        attempts: u32,
    },
    /// An entry holds something this version cannot read.
    #[error("budget store: {key} holds an unreadable value")]
    Corrupt {
        /// The unreadable key.
        key: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The store's configuration cannot work (a bucket name or prefix NATS refuses).
    #[error("budget store: {0}")]
    Config(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    #[test]
    fn pacific_midnight_is_eight_hours_after_utc_midnight_in_winter() {
        assert_eq!(
            next_pacific_midnight(utc("2026-01-15T12:00:00Z")),
            utc("2026-01-16T08:00:00Z")
        );
        // 07:59 UTC on the 16th is still 23:59 on the 15th in Los Angeles.
        assert_eq!(
            pacific_date(utc("2026-01-16T07:59:59Z")),
            NaiveDate::from_ymd_opt(2026, 1, 15).unwrap()
        );
        assert_eq!(
            pacific_date(utc("2026-01-16T08:00:00Z")),
            NaiveDate::from_ymd_opt(2026, 1, 16).unwrap()
        );
    }

    #[test]
    fn pacific_midnight_is_seven_hours_after_utc_midnight_in_summer() {
        assert_eq!(
            next_pacific_midnight(utc("2026-07-04T20:00:00Z")),
            utc("2026-07-05T07:00:00Z")
        );
    }

    #[test]
    fn the_spring_forward_day_is_twenty_three_hours_long() {
        // 2026-03-08: clocks go from 02:00 PST to 03:00 PDT.
        let start = next_pacific_midnight(utc("2026-03-07T20:00:00Z"));
        assert_eq!(start, utc("2026-03-08T08:00:00Z"));
        let end = next_pacific_midnight(start);
        assert_eq!(end, utc("2026-03-09T07:00:00Z"));
        assert_eq!(end - start, chrono::Duration::hours(23));
    }

    #[test]
    fn the_fall_back_day_is_twenty_five_hours_long() {
        // 2026-11-01: clocks go from 02:00 PDT back to 01:00 PST.
        let start = next_pacific_midnight(utc("2026-10-31T20:00:00Z"));
        assert_eq!(start, utc("2026-11-01T07:00:00Z"));
        // 01:30 happens twice that night; both are still November 1st.
        assert_eq!(
            next_pacific_midnight(utc("2026-11-01T08:30:00Z")),
            utc("2026-11-02T08:00:00Z")
        );
        assert_eq!(
            next_pacific_midnight(utc("2026-11-01T09:30:00Z")),
            utc("2026-11-02T08:00:00Z")
        );
        assert_eq!(
            next_pacific_midnight(start) - start,
            chrono::Duration::hours(25)
        );
    }

    #[test]
    fn minute_windows_roll_over_on_the_minute() {
        let a = Window::minute("p", utc("2026-01-01T00:00:59Z"));
        let b = Window::minute("p", utc("2026-01-01T00:01:00Z"));
        assert_ne!(a.key(), b.key());
        assert_eq!(a.ends(), utc("2026-01-01T00:01:00Z"));
        assert_eq!(a.key(), format!("rpm.p.{}", 1_767_225_600 / 60));
    }

    #[test]
    fn day_windows_are_named_by_pacific_date() {
        let w = Window::day("p", utc("2026-01-16T07:59:59Z"));
        assert_eq!(w.key(), "rpd.p.2026-01-15");
        assert_eq!(w.ends(), utc("2026-01-16T08:00:00Z"));
    }

    #[test]
    fn project_names_become_single_safe_key_tokens() {
        assert_eq!(encode_token("my-proj_1"), "my-proj_1");
        assert_eq!(encode_token("a.b"), "a=2Eb");
        assert_eq!(encode_token("a b*>"), "a=20b=2A=3E");
        assert_ne!(encode_token("a.b"), encode_token("a=2Eb"));
        assert_eq!(encode_token(""), "=");
    }

    #[test]
    fn a_ceiling_admits_up_to_its_limit_and_no_further() {
        let ceiling = Ceiling {
            requests: Some(2),
            tokens: Some(100),
        };
        let one = Usage {
            requests: 1,
            tokens: 40,
        };
        assert!(Usage::default().admits(one, ceiling));
        assert!(one.admits(one, ceiling));
        assert!(!one.plus(one).admits(one, ceiling), "third request");
        let big = Usage {
            requests: 1,
            tokens: 70,
        };
        assert!(!one.admits(big, ceiling), "tokens over the ceiling");
        let huge = Usage {
            requests: 1,
            tokens: 500,
        };
        assert!(
            Usage::default().admits(huge, ceiling),
            "alone in a fresh window"
        );
        assert!(!one.admits(huge, ceiling));
    }
}
