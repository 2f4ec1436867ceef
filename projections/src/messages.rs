//! The `messages` read model: the conversation list (title, activity, message count,
//! preview of the last message) and each conversation's messages in order, with
//! edits, deletions and assistant replies.
//!
//! A batch loads the rows its events touch, folds the events into them in memory
//! ([`Batch::fold`], the read model's rules), and writes back the changed rows: on
//! Postgres with two bulk upserts (`unnest`), on SQLite row by row. Previews an edit or
//! a deletion made stale are recomputed from the table after the write.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use colloquy_domain::{CONVERSATION_CATEGORY, ConversationEvent};
use colloquy_eventstore::RecordedEvent;
use uuid::Uuid;

use crate::projection::{
    Bind, Columns, Conn, Projection, decode_all, distinct, rows_by_id, write_rows,
};

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

    fn conversation_tables(&self) -> &'static [(&'static str, &'static str)] {
        &[("conversations", "id"), ("messages", "conversation_id")]
    }

    async fn apply(&self, conn: &mut Conn<'_>, events: &[RecordedEvent]) -> anyhow::Result<()> {
        let decoded = decode_all::<ConversationEvent>(events, CONVERSATION_CATEGORY);
        if decoded.is_empty() {
            return Ok(());
        }
        let conversation_ids = distinct(decoded.iter().map(|(id, _, _)| *id).collect());
        let touched_messages = distinct(
            decoded
                .iter()
                .filter_map(|(_, _, e)| match e {
                    ConversationEvent::MessageEdited(m) => Some(m.message_id.as_uuid()),
                    ConversationEvent::MessageDeleted(m) => Some(m.message_id.as_uuid()),
                    _ => None,
                })
                .collect(),
        );
        let mut batch = Batch {
            conversations: load_conversations(conn, &conversation_ids).await?,
            messages: load_messages(conn, &touched_messages).await?,
            dirty_conversations: Vec::new(),
            dirty_messages: Vec::new(),
        };
        for (id, event, e) in decoded {
            batch.fold(id, event, &e);
        }
        batch.write(conn).await
    }
}

/// A conversation row.
#[derive(Debug, Clone, sqlx::FromRow)]
struct ConversationRow {
    id: Uuid,
    owner: Uuid,
    title: Option<String>,
    system_prompt: Option<String>,
    model: Option<String>,
    archived: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    activity_position: i64,
    message_count: i32,
    last_message_preview: Option<String>,
    version: i64,
    /// The preview must be recomputed from the table after the batch (an edit or a
    /// deletion may have uncovered an older message).
    #[sqlx(skip)]
    preview_stale: bool,
}

/// A message row.
#[derive(Debug, Clone, sqlx::FromRow)]
struct MessageRow {
    id: Uuid,
    conversation_id: Uuid,
    seq: i64,
    author: String,
    author_id: Option<Uuid>,
    text: String,
    created_at: DateTime<Utc>,
    edited_at: Option<DateTime<Utc>>,
    deleted: bool,
    run_id: Option<Uuid>,
    reply_to: Option<Uuid>,
}

/// The rows a batch touches, and which of them changed.
#[derive(Debug)]
struct Batch {
    conversations: HashMap<Uuid, ConversationRow>,
    /// The messages the batch sends, and those it edits or deletes (loaded).
    messages: HashMap<Uuid, MessageRow>,
    dirty_conversations: Vec<Uuid>,
    dirty_messages: Vec<Uuid>,
}

/// Whether an event moves its conversation in the list (sets `activity_position`): its
/// start, a message sent, edited or deleted, a rename. The list's paging looks events up
/// in the log with the same rule (the gateway's `activity_as_of`).
#[must_use]
pub fn moves_activity(event: &ConversationEvent) -> bool {
    match event {
        ConversationEvent::ConversationStarted(_)
        | ConversationEvent::MessageSent(_)
        | ConversationEvent::MessageEdited(_)
        | ConversationEvent::MessageDeleted(_)
        | ConversationEvent::ConversationRenamed(_) => true,
        ConversationEvent::ConversationArchived(_)
        | ConversationEvent::RunOpened(_)
        | ConversationEvent::RunClosed(_) => false,
    }
}

/// [`moves_activity`] for an event as the log stores it: `false` for an event of another
/// category or one that does not decode.
#[must_use]
pub fn recorded_moves_activity(event: &RecordedEvent) -> bool {
    crate::projection::decode::<ConversationEvent>(event, CONVERSATION_CATEGORY)
        .is_some_and(|(_, e)| moves_activity(&e))
}

fn preview(text: &str) -> String {
    text.chars()
        .take(usize::try_from(PREVIEW_CHARS).unwrap_or(200))
        .collect()
}

impl Batch {
    /// One event of conversation `id`: the read model's rules.
    fn fold(&mut self, id: Uuid, event: &RecordedEvent, e: &ConversationEvent) {
        let (time, gp, version) = (event.time, event.global_position, event.position);
        if let ConversationEvent::ConversationStarted(s) = e {
            self.conversations.entry(id).or_insert_with(|| {
                self.dirty_conversations.push(id);
                ConversationRow {
                    id,
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
            return;
        }
        if let ConversationEvent::MessageSent(m) = e {
            self.messages
                .entry(m.message_id.as_uuid())
                .or_insert_with(|| {
                    self.dirty_messages.push(m.message_id.as_uuid());
                    new_message(id, version, m, time)
                });
        }
        // Updates of a conversation that was never started touch no conversation row.
        let Some(c) = self.conversations.get_mut(&id) else {
            return;
        };
        self.dirty_conversations.push(id);
        match e {
            ConversationEvent::ConversationStarted(_) => {}
            ConversationEvent::MessageSent(m) => {
                c.message_count += 1;
                c.updated_at = time;
                c.last_message_preview = Some(preview(&m.text));
                c.preview_stale = false;
            }
            ConversationEvent::MessageEdited(m) => {
                if let Some(row) = self.messages.get_mut(&m.message_id.as_uuid()) {
                    row.text.clone_from(&m.text);
                    row.edited_at = Some(time);
                    self.dirty_messages.push(m.message_id.as_uuid());
                }
                c.updated_at = time;
                c.preview_stale = true;
            }
            ConversationEvent::MessageDeleted(m) => {
                // The text goes: a deleted message is not served, searched or previewed.
                if let Some(row) = self.messages.get_mut(&m.message_id.as_uuid())
                    && !row.deleted
                {
                    row.deleted = true;
                    row.text = String::new();
                    self.dirty_messages.push(m.message_id.as_uuid());
                    if row.conversation_id == id {
                        c.message_count -= 1;
                    }
                }
                c.updated_at = time;
                c.preview_stale = true;
            }
            ConversationEvent::ConversationRenamed(r) => {
                c.title = Some(r.title.clone());
                c.updated_at = time;
            }
            ConversationEvent::ConversationArchived(_) => {
                c.archived = true;
                c.updated_at = time;
            }
            ConversationEvent::RunOpened(_) | ConversationEvent::RunClosed(_) => {}
        }
        if moves_activity(e) {
            c.activity_position = gp;
        }
        c.version = version;
    }

    /// Writes the changed rows, then the previews that went stale.
    async fn write(self, conn: &mut Conn<'_>) -> anyhow::Result<()> {
        let messages: Vec<&MessageRow> = distinct(self.dirty_messages)
            .iter()
            .map(|id| &self.messages[id])
            .collect();
        save_messages(conn, &messages).await?;
        let conversations: Vec<&ConversationRow> = distinct(self.dirty_conversations)
            .iter()
            .map(|id| &self.conversations[id])
            .collect();
        save_conversations(conn, &conversations).await?;
        let stale: Vec<Uuid> = conversations
            .iter()
            .filter(|c| c.preview_stale)
            .map(|c| c.id)
            .collect();
        refresh_previews(conn, &stale).await?;
        Ok(())
    }
}

fn new_message(
    conversation: Uuid,
    seq: i64,
    m: &colloquy_domain::conversation::MessageSent,
    time: DateTime<Utc>,
) -> MessageRow {
    let author = serde_json::to_value(m.author)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "user".to_owned());
    MessageRow {
        id: m.message_id.as_uuid(),
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

// The SQL: how rows are loaded and written on each backend.

macro_rules! conversation_columns {
    () => {
        "id, owner, title, system_prompt, model, archived, created_at, updated_at, \
         activity_position, message_count, last_message_preview, version"
    };
}

macro_rules! message_columns {
    () => {
        "id, conversation_id, seq, author, author_id, text, created_at, edited_at, deleted, \
         run_id, reply_to"
    };
}

async fn load_conversations(
    conn: &mut Conn<'_>,
    ids: &[Uuid],
) -> anyhow::Result<HashMap<Uuid, ConversationRow>> {
    let rows: Vec<ConversationRow> = rows_by_id(
        conn,
        concat!(
            "SELECT ",
            conversation_columns!(),
            " FROM conversations WHERE id = ANY($1)"
        ),
        concat!(
            "SELECT ",
            conversation_columns!(),
            " FROM rm_messages_conversations WHERE id = $1"
        ),
        ids,
    )
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r)).collect())
}

async fn load_messages(
    conn: &mut Conn<'_>,
    ids: &[Uuid],
) -> anyhow::Result<HashMap<Uuid, MessageRow>> {
    let rows: Vec<MessageRow> = rows_by_id(
        conn,
        concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE id = ANY($1)"
        ),
        concat!(
            "SELECT ",
            message_columns!(),
            " FROM rm_messages_messages WHERE id = $1"
        ),
        ids,
    )
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r)).collect())
}

macro_rules! message_updates {
    () => {
        " ON CONFLICT (id) DO UPDATE SET text = excluded.text, edited_at = excluded.edited_at, \
         deleted = excluded.deleted"
    };
}

macro_rules! conversation_updates {
    () => {
        " ON CONFLICT (id) DO UPDATE SET title = excluded.title, archived = excluded.archived, \
         updated_at = excluded.updated_at, activity_position = excluded.activity_position, \
         message_count = excluded.message_count, \
         last_message_preview = excluded.last_message_preview, version = excluded.version"
    };
}

impl Columns for MessageRow {
    fn columns<'r>(bind: &mut impl Bind<'r, Self>) {
        bind.column(|r| r.id);
        bind.column(|r| r.conversation_id);
        bind.column(|r| r.seq);
        bind.column(|r| r.author.as_str());
        bind.column(|r| r.author_id);
        bind.column(|r| r.text.as_str());
        bind.column(|r| r.created_at);
        bind.column(|r| r.edited_at);
        bind.column(|r| r.deleted);
        bind.column(|r| r.run_id);
        bind.column(|r| r.reply_to);
    }
}

impl Columns for ConversationRow {
    fn columns<'r>(bind: &mut impl Bind<'r, Self>) {
        bind.column(|r| r.id);
        bind.column(|r| r.owner);
        bind.column(|r| r.title.as_deref());
        bind.column(|r| r.system_prompt.as_deref());
        bind.column(|r| r.model.as_deref());
        bind.column(|r| r.archived);
        bind.column(|r| r.created_at);
        bind.column(|r| r.updated_at);
        bind.column(|r| r.activity_position);
        bind.column(|r| r.message_count);
        bind.column(|r| r.last_message_preview.as_deref());
        bind.column(|r| r.version);
    }
}

async fn save_messages(conn: &mut Conn<'_>, rows: &[&MessageRow]) -> anyhow::Result<()> {
    write_rows(
        conn,
        concat!(
            "INSERT INTO messages (",
            message_columns!(),
            ")
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::uuid[],
                                  $6::text[], $7::timestamptz[], $8::timestamptz[], $9::bool[],
                                  $10::uuid[], $11::uuid[])",
            message_updates!()
        ),
        concat!(
            "INSERT INTO rm_messages_messages (",
            message_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            message_updates!()
        ),
        rows,
    )
    .await
}

async fn save_conversations(conn: &mut Conn<'_>, rows: &[&ConversationRow]) -> anyhow::Result<()> {
    write_rows(
        conn,
        concat!(
            "INSERT INTO conversations (",
            conversation_columns!(),
            ")
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                                  $6::bool[], $7::timestamptz[], $8::timestamptz[], $9::bigint[],
                                  $10::int[], $11::text[], $12::bigint[])",
            conversation_updates!()
        ),
        concat!(
            "INSERT INTO rm_messages_conversations (",
            conversation_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            conversation_updates!()
        ),
        rows,
    )
    .await
}

/// The preview is the newest message still shown.
async fn refresh_previews(conn: &mut Conn<'_>, ids: &[Uuid]) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    match conn {
        Conn::Postgres(conn) => {
            sqlx::query(
                "UPDATE conversations c
                    SET last_message_preview = (
                          SELECT left(m.text, $2) FROM messages m
                           WHERE m.conversation_id = c.id AND NOT m.deleted
                           ORDER BY m.seq DESC LIMIT 1)
                  WHERE c.id = ANY($1)",
            )
            .bind(ids)
            .bind(PREVIEW_CHARS)
            .execute(&mut **conn)
            .await?;
        }
        Conn::Sqlite(conn) => {
            for id in ids {
                sqlx::query(
                    "UPDATE rm_messages_conversations
                        SET last_message_preview = (
                              SELECT substr(m.text, 1, $2) FROM rm_messages_messages m
                               WHERE m.conversation_id = $1 AND NOT m.deleted
                               ORDER BY m.seq DESC LIMIT 1)
                      WHERE id = $1",
                )
                .bind(id)
                .bind(PREVIEW_CHARS)
                .execute(&mut **conn)
                .await?;
            }
        }
    }
    Ok(())
}
