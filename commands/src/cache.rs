//! The aggregate cache: state and version per stream, so a command needs no database
//! round trip to load. An entry may be stale when another process appended: the
//! append's expected version catches that, and the handler reloads and retries.

use std::time::Duration;

use moka::future::Cache;

/// A cached aggregate: its state (`None` = empty stream) and stream version.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    pub state: Option<A>,
    /// -1 for an empty stream.
    pub version: i64,
    /// Global position of the stream's last event (0 for an empty stream).
    pub position: i64,
}

/// Cache settings.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Most aggregates kept per type.
    pub max_entries: u64,
    /// Entries unused this long are dropped.
    pub idle: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            idle: Duration::from_secs(600),
        }
    }
}

/// One aggregate type's cache, keyed by stream name.
#[derive(Debug, Clone)]
pub struct AggregateCache<A: Clone + Send + Sync + 'static> {
    inner: Cache<String, Loaded<A>>,
}

impl<A: Clone + Send + Sync + 'static> AggregateCache<A> {
    pub fn new(config: CacheConfig) -> Self {
        Self {
            inner: Cache::builder()
                .max_capacity(config.max_entries)
                .time_to_idle(config.idle)
                .build(),
        }
    }

    pub async fn get(&self, stream: &str) -> Option<Loaded<A>> {
        self.inner.get(stream).await
    }

    /// Stores a newer state; an older version than the cached one is ignored.
    pub async fn put(&self, stream: &str, loaded: Loaded<A>) {
        let entry = self.inner.entry(stream.to_owned());
        entry
            .and_upsert_with(|current| async move {
                match current {
                    Some(c) if c.value().version > loaded.version => c.into_value(),
                    _ => loaded,
                }
            })
            .await;
    }

    pub async fn invalidate(&self, stream: &str) {
        self.inner.invalidate(stream).await;
    }
}
