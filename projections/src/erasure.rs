//! Erasure in the read models (docs/adr/0003). Forgetting a user redacts their events in
//! the log in place; the read models still hold copies of the text. For each read model
//! that copies conversation text ([`Projection::conversation_tables`]), the rows of the
//! affected conversations are deleted and the conversations' (now redacted) events are
//! applied again, in one transaction with the projection's checkpoint locked, so the
//! rewrite and the projector's batches take turns: events up to the checkpoint are
//! applied here, later ones by the projector as usual. No full rebuild is needed.

use colloquy_eventstore::{Database, EventStore, GlobalPosition, RecordedEvent};
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use crate::projection::{Conn, Projection, all_projections};
use crate::runner::{check_schema, checkpoint_in, lock_schema, set_schema};

/// Events read per page of a conversation stream.
const PAGE: usize = 1_000;

/// Rewrites every read model's copies of `conversations` from the log. Returns the
/// names of the read models rewritten.
///
/// # Errors
/// A database or log failure; each read model is rewritten in its own transaction, so
/// those before the failure stay rewritten and a retry is safe.
pub async fn rewrite_conversations(
    db: &Database,
    store: &dyn EventStore,
    conversations: &[Uuid],
) -> anyhow::Result<Vec<&'static str>> {
    let mut rewritten = Vec::new();
    if conversations.is_empty() {
        return Ok(rewritten);
    }
    for projection in all_projections() {
        if projection.conversation_tables().is_empty() {
            continue;
        }
        rewrite(db, store, projection.as_ref(), conversations).await?;
        rewritten.push(projection.name());
    }
    Ok(rewritten)
}

async fn rewrite(
    db: &Database,
    store: &dyn EventStore,
    projection: &dyn Projection,
    conversations: &[Uuid],
) -> anyhow::Result<()> {
    let schema = projection.schema();
    check_schema(schema)?;
    // The log is read with the checkpoint locked: every event at or below it is
    // committed (the projector read it), and the projector waits for this transaction.
    match db {
        Database::Postgres(pool) => {
            let mut tx = pool.begin().await?;
            lock_schema(&mut tx, schema).await?;
            set_schema(&mut tx, schema).await?;
            let checkpoint = checkpoint_in(&mut Conn::Postgres(&mut tx), projection).await?;
            for (table, column) in projection.conversation_tables() {
                sqlx::query(AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE {column} = ANY($1)"
                )))
                .bind(conversations)
                .execute(&mut *tx)
                .await?;
            }
            let events = conversation_events(store, conversations, checkpoint).await?;
            projection
                .apply(&mut Conn::Postgres(&mut tx), &events)
                .await?;
            tx.commit().await?;
        }
        Database::Sqlite(pool) => {
            // The write lock; the log is read through the store's other connections
            // (WAL readers see what is committed).
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            let checkpoint = checkpoint_in(&mut Conn::Sqlite(&mut tx), projection).await?;
            for (table, column) in projection.conversation_tables() {
                for id in conversations {
                    sqlx::query(AssertSqlSafe(format!(
                        "DELETE FROM {schema}_{table} WHERE {column} = $1"
                    )))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            let events = conversation_events(store, conversations, checkpoint).await?;
            projection
                .apply(&mut Conn::Sqlite(&mut tx), &events)
                .await?;
            tx.commit().await?;
        }
    }
    Ok(())
}

/// Every event of the conversations' streams at or below `checkpoint`, in log order.
async fn conversation_events(
    store: &dyn EventStore,
    conversations: &[Uuid],
    checkpoint: GlobalPosition,
) -> anyhow::Result<Vec<RecordedEvent>> {
    let mut events = Vec::new();
    for id in conversations {
        let stream = colloquy_domain::ConversationId::from_uuid(*id).stream_name();
        let mut from = 0;
        loop {
            let page = store.read_stream(&stream, from, PAGE).await?;
            let full = page.len() == PAGE;
            let Some(last) = page.last().map(|e| e.position) else {
                break;
            };
            events.extend(page.into_iter().filter(|e| e.global_position <= checkpoint));
            if !full {
                break;
            }
            from = last + 1;
        }
    }
    events.sort_by_key(|e| e.global_position);
    Ok(events)
}
