//! The `messages` read model: the conversation list (title, activity, message count,
//! preview of the last message) and each conversation's messages in order, with
//! edits, deletions and assistant replies.

use async_trait::async_trait;
use colloquy_domain::{CONVERSATION_CATEGORY, ConversationEvent};
use colloquy_eventstore::RecordedEvent;
use sqlx::PgConnection;

use crate::projection::{Projection, decode};

/// Longest preview kept for the conversation list, in characters.
pub const PREVIEW_CHARS: i32 = 200;

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Messages;

#[async_trait]
impl Projection for Messages {
    fn name(&self) -> &'static str {
        "messages"
    }

    fn schema(&self) -> &'static str {
        "rm_messages"
    }

    fn create_function(&self) -> &'static str {
        "colloquy.create_messages_read_model"
    }

    fn tables(&self) -> &'static [(&'static str, &'static str)] {
        &[("conversations", "id"), ("messages", "id")]
    }

    async fn apply(&self, conn: &mut PgConnection, event: &RecordedEvent) -> anyhow::Result<()> {
        let Some((stream_id, e)) = decode::<ConversationEvent>(event, CONVERSATION_CATEGORY) else {
            return Ok(());
        };
        let conversation = stream_id;
        let time = event.time;
        let (gp, version) = (event.global_position, event.position);
        match e {
            ConversationEvent::ConversationStarted(s) => {
                sqlx::query(
                    "INSERT INTO conversations
                       (id, owner, title, system_prompt, model, created_at, updated_at, activity_position, version)
                     VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8)
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(conversation)
                .bind(s.owner.as_uuid())
                .bind(s.title)
                .bind(s.system_prompt)
                .bind(s.model)
                .bind(time)
                .bind(gp)
                .bind(version)
                .execute(&mut *conn)
                .await?;
                return Ok(());
            }
            ConversationEvent::MessageSent(m) => {
                let author = serde_json::to_value(m.author)?;
                sqlx::query(
                    "INSERT INTO messages (id, conversation_id, seq, author, author_id, text, created_at, run_id, reply_to)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(m.message_id.as_uuid())
                .bind(conversation)
                .bind(version)
                .bind(author.as_str().unwrap_or("user"))
                .bind(m.author_id.map(|a| a.as_uuid()))
                .bind(&m.text)
                .bind(time)
                .bind(m.run_id.map(|r| r.as_uuid()))
                .bind(m.reply_to.map(|r| r.as_uuid()))
                .execute(&mut *conn)
                .await?;
                sqlx::query(
                    "UPDATE conversations
                        SET message_count = message_count + 1, updated_at = $2,
                            activity_position = $3, last_message_preview = left($4, $5)
                      WHERE id = $1",
                )
                .bind(conversation)
                .bind(time)
                .bind(gp)
                .bind(&m.text)
                .bind(PREVIEW_CHARS)
                .execute(&mut *conn)
                .await?;
            }
            ConversationEvent::MessageEdited(m) => {
                sqlx::query("UPDATE messages SET text = $2, edited_at = $3 WHERE id = $1")
                    .bind(m.message_id.as_uuid())
                    .bind(&m.text)
                    .bind(time)
                    .execute(&mut *conn)
                    .await?;
                refresh_preview(conn, conversation, time, gp).await?;
            }
            ConversationEvent::MessageDeleted(m) => {
                // The text goes: a deleted message is not served, searched or previewed.
                sqlx::query(
                    "UPDATE messages SET deleted = true, text = '' WHERE id = $1 AND NOT deleted",
                )
                .bind(m.message_id.as_uuid())
                .execute(&mut *conn)
                .await?;
                sqlx::query(
                    "UPDATE conversations
                        SET message_count = (SELECT count(*) FROM messages WHERE conversation_id = $1 AND NOT deleted)
                      WHERE id = $1",
                )
                .bind(conversation)
                .execute(&mut *conn)
                .await?;
                refresh_preview(conn, conversation, time, gp).await?;
            }
            ConversationEvent::ConversationRenamed(r) => {
                sqlx::query("UPDATE conversations SET title = $2, updated_at = $3, activity_position = $4 WHERE id = $1")
                    .bind(conversation)
                    .bind(&r.title)
                    .bind(time)
                    .bind(gp)
                    .execute(&mut *conn)
                    .await?;
            }
            ConversationEvent::ConversationArchived(_) => {
                sqlx::query(
                    "UPDATE conversations SET archived = true, updated_at = $2 WHERE id = $1",
                )
                .bind(conversation)
                .bind(time)
                .execute(&mut *conn)
                .await?;
            }
            ConversationEvent::RunOpened(_) | ConversationEvent::RunClosed(_) => {}
        }
        sqlx::query("UPDATE conversations SET version = $2 WHERE id = $1")
            .bind(conversation)
            .bind(version)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// The preview is the newest message still shown.
async fn refresh_preview(
    conn: &mut PgConnection,
    conversation: uuid::Uuid,
    time: chrono::DateTime<chrono::Utc>,
    gp: i64,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE conversations
            SET last_message_preview = (
                  SELECT left(text, $2) FROM messages
                   WHERE conversation_id = $1 AND NOT deleted ORDER BY seq DESC LIMIT 1),
                updated_at = $3, activity_position = $4
          WHERE id = $1",
    )
    .bind(conversation)
    .bind(PREVIEW_CHARS)
    .bind(time)
    .bind(gp)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
