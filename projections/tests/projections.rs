//! Read models against real Postgres, fed from the log: what each shows, idempotence,
//! crash recovery, position waits, search, rebuild and verify.

#![allow(clippy::unwrap_used, reason = "test code")]

use std::sync::Arc;
use std::time::Duration;

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
use colloquy_eventstore::{EventStore, LogFilter, PgEventStore, PgOptions};
use colloquy_projections::replay::{AlreadyRunning, is_rebuilding, rebuild, verify};
use colloquy_projections::runner::{apply_batch, read_checkpoint};
use colloquy_projections::search::search;
use colloquy_projections::wait::wait_for_position;
use colloquy_projections::{Runner, all_projections, by_name};
use colloquy_testkit::TestDatabase;
use sqlx::PgPool;
use uuid::Uuid;

struct World {
    _db: TestDatabase,
    pool: PgPool,
    store: Arc<dyn EventStore>,
    commands: Commands,
    owner: UserId,
}

async fn world() -> World {
    let db = TestDatabase::new().await;
    let pool = db.pool().await;
    let store: Arc<dyn EventStore> =
        Arc::new(PgEventStore::with_pool(pool.clone(), PgOptions::default()));
    World {
        commands: Commands::new(Arc::clone(&store), CacheConfig::default()),
        _db: db,
        pool,
        store,
        owner: UserId::from_uuid(Uuid::new_v4()),
    }
}

fn runners(w: &World) -> Vec<Runner> {
    all_projections()
        .into_iter()
        .map(|p| Runner::new(w.pool.clone(), Arc::clone(&w.store), p))
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
    let run = RunId::from_uuid(Uuid::new_v4());
    w.commands
        .process(
            id,
            run,
            ProcessCommand::SendAndRequestRun(SendAndRequestRun {
                message_id: MessageId::from_uuid(Uuid::new_v4()),
                by: w.owner,
                text: MessageText::parse("what do foxes eat?".into()).unwrap(),
                run_id: run,
                model: None,
                instructions: None,
            }),
            &Context::new(w.owner),
        )
        .await
        .unwrap();
    w.commands
        .run(
            run,
            RunCommand::Start {
                attempt: 1,
                key_label: "main".into(),
            },
            &Context::new(w.owner),
        )
        .await
        .unwrap();
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

#[tokio::test]
async fn appended_events_reach_each_read_model() {
    let w = world().await;
    let (id, run) = workload(&w).await;
    catch_up_all(&w).await;
    let (title, count, preview, version): (String, i32, String, i64) = sqlx::query_as(
        "SELECT title, message_count, last_message_preview, version FROM rm_messages.conversations WHERE id = $1",
    )
    .bind(id.as_uuid())
    .fetch_one(&w.pool)
    .await
    .unwrap();
    assert_eq!(title, "Plans");
    assert_eq!(
        count, 4,
        "three user messages left after a deletion, plus the reply"
    );
    assert_eq!(preview, "Foxes eat berries and mice.");
    assert_eq!(
        version,
        w.store
            .stream_version(&id.stream_name())
            .await
            .unwrap()
            .unwrap()
    );
    let texts: Vec<(String, String)> = sqlx::query_as(
        "SELECT author, text FROM rm_messages.messages WHERE conversation_id = $1 AND NOT deleted ORDER BY seq",
    )
    .bind(id.as_uuid())
    .fetch_all(&w.pool)
    .await
    .unwrap();
    assert_eq!(
        texts,
        [
            ("user".into(), "the quick red fox".into()),
            ("user".into(), "jumps over the lazy dog".into()),
            ("user".into(), "what do foxes eat?".into()),
            ("assistant".into(), "Foxes eat berries and mice.".into()),
        ]
    );
    let (status, attempts, position): (String, i32, i64) =
        sqlx::query_as("SELECT status, attempts, position FROM rm_runs.runs WHERE id = $1")
            .bind(run.as_uuid())
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempts), ("succeeded", 1));
    let run_last = w
        .store
        .read_stream(&run.stream_name(), 0, 100)
        .await
        .unwrap();
    assert_eq!(position, run_last.last().unwrap().global_position);
}

#[tokio::test]
async fn search_finds_only_the_callers_current_text() {
    let w = world().await;
    let (id, _) = workload(&w).await;
    catch_up_all(&w).await;
    let hits = search(&w.pool, w.owner.as_uuid(), "fox", None, 10, 0)
        .await
        .unwrap();
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
        search(&w.pool, w.owner.as_uuid(), "brown", None, 10, 0)
            .await
            .unwrap()
            .is_empty(),
        "re-indexed after the edit"
    );
    assert!(
        search(&w.pool, w.owner.as_uuid(), "delete", None, 10, 0)
            .await
            .unwrap()
            .is_empty(),
        "deleted messages leave"
    );
    let phrase = search(&w.pool, w.owner.as_uuid(), "\"lazy dog\" -cat", None, 10, 0)
        .await
        .unwrap();
    assert_eq!(phrase.len(), 1);
    let either = search(&w.pool, w.owner.as_uuid(), "berries or lazy", None, 10, 0)
        .await
        .unwrap();
    assert_eq!(either.len(), 2);
}

#[tokio::test]
async fn redelivered_events_change_nothing() {
    let w = world().await;
    workload(&w).await;
    let log = w.store.read_log(&LogFilter::All, 0, 10_000).await.unwrap();
    let messages = by_name("messages").unwrap();
    apply_batch(&w.pool, messages.as_ref(), "rm_messages", &log)
        .await
        .unwrap();
    let snapshot = dump(&w.pool, "rm_messages").await;
    // The whole log again, and a slice of it: nothing moves.
    apply_batch(&w.pool, messages.as_ref(), "rm_messages", &log)
        .await
        .unwrap();
    apply_batch(&w.pool, messages.as_ref(), "rm_messages", &log[2..5])
        .await
        .unwrap();
    assert_eq!(dump(&w.pool, "rm_messages").await, snapshot);
    assert_eq!(
        read_checkpoint(&w.pool, "rm_messages").await.unwrap(),
        log.last().unwrap().global_position
    );
}

async fn dump(pool: &PgPool, schema: &str) -> String {
    let sql = format!(
        "SELECT coalesce(jsonb_agg(to_jsonb(c) ORDER BY c.id), '[]')::text FROM \"{schema}\".conversations c"
    );
    let conversations: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .unwrap();
    let sql = format!(
        "SELECT coalesce(jsonb_agg(to_jsonb(m) ORDER BY m.id), '[]')::text FROM \"{schema}\".messages m"
    );
    let messages: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .unwrap();
    format!("{conversations}\n{messages}")
}

#[tokio::test]
async fn a_batch_killed_before_commit_leaves_nothing_and_the_restart_equals_a_replay() {
    let w = world().await;
    workload(&w).await;
    let log = w.store.read_log(&LogFilter::All, 0, 10_000).await.unwrap();
    let messages = by_name("messages").unwrap();
    apply_batch(&w.pool, messages.as_ref(), "rm_messages", &log[..3])
        .await
        .unwrap();
    // A batch that dies halfway: rows written, no commit (the process is killed).
    {
        let mut tx = w.pool.begin().await.unwrap();
        sqlx::query("SET LOCAL search_path TO rm_messages")
            .execute(&mut *tx)
            .await
            .unwrap();
        for event in &log[3..8] {
            messages.apply(&mut tx, event).await.unwrap();
        }
        drop(tx);
    }
    assert_eq!(
        read_checkpoint(&w.pool, "rm_messages").await.unwrap(),
        log[2].global_position
    );
    Runner::new(w.pool.clone(), Arc::clone(&w.store), Arc::clone(&messages))
        .catch_up(None)
        .await
        .unwrap();
    let differences = verify(&w.pool, &w.store, messages.as_ref(), &|_, _| {})
        .await
        .unwrap();
    assert!(differences.is_empty(), "{differences:?}");
}

#[tokio::test]
async fn verify_reports_a_tampered_row_and_nothing_after_a_clean_run() {
    let w = world().await;
    let (id, _) = workload(&w).await;
    catch_up_all(&w).await;
    for projection in all_projections() {
        let differences = verify(&w.pool, &w.store, projection.as_ref(), &|_, _| {})
            .await
            .unwrap();
        assert!(
            differences.is_empty(),
            "{}: {differences:?}",
            projection.name()
        );
    }
    sqlx::query("UPDATE rm_messages.conversations SET title = 'tampered' WHERE id = $1")
        .bind(id.as_uuid())
        .execute(&w.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM rm_search.documents WHERE conversation_id = $1")
        .bind(id.as_uuid())
        .execute(&w.pool)
        .await
        .unwrap();
    let messages = verify(
        &w.pool,
        &w.store,
        by_name("messages").unwrap().as_ref(),
        &|_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(
        (messages[0].table.as_str(), messages[0].kind),
        ("conversations", "changed")
    );
    assert_eq!(messages[0].key, id.as_uuid().to_string());
    let searched = verify(
        &w.pool,
        &w.store,
        by_name("search").unwrap().as_ref(),
        &|_, _| {},
    )
    .await
    .unwrap();
    assert!(
        !searched.is_empty() && searched.iter().all(|d| d.kind == "missing"),
        "{searched:?}"
    );
}

#[tokio::test]
async fn a_position_wait_for_a_run_request_completes_on_every_read_model() {
    let w = world().await;
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
            &w.pool,
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
    assert!(read_checkpoint(&w.pool, "rm_search").await.unwrap() >= requested.position);
    // A position nobody has reached yet times out (bounded) instead of hanging.
    assert!(
        !wait_for_position(
            &w.pool,
            "rm_runs",
            requested.position + 1_000,
            Duration::from_millis(50)
        )
        .await
        .unwrap()
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_rebuild_swaps_in_while_queries_are_served_and_the_live_runner_continues() {
    let w = world().await;
    workload(&w).await;
    let messages = by_name("messages").unwrap();
    let runner = Runner::new(w.pool.clone(), Arc::clone(&w.store), Arc::clone(&messages));
    runner.catch_up(None).await.unwrap();
    let before = dump(&w.pool, "rm_messages").await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    // Queries hammer the read model during the rebuild; every one must succeed.
    let querying = {
        let pool = w.pool.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut served = 0_u32;
            while !shutdown.is_cancelled() {
                let count: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM rm_messages.conversations")
                        .fetch_one(&pool)
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
    let reached = rebuild(&w.pool, &w.store, messages.as_ref(), &|_, _| {})
        .await
        .unwrap();
    assert_eq!(reached, w.store.head().await.unwrap());
    assert_eq!(
        dump(&w.pool, "rm_messages").await,
        before,
        "the rebuild equals the live model"
    );
    // The live runner continues from the swapped checkpoint: a new event lands once.
    let (id, _) = (start(&w, w.owner, "After").await, ());
    let head = w.store.head().await.unwrap();
    assert!(
        wait_for_position(&w.pool, "rm_messages", head, Duration::from_secs(20))
            .await
            .unwrap()
    );
    shutdown.cancel();
    following.await.unwrap().unwrap();
    assert!(querying.await.unwrap() > 0);
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rm_messages.conversations WHERE id = $1")
            .bind(id.as_uuid())
            .fetch_one(&w.pool)
            .await
            .unwrap();
    assert_eq!(count, 1);
    assert!(
        verify(&w.pool, &w.store, messages.as_ref(), &|_, _| {})
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn after_erasure_and_a_rebuild_the_text_is_gone_from_every_read_model() {
    let w = world().await;
    workload(&w).await;
    catch_up_all(&w).await;
    assert!(
        !search(&w.pool, w.owner.as_uuid(), "fox", None, 10, 0)
            .await
            .unwrap()
            .is_empty()
    );
    w.commands.forget_user(w.owner).await.unwrap();
    for projection in all_projections() {
        rebuild(&w.pool, &w.store, projection.as_ref(), &|_, _| {})
            .await
            .unwrap();
    }
    assert!(
        search(&w.pool, w.owner.as_uuid(), "fox", None, 10, 0)
            .await
            .unwrap()
            .is_empty()
    );
    let all = dump(&w.pool, "rm_messages").await;
    assert!(
        !all.contains("quick red fox") && !all.contains("berries"),
        "{all}"
    );
    assert!(
        all.contains("a fox of their own"),
        "other users keep their text"
    );
}

/// The messages projection folds batches in memory; applying the same events one by
/// one must give the same tables (the live runner and replays use the batch path).
#[tokio::test]
async fn the_batch_fold_equals_applying_events_one_by_one() {
    let w = world().await;
    workload(&w).await;
    workload(&w).await;
    catch_up_all(&w).await;
    let messages = by_name("messages").unwrap();
    sqlx::query("SELECT colloquy.create_messages_read_model('rm_messages_one_by_one')")
        .execute(&w.pool)
        .await
        .unwrap();
    let log = w.store.read_log(&LogFilter::All, 0, 10_000).await.unwrap();
    let mut tx = w.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL search_path TO rm_messages_one_by_one")
        .execute(&mut *tx)
        .await
        .unwrap();
    for event in &log {
        messages.apply(&mut tx, event).await.unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(
        dump(&w.pool, "rm_messages_one_by_one").await,
        dump(&w.pool, "rm_messages").await
    );
    // And in small batches (the live path's shape) as well as one large one.
    sqlx::query("SELECT colloquy.create_messages_read_model('rm_messages_small_batches')")
        .execute(&w.pool)
        .await
        .unwrap();
    for chunk in log.chunks(3) {
        apply_batch(
            &w.pool,
            messages.as_ref(),
            "rm_messages_small_batches",
            chunk,
        )
        .await
        .unwrap();
    }
    assert_eq!(
        dump(&w.pool, "rm_messages_small_batches").await,
        dump(&w.pool, "rm_messages").await
    );
}

/// A dead letter revived by an operator is live again in the runs read model: retrying,
/// with the operator's reason and no finish time; a replay gives the same row.
#[tokio::test]
async fn a_revived_dead_letter_is_retrying_again_with_no_finish_time() {
    let w = world().await;
    let id = start(&w, w.owner, "Revived").await;
    let run = RunId::from_uuid(Uuid::new_v4());
    let ctx = Context::new(w.owner);
    w.commands
        .process(
            id,
            run,
            ProcessCommand::SendAndRequestRun(SendAndRequestRun {
                message_id: MessageId::from_uuid(Uuid::new_v4()),
                by: w.owner,
                text: MessageText::parse("anyone?".into()).unwrap(),
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
            },
            &ctx,
        )
        .await
        .unwrap();
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
    catch_up_all(&w).await;
    let row = |pool: PgPool| async move {
        sqlx::query_as::<_, (String, Option<String>, bool, i32)>(
            "SELECT status, error, finished_at IS NOT NULL, attempts FROM rm_runs.runs WHERE id = $1",
        )
        .bind(run.as_uuid())
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let (status, _, finished, _) = row(w.pool.clone()).await;
    assert_eq!((status.as_str(), finished), ("failed", true));

    w.commands
        .process(
            id,
            run,
            ProcessCommand::ReviveRun(ReviveRun {
                not_before: chrono::Utc::now(),
            }),
            &ctx,
        )
        .await
        .unwrap();
    catch_up_all(&w).await;
    let revived = row(w.pool.clone()).await;
    assert_eq!(
        revived,
        ("retrying".into(), Some(REVIVED_REASON.into()), false, 1)
    );
    let runs = by_name("runs").unwrap();
    rebuild(&w.pool, &w.store, runs.as_ref(), &|_, _| {})
        .await
        .unwrap();
    assert_eq!(row(w.pool.clone()).await, revived, "a replay agrees");
}

/// Two rebuilds of one projection never share its scratch schema: while one runs (held
/// here at its swap, which waits for the projection's lock), a second is refused and
/// the first is reported as running; once it finishes, it is not.
#[tokio::test]
async fn a_second_rebuild_is_refused_while_the_first_runs() {
    let w = world().await;
    workload(&w).await;
    catch_up_all(&w).await;
    let runs = by_name("runs").unwrap();
    assert!(!is_rebuilding(&w.pool, runs.as_ref()).await.unwrap());

    // The live runners' lock: the first rebuild fills its copy, then waits at the swap.
    let mut holder = w.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtext('rm_runs'))")
        .execute(&mut *holder)
        .await
        .unwrap();
    let first = {
        let (pool, store, runs) = (w.pool.clone(), Arc::clone(&w.store), Arc::clone(&runs));
        tokio::spawn(async move { rebuild(&pool, &store, runs.as_ref(), &|_, _| {}).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !is_rebuilding(&w.pool, runs.as_ref()).await.unwrap() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first rebuild never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = rebuild(&w.pool, &w.store, runs.as_ref(), &|_, _| {})
        .await
        .unwrap_err();
    assert_eq!(
        second.downcast_ref::<AlreadyRunning>(),
        Some(&AlreadyRunning { projection: "runs" })
    );

    sqlx::query("SELECT pg_advisory_unlock(hashtext('rm_runs'))")
        .execute(&mut *holder)
        .await
        .unwrap();
    let reached = first.await.unwrap().unwrap();
    assert_eq!(reached, w.store.head().await.unwrap());
    assert!(!is_rebuilding(&w.pool, runs.as_ref()).await.unwrap());
}
