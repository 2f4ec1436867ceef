//! The `search` read model: Postgres full-text search over message text
//! (`tsvector`, `websearch_to_tsquery`, `ts_rank`, `ts_headline`), always restricted
//! to the caller's conversations. Deleted messages leave the index, edits re-index,
//! redacted (forgotten) text is indexed as the empty string it became.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use colloquy_domain::{CONVERSATION_CATEGORY, ConversationEvent};
use colloquy_eventstore::RecordedEvent;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::projection::{Projection, decode};

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Search;

#[async_trait]
impl Projection for Search {
    fn name(&self) -> &'static str {
        "search"
    }

    fn schema(&self) -> &'static str {
        "rm_search"
    }

    fn create_function(&self) -> &'static str {
        "colloquy.create_search_read_model"
    }

    fn tables(&self) -> &'static [(&'static str, &'static str)] {
        &[("conversations", "id"), ("documents", "message_id")]
    }

    async fn apply(&self, conn: &mut PgConnection, event: &RecordedEvent) -> anyhow::Result<()> {
        let Some((stream_id, e)) = decode::<ConversationEvent>(event, CONVERSATION_CATEGORY) else {
            return Ok(());
        };
        let conversation = stream_id;
        match e {
            ConversationEvent::ConversationStarted(s) => {
                sqlx::query("INSERT INTO conversations (id, owner) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")
                    .bind(conversation)
                    .bind(s.owner.as_uuid())
                    .execute(&mut *conn)
                    .await?;
            }
            ConversationEvent::MessageSent(m) => {
                sqlx::query(
                    "INSERT INTO documents (message_id, conversation_id, owner, text, created_at)
                     SELECT $1, c.id, c.owner, $3, $4 FROM conversations c WHERE c.id = $2
                     ON CONFLICT (message_id) DO NOTHING",
                )
                .bind(m.message_id.as_uuid())
                .bind(conversation)
                .bind(&m.text)
                .bind(event.time)
                .execute(&mut *conn)
                .await?;
            }
            ConversationEvent::MessageEdited(m) => {
                sqlx::query("UPDATE documents SET text = $2 WHERE message_id = $1")
                    .bind(m.message_id.as_uuid())
                    .bind(&m.text)
                    .execute(&mut *conn)
                    .await?;
            }
            ConversationEvent::MessageDeleted(m) => {
                sqlx::query("DELETE FROM documents WHERE message_id = $1")
                    .bind(m.message_id.as_uuid())
                    .execute(&mut *conn)
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// One search hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub conversation_id: Uuid,
    pub message_id: Uuid,
    pub snippet: String,
    pub rank: f32,
    pub created_at: DateTime<Utc>,
}

/// Searches `owner`'s messages with web-search syntax (quotes, `-word`, `or`), best
/// first; `conversation` narrows to one conversation.
pub async fn search(
    pool: &PgPool,
    owner: Uuid,
    query: &str,
    conversation: Option<Uuid>,
    limit: i64,
    offset: i64,
) -> Result<Vec<Hit>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT d.conversation_id, d.message_id, d.created_at,
                ts_rank(d.tsv, q) AS rank,
                ts_headline('english', d.text, q, 'MaxFragments=2, MaxWords=20, MinWords=5') AS snippet
           FROM rm_search.documents d, websearch_to_tsquery('english', $2) q
          WHERE d.owner = $1 AND d.tsv @@ q AND ($3::uuid IS NULL OR d.conversation_id = $3)
          ORDER BY rank DESC, d.created_at DESC, d.message_id
          LIMIT $4 OFFSET $5",
    )
    .bind(owner)
    .bind(query)
    .bind(conversation)
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Hit {
                conversation_id: r.try_get("conversation_id")?,
                message_id: r.try_get("message_id")?,
                snippet: r.try_get("snippet")?,
                rank: r.try_get("rank")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect()
}
