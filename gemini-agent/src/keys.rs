//! The Gemini API key pool: which key the next call uses, and what Gemini's answer
//! teaches about keys and projects.
//!
//! Quotas belong to projects, so keys are grouped by project and every project has one
//! budget (requests per minute and per day, optionally tokens per minute) kept in a
//! [`BudgetStore`] that all agent instances share. A call goes:
//!
//! 1. [`KeyPool::acquire`] picks the least recently used key of a project that is neither
//!    cooling nor exhausted and whose budget admits one more call, spends the budget, and
//!    returns a [`Lease`]. When no project can take a call it says when one can
//!    ([`AcquireError::NotReady`]), so the caller schedules a retry instead of polling.
//! 2. The caller makes the call with [`Lease::key`].
//! 3. [`KeyPool::report`] hands back the lease with the [`Outcome`]: a 429 cools the
//!    project or exhausts it until midnight US Pacific, a rejected key is disabled, and a
//!    quota lower than configured is learned. All of it is shared through the store.
//!
//! Disabled keys come back through [`KeyPool::recheck`] (on demand) or
//! [`KeyPool::spawn_reprobe`] (periodically), with a cheap call the caller supplies as a
//! [`KeyProbe`], so this module does not depend on the HTTP client.
//! [`KeyPool::snapshot`] is the admin view; it never contains a key.

mod config;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::budget::{
    BudgetStore, Ceiling, Disabled, Health, KeyHealth, LastError, Learned, ProjectHealth, Spend,
    StoreError, Usage, Window,
};
use crate::clock::Clock;

pub use config::{
    Budget, BudgetOverride, ConfigError, KeysFile, PoolConfig, PoolKey, parse_key_list,
};

/// How many times a health update is retried after losing a compare-and-set.
const HEALTH_ATTEMPTS: u32 = 32;

/// The longest error text kept per key; Gemini's messages can be long.
const MAX_ERROR_LEN: usize = 300;

/// Shared keys and budgets; cheap to call from many tasks at once. See the module docs.
#[derive(Debug)]
pub struct KeyPool {
    keys: Vec<PoolKey>,
    budgets: HashMap<String, Budget>,
    default_cooldown: Duration,
    learned_quota_ttl: Duration,
    store: Arc<dyn BudgetStore>,
    clock: Arc<dyn Clock>,
    local: Mutex<Local>,
}

/// What one instance remembers for itself: the order it used keys in (each instance
/// rotating on its own spreads the load well enough), and projects whose current window
/// it saw at its request limit, so it does not ask the store again before the window ends. Counters only
/// grow within a window except for refunds; this instance drops the hint when it refunds,
/// and another instance's refund is merely used a little later. So the hint can be too
/// cautious, never too generous.
#[derive(Debug, Default)]
struct Local {
    uses: u64,
    last_used: HashMap<String, u64>,
    full_until: HashMap<String, DateTime<Utc>>,
}

/// One granted call: which key to use. Hand it back to [`KeyPool::report`]; a lease
/// dropped without a report leaves its budget spent, which errs on the safe side.
#[derive(Debug)]
pub struct Lease {
    label: String,
    project: String,
    key: SecretString,
    minute: Window,
    day: Window,
    estimated_tokens: u64,
}

impl Lease {
    /// The key's label, for logs and events (`RunStarted` records it).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The project whose budget the call spends.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The key, for the `x-goog-api-key` header; readable only through
    /// [`ExposeSecret::expose_secret`], and redacted in `Debug`.
    pub fn key(&self) -> &SecretString {
        &self.key
    }
}

/// What a call made with a [`Lease`] came to, as far as keys and quotas care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Gemini answered. `tokens` is the input token count it reported
    /// (`usageMetadata.promptTokenCount`); it replaces the estimate in the minute window.
    Success {
        /// Input tokens the call actually used.
        tokens: u64,
    },
    /// The call was never sent (cancelled before it started): the budget is refunded.
    NotSent,
    /// 429 with a per-minute quota: the project cools until `retry_after` from now
    /// (RetryInfo or the message's "retry in"), or the pool's default cooldown.
    RateLimited {
        /// The server's retry hint.
        retry_after: Option<Duration>,
        /// The quota the 429 reported, learned if lower than configured.
        quota: Option<QuotaLimit>,
    },
    /// 429 with a per-day quota: the project is exhausted until midnight US Pacific.
    DailyExhausted {
        /// The quota the 429 reported, learned if lower than configured.
        quota: Option<QuotaLimit>,
    },
    /// The key is invalid or deleted (400 `API_KEY_INVALID`): disabled.
    KeyInvalid {
        /// Gemini's explanation.
        reason: String,
    },
    /// The key cannot be used (403 suspended, leaked or blocked; 400 `FAILED_PRECONDITION`
    /// billing required): disabled.
    KeyUnusable {
        /// Gemini's explanation.
        reason: String,
    },
    /// 500, 503 overloaded or 504: not the key's fault and not a quota; no penalty, but it
    /// is shown as the key's last error.
    ServerError {
        /// What happened.
        detail: String,
    },
    /// The call failed for a reason that concerns neither key nor quota (a bad request, a
    /// blocked prompt): nothing changes.
    RequestFailed,
}

/// A limit a 429 reported in `QuotaFailure.violations[]`, by which budget it limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaLimit {
    /// Requests per minute.
    RequestsPerMinute(u64),
    /// Input tokens per minute.
    TokensPerMinute(u64),
    /// Requests per day.
    RequestsPerDay(u64),
}

impl QuotaLimit {
    /// Reads a violation's `quotaId` (e.g. `GenerateRequestsPerMinutePerProjectPerModel-
    /// FreeTier`, `GenerateContentInputTokensPerModelPerMinute-FreeTier`) and
    /// `quotaValue`. `None` for quotas the pool does not budget (such as tokens per day).
    pub fn from_violation(quota_id: &str, quota_value: u64) -> Option<Self> {
        let tokens = quota_id.contains("Token");
        if quota_id.contains("PerMinute") {
            Some(if tokens {
                Self::TokensPerMinute(quota_value)
            } else {
                Self::RequestsPerMinute(quota_value)
            })
        } else if quota_id.contains("PerDay") && !tokens {
            Some(Self::RequestsPerDay(quota_value))
        } else {
            None
        }
    }
}

/// Why [`KeyPool::acquire`] has no key.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// Every project with a usable key is cooling, exhausted or out of budget; the
    /// earliest of them can take a call at `until`. Retry then.
    #[error("no Gemini project has budget before {until}")]
    NotReady {
        /// When the first project becomes ready (a window ends or a cooldown expires).
        until: DateTime<Utc>,
    },
    /// Every key is disabled (or none is configured): waiting does not help until a
    /// recheck brings one back.
    #[error("no usable Gemini key: every key is disabled or none is configured")]
    NoUsableKey,
    /// The budget store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A cheap call that tells whether Gemini accepts a key (e.g. listing models), supplied by
/// the caller so the pool does not depend on the HTTP client. Wrap a closure with
/// [`ProbeFn`].
#[async_trait]
pub trait KeyProbe: Send + Sync {
    /// `Ok` if Gemini accepted the key.
    async fn probe(&self, key: &SecretString) -> Result<(), ProbeError>;
}

/// Why a probe did not confirm a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// Gemini rejected the key (invalid, suspended, blocked): it stays or becomes disabled.
    #[error("key rejected: {0}")]
    Rejected(String),
    /// The probe failed for another reason (network, overload): says nothing about the key.
    #[error("probe inconclusive: {0}")]
    Inconclusive(String),
}

/// A [`KeyProbe`] made from a closure taking the key (cloned) and returning a future.
pub struct ProbeFn<F>(pub F);

impl<F> fmt::Debug for ProbeFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProbeFn")
    }
}

#[async_trait]
impl<F, Fut> KeyProbe for ProbeFn<F>
where
    F: Fn(SecretString) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), ProbeError>> + Send,
{
    async fn probe(&self, key: &SecretString) -> Result<(), ProbeError> {
        (self.0)(key.clone()).await
    }
}

/// What a recheck found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum KeyCheck {
    /// Gemini accepted the key; it is enabled.
    Usable,
    /// Gemini rejected the key; it is disabled with this reason.
    Rejected {
        /// Gemini's explanation.
        reason: String,
    },
    /// The probe could not tell; nothing changed.
    Inconclusive {
        /// What went wrong.
        detail: String,
    },
}

/// Why [`KeyPool::recheck`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RecheckError {
    /// No key has that label.
    #[error("no Gemini key is labelled {0:?}")]
    UnknownKey(String),
    /// The budget store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A key's state in the admin view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Usable now (its project may still be at its per-minute budget until the minute ends).
    Ready,
    /// Its project got a per-minute 429 and waits until `cooldown_until`.
    Cooling,
    /// Its project's daily quota is gone until midnight US Pacific (`cooldown_until`).
    ExhaustedToday,
    /// The key is out of use until a recheck accepts it.
    Disabled,
}

/// One key in the admin view (`GET /v1/admin/agent/keys`, `colloquy admin keys status`).
/// Counts and limits are the project's, since quotas are per project. Never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// The key's label.
    pub label: String,
    /// Its project.
    pub project: String,
    /// Ready, cooling, exhausted today or disabled.
    pub state: KeyState,
    /// Until when a cooling or exhausted project waits.
    pub cooldown_until: Option<DateTime<Utc>>,
    /// Requests the project was granted in the last minute.
    pub requests_this_minute: u64,
    /// Requests the project was granted this US Pacific day.
    pub requests_today: u64,
    /// Input tokens the project spent in the last minute.
    pub tokens_this_minute: u64,
    /// The limits in force: configured, or lower ones learned from 429s.
    pub limits: Budget,
    /// Why the key is disabled, when it is.
    pub disabled_reason: Option<String>,
    /// The last error a call with this key met.
    pub last_error: Option<String>,
    /// When that error happened.
    pub last_error_at: Option<DateTime<Utc>>,
}

/// A project's budget after learned limits, in the store's units.
#[derive(Debug, Clone, Copy)]
struct Limits {
    rpm: u64,
    rpd: u64,
    tpm: Option<u64>,
}

impl Limits {
    fn as_budget(self) -> Budget {
        let narrow = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        Budget {
            rpm: narrow(self.rpm),
            rpd: narrow(self.rpd),
            tpm: self.tpm.map(narrow),
        }
    }
}

fn later(a: Option<DateTime<Utc>>, b: DateTime<Utc>) -> DateTime<Utc> {
    a.map_or(b, |a| a.max(b))
}

fn plus(at: DateTime<Utc>, by: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(by)
        .ok()
        .and_then(|by| at.checked_add_signed(by))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Until when a project is blocked by a cooldown or daily exhaustion, if it is.
fn blocked_until(project: Option<&ProjectHealth>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let project = project?;
    [project.cooling_until, project.exhausted_until]
        .into_iter()
        .flatten()
        .filter(|until| *until > now)
        .max()
}

impl KeyPool {
    /// A pool over `config`'s keys, spending budgets in `store` and reading time from
    /// `clock`. Pools in several processes that share one store share the budgets.
    pub fn new(
        config: PoolConfig,
        store: Arc<dyn BudgetStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let budgets = config
            .keys
            .iter()
            .map(|key| (key.project.clone(), config.budget_for(&key.project)))
            .collect();
        Ok(Self {
            budgets,
            default_cooldown: config.default_cooldown,
            learned_quota_ttl: config.learned_quota_ttl,
            keys: config.keys,
            store,
            clock,
            local: Mutex::new(Local::default()),
        })
    }

    /// The labels of all keys, in configuration order.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|key| key.label.as_str())
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        // Only hints and use order live here; a panic elsewhere cannot make them unsafe.
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Picks a key and spends one call of its project's budget, counting
    /// `estimated_tokens` input tokens against a tokens-per-minute limit (0 if unknown).
    ///
    /// Projects are tried in the order of their least recently used enabled key; the
    /// first whose budget admits the call wins. The minute window is spent first, then the
    /// day window; if the day refuses, the minute is refunded.
    pub async fn acquire(&self, estimated_tokens: u64) -> Result<Lease, AcquireError> {
        let now = self.clock.now();
        let health = self.store.load_health().await?.value;
        let candidates = self.candidates(&health);
        let mut tried = HashSet::new();
        let mut earliest: Option<DateTime<Utc>> = None;
        for key in candidates {
            if !tried.insert(key.project.as_str()) {
                continue;
            }
            match self
                .try_project(key, &health, now, estimated_tokens)
                .await?
            {
                Ok(lease) => return Ok(lease),
                Err(until) => earliest = Some(earliest.map_or(until, |e| e.min(until))),
            }
        }
        match earliest {
            Some(until) => Err(AcquireError::NotReady { until }),
            None => Err(AcquireError::NoUsableKey),
        }
    }

    /// Enabled keys, least recently used first (configuration order among equals).
    fn candidates(&self, health: &Health) -> Vec<&PoolKey> {
        let local = self.local();
        let mut keys: Vec<(u64, usize, &PoolKey)> = self
            .keys
            .iter()
            .enumerate()
            .filter(|(_, key)| {
                health
                    .keys
                    .get(&key.label)
                    .is_none_or(|k| k.disabled.is_none())
            })
            .map(|(index, key)| {
                let used = local.last_used.get(&key.label).copied().unwrap_or(0);
                (used, index, key)
            })
            .collect();
        keys.sort_unstable_by_key(|(used, index, _)| (*used, *index));
        keys.into_iter().map(|(_, _, key)| key).collect()
    }

    /// Tries to spend one call of `key`'s project: the lease, or when to try again.
    async fn try_project(
        &self,
        key: &PoolKey,
        health: &Health,
        now: DateTime<Utc>,
        estimated_tokens: u64,
    ) -> Result<Result<Lease, DateTime<Utc>>, StoreError> {
        let project = key.project.as_str();
        let project_health = health.projects.get(project);
        if let Some(until) = blocked_until(project_health, now) {
            return Ok(Err(until));
        }
        if let Some(until) = self.local().full_until.get(project).copied()
            && until > now
        {
            return Ok(Err(until));
        }
        let limits = self.limits(project, project_health, now);
        // The minute slides: what the earlier slots of the last minute spent is left out
        // of the current slot's ceiling. Ended slots take no new calls (only refunds and
        // token corrections), so spending the current one with compare-and-set keeps the
        // request count exact across instances.
        let minute = Window::slot(project, now);
        let slots = Window::minute_slots(project, now);
        let slots = &slots[..slots.len() - 1];
        let earlier =
            futures::future::try_join_all(slots.iter().map(|slot| self.store.usage(slot))).await?;
        let spent = earlier.iter().fold(Usage::default(), |sum, u| sum.plus(*u));
        // When a full minute frees room: as its oldest spending slot stops counting.
        let frees = slots
            .iter()
            .zip(&earlier)
            .find(|(_, u)| u.requests > 0)
            .map_or(minute.counts_until(), |(slot, _)| slot.counts_until());
        let day = Window::day(project, now);
        let one = Usage {
            requests: 1,
            tokens: estimated_tokens,
        };
        let minute_ceiling = Ceiling {
            requests: Some(limits.rpm.saturating_sub(spent.requests)),
            tokens: limits.tpm.map(|tpm| tpm.saturating_sub(spent.tokens)),
        };
        if let Spend::Refused(usage) = self.store.try_spend(&minute, one, minute_ceiling).await? {
            // Only a full request count is worth remembering: token room comes back with
            // every call that used fewer tokens than estimated, and a smaller call may fit.
            if usage.requests + spent.requests >= limits.rpm {
                self.hint_full(project, frees);
                return Ok(Err(frees));
            }
            return Ok(Err(minute.ends()));
        }
        let day_ceiling = Ceiling {
            requests: Some(limits.rpd),
            tokens: None,
        };
        let day_spend = self
            .store
            .try_spend(&day, Usage { tokens: 0, ..one }, day_ceiling)
            .await;
        match day_spend {
            Ok(Spend::Granted(_)) => {}
            Ok(Spend::Refused(_)) => {
                self.refund(&minute, one).await;
                return Ok(Err(self.hint_full(project, day.ends())));
            }
            Err(error) => {
                self.refund(&minute, one).await;
                return Err(error);
            }
        }
        let mut local = self.local();
        local.uses += 1;
        let uses = local.uses;
        local.last_used.insert(key.label.clone(), uses);
        Ok(Ok(Lease {
            label: key.label.clone(),
            project: key.project.clone(),
            key: key.key.clone(),
            minute,
            day,
            estimated_tokens,
        }))
    }

    fn hint_full(&self, project: &str, until: DateTime<Utc>) -> DateTime<Utc> {
        self.local().full_until.insert(project.to_owned(), until);
        until
    }

    /// Drops the "window full" hint for `project` after this instance gave budget back,
    /// so the freed room is used at once.
    fn forget_full(&self, project: &str) {
        self.local().full_until.remove(project);
    }

    /// Gives back a spend. A failure only leaves the window over-counted (safe), so it is
    /// logged, not returned.
    async fn refund(&self, window: &Window, spent: Usage) {
        let requests = i64::try_from(spent.requests).unwrap_or(i64::MAX);
        let tokens = i64::try_from(spent.tokens).unwrap_or(i64::MAX);
        if let Err(error) = self.store.adjust(window, -requests, -tokens).await {
            tracing::warn!(
                budget.window = %window.key(),
                error = &error as &dyn std::error::Error,
                "Failed to refund a budget window; it stays over-counted until it ends"
            );
        }
    }

    /// The limits in force for `project`: configured, lowered by unexpired learned ones.
    fn limits(&self, project: &str, health: Option<&ProjectHealth>, now: DateTime<Utc>) -> Limits {
        let budget = self.budgets.get(project).copied().unwrap_or_default();
        let learned = |slot: Option<Learned>| slot.filter(|l| l.until > now).map(|l| l.value);
        let lower = |configured: u64, slot: Option<Learned>| {
            learned(slot).map_or(configured, |l| l.min(configured))
        };
        let learned_limits = health.map(|h| h.learned).unwrap_or_default();
        Limits {
            rpm: lower(budget.rpm.into(), learned_limits.rpm),
            rpd: lower(budget.rpd.into(), learned_limits.rpd),
            tpm: match (budget.tpm.map(u64::from), learned(learned_limits.tpm)) {
                (Some(c), Some(l)) => Some(c.min(l)),
                (c, l) => c.or(l),
            },
        }
    }

    /// Records what a call came to (see [`Outcome`]). Cooldowns, exhaustion, disabled keys
    /// and learned quotas go to the shared store, so every instance acts on them.
    pub async fn report(&self, lease: Lease, outcome: Outcome) -> Result<(), StoreError> {
        let now = self.clock.now();
        let project = lease.project.as_str();
        let label = lease.label.as_str();
        match outcome {
            Outcome::Success { tokens } => {
                let delta = i128::from(tokens) - i128::from(lease.estimated_tokens);
                let delta =
                    i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX });
                if delta != 0 && lease.minute.counts_until() > now {
                    self.store.adjust(&lease.minute, 0, delta).await?;
                    if delta < 0 {
                        self.forget_full(project);
                    }
                }
                Ok(())
            }
            Outcome::NotSent => {
                let spent = Usage {
                    requests: 1,
                    tokens: lease.estimated_tokens,
                };
                if lease.minute.counts_until() > now {
                    self.refund(&lease.minute, spent).await;
                }
                if lease.day.ends() > now {
                    self.refund(&lease.day, Usage { tokens: 0, ..spent }).await;
                }
                self.forget_full(project);
                Ok(())
            }
            Outcome::RateLimited { retry_after, quota } => {
                let until = plus(now, retry_after.unwrap_or(self.default_cooldown));
                let message = match retry_after {
                    Some(after) => format!(
                        "rate limited: per-minute quota, retry after {}",
                        humantime::format_duration(after)
                    ),
                    None => "rate limited: per-minute quota".to_owned(),
                };
                self.update_health(|health| {
                    let state = health.projects.entry(project.to_owned()).or_default();
                    state.cooling_until = Some(later(state.cooling_until, until));
                    self.learn(project, state, quota, now);
                    self.note_error(health, label, &message, now);
                })
                .await
            }
            Outcome::DailyExhausted { quota } => {
                let until = crate::budget::next_pacific_midnight(now);
                self.update_health(|health| {
                    let state = health.projects.entry(project.to_owned()).or_default();
                    state.exhausted_until = Some(later(state.exhausted_until, until));
                    self.learn(project, state, quota, now);
                    self.note_error(health, label, "rate limited: per-day quota exhausted", now);
                })
                .await
            }
            Outcome::KeyInvalid { reason } => {
                self.disable(label, &format!("key invalid: {reason}"), now)
                    .await
            }
            Outcome::KeyUnusable { reason } => {
                self.disable(label, &format!("key unusable: {reason}"), now)
                    .await
            }
            Outcome::ServerError { detail } => {
                let message = format!("server error: {detail}");
                self.update_health(|health| self.note_error(health, label, &message, now))
                    .await
            }
            Outcome::RequestFailed => Ok(()),
        }
    }

    /// Lowers a project's limit to what a 429 reported, when that is below the limit in
    /// force; it applies for `learned_quota_ttl`. A reported 0 means the project has no
    /// access to the model at all, which is the key classifier's to report, not a budget,
    /// so it is not learned.
    fn learn(
        &self,
        project: &str,
        state: &mut ProjectHealth,
        quota: Option<QuotaLimit>,
        now: DateTime<Utc>,
    ) {
        let Some(quota) = quota else { return };
        let budget = self.budgets.get(project).copied().unwrap_or_default();
        let (slot, configured, value) = match quota {
            QuotaLimit::RequestsPerMinute(v) => (&mut state.learned.rpm, Some(budget.rpm), v),
            QuotaLimit::TokensPerMinute(v) => (&mut state.learned.tpm, budget.tpm, v),
            QuotaLimit::RequestsPerDay(v) => (&mut state.learned.rpd, Some(budget.rpd), v),
        };
        if value == 0 || configured.is_some_and(|c| value >= u64::from(c)) {
            return;
        }
        let value = slot
            .filter(|l| l.until > now)
            .map_or(value, |l| l.value.min(value));
        *slot = Some(Learned {
            value,
            until: plus(now, self.learned_quota_ttl),
        });
    }

    fn note_error(&self, health: &mut Health, label: &str, message: &str, now: DateTime<Utc>) {
        health.keys.entry(label.to_owned()).or_default().last_error = Some(LastError {
            message: self.scrub(message),
            at: now,
        });
    }

    async fn disable(
        &self,
        label: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let reason = self.scrub(reason);
        self.update_health(|health| {
            let key = health.keys.entry(label.to_owned()).or_default();
            if key.disabled.is_none() {
                key.disabled = Some(Disabled {
                    reason: reason.clone(),
                    since: now,
                });
            }
            key.last_error = Some(LastError {
                message: reason.clone(),
                at: now,
            });
        })
        .await
    }

    /// Removes any configured key from `text` and shortens it: error texts are stored and
    /// shown to operators, and some echo request details.
    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for key in &self.keys {
            let secret = key.key.expose_secret();
            if !secret.is_empty() && text.contains(secret) {
                text = text.replace(secret, "[redacted]");
            }
        }
        if text.len() > MAX_ERROR_LEN {
            let mut end = MAX_ERROR_LEN;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        text
    }

    /// Applies `change` to the shared health document with compare-and-set, re-reading and
    /// re-applying it when another instance wrote first.
    async fn update_health(&self, mut change: impl FnMut(&mut Health)) -> Result<(), StoreError> {
        for _ in 0..HEALTH_ATTEMPTS {
            let current = self.store.load_health().await?;
            let mut next = current.value.clone();
            change(&mut next);
            if next == current.value || self.store.save_health(&next, current.revision).await? {
                return Ok(());
            }
        }
        Err(StoreError::Contended {
            key: "health".to_owned(),
            attempts: HEALTH_ATTEMPTS,
        })
    }

    /// Probes the key labelled `label` now: enables it if Gemini accepts it, disables it
    /// if Gemini rejects it, and changes nothing if the probe cannot tell.
    pub async fn recheck(
        &self,
        label: &str,
        probe: &dyn KeyProbe,
    ) -> Result<KeyCheck, RecheckError> {
        let key = self
            .keys
            .iter()
            .find(|key| key.label == label)
            .ok_or_else(|| RecheckError::UnknownKey(label.to_owned()))?;
        Ok(self.recheck_key(key, probe).await?)
    }

    /// Probes every disabled key once; what [`Self::spawn_reprobe`] runs each interval.
    pub async fn recheck_disabled(
        &self,
        probe: &dyn KeyProbe,
    ) -> Result<Vec<(String, KeyCheck)>, StoreError> {
        let health = self.store.load_health().await?.value;
        let mut checked = Vec::new();
        for key in &self.keys {
            let disabled = health
                .keys
                .get(&key.label)
                .is_some_and(|k| k.disabled.is_some());
            if disabled {
                let check = self.recheck_key(key, probe).await?;
                checked.push((key.label.clone(), check));
            }
        }
        Ok(checked)
    }

    async fn recheck_key(
        &self,
        key: &PoolKey,
        probe: &dyn KeyProbe,
    ) -> Result<KeyCheck, StoreError> {
        let label = key.label.as_str();
        match probe.probe(&key.key).await {
            Ok(()) => {
                self.update_health(|health| {
                    if let Some(state) = health.keys.get_mut(label) {
                        state.disabled = None;
                    }
                })
                .await?;
                tracing::info!(
                    gemini.key = label,
                    "Gemini key accepted by a recheck; enabled"
                );
                Ok(KeyCheck::Usable)
            }
            Err(ProbeError::Rejected(reason)) => {
                let reason = self.scrub(&reason);
                self.disable(
                    label,
                    &format!("key rejected by recheck: {reason}"),
                    self.clock.now(),
                )
                .await?;
                Ok(KeyCheck::Rejected { reason })
            }
            Err(ProbeError::Inconclusive(detail)) => Ok(KeyCheck::Inconclusive {
                detail: self.scrub(&detail),
            }),
        }
    }

    /// Re-probes disabled keys every `every` until `cancel` fires (the first round after
    /// one interval). Every instance may run one; probes are cheap calls outside the
    /// generation quota, and the shared health document keeps their verdicts consistent.
    pub fn spawn_reprobe(
        self: &Arc<Self>,
        probe: Arc<dyn KeyProbe>,
        every: Duration,
        cancel: CancellationToken,
    ) -> JoinHandle<()> {
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = ticks.tick() => {
                        if let Err(error) = pool.recheck_disabled(probe.as_ref()).await {
                            tracing::warn!(
                                error = &error as &dyn std::error::Error,
                                "Failed to re-probe disabled Gemini keys"
                            );
                        }
                    }
                }
            }
        })
    }

    /// Every key's state, for the admin view. Never contains a key.
    pub async fn snapshot(&self) -> Result<Vec<KeyStatus>, StoreError> {
        let now = self.clock.now();
        let health = self.store.load_health().await?.value;
        let mut usage: HashMap<&str, (Usage, Usage)> = HashMap::new();
        for key in &self.keys {
            let project = key.project.as_str();
            if !usage.contains_key(project) {
                let mut minute = Usage::default();
                for slot in Window::minute_slots(project, now) {
                    minute = minute.plus(self.store.usage(&slot).await?);
                }
                let day = self.store.usage(&Window::day(project, now)).await?;
                usage.insert(project, (minute, day));
            }
        }
        let status = self
            .keys
            .iter()
            .map(|key| {
                let project = key.project.as_str();
                let (minute, day) = usage.get(project).copied().unwrap_or_default();
                let project_health = health.projects.get(project);
                let key_health = health.keys.get(&key.label).cloned().unwrap_or_default();
                let limits = self.limits(project, project_health, now);
                let active = |t: Option<DateTime<Utc>>| t.filter(|t| *t > now);
                let exhausted =
                    active(project_health.and_then(|p| p.exhausted_until)).or_else(|| {
                        (day.requests >= limits.rpd).then(|| Window::day(project, now).ends())
                    });
                let cooling = active(project_health.and_then(|p| p.cooling_until));
                let (state, cooldown_until) = match (&key_health, exhausted, cooling) {
                    (
                        KeyHealth {
                            disabled: Some(_), ..
                        },
                        _,
                        _,
                    ) => (KeyState::Disabled, None),
                    (_, Some(until), _) => (KeyState::ExhaustedToday, Some(until)),
                    (_, None, Some(until)) => (KeyState::Cooling, Some(until)),
                    _ => (KeyState::Ready, None),
                };
                KeyStatus {
                    label: key.label.clone(),
                    project: key.project.clone(),
                    state,
                    cooldown_until,
                    requests_this_minute: minute.requests,
                    requests_today: day.requests,
                    tokens_this_minute: minute.tokens,
                    limits: limits.as_budget(),
                    disabled_reason: key_health.disabled.map(|d| d.reason),
                    last_error_at: key_health.last_error.as_ref().map(|e| e.at),
                    last_error: key_health.last_error.map(|e| e.message),
                }
            })
            .collect();
        Ok(status)
    }
}

#[cfg(test)]
mod tests;
