//! How long to wait before trying again, at the two layers retries happen.
//!
//! - [`Backoff`] / [`Retries`]: within one attempt of a run, the short waits between calls
//!   to Gemini. Full-jitter exponential backoff, `sleep = random(0, min(cap, base *
//!   2^n))`, so many callers that failed together do not come back together; but a server
//!   hint (RetryInfo's `retryDelay`, or "Please retry in 47s." in the message) wins when
//!   present, capped, because Gemini knows when its quota window reopens. Tries and total
//!   waiting are both bounded.
//! - [`RetrySchedule`]: across attempts, the escalating delays of `COLLOQUY_RETRY_DELAYS`
//!   (default `1m,10m,1h,1d`) after which a failed run is retried, recorded in the log as
//!   RunRetryScheduled; past the last one the run goes to the dead letters.
//!
//! The `backon` crate was considered for the first: its jitter adds `random(0, d)` on top
//! of the delay `d` rather than drawing from `[0, d]`, and a hint set through its `adjust`
//! hook is not counted towards its total-delay limit, so the small function here is
//! clearer than bending it.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;

/// The policy for short retries of one call. `Copy`, so each call takes its own
/// [`Retries`] from a shared policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first wait; it doubles with every failure.
    pub base: Duration,
    /// The most any jittered wait can be.
    pub cap: Duration,
    /// The most calls in all, the first included.
    pub max_tries: u32,
    /// The most time spent waiting between calls, in all.
    pub max_total_wait: Duration,
    /// Server hints longer than this are cut to it.
    pub max_hint: Duration,
}

impl Default for Backoff {
    /// Base 1 s, cap 30 s, at most 4 tries and 2 minutes of waiting; hints up to 60 s
    /// (Gemini's per-minute windows reopen within a minute).
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
            max_tries: 4,
            max_total_wait: Duration::from_secs(120),
            max_hint: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The most the jittered wait after failure number `failure` (from 1) can be:
    /// `min(cap, base * 2^(failure - 1))`.
    pub fn ceiling(&self, failure: u32) -> Duration {
        let doublings = failure.saturating_sub(1);
        let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A fresh count of tries and waiting for one call.
    pub fn start(self) -> Retries {
        Retries {
            policy: self,
            failures: 0,
            waited: Duration::ZERO,
        }
    }
}

/// The retries of one call under a [`Backoff`] policy: call [`Retries::next_delay`] after
/// each failure, sleep what it returns, and give up when it returns `None`.
#[derive(Debug, Clone)]
pub struct Retries {
    policy: Backoff,
    failures: u32,
    waited: Duration,
}

impl Retries {
    /// After a failed call: how long to wait before the next one, or `None` when the tries
    /// or the total wait are used up. `hint` is the server's retry delay, if it sent one.
    pub fn next_delay(&mut self, hint: Option<Duration>) -> Option<Duration> {
        self.next_delay_with(hint, &mut rand::rng())
    }

    /// [`Self::next_delay`] with a given random source, for reproducible tests.
    pub fn next_delay_with<R: Rng + ?Sized>(
        &mut self,
        hint: Option<Duration>,
        rng: &mut R,
    ) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        if self.failures >= self.policy.max_tries {
            return None;
        }
        let delay = match hint {
            Some(hint) => hint.min(self.policy.max_hint),
            None => {
                let ceiling = self.policy.ceiling(self.failures);
                let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
                Duration::from_nanos(rng.random_range(0..=nanos))
            }
        };
        let waited = self.waited.saturating_add(delay);
        if waited > self.policy.max_total_wait {
            return None;
        }
        self.waited = waited;
        Some(delay)
    }

    /// Calls that failed so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Time waited so far.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

/// What to do with a run after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Retry once this much time has passed.
    RetryAfter(Duration),
    /// The schedule is used up: the run fails and goes to the dead letters.
    DeadLetter,
}

/// The escalating delays between attempts of a run (`COLLOQUY_RETRY_DELAYS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    delays: Vec<Duration>,
}

impl RetrySchedule {
    /// The schedule when none is configured.
    pub const DEFAULT: &'static str = "1m,10m,1h,1d";

    /// These delays, in order.
    pub fn new(delays: Vec<Duration>) -> Self {
        Self { delays }
    }

    /// Parses comma-separated durations such as `1m,10m,1h,1d` (`s`, `m`, `h`, `d` and
    /// the other units humantime accepts; spaces around entries are ignored). At least
    /// one delay is required: a run that should never be retried is better served by an
    /// explicit setting than by an empty string that might be a mistake.
    pub fn parse(text: &str) -> Result<Self, ScheduleError> {
        if text.trim().is_empty() {
            return Err(ScheduleError::Empty);
        }
        text.split(',')
            .enumerate()
            .map(|(n, entry)| {
                humantime::parse_duration(entry.trim()).map_err(|_| ScheduleError::Entry {
                    entry: n + 1,
                    value: entry.trim().to_owned(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }

    /// The delays, in order.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    /// The decision for retry number `retry` (1 for the first retry, after the first
    /// failed attempt; 0 is read as 1).
    pub fn decide(&self, retry: u32) -> RetryDecision {
        let index = usize::try_from(retry.max(1) - 1).unwrap_or(usize::MAX);
        match self.delays.get(index) {
            Some(delay) => RetryDecision::RetryAfter(*delay),
            None => RetryDecision::DeadLetter,
        }
    }
}

impl Default for RetrySchedule {
    /// `1m,10m,1h,1d`.
    fn default() -> Self {
        Self::new(
            [60, 600, 3600, 86_400]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
        )
    }
}

impl FromStr for RetrySchedule {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl fmt::Display for RetrySchedule {
    /// The schedule in the form [`RetrySchedule::parse`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, delay) in self.delays.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", humantime::format_duration(*delay))?;
        }
        Ok(())
    }
}

/// Why a retry schedule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// Nothing to parse.
    #[error("COLLOQUY_RETRY_DELAYS must list at least one delay, e.g. 1m,10m,1h,1d")]
    Empty,
    /// One entry is not a duration.
    #[error(
        "COLLOQUY_RETRY_DELAYS: entry {entry} ({value:?}) is not a duration like 30s, 10m, 1h or 1d"
    )]
    Entry {
        /// The entry's number, from 1.
        entry: usize,
        /// The entry as written.
        value: String,
    },
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        let policy = Backoff {
            base: SECOND,
            cap: 10 * SECOND,
            ..Backoff::default()
        };
        let ceilings: Vec<_> = (1..=6).map(|n| policy.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [1, 2, 4, 8, 10, 10].map(Duration::from_secs).to_vec()
        );
        assert_eq!(policy.ceiling(200), 10 * SECOND, "no overflow");
    }

    #[test]
    fn jittered_waits_are_spread_between_zero_and_the_ceiling() {
        let policy = Backoff {
            base: SECOND,
            cap: 8 * SECOND,
            max_tries: 100,
            max_total_wait: Duration::from_secs(100_000),
            max_hint: SECOND,
        };
        let mut rng = StdRng::seed_from_u64(7);
        let mut third_waits = Vec::new();
        for _ in 0..500 {
            let mut retries = policy.start();
            let first = retries.next_delay_with(None, &mut rng).unwrap();
            assert!(first <= SECOND);
            retries.next_delay_with(None, &mut rng).unwrap();
            third_waits.push(retries.next_delay_with(None, &mut rng).unwrap());
        }
        // Third failure: uniform over [0, 4 s]. Full jitter reaches both ends' neighbourhoods.
        assert!(third_waits.iter().all(|d| *d <= 4 * SECOND));
        assert!(third_waits.iter().any(|d| *d < SECOND / 2));
        assert!(third_waits.iter().any(|d| *d > 3 * SECOND + SECOND / 2));
    }

    #[test]
    fn a_server_hint_is_used_as_given_but_capped() {
        let policy = Backoff {
            max_hint: 30 * SECOND,
            ..Backoff::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let mut retries = policy.start();
        assert_eq!(
            retries.next_delay_with(Some(22 * SECOND), &mut rng),
            Some(22 * SECOND)
        );
        assert_eq!(
            retries.next_delay_with(Some(47 * SECOND), &mut rng),
            Some(30 * SECOND)
        );
        assert_eq!(retries.waited(), 52 * SECOND);
    }

    #[test]
    fn tries_are_bounded() {
        let policy = Backoff {
            max_tries: 3,
            ..Backoff::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let mut retries = policy.start();
        assert!(
            retries.next_delay_with(None, &mut rng).is_some(),
            "before try 2"
        );
        assert!(
            retries.next_delay_with(None, &mut rng).is_some(),
            "before try 3"
        );
        assert_eq!(retries.next_delay_with(None, &mut rng), None, "no try 4");
    }

    #[test]
    fn the_total_wait_is_bounded() {
        let policy = Backoff {
            max_tries: 10,
            max_total_wait: 50 * SECOND,
            max_hint: 60 * SECOND,
            ..Backoff::default()
        };
        let mut rng = StdRng::seed_from_u64(1);
        let mut retries = policy.start();
        assert_eq!(
            retries.next_delay_with(Some(30 * SECOND), &mut rng),
            Some(30 * SECOND)
        );
        assert_eq!(
            retries.next_delay_with(Some(30 * SECOND), &mut rng),
            None,
            "60 s in all would exceed 50 s"
        );
    }

    #[test]
    fn the_default_schedule_escalates_then_gives_up() {
        let schedule: RetrySchedule = RetrySchedule::DEFAULT.parse().unwrap();
        assert_eq!(schedule, RetrySchedule::default());
        assert_eq!(
            schedule.decide(1),
            RetryDecision::RetryAfter(Duration::from_secs(60))
        );
        assert_eq!(
            schedule.decide(2),
            RetryDecision::RetryAfter(Duration::from_secs(600))
        );
        assert_eq!(
            schedule.decide(3),
            RetryDecision::RetryAfter(Duration::from_secs(3600))
        );
        assert_eq!(
            schedule.decide(4),
            RetryDecision::RetryAfter(Duration::from_secs(86_400))
        );
        assert_eq!(schedule.decide(5), RetryDecision::DeadLetter);
        assert_eq!(schedule.decide(0), schedule.decide(1));
    }

    #[test]
    fn schedules_parse_with_spaces_and_print_back() {
        let schedule = RetrySchedule::parse(" 30s, 5m ,2h").unwrap();
        assert_eq!(
            schedule.delays(),
            &[
                Duration::from_secs(30),
                Duration::from_secs(300),
                Duration::from_secs(7200)
            ]
        );
        assert_eq!(schedule.to_string(), "30s,5m,2h");
    }

    #[test]
    fn bad_schedules_name_the_entry() {
        assert_eq!(RetrySchedule::parse(" "), Err(ScheduleError::Empty));
        assert_eq!(
            RetrySchedule::parse("1m,soon"),
            Err(ScheduleError::Entry {
                entry: 2,
                value: "soon".into()
            })
        );
        assert!(RetrySchedule::parse("1m,,1h").is_err());
    }
}
