//! The `search` read model: full-text search over message text, always restricted to
//! the caller's conversations. Deleted messages leave the index, edits re-index,
//! redacted (forgotten) text is indexed as the empty string it became.
//!
//! - Postgres: a generated `tsvector` column, `websearch_to_tsquery`, `ts_rank` and
//!   `ts_headline`.
//! - SQLite: an FTS5 index over the documents (`rm_search_fts`, external content kept
//!   in step by triggers, Porter stemming), `bm25` and `snippet()`. The user's query,
//!   in the same web-search syntax, is translated by [`fts5_query`] into an FTS5
//!   expression in which every word is a quoted string, so no input is FTS5 syntax.
//!
//! A batch loads the conversations and documents its events touch, folds the events
//! into them and writes back what changed (bulk on Postgres, row by row on SQLite).

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use colloquy_domain::{CONVERSATION_CATEGORY, ConversationEvent};
use colloquy_eventstore::{Database, RecordedEvent};
use uuid::Uuid;

use crate::projection::{
    Bind, Columns, Conn, Projection, decode_all, distinct, rows_by_id, write_rows,
};

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

    fn conversation_tables(&self) -> &'static [(&'static str, &'static str)] {
        &[("conversations", "id"), ("documents", "conversation_id")]
    }

    async fn apply(&self, conn: &mut Conn<'_>, events: &[RecordedEvent]) -> anyhow::Result<()> {
        let decoded = decode_all::<ConversationEvent>(events, CONVERSATION_CATEGORY);
        if decoded.is_empty() {
            return Ok(());
        }
        let conversation_ids = distinct(decoded.iter().map(|(id, _, _)| *id).collect());
        let message_ids = distinct(
            decoded
                .iter()
                .filter_map(|(_, _, e)| match e {
                    ConversationEvent::MessageSent(m) => Some(m.message_id.as_uuid()),
                    ConversationEvent::MessageEdited(m) => Some(m.message_id.as_uuid()),
                    ConversationEvent::MessageDeleted(m) => Some(m.message_id.as_uuid()),
                    _ => None,
                })
                .collect(),
        );
        let mut batch = Batch {
            owners: load_conversations(conn, &conversation_ids)
                .await?
                .into_iter()
                .map(|c| (c.id, c.owner))
                .collect(),
            documents: load_documents(conn, &message_ids)
                .await?
                .into_iter()
                .map(|d| (d.message_id, Some(d)))
                .collect(),
            new_conversations: Vec::new(),
            dirty_documents: Vec::new(),
        };
        for (id, event, e) in decoded {
            batch.fold(id, event, &e);
        }
        batch.write(conn).await
    }
}

/// A conversation's owner.
#[derive(Debug, Clone, sqlx::FromRow)]
struct ConversationRow {
    id: Uuid,
    owner: Uuid,
}

/// One searchable message.
#[derive(Debug, Clone, sqlx::FromRow)]
struct DocumentRow {
    message_id: Uuid,
    conversation_id: Uuid,
    owner: Uuid,
    text: String,
    created_at: DateTime<Utc>,
}

/// The rows a batch touches, and which of them changed.
#[derive(Debug)]
struct Batch {
    /// Conversation → owner.
    owners: HashMap<Uuid, Uuid>,
    /// Message → its document (`None`: deleted in this batch).
    documents: HashMap<Uuid, Option<DocumentRow>>,
    new_conversations: Vec<Uuid>,
    dirty_documents: Vec<Uuid>,
}

impl Batch {
    /// One event of conversation `id`: the read model's rules.
    fn fold(&mut self, id: Uuid, event: &RecordedEvent, e: &ConversationEvent) {
        match e {
            ConversationEvent::ConversationStarted(s) => {
                self.owners.entry(id).or_insert_with(|| {
                    self.new_conversations.push(id);
                    s.owner.as_uuid()
                });
            }
            ConversationEvent::MessageSent(m) => {
                // Only messages of a conversation whose owner is known are searchable.
                let Some(owner) = self.owners.get(&id) else {
                    return;
                };
                let document = self.documents.entry(m.message_id.as_uuid()).or_default();
                if document.is_none() {
                    *document = Some(DocumentRow {
                        message_id: m.message_id.as_uuid(),
                        conversation_id: id,
                        owner: *owner,
                        text: m.text.clone(),
                        created_at: event.time,
                    });
                    self.dirty_documents.push(m.message_id.as_uuid());
                }
            }
            ConversationEvent::MessageEdited(m) => {
                if let Some(Some(document)) = self.documents.get_mut(&m.message_id.as_uuid()) {
                    document.text.clone_from(&m.text);
                    self.dirty_documents.push(m.message_id.as_uuid());
                }
            }
            ConversationEvent::MessageDeleted(m) => {
                if let Some(document) = self.documents.get_mut(&m.message_id.as_uuid())
                    && document.take().is_some()
                {
                    self.dirty_documents.push(m.message_id.as_uuid());
                }
            }
            _ => {}
        }
    }

    async fn write(self, conn: &mut Conn<'_>) -> anyhow::Result<()> {
        let conversations: Vec<ConversationRow> = distinct(self.new_conversations)
            .into_iter()
            .map(|id| ConversationRow {
                id,
                owner: self.owners[&id],
            })
            .collect();
        save_conversations(conn, &conversations.iter().collect::<Vec<_>>()).await?;
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for id in distinct(self.dirty_documents) {
            match &self.documents[&id] {
                Some(document) => upserts.push(document),
                None => deletes.push(id),
            }
        }
        save_documents(conn, &upserts).await?;
        delete_documents(conn, &deletes.iter().collect::<Vec<_>>()).await?;
        Ok(())
    }
}

// The SQL: how rows are loaded and written on each backend. On SQLite, triggers on
// `rm_search_documents` keep the FTS5 index in step (migration 0002).

async fn load_conversations(
    conn: &mut Conn<'_>,
    ids: &[Uuid],
) -> anyhow::Result<Vec<ConversationRow>> {
    rows_by_id(
        conn,
        "SELECT id, owner FROM conversations WHERE id = ANY($1)",
        "SELECT id, owner FROM rm_search_conversations WHERE id = $1",
        ids,
    )
    .await
}

async fn load_documents(conn: &mut Conn<'_>, ids: &[Uuid]) -> anyhow::Result<Vec<DocumentRow>> {
    rows_by_id(
        conn,
        "SELECT message_id, conversation_id, owner, text, created_at
           FROM documents WHERE message_id = ANY($1)",
        "SELECT message_id, conversation_id, owner, text, created_at
           FROM rm_search_documents WHERE message_id = $1",
        ids,
    )
    .await
}

impl Columns for ConversationRow {
    fn columns<'r>(bind: &mut impl Bind<'r, Self>) {
        bind.column(|r| r.id);
        bind.column(|r| r.owner);
    }
}

impl Columns for DocumentRow {
    fn columns<'r>(bind: &mut impl Bind<'r, Self>) {
        bind.column(|r| r.message_id);
        bind.column(|r| r.conversation_id);
        bind.column(|r| r.owner);
        bind.column(|r| r.text.as_str());
        bind.column(|r| r.created_at);
    }
}

async fn save_conversations(conn: &mut Conn<'_>, rows: &[&ConversationRow]) -> anyhow::Result<()> {
    write_rows(
        conn,
        "INSERT INTO conversations (id, owner)
         SELECT * FROM unnest($1::uuid[], $2::uuid[])
         ON CONFLICT (id) DO NOTHING",
        "INSERT INTO rm_search_conversations (id, owner) VALUES ($1, $2)
         ON CONFLICT (id) DO NOTHING",
        rows,
    )
    .await
}

async fn save_documents(conn: &mut Conn<'_>, rows: &[&DocumentRow]) -> anyhow::Result<()> {
    write_rows(
        conn,
        "INSERT INTO documents (message_id, conversation_id, owner, text, created_at)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[],
                              $5::timestamptz[])
         ON CONFLICT (message_id) DO UPDATE SET text = excluded.text",
        "INSERT INTO rm_search_documents
                (message_id, conversation_id, owner, text, created_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (message_id) DO UPDATE SET text = excluded.text",
        rows,
    )
    .await
}

async fn delete_documents(conn: &mut Conn<'_>, ids: &[&Uuid]) -> anyhow::Result<()> {
    write_rows(
        conn,
        "DELETE FROM documents WHERE message_id = ANY($1)",
        "DELETE FROM rm_search_documents WHERE message_id = $1",
        ids,
    )
    .await
}

/// One search hit.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Hit {
    pub conversation_id: Uuid,
    pub message_id: Uuid,
    /// The matching text with the matches in `<b>…</b>`.
    pub snippet: String,
    /// Higher is better (Postgres' `ts_rank`; SQLite's `bm25`, negated). Only the
    /// order means anything, and only within one backend.
    pub rank: f32,
    pub created_at: DateTime<Utc>,
}

/// Searches `owner`'s messages with web-search syntax (words, `"quoted phrases"`,
/// `-word`, `or`), best first; `conversation` narrows to one conversation.
///
/// On SQLite a query with no word to look for (only negations, or only punctuation)
/// finds nothing: FTS5 cannot express "everything except".
pub async fn search(
    db: &Database,
    owner: Uuid,
    query: &str,
    conversation: Option<Uuid>,
    limit: i64,
    offset: i64,
) -> Result<Vec<Hit>, sqlx::Error> {
    match db {
        Database::Postgres(pool) => {
            sqlx::query_as(
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
            .await
        }
        Database::Sqlite(pool) => {
            let Some(expression) = fts5_query(query) else {
                return Ok(Vec::new());
            };
            sqlx::query_as(
                "SELECT d.conversation_id, d.message_id, d.created_at,
                        -bm25(rm_search_fts) AS rank,
                        snippet(rm_search_fts, 0, '<b>', '</b>', ' … ', 20) AS snippet
                   FROM rm_search_fts
                   JOIN rm_search_documents d ON d.fts_id = rm_search_fts.rowid
                  WHERE rm_search_fts MATCH $2 AND d.owner = $1
                    AND ($3 IS NULL OR d.conversation_id = $3)
                  ORDER BY bm25(rm_search_fts), d.created_at DESC, d.message_id
                  LIMIT $4 OFFSET $5",
            )
            .bind(owner)
            .bind(expression)
            .bind(conversation)
            .bind(limit)
            .bind(offset)
            .fetch_all(pool)
            .await
        }
    }
}

/// One term of a web-search query: a word or a quoted phrase (its words), maybe
/// negated.
#[derive(Debug, PartialEq)]
enum Term {
    Or,
    Words { negated: bool, words: Vec<String> },
}

/// The words FTS5's tokenizer would see in `text`: runs of letters and digits.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

fn terms(query: &str) -> Vec<Term> {
    let mut terms = Vec::new();
    let mut chars = query.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(first) = chars.next() else {
            return terms;
        };
        let negated = first == '-';
        let opening = if negated { chars.next() } else { Some(first) };
        let text: String = match opening {
            // A quoted phrase runs to the closing quote (or the end).
            Some('"') => chars.by_ref().take_while(|c| *c != '"').collect(),
            // A lone `-` is nothing.
            Some(c) if c.is_whitespace() => continue,
            None => return terms,
            // A word runs to whitespace or a quote.
            Some(c) => {
                let mut word = String::from(c);
                while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '"') {
                    word.push(c);
                }
                if !negated && word.eq_ignore_ascii_case("or") {
                    terms.push(Term::Or);
                    continue;
                }
                word
            }
        };
        let words = words(&text);
        if !words.is_empty() {
            terms.push(Term::Words { negated, words });
        }
    }
}

/// An FTS5 string: the words as one quoted phrase (quotes doubled, though words never
/// hold one).
fn phrase(words: &[String]) -> String {
    format!("\"{}\"", words.join(" ").replace('"', "\"\""))
}

/// Translates a web-search query (Postgres' `websearch_to_tsquery` syntax: words and
/// `"quoted phrases"` all required, `-word` or `-"phrase"` excluded, `or` between
/// alternatives) into an FTS5 expression, or `None` when there is nothing to look for.
///
/// Every word is emitted inside a quoted FTS5 string, so no input (a stray quote,
/// `NEAR(`, `*`, `:`, `^`, an FTS5 keyword) is ever read as FTS5 syntax. As in
/// `websearch_to_tsquery`, `or` binds looser than the implicit AND: `a b or c` is
/// `(a AND b) OR c`. An alternative with only exclusions is dropped (FTS5 has no
/// "everything except").
pub fn fts5_query(query: &str) -> Option<String> {
    let mut alternatives: Vec<Vec<(bool, Vec<String>)>> = vec![Vec::new()];
    for term in terms(query) {
        match term {
            Term::Or => {
                if alternatives.last().is_some_and(|a| !a.is_empty()) {
                    alternatives.push(Vec::new());
                }
            }
            Term::Words { negated, words } => {
                if let Some(current) = alternatives.last_mut() {
                    current.push((negated, words));
                }
            }
        }
    }
    let expressions: Vec<String> = alternatives
        .iter()
        .filter_map(|terms| {
            let wanted: Vec<String> = terms
                .iter()
                .filter(|(negated, _)| !negated)
                .map(|(_, words)| phrase(words))
                .collect();
            if wanted.is_empty() {
                return None;
            }
            let unwanted: Vec<String> = terms
                .iter()
                .filter(|(negated, _)| *negated)
                .map(|(_, words)| phrase(words))
                .collect();
            let wanted = format!("({})", wanted.join(" AND "));
            Some(if unwanted.is_empty() {
                wanted
            } else {
                format!("({wanted} NOT ({}))", unwanted.join(" OR "))
            })
        })
        .collect();
    (!expressions.is_empty()).then(|| expressions.join(" OR "))
}

#[cfg(test)]
mod tests {
    use super::fts5_query;

    #[test]
    fn web_search_syntax_becomes_quoted_fts5() {
        let cases = [
            ("fox", Some(r#"("fox")"#)),
            ("quick fox", Some(r#"("quick" AND "fox")"#)),
            (r#""lazy dog" -cat"#, Some(r#"(("lazy dog") NOT ("cat"))"#)),
            ("berries or lazy", Some(r#"("berries") OR ("lazy")"#)),
            ("berries OR lazy", Some(r#"("berries") OR ("lazy")"#)),
            ("a b or c", Some(r#"("a" AND "b") OR ("c")"#)),
            (r#"-"sad cat" dog"#, Some(r#"(("dog") NOT ("sad cat"))"#)),
            ("or fox or", Some(r#"("fox")"#)),
            ("well-known", Some(r#"("well known")"#)),
            // A quoted `or` is a word.
            (r#""or""#, Some(r#"("or")"#)),
            ("-or fox", Some(r#"(("fox") NOT ("or"))"#)),
        ];
        for (input, expected) in cases {
            assert_eq!(fts5_query(input).as_deref(), expected, "{input}");
        }
    }

    #[test]
    fn fts5_syntax_in_the_input_is_only_words() {
        let cases = [
            // A word with punctuation inside is the phrase of its parts.
            (r#"NEAR(a b"#, Some(r#"("NEAR a" AND "b")"#)),
            (r#"fox" OR "x"#, Some(r#"("fox" AND "OR" AND "x")"#)),
            (r#"""#, None),
            ("a* ^b c:d", Some(r#"("a" AND "b" AND "c d")"#)),
            ("AND NOT", Some(r#"("AND" AND "NOT")"#)),
            ("  ", None),
            ("-", None),
            ("- -", None),
            ("!!! ???", None),
            ("-fox", None),
            ("-fox or dog", Some(r#"("dog")"#)),
            (
                "café naïve 東京",
                Some(r#"("café" AND "naïve" AND "東京")"#),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(fts5_query(input).as_deref(), expected, "{input}");
        }
    }
}
