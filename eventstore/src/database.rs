//! Which database a process keeps its log and read models in: Postgres (production,
//! with NATS) or one SQLite file (the embedded mode). Everything that runs SQL outside
//! the event store takes a [`Database`] and picks its dialect with a `match`; the rules
//! around the SQL are shared.

use sqlx::{PgPool, SqlitePool};

/// A connection pool of one of the two backends (cheap to clone).
#[derive(Debug, Clone)]
pub enum Database {
    /// Postgres, on Message DB's schema plus Colloquy's (`migrations/postgres`).
    Postgres(PgPool),
    /// One SQLite file in WAL mode (`migrations/sqlite`).
    Sqlite(SqlitePool),
}

/// The backend's name, for logs, `/readyz` and the first line `serve` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// `postgres` or `sqlite`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Database {
    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Postgres(_) => Backend::Postgres,
            Self::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// The Postgres pool, if this is Postgres.
    pub fn postgres(&self) -> Option<&PgPool> {
        match self {
            Self::Postgres(pool) => Some(pool),
            Self::Sqlite(_) => None,
        }
    }

    /// The SQLite pool, if this is SQLite.
    pub fn sqlite(&self) -> Option<&SqlitePool> {
        match self {
            Self::Postgres(_) => None,
            Self::Sqlite(pool) => Some(pool),
        }
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        match self {
            Self::Postgres(pool) => pool.close().await,
            Self::Sqlite(pool) => pool.close().await,
        }
    }
}

impl From<PgPool> for Database {
    fn from(pool: PgPool) -> Self {
        Self::Postgres(pool)
    }
}

impl From<SqlitePool> for Database {
    fn from(pool: SqlitePool) -> Self {
        Self::Sqlite(pool)
    }
}
