//! What a projection is: a name, a schema it owns, and how one event changes its
//! tables. Events it does not care about change nothing, but still advance its
//! checkpoint (so "reached P" holds for every P; architecture rule 5).

use std::sync::Arc;

use async_trait::async_trait;
use colloquy_eventstore::RecordedEvent;
use sqlx::PgConnection;

/// One read model.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// The name operators use (`colloquy replay messages`).
    fn name(&self) -> &'static str;

    /// The schema holding the live tables and checkpoint.
    fn schema(&self) -> &'static str;

    /// The SQL function that creates the tables in a given schema (migration 0004).
    fn create_function(&self) -> &'static str;

    /// Its tables with the columns that identify a row, for `replay --verify`.
    fn tables(&self) -> &'static [(&'static str, &'static str)];

    /// Applies one event. The connection is inside the batch's transaction with
    /// `search_path` set to the target schema, so SQL names tables unqualified.
    async fn apply(&self, conn: &mut PgConnection, event: &RecordedEvent) -> anyhow::Result<()>;

    /// Applies events in order (all above the checkpoint). The default applies them one
    /// by one; a projection may fold a batch in memory and write it in bulk, as long as
    /// the result is the same (`replay --verify` compares the two paths).
    async fn apply_all(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> anyhow::Result<()> {
        for event in events {
            self.apply(conn, event).await?;
        }
        Ok(())
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
