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

    async fn apply_all(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> anyhow::Result<()> {
        self.fold(conn, events).await
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

/// A conversation row while a batch is folded.
#[derive(Debug, Clone)]
struct ConversationRow {
    owner: uuid::Uuid,
    title: Option<String>,
    system_prompt: Option<String>,
    model: Option<String>,
    archived: bool,
    created_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
    activity_position: i64,
    message_count: i32,
    last_message_preview: Option<String>,
    version: i64,
    /// The preview must be recomputed from the table after the batch (an edit or a
    /// deletion may have uncovered an older message).
    preview_stale: bool,
}

/// A message row while a batch is folded.
#[derive(Debug, Clone)]
struct MessageRow {
    conversation_id: uuid::Uuid,
    seq: i64,
    author: String,
    author_id: Option<uuid::Uuid>,
    text: String,
    created_at: chrono::DateTime<chrono::Utc>,
    edited_at: Option<chrono::DateTime<chrono::Utc>>,
    deleted: bool,
    run_id: Option<uuid::Uuid>,
    reply_to: Option<uuid::Uuid>,
}

fn preview(text: &str) -> String {
    text.chars()
        .take(usize::try_from(PREVIEW_CHARS).unwrap_or(200))
        .collect()
}

impl Messages {
    /// The batch path: load the touched rows, fold the events in memory exactly as
    /// [`Projection::apply`] would, write the rows back with two bulk upserts, then
    /// recompute the previews an edit or deletion made stale.
    async fn fold(&self, conn: &mut PgConnection, events: &[RecordedEvent]) -> anyhow::Result<()> {
        use std::collections::HashMap;

        use sqlx::Row as _;

        let decoded: Vec<(uuid::Uuid, &RecordedEvent, ConversationEvent)> = events
            .iter()
            .filter_map(|e| {
                decode::<ConversationEvent>(e, CONVERSATION_CATEGORY).map(|(id, d)| (id, e, d))
            })
            .collect();
        if decoded.is_empty() {
            return Ok(());
        }
        let conversation_ids: Vec<uuid::Uuid> = decoded.iter().map(|(id, _, _)| *id).collect();
        let touched_messages: Vec<uuid::Uuid> = decoded
            .iter()
            .filter_map(|(_, _, e)| match e {
                ConversationEvent::MessageEdited(m) => Some(m.message_id.as_uuid()),
                ConversationEvent::MessageDeleted(m) => Some(m.message_id.as_uuid()),
                _ => None,
            })
            .collect();
        let mut conversations: HashMap<uuid::Uuid, ConversationRow> = HashMap::new();
        for r in sqlx::query(
            "SELECT id, owner, title, system_prompt, model, archived, created_at, updated_at,
                    activity_position, message_count, last_message_preview, version
               FROM conversations WHERE id = ANY($1)",
        )
        .bind(&conversation_ids)
        .fetch_all(&mut *conn)
        .await?
        {
            conversations.insert(
                r.try_get("id")?,
                ConversationRow {
                    owner: r.try_get("owner")?,
                    title: r.try_get("title")?,
                    system_prompt: r.try_get("system_prompt")?,
                    model: r.try_get("model")?,
                    archived: r.try_get("archived")?,
                    created_at: r.try_get("created_at")?,
                    updated_at: r.try_get("updated_at")?,
                    activity_position: r.try_get("activity_position")?,
                    message_count: r.try_get("message_count")?,
                    last_message_preview: r.try_get("last_message_preview")?,
                    version: r.try_get("version")?,
                    preview_stale: false,
                },
            );
        }
        let mut messages: HashMap<uuid::Uuid, MessageRow> = HashMap::new();
        if !touched_messages.is_empty() {
            for r in sqlx::query(
                "SELECT id, conversation_id, seq, author, author_id, text, created_at, edited_at,
                        deleted, run_id, reply_to
                   FROM messages WHERE id = ANY($1)",
            )
            .bind(&touched_messages)
            .fetch_all(&mut *conn)
            .await?
            {
                messages.insert(
                    r.try_get("id")?,
                    MessageRow {
                        conversation_id: r.try_get("conversation_id")?,
                        seq: r.try_get("seq")?,
                        author: r.try_get("author")?,
                        author_id: r.try_get("author_id")?,
                        text: r.try_get("text")?,
                        created_at: r.try_get("created_at")?,
                        edited_at: r.try_get("edited_at")?,
                        deleted: r.try_get("deleted")?,
                        run_id: r.try_get("run_id")?,
                        reply_to: r.try_get("reply_to")?,
                    },
                );
            }
        }
        let mut dirty_messages: Vec<uuid::Uuid> = Vec::new();
        let mut dirty_conversations: Vec<uuid::Uuid> = Vec::new();
        for (id, event, e) in decoded {
            let (time, gp, version) = (event.time, event.global_position, event.position);
            if let ConversationEvent::ConversationStarted(s) = &e {
                conversations.entry(id).or_insert_with(|| {
                    dirty_conversations.push(id);
                    ConversationRow {
                        owner: s.owner.as_uuid(),
                        title: s.title.clone(),
                        system_prompt: s.system_prompt.clone(),
                        model: s.model.clone(),
                        archived: false,
                        created_at: time,
                        updated_at: time,
                        activity_position: gp,
                        message_count: 0,
                        last_message_preview: None,
                        version,
                        preview_stale: false,
                    }
                });
                continue;
            }
            let Some(c) = conversations.get_mut(&id) else {
                // As in `apply`: updates of a conversation that was never started
                // touch no row.
                if let ConversationEvent::MessageSent(m) = &e {
                    messages.entry(m.message_id.as_uuid()).or_insert_with(|| {
                        dirty_messages.push(m.message_id.as_uuid());
                        new_message(id, version, m, time)
                    });
                }
                continue;
            };
            dirty_conversations.push(id);
            match &e {
                ConversationEvent::ConversationStarted(_) => {}
                ConversationEvent::MessageSent(m) => {
                    messages.entry(m.message_id.as_uuid()).or_insert_with(|| {
                        dirty_messages.push(m.message_id.as_uuid());
                        new_message(id, version, m, time)
                    });
                    c.message_count += 1;
                    c.updated_at = time;
                    c.activity_position = gp;
                    c.last_message_preview = Some(preview(&m.text));
                    c.preview_stale = false;
                }
                ConversationEvent::MessageEdited(m) => {
                    if let Some(row) = messages.get_mut(&m.message_id.as_uuid()) {
                        row.text.clone_from(&m.text);
                        row.edited_at = Some(time);
                        dirty_messages.push(m.message_id.as_uuid());
                    }
                    c.updated_at = time;
                    c.activity_position = gp;
                    c.preview_stale = true;
                }
                ConversationEvent::MessageDeleted(m) => {
                    if let Some(row) = messages.get_mut(&m.message_id.as_uuid())
                        && !row.deleted
                    {
                        row.deleted = true;
                        row.text = String::new();
                        dirty_messages.push(m.message_id.as_uuid());
                        if row.conversation_id == id {
                            c.message_count -= 1;
                        }
                    }
                    c.updated_at = time;
                    c.activity_position = gp;
                    c.preview_stale = true;
                }
                ConversationEvent::ConversationRenamed(r) => {
                    c.title = Some(r.title.clone());
                    c.updated_at = time;
                    c.activity_position = gp;
                }
                ConversationEvent::ConversationArchived(_) => {
                    c.archived = true;
                    c.updated_at = time;
                }
                ConversationEvent::RunOpened(_) | ConversationEvent::RunClosed(_) => {}
            }
            c.version = version;
        }

        dirty_messages.sort_unstable();
        dirty_messages.dedup();
        if !dirty_messages.is_empty() {
            let rows: Vec<&MessageRow> = dirty_messages.iter().map(|id| &messages[id]).collect();
            sqlx::query(
                "INSERT INTO messages (id, conversation_id, seq, author, author_id, text, created_at,
                                       edited_at, deleted, run_id, reply_to)
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::uuid[],
                                      $6::text[], $7::timestamptz[], $8::timestamptz[], $9::bool[],
                                      $10::uuid[], $11::uuid[])
                 ON CONFLICT (id) DO UPDATE SET text = excluded.text, edited_at = excluded.edited_at,
                                                deleted = excluded.deleted",
            )
            .bind(&dirty_messages)
            .bind(rows.iter().map(|r| r.conversation_id).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.seq).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.author.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.author_id).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.text.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.created_at).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.edited_at).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.deleted).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.run_id).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.reply_to).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
        }
        dirty_conversations.sort_unstable();
        dirty_conversations.dedup();
        if !dirty_conversations.is_empty() {
            let rows: Vec<&ConversationRow> = dirty_conversations
                .iter()
                .map(|id| &conversations[id])
                .collect();
            sqlx::query(
                "INSERT INTO conversations (id, owner, title, system_prompt, model, archived, created_at,
                                            updated_at, activity_position, message_count,
                                            last_message_preview, version)
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                                      $6::bool[], $7::timestamptz[], $8::timestamptz[], $9::bigint[],
                                      $10::int[], $11::text[], $12::bigint[])
                 ON CONFLICT (id) DO UPDATE SET title = excluded.title, archived = excluded.archived,
                        updated_at = excluded.updated_at, activity_position = excluded.activity_position,
                        message_count = excluded.message_count,
                        last_message_preview = excluded.last_message_preview, version = excluded.version",
            )
            .bind(&dirty_conversations)
            .bind(rows.iter().map(|r| r.owner).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.title.as_deref()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.system_prompt.as_deref()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.model.as_deref()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.archived).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.created_at).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.activity_position).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.message_count).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.last_message_preview.as_deref()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
            let stale: Vec<uuid::Uuid> = dirty_conversations
                .iter()
                .copied()
                .filter(|id| conversations[id].preview_stale)
                .collect();
            if !stale.is_empty() {
                sqlx::query(
                    "UPDATE conversations c
                        SET last_message_preview = (
                              SELECT left(m.text, $2) FROM messages m
                               WHERE m.conversation_id = c.id AND NOT m.deleted
                               ORDER BY m.seq DESC LIMIT 1)
                      WHERE c.id = ANY($1)",
                )
                .bind(&stale)
                .bind(PREVIEW_CHARS)
                .execute(&mut *conn)
                .await?;
            }
        }
        Ok(())
    }
}

fn new_message(
    conversation: uuid::Uuid,
    seq: i64,
    m: &colloquy_domain::conversation::MessageSent,
    time: chrono::DateTime<chrono::Utc>,
) -> MessageRow {
    let author = serde_json::to_value(m.author)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "user".to_owned());
    MessageRow {
        conversation_id: conversation,
        seq,
        author,
        author_id: m.author_id.map(|a| a.as_uuid()),
        text: m.text.clone(),
        created_at: time,
        edited_at: None,
        deleted: false,
        run_id: m.run_id.map(|r| r.as_uuid()),
        reply_to: m.reply_to.map(|r| r.as_uuid()),
    }
}
