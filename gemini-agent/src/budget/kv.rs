//! The budget store in NATS JetStream key-value buckets, shared by every agent instance.
//!
//! Two buckets, both named by the caller:
//!
//! | bucket | key | value | lifetime |
//! |---|---|---|---|
//! | `<bucket>` | `<prefix>.rpm.<project>.s<unix-seconds / 5>` (a 5-second slot of the minute) | `{"requests":n,"tokens":t}` | bucket `max_age` (default 2 days) |
//! | `<bucket>` | `<prefix>.rpd.<project>.<pacific-date>` | `{"requests":n,"tokens":0}` | bucket `max_age` |
//! | `<bucket>_health` | `<prefix>.health` | the [`Health`] document as JSON | no expiry |
//!
//! Counters are spent with compare-and-set: `create` for a window nobody has written yet
//! (it fails if another instance created it first), `update(key, value, revision)` for an
//! existing one (it fails if the entry changed since it was read); the loser re-reads and
//! tries again. Old windows need no clean-up: the window bucket's `max_age` expires them
//! (a day window is written at most 25 hours before it ends, so two days is ample).
//!
//! Health lives in its own bucket because it must not expire: a disabled key stays
//! disabled until a probe or an operator re-enables it, however long that takes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    BudgetStore, Ceiling, Health, MemoryBudgetStore, Spend, StoreError, Usage, Versioned, Window,
};

/// How many compare-and-set attempts one operation makes before giving up. Each loss
/// means another writer succeeded, so this is only reached under extreme contention.
const MAX_ATTEMPTS: u32 = 64;

/// Where a [`KvBudgetStore`] keeps its data.
#[derive(Debug, Clone)]
pub struct KvBudgetConfig {
    /// The window bucket's name (letters, digits, `-` and `_`); health goes in
    /// `<bucket>_health`. Instances that share budgets use the same name.
    pub bucket: String,
    /// The first token(s) of every key, so several deployments can share buckets.
    pub prefix: String,
    /// Replicas of each bucket (1 for a single server, 3 in a cluster).
    pub replicas: usize,
    /// How long window counters are kept; must exceed the longest day (25 hours).
    pub window_max_age: Duration,
}

impl KvBudgetConfig {
    /// One replica and a two-day window lifetime.
    pub fn new(bucket: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            prefix: prefix.into(),
            replicas: 1,
            window_max_age: Duration::from_secs(2 * 24 * 3600),
        }
    }
}

/// Budgets and health in JetStream key-value buckets.
///
/// A NATS server can come back without its JetStream data (a replaced node, a lost
/// volume): an operation that fails while the connection is up opens the buckets again,
/// creating them if they are gone, so that the next operation works (the agent retries
/// its runs) instead of every one failing until the process restarts. A store made
/// before NATS could be reached (see [`KvOnceReachable`]) opens them at its first
/// operation once NATS is connected, and fails until then.
#[derive(Debug, Clone)]
pub struct KvBudgetStore {
    js: jetstream::Context,
    configs: Arc<(kv::Config, kv::Config)>,
    buckets: Arc<RwLock<Option<Buckets>>>,
    prefix: String,
}

/// The window and health buckets.
#[derive(Debug, Clone)]
struct Buckets {
    windows: kv::Store,
    health: kv::Store,
}

impl KvBudgetStore {
    /// Opens the buckets, creating them if they do not exist yet (several instances may
    /// race to create them; creating an identical bucket again succeeds).
    pub async fn open(js: &jetstream::Context, config: KvBudgetConfig) -> Result<Self, StoreError> {
        let store = Self::unopened(js, config)?;
        let buckets = open_buckets(js, &store.configs).await?;
        *store
            .buckets
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(buckets);
        Ok(store)
    }

    /// The store without its buckets yet, for a process that starts while NATS is out
    /// of reach: it opens them (creating them if need be) at the first operation made
    /// while the connection is up; until then every operation fails as an outage does.
    fn unopened(js: &jetstream::Context, config: KvBudgetConfig) -> Result<Self, StoreError> {
        let prefix = config.prefix.trim_matches('.');
        let prefix_ok = !prefix.is_empty()
            && prefix.split('.').all(|token| {
                !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'='))
            });
        if !prefix_ok {
            return Err(StoreError::Config(format!(
                "key prefix {:?} must be dot-separated tokens of letters, digits, '-', '_' and '='",
                config.prefix
            )));
        }
        if config.window_max_age < Duration::from_secs(25 * 3600) {
            return Err(StoreError::Config(
                "window_max_age must be at least 25 hours, the longest Pacific day".to_owned(),
            ));
        }
        let windows = kv::Config {
            bucket: config.bucket.clone(),
            description: "Gemini request budgets per project and window".to_owned(),
            history: 1,
            max_age: config.window_max_age,
            num_replicas: config.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let health = kv::Config {
            bucket: format!("{}_health", config.bucket),
            description: "Gemini project cooldowns and key health".to_owned(),
            history: 1,
            num_replicas: config.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        Ok(Self {
            js: js.clone(),
            configs: Arc::new((windows, health)),
            buckets: Arc::new(RwLock::new(None)),
            prefix: prefix.to_owned(),
        })
    }

    /// The buckets, opened now if they never were and NATS is connected.
    async fn buckets(&self) -> Result<Buckets, StoreError> {
        let opened = self
            .buckets
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(buckets) = opened {
            return Ok(buckets);
        }
        if self.js.client().connection_state() != async_nats::connection::State::Connected {
            return Err(backend(
                "open buckets",
                std::io::Error::new(std::io::ErrorKind::NotConnected, "NATS is not connected"),
            ));
        }
        let buckets = open_buckets(&self.js, &self.configs).await?;
        *self
            .buckets
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(buckets.clone());
        Ok(buckets)
    }

    /// Passes `result` on; after a backend failure while NATS is connected (so not an
    /// outage, which the caller's retries wait out), opens the buckets again.
    async fn reopen_after<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if matches!(result, Err(StoreError::Backend { .. }))
            && self.js.client().connection_state() == async_nats::connection::State::Connected
        {
            match open_buckets(&self.js, &self.configs).await {
                Ok(buckets) => {
                    *self
                        .buckets
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(buckets);
                }
                Err(error) => {
                    tracing::warn!(error = %error, "budget store: cannot open its buckets again");
                }
            }
        }
        result
    }

    fn window_key(&self, window: &Window) -> String {
        format!("{}.{}", self.prefix, window.key())
    }

    fn health_key(&self) -> String {
        format!("{}.health", self.prefix)
    }
}

/// Opens (creating if need be) the window and health buckets.
async fn open_buckets(
    js: &jetstream::Context,
    configs: &(kv::Config, kv::Config),
) -> Result<Buckets, StoreError> {
    Ok(Buckets {
        windows: ensure_bucket(js, configs.0.clone()).await?,
        health: ensure_bucket(js, configs.1.clone()).await?,
    })
}

async fn ensure_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, StoreError> {
    match js.create_key_value(config.clone()).await {
        Ok(store) => Ok(store),
        // It exists with a different configuration (e.g. other replicas): use it as is.
        Err(create) => js
            .get_key_value(config.bucket.clone())
            .await
            .map_err(|_| backend("create bucket", create)),
    }
}

fn backend(
    operation: &'static str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> StoreError {
    StoreError::Backend {
        operation,
        source: Box::new(source),
    }
}

/// Reads `key`: its decoded value and revision, or `None` if absent, deleted or expired.
async fn read<T: DeserializeOwned>(
    store: &kv::Store,
    key: &str,
) -> Result<Option<(T, u64)>, StoreError> {
    let entry = store.entry(key).await.map_err(|e| backend("read", e))?;
    match entry {
        Some(entry) if entry.operation == kv::Operation::Put => {
            let value =
                serde_json::from_slice(&entry.value).map_err(|source| StoreError::Corrupt {
                    key: key.to_owned(),
                    source,
                })?;
            Ok(Some((value, entry.revision)))
        }
        _ => Ok(None),
    }
}

/// Writes `key` if it is still at `revision` (`None`: if it does not exist). `Ok(false)`
/// when another writer came first.
async fn write_if<T: Serialize>(
    store: &kv::Store,
    key: &str,
    value: &T,
    revision: Option<u64>,
) -> Result<bool, StoreError> {
    let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Corrupt {
        key: key.to_owned(),
        source,
    })?;
    match revision {
        None => match store.create(key, bytes.into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(backend("create", e)),
        },
        Some(revision) => match store.update(key, bytes.into(), revision).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(backend("update", e)),
        },
    }
}

/// A short random pause after a lost compare-and-set, so writers that collided do not
/// collide again in lockstep.
async fn after_conflict(attempt: u32) {
    let most = u64::from(attempt.min(8)) + 1;
    let micros = rand::rng().random_range(0..=most * 500);
    tokio::time::sleep(Duration::from_micros(micros)).await;
}

impl KvBudgetStore {
    async fn usage_once(&self, window: &Window) -> Result<Usage, StoreError> {
        Ok(
            read::<Usage>(&self.buckets().await?.windows, &self.window_key(window))
                .await?
                .map(|(usage, _)| usage)
                .unwrap_or_default(),
        )
    }

    async fn try_spend_once(
        &self,
        window: &Window,
        add: Usage,
        ceiling: Ceiling,
    ) -> Result<Spend, StoreError> {
        let key = self.window_key(window);
        for attempt in 0..MAX_ATTEMPTS {
            let current = read::<Usage>(&self.buckets().await?.windows, &key).await?;
            let (usage, revision) = match current {
                Some((usage, revision)) => (usage, Some(revision)),
                None => (Usage::default(), None),
            };
            if !usage.admits(add, ceiling) {
                return Ok(Spend::Refused(usage));
            }
            let next = usage.plus(add);
            if write_if(&self.buckets().await?.windows, &key, &next, revision).await? {
                return Ok(Spend::Granted(next));
            }
            after_conflict(attempt).await;
        }
        Err(StoreError::Contended {
            key,
            attempts: MAX_ATTEMPTS,
        })
    }

    async fn adjust_once(
        &self,
        window: &Window,
        requests: i64,
        tokens: i64,
    ) -> Result<(), StoreError> {
        let key = self.window_key(window);
        for attempt in 0..MAX_ATTEMPTS {
            let current = read::<Usage>(&self.buckets().await?.windows, &key).await?;
            let (usage, revision) = match current {
                Some((usage, revision)) => (usage, Some(revision)),
                None => (Usage::default(), None),
            };
            let next = usage.adjusted(requests, tokens);
            if next == usage {
                return Ok(());
            }
            if write_if(&self.buckets().await?.windows, &key, &next, revision).await? {
                return Ok(());
            }
            after_conflict(attempt).await;
        }
        Err(StoreError::Contended {
            key,
            attempts: MAX_ATTEMPTS,
        })
    }

    async fn load_health_once(&self) -> Result<Versioned<Health>, StoreError> {
        Ok(
            match read::<Health>(&self.buckets().await?.health, &self.health_key()).await? {
                Some((value, revision)) => Versioned {
                    value,
                    revision: Some(revision),
                },
                None => Versioned {
                    value: Health::default(),
                    revision: None,
                },
            },
        )
    }

    async fn save_health_once(
        &self,
        health: &Health,
        revision: Option<u64>,
    ) -> Result<bool, StoreError> {
        write_if(
            &self.buckets().await?.health,
            &self.health_key(),
            health,
            revision,
        )
        .await
    }
}

#[async_trait]
impl BudgetStore for KvBudgetStore {
    async fn usage(&self, window: &Window) -> Result<Usage, StoreError> {
        self.reopen_after(self.usage_once(window).await).await
    }

    async fn try_spend(
        &self,
        window: &Window,
        add: Usage,
        ceiling: Ceiling,
    ) -> Result<Spend, StoreError> {
        self.reopen_after(self.try_spend_once(window, add, ceiling).await)
            .await
    }

    async fn adjust(&self, window: &Window, requests: i64, tokens: i64) -> Result<(), StoreError> {
        self.reopen_after(self.adjust_once(window, requests, tokens).await)
            .await
    }

    async fn load_health(&self) -> Result<Versioned<Health>, StoreError> {
        self.reopen_after(self.load_health_once().await).await
    }

    async fn save_health(
        &self,
        health: &Health,
        revision: Option<u64>,
    ) -> Result<bool, StoreError> {
        self.reopen_after(self.save_health_once(health, revision).await)
            .await
    }
}

/// Whether a nats-server of `version` (e.g. `2.10.4`) holds the key-value buckets as
/// async-nats creates them: 2.10 or later. An unreadable version (or none yet, before
/// the first connection) is given the benefit of the doubt.
pub fn server_has_key_value_stores(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= (2, 10),
        _ => true,
    }
}

/// The budgets of a process that started while NATS was out of reach, so before it
/// could tell what server it would get: the shared buckets (opened once NATS answers), unless the server that answers is older than 2.10, in
/// which case the budgets are this process's own, as they would have been had it
/// started against that server.
#[derive(Debug)]
pub struct KvOnceReachable {
    nats: async_nats::Client,
    shared: KvBudgetStore,
    local: MemoryBudgetStore,
    warned: AtomicBool,
}

impl KvOnceReachable {
    /// Shared budgets on `js` (whose client is the one whose server decides).
    pub fn new(js: &jetstream::Context, config: KvBudgetConfig) -> Result<Self, StoreError> {
        Ok(Self {
            nats: js.client(),
            shared: KvBudgetStore::unopened(js, config)?,
            local: MemoryBudgetStore::new(),
            warned: AtomicBool::new(false),
        })
    }

    fn store(&self) -> &dyn BudgetStore {
        let connected = self.nats.connection_state() == async_nats::connection::State::Connected;
        let version = self.nats.server_info().version;
        if connected && !server_has_key_value_stores(&version) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(%version, "Gemini budgets are kept in this process only (the NATS server has no key-value store: it needs 2.10 or later)");
            }
            &self.local
        } else {
            &self.shared
        }
    }
}

#[async_trait]
impl BudgetStore for KvOnceReachable {
    async fn usage(&self, window: &Window) -> Result<Usage, StoreError> {
        self.store().usage(window).await
    }

    async fn try_spend(
        &self,
        window: &Window,
        add: Usage,
        ceiling: Ceiling,
    ) -> Result<Spend, StoreError> {
        self.store().try_spend(window, add, ceiling).await
    }

    async fn adjust(&self, window: &Window, requests: i64, tokens: i64) -> Result<(), StoreError> {
        self.store().adjust(window, requests, tokens).await
    }

    async fn load_health(&self) -> Result<Versioned<Health>, StoreError> {
        self.store().load_health().await
    }

    async fn save_health(
        &self,
        health: &Health,
        revision: Option<u64>,
    ) -> Result<bool, StoreError> {
        self.store().save_health(health, revision).await
    }
}

#[cfg(test)]
mod tests {
    use super::server_has_key_value_stores;

    #[test]
    fn key_value_stores_need_nats_2_10() {
        for version in [
            "2.10.0",
            "2.10.4",
            "2.11.1",
            "2.15.1",
            "3.0.0",
            "v2.12.0-beta.1",
        ] {
            assert!(server_has_key_value_stores(version), "{version}");
        }
        for version in ["2.9.10", "2.9.25", "2.2.0", "1.4.1"] {
            assert!(!server_has_key_value_stores(version), "{version}");
        }
        assert!(server_has_key_value_stores(""), "benefit of the doubt");
        assert!(
            server_has_key_value_stores("unknown"),
            "benefit of the doubt"
        );
    }
}
