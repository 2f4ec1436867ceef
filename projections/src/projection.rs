//! What a projection is: a name, the tables it owns, and how a batch of events changes
//! them. Events it does not care about change nothing, but still advance its
//! checkpoint (so "reached P" holds for every P; architecture rule 5).
//!
//! The projections are written once for both backends: each loads the rows a batch
//! touches, folds the events into them in memory (the read model's logic, in Rust), and
//! writes back what changed. Only the loading and writing differ by backend, by SQL.

use std::sync::Arc;

use async_trait::async_trait;
use colloquy_eventstore::RecordedEvent;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArguments, PgHasArrayType};
use sqlx::sqlite::SqliteArguments;
use sqlx::{Arguments as _, Encode, PgConnection, Postgres, Sqlite, SqliteConnection, Type};

/// A connection inside a read-model write transaction, of either backend.
///
/// - Postgres: `search_path` is set to the target schema (the live one, or a rebuild's
///   scratch schema), so SQL names tables unqualified (`conversations`).
/// - SQLite: SQL names the projection's tables (`rm_messages_conversations`); a
///   rebuild's scratch copy is TEMP tables of the same names on its own connection,
///   which shadow the live ones there.
#[derive(Debug)]
pub enum Conn<'c> {
    Postgres(&'c mut PgConnection),
    Sqlite(&'c mut SqliteConnection),
}

/// One read model.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// The name operators use (`colloquy replay messages`).
    fn name(&self) -> &'static str;

    /// Where its tables and checkpoint live: the Postgres schema, and on SQLite the
    /// prefix of its tables' names (`rm_messages` → `rm_messages_conversations`,
    /// `rm_messages_checkpoint`).
    fn schema(&self) -> &'static str;

    /// The Postgres function that creates the tables in a given schema (migration 0004).
    fn create_function(&self) -> &'static str;

    /// Its tables (without the schema or prefix) with the column that identifies a row,
    /// for `replay --verify`.
    fn tables(&self) -> &'static [(&'static str, &'static str)];

    /// Applies events in order, all above the checkpoint, inside the caller's
    /// transaction. Applying a log in one batch or in many gives the same tables
    /// (`replay --verify` compares the live tables, built batch by batch, with a
    /// rebuild in large pages).
    async fn apply(&self, conn: &mut Conn<'_>, events: &[RecordedEvent]) -> anyhow::Result<()>;

    /// The tables holding copies of conversation text, each with the column naming the
    /// conversation a row belongs to: erasure deletes these rows and applies the
    /// conversations' redacted events again ([`crate::erasure`]). Empty (the default)
    /// for a read model that copies no text.
    fn conversation_tables(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }
}

impl std::fmt::Debug for dyn Projection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Projection({})", self.name())
    }
}

/// Every projection, in a fixed order.
pub fn all_projections() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(crate::messages::Messages),
        Arc::new(crate::runs::Runs),
        Arc::new(crate::search::Search),
    ]
}

/// A projection by name.
pub fn by_name(name: &str) -> Option<Arc<dyn Projection>> {
    all_projections().into_iter().find(|p| p.name() == name)
}

/// Decodes an event of `E`'s aggregate with its stream's id, or `None` for an event
/// of another category, of a type this build does not know, or one that is not a valid
/// domain event at all (written by a foreign Message DB client, say). The last is
/// logged and skipped: one bad event must not stop a read model forever.
pub fn decode<E: colloquy_domain::DomainEvent>(
    event: &RecordedEvent,
    category: &str,
) -> Option<(uuid::Uuid, E)> {
    if event.category() != category {
        return None;
    }
    let id = event
        .stream_name
        .split_once('-')
        .and_then(|(_, id)| uuid::Uuid::parse_str(id).ok());
    let decoded = E::from_stored(
        &event.event_type,
        event.schema_version(),
        event.data.clone(),
    );
    match (id, decoded) {
        (Some(id), Ok(e)) => Some((id, e)),
        (_, Err(e)) if e.is_skippable() => None,
        (_, result) => {
            tracing::warn!(
                event.global_position = event.global_position,
                event.r#type = %event.event_type,
                error = ?result.err(),
                "skipping an event that is not a valid domain event"
            );
            None
        }
    }
}

/// Decodes the events of `E`'s aggregate in a batch, each with its stream's id and the
/// recorded event it came from ([`decode`]); the rest are left out.
pub(crate) fn decode_all<'e, E: colloquy_domain::DomainEvent>(
    events: &'e [RecordedEvent],
    category: &str,
) -> Vec<(uuid::Uuid, &'e RecordedEvent, E)> {
    events
        .iter()
        .filter_map(|e| decode::<E>(e, category).map(|(id, d)| (id, e, d)))
        .collect()
}

/// Loads rows by id on either backend: on Postgres with one query (`postgres` takes the
/// ids as a `uuid[]` in `$1`), on SQLite one indexed lookup per id (`sqlite` takes one
/// id in `$1`; in-process lookups cost microseconds). Ids not found are left out.
pub(crate) async fn rows_by_id<T>(
    conn: &mut Conn<'_>,
    postgres: &'static str,
    sqlite: &'static str,
    ids: &[uuid::Uuid],
) -> anyhow::Result<Vec<T>>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
        + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
        + Send
        + Unpin,
{
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    match conn {
        Conn::Postgres(conn) => Ok(sqlx::query_as(postgres)
            .bind(ids)
            .fetch_all(&mut **conn)
            .await?),
        Conn::Sqlite(conn) => {
            let mut rows = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(row) = sqlx::query_as(sqlite)
                    .bind(id)
                    .fetch_optional(&mut **conn)
                    .await?
                {
                    rows.push(row);
                }
            }
            Ok(rows)
        }
    }
}

/// Sorts and deduplicates ids (the order bulk writes take their rows in).
pub(crate) fn distinct(mut ids: Vec<uuid::Uuid>) -> Vec<uuid::Uuid> {
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A row type's columns, in the order its write statements name them, written once
/// for both backends: `columns` hands each column's value to [`Bind::column`].
pub(crate) trait Columns: Sized + Sync {
    fn columns<'r>(bind: &mut impl Bind<'r, Self>)
    where
        Self: 'r;
}

/// Binds the columns of rows of type `R`: on Postgres each column as one array of
/// every row's value (for `unnest`), on SQLite one row's values.
pub(crate) trait Bind<'r, R: 'r> {
    fn column<V>(&mut self, value: impl Fn(&'r R) -> V)
    where
        V: Encode<'r, Postgres>
            + Type<Postgres>
            + PgHasArrayType
            + Encode<'r, Sqlite>
            + Type<Sqlite>;
}

/// A row that is only its id (a delete by id, say).
impl Columns for uuid::Uuid {
    fn columns<'r>(bind: &mut impl Bind<'r, Self>) {
        bind.column(|id| *id);
    }
}

/// One array per column, for all the rows.
struct PgArrays<'r, R> {
    rows: &'r [&'r R],
    arguments: Result<PgArguments, BoxDynError>,
}

impl<'r, R> Bind<'r, R> for PgArrays<'r, R> {
    fn column<V>(&mut self, value: impl Fn(&'r R) -> V)
    where
        V: Encode<'r, Postgres> + Type<Postgres> + PgHasArrayType,
    {
        if let Ok(arguments) = &mut self.arguments {
            let values: Vec<V> = self.rows.iter().map(|row| value(row)).collect();
            if let Err(e) = arguments.add(values) {
                self.arguments = Err(e);
            }
        }
    }
}

/// One value per column, of one row.
struct SqliteValues<'r, R> {
    row: &'r R,
    arguments: Result<SqliteArguments, BoxDynError>,
}

impl<'r, R> Bind<'r, R> for SqliteValues<'r, R> {
    fn column<V>(&mut self, value: impl Fn(&'r R) -> V)
    where
        V: Encode<'r, Sqlite> + Type<Sqlite>,
    {
        if let Ok(arguments) = &mut self.arguments
            && let Err(e) = arguments.add(value(self.row))
        {
            self.arguments = Err(e);
        }
    }
}

/// Writes rows on either backend: on Postgres with one statement (`postgres` takes
/// each column as an array, `$1` the first column's, for `unnest`), on SQLite one
/// statement per row (`sqlite` takes one row's columns, `$1` the first). Nothing is
/// run for no rows.
pub(crate) async fn write_rows<R: Columns>(
    conn: &mut Conn<'_>,
    postgres: &'static str,
    sqlite: &'static str,
    rows: &[&R],
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    match conn {
        Conn::Postgres(conn) => {
            let mut arrays = PgArrays {
                rows,
                arguments: Ok(PgArguments::default()),
            };
            R::columns(&mut arrays);
            let arguments = arrays.arguments.map_err(sqlx::Error::Encode)?;
            sqlx::query_with(postgres, arguments)
                .execute(&mut **conn)
                .await?;
        }
        Conn::Sqlite(conn) => {
            for row in rows {
                let mut values = SqliteValues {
                    row: *row,
                    arguments: Ok(SqliteArguments::default()),
                };
                R::columns(&mut values);
                let arguments = values.arguments.map_err(sqlx::Error::Encode)?;
                sqlx::query_with(sqlite, arguments)
                    .execute(&mut **conn)
                    .await?;
            }
        }
    }
    Ok(())
}
