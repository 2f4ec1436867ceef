//! Read models fed from the log, on both backends (real Postgres, and a SQLite file):
//! what each shows, idempotence, crash recovery, position waits, search, rebuild and
//! verify; and that one log gives the same read models on both.
//!
//! Each scenario is a function of a [`World`]; `on_both_backends!` makes a
//! `postgres::<name>` and a `sqlite::<name>` test of it.

#![allow(clippy::unwrap_used, reason = "test code")]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use colloquy_commands::cache::CacheConfig;
use colloquy_commands::{Commands, Context};
use colloquy_domain::process::{
    CompleteRun, FailRun, ProcessCommand, ReviveRun, SendAndRequestRun,
};
use colloquy_domain::run::{DEAD_LETTER_PREFIX, REVIVED_REASON, Usage};
use colloquy_domain::{
    AssistantText, ConversationCommand, ConversationId, MessageId, MessageText, RunCommand, RunId,
    Title, UserId,
};
use colloquy_eventstore::{
    Database, EventStore, LogFilter, PgEventStore, PgOptions, RecordedEvent, SqliteEventStore,
};
use colloquy_projections::replay::{AlreadyRunning, Difference, is_rebuilding, rebuild, verify};
use colloquy_projections::runner::{apply_batch, read_checkpoint};
use colloquy_projections::search::{Hit, search};
use colloquy_projections::wait::wait_for_position;
use colloquy_projections::{Conn, Projection, Runner, all_projections, by_name};
use colloquy_testkit::TestDatabase;
use sqlx::{AssertSqlSafe, Connection as _};
use uuid::Uuid;

/// What keeps a test's database alive.
#[allow(dead_code, reason = "held for its Drop")]
enum Keep {
    Postgres(TestDatabase),
    Sqlite(TempDir),
}

/// A directory removed when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct World {
    _keep: Keep,
    db: Database,
    store: Arc<dyn EventStore>,
    commands: Commands,
    owner: UserId,
}

async fn postgres_world() -> World {
    let keep = TestDatabase::new().await;
    let pool = keep.pool().await;
    let store: Arc<dyn EventStore> =
        Arc::new(PgEventStore::with_pool(pool.clone(), PgOptions::default()));
    world(Keep::Postgres(keep), Database::Postgres(pool), store)
}

async fn sqlite_world() -> World {
    let dir = std::env::temp_dir().join(format!("colloquy-projections-{}", Uuid::new_v4()));
    let pool = colloquy_eventstore::sqlite::open(&dir.join("colloquy.db"))
        .await
        .unwrap();
    let store: Arc<dyn EventStore> = Arc::new(SqliteEventStore::new(pool.clone()));
    world(Keep::Sqlite(TempDir(dir)), Database::Sqlite(pool), store)
}

fn world(keep: Keep, db: Database, store: Arc<dyn EventStore>) -> World {
    World {
        commands: Commands::new(Arc::clone(&store), CacheConfig::default()),
        _keep: keep,
        db,
        store,
        owner: UserId::from_uuid(Uuid::new_v4()),
    }
}

/// A `postgres::<name>` and a `sqlite::<name>` test of each scenario `<name>`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::postgres_world().await).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::sqlite_world().await).await;
                }
            )*
        }
    };
}

on_both_backends!(
    appended_events_reach_each_read_model,
    search_finds_only_the_callers_current_text,
    search_takes_any_input_safely,
    redelivered_events_change_nothing,
    a_batch_killed_before_commit_leaves_nothing_and_the_restart_equals_a_replay,
    verify_reports_a_tampered_row_and_nothing_after_a_clean_run,
    a_position_wait_for_a_run_request_completes_on_every_read_model,
    a_rebuild_swaps_in_while_queries_are_served_and_the_live_runner_continues,
    after_erasure_and_a_rebuild_the_text_is_gone_from_every_read_model,
    any_batching_of_the_log_gives_the_same_tables,
    a_revived_dead_letter_is_retrying_again_with_no_finish_time,
    a_second_rebuild_is_refused_while_the_first_runs,
    lag_counts_the_events_after_the_checkpoint,
);

// ---------------------------------------------------------------------------------
// Reading the tables on either backend.

/// A read model's table: `rm_messages.conversations` on Postgres,
/// `rm_messages_conversations` on SQLite.
fn table(db: &Database, schema: &str, name: &str) -> String {
    match db {
        Database::Postgres(_) => format!("{schema}.{name}"),
        Database::Sqlite(_) => format!("{schema}_{name}"),
    }
}

/// Rows of `sql` (`{t}` stands for `table(db, schema, name)`) on either backend.
async fn rows<T>(db: &Database, sql: &str, schema: &str, name: &str) -> Vec<T>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
        + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
        + Send
        + Unpin,
{
    let sql = AssertSqlSafe(sql.replace("{t}", &table(db, schema, name)));
    match db {
        Database::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
        Database::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
    }
}

/// Runs a statement (`{t}` as in [`rows`]) with one id bound as `$1`.
async fn execute(db: &Database, sql: &str, schema: &str, name: &str, id: Uuid) {
    let sql = AssertSqlSafe(sql.replace("{t}", &table(db, schema, name)));
    match db {
        Database::Postgres(pool) => {
            sqlx::query(sql).bind(id).execute(pool).await.unwrap();
        }
        Database::Sqlite(pool) => {
            sqlx::query(sql).bind(id).execute(pool).await.unwrap();
        }
    }
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
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
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
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

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct RunRow {
    id: Uuid,
    conversation_id: Uuid,
    requested_by: Uuid,
    prompt_message_id: Uuid,
    model: Option<String>,
    status: String,
    stage: Option<String>,
    percent: i16,
    attempts: i32,
    error: Option<String>,
    reply_message_id: Option<Uuid>,
    usage: Option<serde_json::Value>,
    not_before: Option<DateTime<Utc>>,
    position: i64,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct SearchConversationRow {
    id: Uuid,
    owner: Uuid,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct DocumentRow {
    message_id: Uuid,
    conversation_id: Uuid,
    owner: Uuid,
    text: String,
    created_at: DateTime<Utc>,
}

/// Every row of every read model, typed, in key order: equal dumps are equal models.
#[derive(Debug, Clone, PartialEq)]
struct Dump {
    conversations: Vec<ConversationRow>,
    messages: Vec<MessageRow>,
    runs: Vec<RunRow>,
    search_conversations: Vec<SearchConversationRow>,
    documents: Vec<DocumentRow>,
}

async fn dump(db: &Database) -> Dump {
    Dump {
        conversations: rows(
            db,
            "SELECT id, owner, title, system_prompt, model, archived, created_at, updated_at,
                    activity_position, message_count, last_message_preview, version
               FROM {t} ORDER BY id",
            "rm_messages",
            "conversations",
        )
        .await,
        messages: rows(
            db,
            "SELECT id, conversation_id, seq, author, author_id, text, created_at, edited_at,
                    deleted, run_id, reply_to
               FROM {t} ORDER BY id",
            "rm_messages",
            "messages",
        )
        .await,
        runs: rows(
            db,
            "SELECT id, conversation_id, requested_by, prompt_message_id, model, status, stage,
                    percent, attempts, error, reply_message_id, usage, not_before, position,
                    created_at, started_at, finished_at
               FROM {t} ORDER BY id",
            "rm_runs",
            "runs",
        )
        .await,
        search_conversations: rows(
            db,
            "SELECT id, owner FROM {t} ORDER BY id",
            "rm_search",
            "conversations",
        )
        .await,
        documents: rows(
            db,
            "SELECT message_id, conversation_id, owner, text, created_at
               FROM {t} ORDER BY message_id",
            "rm_search",
            "documents",
        )
        .await,
    }
}

/// Empties a projection's tables and sets its checkpoint back to 0.
async fn reset(db: &Database, projection: &dyn Projection) {
    let schema = projection.schema();
    let mut statements: Vec<String> = projection
        .tables()
        .iter()
        .map(|(name, _)| format!("DELETE FROM {}", table(db, schema, name)))
        .collect();
    statements.push(format!(
        "UPDATE {} SET position = 0",
        table(db, schema, "checkpoint")
    ));
    for sql in statements {
        match db {
            Database::Postgres(pool) => {
                sqlx::query(AssertSqlSafe(sql)).execute(pool).await.unwrap();
            }
            Database::Sqlite(pool) => {
                sqlx::query(AssertSqlSafe(sql)).execute(pool).await.unwrap();
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Writing the log.

fn runners(w: &World) -> Vec<Runner> {
    all_projections()
        .into_iter()
        .map(|p| Runner::new(w.db.clone(), Arc::clone(&w.store), p))
        .collect()
}

async fn catch_up_all(w: &World) {
    for runner in runners(w) {
        runner.catch_up(None).await.unwrap();
    }
}

async fn start(w: &World, owner: UserId, title: &str) -> ConversationId {
    let id = ConversationId::from_uuid(Uuid::new_v4());
    w.commands
        .conversation(
            id,
            ConversationCommand::Start {
                id,
                owner,
                title: Some(Title::parse(title.into()).unwrap()),
                system_prompt: None,
                model: None,
            },
            &Context::new(owner),
        )
        .await
        .unwrap();
    id
}

async fn send(w: &World, id: ConversationId, owner: UserId, text: &str) -> MessageId {
    let message = MessageId::from_uuid(Uuid::new_v4());
    w.commands
        .conversation(
            id,
            ConversationCommand::SendMessage {
                message_id: message,
                by: owner,
                text: MessageText::parse(text.into()).unwrap(),
            },
            &Context::new(owner),
        )
        .await
        .unwrap();
    message
}

/// The owner sends `text` to conversation `id` with a run requested for it, and the
/// run's first attempt starts.
async fn ask_and_start(w: &World, id: ConversationId, text: &str) -> RunId {
    let run = RunId::from_uuid(Uuid::new_v4());
    let ctx = Context::new(w.owner);
    w.commands
        .process(
            id,
            run,
            ProcessCommand::SendAndRequestRun(SendAndRequestRun {
                message_id: MessageId::from_uuid(Uuid::new_v4()),
                by: w.owner,
                text: MessageText::parse(text.into()).unwrap(),
                run_id: run,
                model: None,
                instructions: None,
            }),
            &ctx,
        )
        .await
        .unwrap();
    w.commands
        .run(
            run,
            RunCommand::Start {
                attempt: 1,
                key_label: "main".into(),
                milestones: Vec::new(),
            },
            &ctx,
        )
        .await
        .unwrap();
    run
}

/// A mixed workload: conversations, messages, edits, deletions, a completed run.
async fn workload(w: &World) -> (ConversationId, RunId) {
    let id = start(w, w.owner, "Plans").await;
    let first = send(w, id, w.owner, "the quick brown fox").await;
    send(w, id, w.owner, "jumps over the lazy dog").await;
    let gone = send(w, id, w.owner, "delete me please").await;
    w.commands
        .conversation(
            id,
            ConversationCommand::EditMessage {
                message_id: first,
                by: w.owner,
                text: MessageText::parse("the quick red fox".into()).unwrap(),
            },
            &Context::new(w.owner),
        )
        .await
        .unwrap();
    w.commands
        .conversation(
            id,
            ConversationCommand::DeleteMessage {
                message_id: gone,
                by: w.owner,
            },
            &Context::new(w.owner),
        )
        .await
        .unwrap();
    let run = ask_and_start(w, id, "what do foxes eat?").await;
    w.commands
        .process(
            id,
            run,
            ProcessCommand::CompleteRun(CompleteRun {
                attempt: 1,
                reply_message_id: MessageId::from_uuid(Uuid::new_v4()),
                text: AssistantText::parse("Foxes eat berries and mice.".into()).unwrap(),
                finish_reason: "STOP".into(),
                usage: Usage {
                    prompt_tokens: 10,
                    candidates_tokens: 6,
                    total_tokens: 16,
                    thoughts_tokens: None,
                },
            }),
            &Context::new(w.owner),
        )
        .await
        .unwrap();
    let other = UserId::from_uuid(Uuid::new_v4());
    let theirs = start(w, other, "Theirs").await;
    send(w, theirs, other, "a fox of their own").await;
    (id, run)
}

/// A run that fails into a dead letter and is revived: `(conversation, run)`.
async fn dead_letter_revived(w: &World) -> (ConversationId, RunId) {
    let id = start(w, w.owner, "Revived").await;
    let run = ask_and_start(w, id, "anyone?").await;
    let ctx = Context::new(w.owner);
    w.commands
        .process(
            id,
            run,
            ProcessCommand::FailRun(FailRun {
                reason: format!("{DEAD_LETTER_PREFIX} after 1 attempts: 500"),
            }),
            &ctx,
        )
        .await
        .unwrap();
    w.commands
        .process(
            id,
            run,
            ProcessCommand::ReviveRun(ReviveRun {
                not_before: Utc::now(),
            }),
            &ctx,
        )
        .await
        .unwrap();
    (id, run)
}

async fn whole_log(w: &World) -> Vec<RecordedEvent> {
    w.store.read_log(&LogFilter::All, 0, 10_000).await.unwrap()
}

// ---------------------------------------------------------------------------------
// The scenarios.

async fn appended_events_reach_each_read_model(w: World) {
    let (id, run) = workload(&w).await;
    catch_up_all(&w).await;
    let models = dump(&w.db).await;
    let conversation = models
        .conversations
        .iter()
        .find(|c| c.id == id.as_uuid())
        .unwrap();
    assert_eq!(conversation.title.as_deref(), Some("Plans"));
    assert_eq!(
        conversation.message_count, 4,
        "three user messages left after a deletion, plus the reply"
    );
    assert_eq!(
        conversation.last_message_preview.as_deref(),
        Some("Foxes eat berries and mice.")
    );
    assert_eq!(
        conversation.version,
        w.store
            .stream_version(&id.stream_name())
            .await
            .unwrap()
            .unwrap()
    );
    let mut messages: Vec<&MessageRow> = models
        .messages
        .iter()
        .filter(|m| m.conversation_id == id.as_uuid() && !m.deleted)
        .collect();
    messages.sort_by_key(|m| m.seq);
    let texts: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| (m.author.as_str(), m.text.as_str()))
        .collect();
    assert_eq!(
        texts,
        [
            ("user", "the quick red fox"),
            ("user", "jumps over the lazy dog"),
            ("user", "what do foxes eat?"),
            ("assistant", "Foxes eat berries and mice."),
        ]
    );
    let reply = messages.last().unwrap();
    assert_eq!(reply.run_id, Some(run.as_uuid()));
    let deleted = models
        .messages
        .iter()
        .find(|m| m.deleted)
        .expect("the deleted message keeps its row");
    assert_eq!(deleted.text, "", "without its text");

    let row = models.runs.iter().find(|r| r.id == run.as_uuid()).unwrap();
    assert_eq!((row.status.as_str(), row.attempts), ("succeeded", 1));
    assert_eq!(row.reply_message_id, Some(reply.id));
    assert_eq!(row.usage.as_ref().unwrap()["totalTokens"], 16);
    let run_last = w
        .store
        .read_stream(&run.stream_name(), 0, 100)
        .await
        .unwrap();
    assert_eq!(row.position, run_last.last().unwrap().global_position);

    assert_eq!(models.search_conversations.len(), 2);
    assert_eq!(
        models.documents.len(),
        5,
        "four shown messages of the owner, one of the other user"
    );
}

/// The first page (ten hits) of `owner`'s search for `query` in all conversations.
async fn find(db: &Database, owner: Uuid, query: &str) -> Vec<Hit> {
    search(db, owner, query, None, 10, 0).await.unwrap()
}

/// Message ids of hits, sorted.
fn ids(hits: &[Hit]) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = hits.iter().map(|h| h.message_id).collect();
    ids.sort_unstable();
    ids
}

async fn search_finds_only_the_callers_current_text(w: World) {
    let (id, _) = workload(&w).await;
    catch_up_all(&w).await;
    let owner = w.owner.as_uuid();
    let hits = find(&w.db, owner, "fox").await;
    // The edited message, the question and the reply ("foxes" stems to "fox").
    assert_eq!(hits.len(), 3, "{hits:?}");
    assert!(
        hits.iter().all(|h| h.conversation_id == id.as_uuid()),
        "never another user's"
    );
    assert!(
        hits.iter().any(|h| h.snippet.contains("<b>fox</b>")),
        "{hits:?}"
    );
    assert!(
        hits.windows(2).all(|pair| pair[0].rank >= pair[1].rank),
        "best first: {hits:?}"
    );
    for (query, why) in [
        ("brown", "re-indexed after the edit"),
        ("delete", "deleted messages leave"),
        ("\"dog lazy\"", "a phrase keeps its order"),
        ("lazy -dog", "an excluded word excludes"),
    ] {
        assert!(find(&w.db, owner, query).await.is_empty(), "{why}");
    }
    let phrase = find(&w.db, owner, "\"lazy dog\" -cat").await;
    assert_eq!(phrase.len(), 1);
    let either = find(&w.db, owner, "berries or lazy").await;
    assert_eq!(either.len(), 2);
    // Narrowed to one conversation, and paged.
    assert_eq!(
        search(&w.db, owner, "fox", Some(Uuid::new_v4()), 10, 0)
            .await
            .unwrap(),
        []
    );
    let first = search(&w.db, owner, "fox", Some(id.as_uuid()), 2, 0)
        .await
        .unwrap();
    let rest = search(&w.db, owner, "fox", Some(id.as_uuid()), 2, 2)
        .await
        .unwrap();
    assert_eq!((first.len(), rest.len()), (2, 1));
    assert_eq!(ids(&[first, rest].concat()), ids(&hits));
}

/// Whatever the user types is a query, never a syntax error.
async fn search_takes_any_input_safely(w: World) {
    workload(&w).await;
    catch_up_all(&w).await;
    for input in [
        "\"",
        "fox\"",
        "NEAR(fox",
        "fox*",
        "^fox",
        "text:fox",
        "fox AND",
        "(fox",
        "fox OR",
        "-",
        "!!!",
        "'; DROP TABLE x; --",
        "\\",
        "\u{1F98A} fox",
    ] {
        let hits = search(&w.db, w.owner.as_uuid(), input, None, 10, 0).await;
        assert!(hits.is_ok(), "{input:?}: {hits:?}");
    }
    let hits = find(&w.db, w.owner.as_uuid(), "NEAR(fox").await;
    assert!(
        hits.is_empty(),
        "near is a word here, and no message has it"
    );
}

async fn redelivered_events_change_nothing(w: World) {
    workload(&w).await;
    let log = whole_log(&w).await;
    for projection in all_projections() {
        apply_batch(&w.db, projection.as_ref(), &log).await.unwrap();
    }
    let snapshot = dump(&w.db).await;
    // The whole log again, and a slice of it: nothing moves.
    for projection in all_projections() {
        apply_batch(&w.db, projection.as_ref(), &log).await.unwrap();
        apply_batch(&w.db, projection.as_ref(), &log[2..5])
            .await
            .unwrap();
        assert_eq!(
            read_checkpoint(&w.db, projection.schema()).await.unwrap(),
            log.last().unwrap().global_position
        );
    }
    assert_eq!(dump(&w.db).await, snapshot);
}

/// What a verify of `projection` finds.
async fn differences(w: &World, projection: &dyn Projection) -> Vec<Difference> {
    verify(&w.db, &w.store, projection, &|_, _| {})
        .await
        .unwrap()
}

/// Applies events in a transaction that is never committed (a process killed mid-batch).
async fn apply_and_die(db: &Database, projection: &dyn Projection, events: &[RecordedEvent]) {
    match db {
        Database::Postgres(pool) => {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query(AssertSqlSafe(format!(
                "SET LOCAL search_path TO {}",
                projection.schema()
            )))
            .execute(&mut *tx)
            .await
            .unwrap();
            projection
                .apply(&mut Conn::Postgres(&mut tx), events)
                .await
                .unwrap();
        }
        Database::Sqlite(pool) => {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
            projection
                .apply(&mut Conn::Sqlite(&mut tx), events)
                .await
                .unwrap();
        }
    }
}

async fn a_batch_killed_before_commit_leaves_nothing_and_the_restart_equals_a_replay(w: World) {
    workload(&w).await;
    let log = whole_log(&w).await;
    let messages = by_name("messages").unwrap();
    apply_batch(&w.db, messages.as_ref(), &log[..3])
        .await
        .unwrap();
    let before = dump(&w.db).await;
    apply_and_die(&w.db, messages.as_ref(), &log[3..8]).await;
    assert_eq!(dump(&w.db).await, before);
    assert_eq!(
        read_checkpoint(&w.db, "rm_messages").await.unwrap(),
        log[2].global_position
    );
    Runner::new(w.db.clone(), Arc::clone(&w.store), Arc::clone(&messages))
        .catch_up(None)
        .await
        .unwrap();
    let differences = differences(&w, messages.as_ref()).await;
    assert!(differences.is_empty(), "{differences:?}");
}

async fn verify_reports_a_tampered_row_and_nothing_after_a_clean_run(w: World) {
    let (id, _) = workload(&w).await;
    dead_letter_revived(&w).await;
    catch_up_all(&w).await;
    for projection in all_projections() {
        let differences = differences(&w, projection.as_ref()).await;
        assert!(
            differences.is_empty(),
            "{}: {differences:?}",
            projection.name()
        );
    }
    execute(
        &w.db,
        "UPDATE {t} SET title = 'tampered' WHERE id = $1",
        "rm_messages",
        "conversations",
        id.as_uuid(),
    )
    .await;
    execute(
        &w.db,
        "DELETE FROM {t} WHERE conversation_id = $1",
        "rm_search",
        "documents",
        id.as_uuid(),
    )
    .await;
    let messages = differences(&w, by_name("messages").unwrap().as_ref()).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(
        (messages[0].table.as_str(), messages[0].kind),
        ("conversations", "changed")
    );
    assert_eq!(messages[0].key, id.as_uuid().to_string());
    let searched = differences(&w, by_name("search").unwrap().as_ref()).await;
    assert_eq!(searched.len(), 4, "{searched:?}");
    assert!(searched.iter().all(|d| d.kind == "missing"), "{searched:?}");
    // A verify changes nothing.
    let after = dump(&w.db).await;
    differences(&w, by_name("search").unwrap().as_ref()).await;
    assert_eq!(dump(&w.db).await, after);
}

async fn a_position_wait_for_a_run_request_completes_on_every_read_model(w: World) {
    let (id, _) = workload(&w).await;
    let run = RunId::from_uuid(Uuid::new_v4());
    send(&w, id, w.owner, "one more").await;
    let requested = w
        .commands
        .process(
            id,
            run,
            ProcessCommand::RequestRun(colloquy_domain::process::RequestRun {
                run_id: run,
                by: w.owner,
                model: None,
                instructions: None,
            }),
            &Context::new(w.owner),
        )
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    for runner in runners(&w) {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { runner.follow_log(shutdown).await });
    }
    for projection in all_projections() {
        let reached = wait_for_position(
            &w.db,
            projection.schema(),
            requested.position,
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        assert!(
            reached,
            "{} reached the run request's position",
            projection.name()
        );
    }
    // The search read model has nothing about runs, yet it has reached the position.
    assert!(read_checkpoint(&w.db, "rm_search").await.unwrap() >= requested.position);
    // A position nobody has reached yet times out (bounded) instead of hanging.
    assert!(
        !wait_for_position(
            &w.db,
            "rm_runs",
            requested.position + 1_000,
            Duration::from_millis(50)
        )
        .await
        .unwrap()
    );
    // A new event reaches the followed read models too.
    let later = send(&w, id, w.owner, "and another").await;
    let head = w.store.head().await.unwrap();
    assert!(
        wait_for_position(&w.db, "rm_messages", head, Duration::from_secs(20))
            .await
            .unwrap()
    );
    assert!(
        dump(&w.db)
            .await
            .messages
            .iter()
            .any(|m| m.id == later.as_uuid())
    );
    shutdown.cancel();
}

async fn count(db: &Database, schema: &str, name: &str) -> sqlx::Result<i64> {
    let sql = AssertSqlSafe(format!("SELECT count(*) FROM {}", table(db, schema, name)));
    match db {
        Database::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        Database::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
    }
}

async fn a_rebuild_swaps_in_while_queries_are_served_and_the_live_runner_continues(w: World) {
    workload(&w).await;
    let messages = by_name("messages").unwrap();
    let runner = Runner::new(w.db.clone(), Arc::clone(&w.store), Arc::clone(&messages));
    runner.catch_up(None).await.unwrap();
    let before = dump(&w.db).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    // Queries hammer the read model during the rebuild; every one must succeed.
    let querying = {
        let db = w.db.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut served = 0_u32;
            while !shutdown.is_cancelled() {
                let count = count(&db, "rm_messages", "conversations")
                    .await
                    .expect("every query during the rebuild is served");
                assert!(count >= 2, "never an empty or half-built model: {count}");
                served += 1;
                tokio::task::yield_now().await;
            }
            served
        })
    };
    let following = {
        let runner = runner.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { runner.follow_log(shutdown).await })
    };
    let reached = rebuild(&w.db, &w.store, messages.as_ref(), &|_, _| {})
        .await
        .unwrap();
    assert_eq!(reached, w.store.head().await.unwrap());
    assert_eq!(
        dump(&w.db).await.conversations,
        before.conversations,
        "the rebuild equals the live model"
    );
    assert_eq!(dump(&w.db).await.messages, before.messages);
    // The live runner continues from the swapped checkpoint: a new event lands once.
    let id = start(&w, w.owner, "After").await;
    let head = w.store.head().await.unwrap();
    assert!(
        wait_for_position(&w.db, "rm_messages", head, Duration::from_secs(20))
            .await
            .unwrap()
    );
    shutdown.cancel();
    following.await.unwrap().unwrap();
    assert!(querying.await.unwrap() > 0);
    let after = dump(&w.db).await;
    assert_eq!(
        after
            .conversations
            .iter()
            .filter(|c| c.id == id.as_uuid())
            .count(),
        1
    );
    assert!(differences(&w, messages.as_ref()).await.is_empty());
}

async fn after_erasure_and_a_rebuild_the_text_is_gone_from_every_read_model(w: World) {
    workload(&w).await;
    catch_up_all(&w).await;
    assert!(!find(&w.db, w.owner.as_uuid(), "fox").await.is_empty());
    w.commands.forget_user(w.owner).await.unwrap();
    for projection in all_projections() {
        rebuild(&w.db, &w.store, projection.as_ref(), &|_, _| {})
            .await
            .unwrap();
    }
    assert!(find(&w.db, w.owner.as_uuid(), "fox").await.is_empty());
    let all = format!("{:?}", dump(&w.db).await);
    assert!(
        !all.contains("quick red fox") && !all.contains("berries"),
        "{all}"
    );
    assert!(
        all.contains("a fox of their own"),
        "other users keep their text"
    );
    let other = dump(&w.db)
        .await
        .search_conversations
        .into_iter()
        .find(|c| c.owner != w.owner.as_uuid())
        .unwrap()
        .owner;
    let theirs = find(&w.db, other, "fox").await;
    assert_eq!(theirs.len(), 1, "the other user still finds their own");
    if let Database::Sqlite(pool) = &w.db {
        // The swapped-in FTS5 index matches its documents.
        sqlx::query("INSERT INTO rm_search_fts (rm_search_fts) VALUES ('integrity-check')")
            .execute(pool)
            .await
            .unwrap();
    }
}

/// The projections fold batches in memory; one batch, one event at a time and small
/// batches (the live path's shape) must all give the same tables.
async fn any_batching_of_the_log_gives_the_same_tables(w: World) {
    workload(&w).await;
    workload(&w).await;
    dead_letter_revived(&w).await;
    let log = whole_log(&w).await;
    let projections = all_projections();
    for projection in &projections {
        apply_batch(&w.db, projection.as_ref(), &log).await.unwrap();
    }
    let whole = dump(&w.db).await;
    for size in [1, 3, 7] {
        for projection in &projections {
            reset(&w.db, projection.as_ref()).await;
            for chunk in log.chunks(size) {
                apply_batch(&w.db, projection.as_ref(), chunk)
                    .await
                    .unwrap();
            }
        }
        assert_eq!(dump(&w.db).await, whole, "batches of {size}");
    }
}

/// A dead letter revived by an operator is live again in the runs read model: retrying,
/// with the operator's reason and no finish time; a replay gives the same row.
async fn a_revived_dead_letter_is_retrying_again_with_no_finish_time(w: World) {
    let (_, run) = dead_letter_revived(&w).await;
    let log = whole_log(&w).await;
    let runs = by_name("runs").unwrap();
    // Up to the failure (the revival is the last event).
    apply_batch(&w.db, runs.as_ref(), &log[..log.len() - 1])
        .await
        .unwrap();
    let row = |models: Dump| models.runs.into_iter().find(|r| r.id == run.as_uuid());
    let failed = row(dump(&w.db).await).unwrap();
    assert_eq!(failed.status, "failed");
    assert!(failed.finished_at.is_some());

    catch_up_all(&w).await;
    let revived = row(dump(&w.db).await).unwrap();
    assert_eq!(
        (
            revived.status.as_str(),
            revived.error.as_deref(),
            revived.finished_at,
            revived.attempts
        ),
        ("retrying", Some(REVIVED_REASON), None, 1)
    );
    assert!(revived.not_before.is_some());
    rebuild(&w.db, &w.store, runs.as_ref(), &|_, _| {})
        .await
        .unwrap();
    assert_eq!(row(dump(&w.db).await), Some(revived), "a replay agrees");
}

/// Holds what a rebuild's swap waits for: the projection's advisory lock on Postgres,
/// the write lock on SQLite. Released when `release` is sent.
async fn hold_the_swap(
    db: &Database,
    schema: &'static str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let (held, holding) = tokio::sync::oneshot::channel::<()>();
    let db = db.clone();
    let task = tokio::spawn(async move {
        match db {
            Database::Postgres(pool) => {
                let mut conn = pool.acquire().await.unwrap();
                sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
                    .bind(schema)
                    .execute(&mut *conn)
                    .await
                    .unwrap();
                held.send(()).unwrap();
                let _ = released.await;
                sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
                    .bind(schema)
                    .execute(&mut *conn)
                    .await
                    .unwrap();
            }
            Database::Sqlite(pool) => {
                let mut conn = pool.acquire().await.unwrap();
                let tx = conn.begin_with("BEGIN IMMEDIATE").await.unwrap();
                held.send(()).unwrap();
                let _ = released.await;
                tx.rollback().await.unwrap();
            }
        }
    });
    holding.await.unwrap();
    (release, task)
}

/// Two rebuilds of one projection never share its scratch tables: while one runs (held
/// here at its swap), a second is refused and the first is reported as running; once
/// it finishes, it is not.
async fn a_second_rebuild_is_refused_while_the_first_runs(w: World) {
    workload(&w).await;
    catch_up_all(&w).await;
    let runs = by_name("runs").unwrap();
    assert!(!is_rebuilding(&w.db, runs.as_ref()).await.unwrap());

    let (release, holder) = hold_the_swap(&w.db, "rm_runs").await;
    let first = {
        let (db, store, runs) = (w.db.clone(), Arc::clone(&w.store), Arc::clone(&runs));
        tokio::spawn(async move { rebuild(&db, &store, runs.as_ref(), &|_, _| {}).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !is_rebuilding(&w.db, runs.as_ref()).await.unwrap() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first rebuild never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = rebuild(&w.db, &w.store, runs.as_ref(), &|_, _| {})
        .await
        .unwrap_err();
    assert_eq!(
        second.downcast_ref::<AlreadyRunning>(),
        Some(&AlreadyRunning { projection: "runs" })
    );

    release.send(()).unwrap();
    holder.await.unwrap();
    let reached = first.await.unwrap().unwrap();
    assert_eq!(reached, w.store.head().await.unwrap());
    assert!(!is_rebuilding(&w.db, runs.as_ref()).await.unwrap());
}

async fn lag_counts_the_events_after_the_checkpoint(w: World) {
    workload(&w).await;
    let head = w.store.head().await.unwrap();
    let lags = colloquy_projections::runner::lags(&w.db).await.unwrap();
    assert_eq!(lags.len(), 3);
    for found in &lags {
        assert_eq!(found.lag.checkpoint, 0);
        assert_eq!(found.lag.events, head);
        assert!(
            (0.0..60.0).contains(&found.lag.seconds) && found.lag.seconds > 0.0,
            "{:?}",
            found.lag
        );
    }
    catch_up_all(&w).await;
    for found in colloquy_projections::runner::lags(&w.db).await.unwrap() {
        assert_eq!(
            (found.lag.checkpoint, found.lag.events, found.lag.seconds),
            (head, 0, 0.0)
        );
    }
}

// ---------------------------------------------------------------------------------
// Across backends.

/// One log, projected on Postgres and on SQLite (in other batches), gives the same
/// rows in every read model and the same search hits.
#[tokio::test]
async fn the_same_log_gives_the_same_read_models_on_both_backends() {
    let pg = postgres_world().await;
    workload(&pg).await;
    workload(&pg).await;
    dead_letter_revived(&pg).await;
    let (id, _) = workload(&pg).await;
    pg.commands
        .conversation(
            id,
            ConversationCommand::Rename {
                by: pg.owner,
                title: Title::parse("Renamed".into()).unwrap(),
            },
            &Context::new(pg.owner),
        )
        .await
        .unwrap();
    pg.commands
        .conversation(
            id,
            ConversationCommand::Archive { by: pg.owner },
            &Context::new(pg.owner),
        )
        .await
        .unwrap();
    catch_up_all(&pg).await;
    let log = whole_log(&pg).await;

    let lite = sqlite_world().await;
    for projection in all_projections() {
        for chunk in log.chunks(5) {
            apply_batch(&lite.db, projection.as_ref(), chunk)
                .await
                .unwrap();
        }
    }
    let (on_postgres, on_sqlite) = (dump(&pg.db).await, dump(&lite.db).await);
    assert!(!on_postgres.conversations.is_empty() && !on_postgres.runs.is_empty());
    assert_eq!(on_sqlite, on_postgres);
    for projection in all_projections() {
        assert_eq!(
            read_checkpoint(&lite.db, projection.schema())
                .await
                .unwrap(),
            read_checkpoint(&pg.db, projection.schema()).await.unwrap()
        );
    }
    for query in [
        "fox",
        "foxes",
        "\"lazy dog\"",
        "quick -red",
        "berries or lazy",
        "mice eat",
    ] {
        let on_postgres = search(&pg.db, pg.owner.as_uuid(), query, None, 100, 0)
            .await
            .unwrap();
        let on_sqlite = search(&lite.db, pg.owner.as_uuid(), query, None, 100, 0)
            .await
            .unwrap();
        assert_eq!(ids(&on_sqlite), ids(&on_postgres), "{query}");
    }
}
