//! The in-process budget store: for tests, and for a single agent process without NATS
//! (the embedded mode), where nobody else spends the budget.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use super::{
    BudgetStore, Ceiling, Health, SLOT_SECONDS, Spend, StoreError, Usage, Versioned, Window,
    WindowKind,
};

/// Windows kept per project and kind: the slots of a sliding minute.
const KEEP: usize = (60 / SLOT_SECONDS) as usize + 1;

/// Budgets and health in memory. One instance shared (behind an `Arc`) by several pools
/// behaves like one shared bucket; it forgets everything when the process ends.
#[derive(Debug, Default)]
pub struct MemoryBudgetStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Usage by window key.
    windows: HashMap<String, Usage>,
    /// The newest window keys per (kind, project), oldest first, so older windows can be
    /// dropped.
    newest: HashMap<(WindowKind, String), VecDeque<String>>,
    health: Health,
    /// 0 while no health was saved.
    health_revision: u64,
}

impl MemoryBudgetStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section below leaves the maps consistent before it can panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// Records `usage` for `window`, dropping the oldest window of the same project and
    /// kind beyond [`KEEP`]: only the current window is ever spent, and only the slots of
    /// the last minute are read, so memory stays bounded.
    fn write(&mut self, window: &Window, usage: Usage) {
        let key = window.key();
        let kept = self
            .newest
            .entry((window.kind(), window.project().to_owned()))
            .or_default();
        if !kept.contains(&key) {
            kept.push_back(key.clone());
            if kept.len() > KEEP
                && let Some(old) = kept.pop_front()
            {
                self.windows.remove(&old);
            }
        }
        self.windows.insert(key, usage);
    }
}

#[async_trait]
impl BudgetStore for MemoryBudgetStore {
    async fn usage(&self, window: &Window) -> Result<Usage, StoreError> {
        Ok(self
            .lock()
            .windows
            .get(&window.key())
            .copied()
            .unwrap_or_default())
    }

    async fn try_spend(
        &self,
        window: &Window,
        add: Usage,
        ceiling: Ceiling,
    ) -> Result<Spend, StoreError> {
        let mut inner = self.lock();
        let current = inner
            .windows
            .get(&window.key())
            .copied()
            .unwrap_or_default();
        if !current.admits(add, ceiling) {
            return Ok(Spend::Refused(current));
        }
        let next = current.plus(add);
        inner.write(window, next);
        Ok(Spend::Granted(next))
    }

    async fn adjust(&self, window: &Window, requests: i64, tokens: i64) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let key = window.key();
        match inner.windows.get(&key).copied() {
            Some(current) => {
                inner.write(window, current.adjusted(requests, tokens));
            }
            // A window already dropped is over; corrections to it change nothing.
            None => {
                let is_old = inner
                    .newest
                    .get(&(window.kind(), window.project().to_owned()))
                    .is_some_and(|kept| !kept.contains(&key));
                let next = Usage::default().adjusted(requests, tokens);
                if !is_old && next != Usage::default() {
                    inner.write(window, next);
                }
            }
        }
        Ok(())
    }

    async fn load_health(&self) -> Result<Versioned<Health>, StoreError> {
        let inner = self.lock();
        Ok(Versioned {
            value: inner.health.clone(),
            revision: (inner.health_revision > 0).then_some(inner.health_revision),
        })
    }

    async fn save_health(
        &self,
        health: &Health,
        revision: Option<u64>,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let current = (inner.health_revision > 0).then_some(inner.health_revision);
        if current != revision {
            return Ok(false);
        }
        inner.health = health.clone();
        inner.health_revision += 1;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    #[tokio::test]
    async fn health_saves_are_compare_and_set() {
        let store = MemoryBudgetStore::new();
        let first = store.load_health().await.unwrap();
        assert_eq!(first.revision, None);
        assert!(store.save_health(&Health::default(), None).await.unwrap());
        assert!(
            !store.save_health(&Health::default(), None).await.unwrap(),
            "a second create loses"
        );
        let second = store.load_health().await.unwrap();
        assert!(
            store
                .save_health(&Health::default(), second.revision)
                .await
                .unwrap()
        );
        assert!(
            !store
                .save_health(&Health::default(), second.revision)
                .await
                .unwrap(),
            "a stale revision loses"
        );
    }

    #[tokio::test]
    async fn old_windows_are_dropped_when_a_minute_of_slots_is_kept() {
        let store = MemoryBudgetStore::new();
        let ceiling = Ceiling::default();
        let one = Usage {
            requests: 1,
            tokens: 0,
        };
        let old = Window::slot("p", at("2026-01-01T00:00:00Z"));
        let kept = Window::slot("p", at("2026-01-01T00:00:05Z"));
        let new = Window::slot("p", at("2026-01-01T00:01:05Z"));
        store.try_spend(&old, one, ceiling).await.unwrap();
        store.try_spend(&kept, one, ceiling).await.unwrap();
        for slot in Window::minute_slots("p", at("2026-01-01T00:01:05Z")) {
            store
                .try_spend(&slot, Usage::default(), ceiling)
                .await
                .unwrap();
        }
        assert_eq!(store.lock().windows.len(), KEEP);
        assert_eq!(
            store.usage(&kept).await.unwrap(),
            one,
            "still in the minute"
        );
        // A late refund to the old window neither resurrects it nor touches the others.
        store.adjust(&old, -1, 0).await.unwrap();
        assert_eq!(store.usage(&old).await.unwrap(), Usage::default());
        assert_eq!(store.usage(&kept).await.unwrap(), one);
        assert_eq!(store.usage(&new).await.unwrap(), Usage::default());
    }
}
