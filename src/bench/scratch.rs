//! The scratch database a benchmark works in: created next to the configured
//! database on the same server, migrated, and dropped at the end.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _};

/// A freshly created, migrated database that [`ScratchDb::drop_database`] removes.
#[derive(Debug)]
pub struct ScratchDb {
    /// Where the configured database lives (only used to create and drop).
    admin: PgConnectOptions,
    name: String,
    options: PgConnectOptions,
}

impl ScratchDb {
    /// Creates `colloquy_bench_<random>` on the server of `url` and applies the
    /// project's migrations to it.
    pub async fn create(url: &str) -> anyhow::Result<Self> {
        // Lock waits are what a benchmark provokes: no slow-statement warnings, here
        // or on the scratch database (whose options derive from these).
        let admin = PgConnectOptions::from_str(url)
            .context("DATABASE_URL is not a valid URL")?
            .disable_statement_logging();
        let name = format!(
            "colloquy_bench_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut conn = PgConnection::connect_with(&admin)
            .await
            .context("Failed to connect to Postgres (DATABASE_URL)")?;
        // The name is ours: lowercase letters, digits and underscores only.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("Failed to create the scratch database {name}"))?;
        conn.close().await.ok();
        let scratch = Self {
            options: admin.clone().database(&name),
            admin,
            name,
        };
        if let Err(error) = scratch.migrate().await {
            scratch.drop_database().await.ok();
            return Err(error);
        }
        Ok(scratch)
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        let pool = self.pool(1).await?;
        colloquy_eventstore::postgres::migrate(&pool)
            .await
            .context("Failed to migrate the scratch database")?;
        pool.close().await;
        Ok(())
    }

    /// The scratch database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection options for the scratch database.
    pub fn options(&self) -> &PgConnectOptions {
        &self.options
    }

    /// A pool on the scratch database with up to `max` connections, opened eagerly
    /// so that connecting is not measured.
    pub async fn pool(&self, max: u32) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(max)
            .min_connections(max)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(self.options.clone())
            .await
            .with_context(|| format!("Failed to connect to the scratch database {}", self.name))
    }

    /// Drops the scratch database, ending any session still connected to it.
    pub async fn drop_database(self) -> anyhow::Result<()> {
        let mut conn = PgConnection::connect_with(&self.admin)
            .await
            .context("Failed to connect to Postgres to drop the scratch database")?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await
        .with_context(|| format!("Failed to drop the scratch database {}", self.name))?;
        conn.close().await.ok();
        Ok(())
    }
}
