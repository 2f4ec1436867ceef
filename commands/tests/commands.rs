//! Command handling against real Postgres: positions and versions, the cache under a
//! second writer, conflicts, idempotency, multi-stream commands and erasure.

#![allow(clippy::unwrap_used, reason = "test code")]

use std::sync::Arc;

use colloquy_commands::cache::CacheConfig;
use colloquy_commands::{CommandError, Commands, Context};
use colloquy_domain::process::{CancelRun, ProcessCommand, RequestRun, SendAndRequestRun};
use colloquy_domain::{
    ConversationCommand, ConversationId, DomainError, MessageId, MessageText, RunId, Title, UserId,
};
use colloquy_eventstore::{
    EventStore, ExpectedVersion, LogFilter, NewEvent, PgEventStore, PgOptions, StreamAppend,
};
use colloquy_testkit::TestDatabase;
use serde_json::json;
use uuid::Uuid;

struct World {
    _db: TestDatabase,
    store: Arc<dyn EventStore>,
    commands: Commands,
    owner: UserId,
}

async fn world() -> World {
    let db = TestDatabase::new().await;
    let store: Arc<dyn EventStore> = Arc::new(PgEventStore::with_pool(
        db.pool().await,
        PgOptions::default(),
    ));
    let commands = Commands::new(Arc::clone(&store), CacheConfig::default());
    World {
        _db: db,
        store,
        commands,
        owner: UserId::from_uuid(Uuid::new_v4()),
    }
}

fn text(s: &str) -> MessageText {
    MessageText::parse(s.to_owned()).unwrap()
}

async fn start(w: &World, commands: &Commands) -> ConversationId {
    let id = ConversationId::from_uuid(Uuid::new_v4());
    commands
        .conversation(
            id,
            ConversationCommand::Start {
                id,
                owner: w.owner,
                title: Some(Title::parse("Hello".into()).unwrap()),
                system_prompt: None,
                model: None,
            },
            &Context::new(w.owner),
        )
        .await
        .unwrap();
    id
}

fn send(w: &World, s: &str) -> ConversationCommand {
    ConversationCommand::SendMessage {
        message_id: MessageId::from_uuid(Uuid::new_v4()),
        by: w.owner,
        text: text(s),
    }
}

async fn log_len(store: &Arc<dyn EventStore>) -> usize {
    store
        .read_log(&LogFilter::All, 0, 10_000)
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn a_command_returns_the_position_and_version_it_wrote() {
    let w = world().await;
    let id = start(&w, &w.commands).await;
    let sent = w
        .commands
        .conversation(id, send(&w, "hi"), &Context::new(w.owner))
        .await
        .unwrap();
    assert_eq!(sent.version_of(&id.stream_name()), Some(1));
    assert_eq!(sent.position, w.store.head().await.unwrap());
    assert!(!sent.replayed);
    let stored = w.store.read_stream(&id.stream_name(), 0, 10).await.unwrap();
    assert_eq!(stored[1].event_type, "MessageSent");
    assert_eq!(stored[1].data["text"], "hi");
    let meta = stored[1].metadata.as_ref().unwrap();
    assert_eq!(meta["schemaVersion"], 2);
    assert_eq!(meta["userId"], w.owner.to_string());
}

#[tokio::test]
async fn a_stale_cache_in_another_process_reloads_and_retries() {
    let w = world().await;
    // Two handlers with their own caches stand for two gateway processes.
    let other = Commands::new(Arc::clone(&w.store), CacheConfig::default());
    let id = start(&w, &w.commands).await;
    other
        .conversation(id, send(&w, "from b"), &Context::new(w.owner))
        .await
        .unwrap();
    // w.commands' cache still says version 0: its append conflicts, reloads, retries.
    let sent = w
        .commands
        .conversation(id, send(&w, "from a"), &Context::new(w.owner))
        .await
        .unwrap();
    assert_eq!(sent.version_of(&id.stream_name()), Some(2));
    let texts: Vec<_> = w
        .store
        .read_stream(&id.stream_name(), 1, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.data["text"].clone())
        .collect();
    assert_eq!(texts, [json!("from b"), json!("from a")]);
}

#[tokio::test]
async fn concurrent_senders_on_one_conversation_all_land() {
    let w = world().await;
    let id = start(&w, &w.commands).await;
    let handlers: Vec<Commands> = (0..4)
        .map(|_| Commands::new(Arc::clone(&w.store), CacheConfig::default()))
        .collect();
    let tasks: Vec<_> = (0..12)
        .map(|n| {
            let commands = handlers[n % 4].clone();
            let cmd = send(&w, &format!("m{n}"));
            let owner = w.owner;
            tokio::spawn(async move { commands.conversation(id, cmd, &Context::new(owner)).await })
        })
        .collect();
    for t in tasks {
        t.await
            .unwrap()
            .expect("in-process turns and jittered retries let every send land");
    }
    let messages = w
        .store
        .read_stream(&id.stream_name(), 1, 100)
        .await
        .unwrap();
    assert_eq!(
        messages.len(),
        12,
        "every accepted command is in the log once"
    );
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_result_and_appends_nothing() {
    let w = world().await;
    let id = start(&w, &w.commands).await;
    let ctx = Context::new(w.owner).with_idempotency("key-1", "body-a");
    let cmd = ConversationCommand::SendMessage {
        message_id: MessageId::from_uuid(ctx.derive_id("message")),
        by: w.owner,
        text: text("once"),
    };
    let first = w
        .commands
        .conversation(id, cmd.clone(), &ctx)
        .await
        .unwrap();
    let before = log_len(&w.store).await;
    let again = w
        .commands
        .conversation(id, cmd.clone(), &ctx)
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.position, first.position);
    assert_eq!(
        again.version_of(&id.stream_name()),
        first.version_of(&id.stream_name())
    );
    assert_eq!(log_len(&w.store).await, before);
    // The same key with another body is refused.
    let other = Context::new(w.owner).with_idempotency("key-1", "body-b");
    let refused = w.commands.conversation(id, cmd, &other).await;
    assert!(
        matches!(refused, Err(CommandError::IdempotencyMismatch)),
        "{refused:?}"
    );
    assert_eq!(log_len(&w.store).await, before);
}

#[tokio::test]
async fn concurrent_repeats_of_one_key_write_once() {
    let w = world().await;
    let id = start(&w, &w.commands).await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let commands = Commands::new(Arc::clone(&w.store), CacheConfig::default());
            let owner = w.owner;
            tokio::spawn(async move {
                let ctx = Context::new(owner).with_idempotency("same", "same-body");
                let cmd = ConversationCommand::SendMessage {
                    message_id: MessageId::from_uuid(ctx.derive_id("message")),
                    by: owner,
                    text: MessageText::parse("dup?".into()).unwrap(),
                };
                commands.conversation(id, cmd, &ctx).await.unwrap()
            })
        })
        .collect();
    let mut positions = std::collections::HashSet::new();
    for t in tasks {
        positions.insert(t.await.unwrap().position);
    }
    assert_eq!(positions.len(), 1);
    assert_eq!(
        w.store
            .read_stream(&id.stream_name(), 1, 100)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn send_and_run_appends_both_streams_atomically_and_runs_are_exclusive() {
    let w = world().await;
    let id = start(&w, &w.commands).await;
    let run = RunId::from_uuid(Uuid::new_v4());
    let done = w
        .commands
        .process(
            id,
            run,
            ProcessCommand::SendAndRequestRun(SendAndRequestRun {
                message_id: MessageId::from_uuid(Uuid::new_v4()),
                by: w.owner,
                text: text("answer me"),
                run_id: run,
                model: None,
                instructions: None,
            }),
            &Context::new(w.owner),
        )
        .await
        .unwrap();
    let log = w.store.read_log(&LogFilter::All, 0, 100).await.unwrap();
    let types: Vec<_> = log.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "ConversationStarted",
            "MessageSent",
            "RunOpened",
            "RunRequested"
        ]
    );
    assert_eq!(
        done.position, log[3].global_position,
        "the run's event is last"
    );
    assert_eq!(done.version_of(&run.stream_name()), Some(0));
    let second = RunId::from_uuid(Uuid::new_v4());
    let refused = w
        .commands
        .process(
            id,
            second,
            ProcessCommand::RequestRun(RequestRun {
                run_id: second,
                by: w.owner,
                model: None,
                instructions: None,
            }),
            &Context::new(w.owner),
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(CommandError::Domain(DomainError::RunAlreadyActive { .. }))
        ),
        "{refused:?}"
    );
    assert_eq!(
        w.store.stream_version(&second.stream_name()).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn a_refusal_from_a_stale_cache_is_decided_again_on_the_log() {
    let w = world().await;
    let a = Commands::new(Arc::clone(&w.store), CacheConfig::default());
    let b = Commands::new(Arc::clone(&w.store), CacheConfig::default());
    let id = start(&w, &a).await;
    a.conversation(id, send(&w, "q"), &Context::new(w.owner))
        .await
        .unwrap();
    let run = RunId::from_uuid(Uuid::new_v4());
    let request = |run_id| {
        ProcessCommand::RequestRun(RequestRun {
            run_id,
            by: w.owner,
            model: None,
            instructions: None,
        })
    };
    a.process(id, run, request(run), &Context::new(w.owner))
        .await
        .unwrap();
    // b closes the run; a's cache still says a run is open.
    b.process(
        id,
        run,
        ProcessCommand::CancelRun(CancelRun { by: w.owner }),
        &Context::new(w.owner),
    )
    .await
    .unwrap();
    let next = RunId::from_uuid(Uuid::new_v4());
    a.process(id, next, request(next), &Context::new(w.owner))
        .await
        .expect("a re-reads the log and sees the run closed");
}

#[tokio::test]
async fn old_schema_versions_are_upcast_when_loading() {
    let w = world().await;
    let id = start(&w, &w.commands).await;
    let old_message = Uuid::new_v4();
    // A v1 MessageSent as an older build wrote it: `body`, no author.
    w.store
        .append(vec![StreamAppend::new(
            id.stream_name(),
            ExpectedVersion::Exact(0),
            vec![
                NewEvent::new(
                    Uuid::new_v4(),
                    "MessageSent",
                    json!({"messageId": old_message, "authorId": w.owner.to_string(), "body": "old"}),
                )
                .with_metadata(json!({"schemaVersion": 1})),
            ],
        )])
        .await
        .unwrap();
    let fresh = Commands::new(Arc::clone(&w.store), CacheConfig::default());
    let loaded = fresh.load_conversation(id).await.unwrap();
    let conversation = loaded.state.unwrap();
    assert!(
        conversation
            .message(MessageId::from_uuid(old_message))
            .is_some()
    );
    assert_eq!(loaded.version, 1);
}

#[tokio::test]
async fn a_forgotten_user_s_text_cannot_be_read_from_the_log() {
    let w = world().await;
    let id = start(&w, &w.commands).await;
    w.commands
        .conversation(id, send(&w, "my secret: swordfish"), &Context::new(w.owner))
        .await
        .unwrap();
    let someone = UserId::from_uuid(Uuid::new_v4());
    let theirs = ConversationId::from_uuid(Uuid::new_v4());
    w.commands
        .conversation(
            theirs,
            ConversationCommand::Start {
                id: theirs,
                owner: someone,
                title: None,
                system_prompt: None,
                model: None,
            },
            &Context::new(someone),
        )
        .await
        .unwrap();
    w.commands
        .conversation(
            theirs,
            ConversationCommand::SendMessage {
                message_id: MessageId::from_uuid(Uuid::new_v4()),
                by: someone,
                text: text("not forgotten"),
            },
            &Context::new(someone),
        )
        .await
        .unwrap();
    let head = w.store.head().await.unwrap();
    let report = w.commands.forget_user(w.owner).await.unwrap();
    assert!(report.events_redacted >= 2, "{report:?}");
    assert!(report.streams.contains(&id.stream_name()));
    let dump = serde_json::to_string(
        &w.store
            .read_log(&LogFilter::All, 0, 10_000)
            .await
            .unwrap()
            .iter()
            .map(|e| &e.data)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(
        !dump.contains("swordfish") && !dump.contains("Hello"),
        "{dump}"
    );
    assert!(dump.contains("not forgotten"));
    assert_eq!(
        w.store.head().await.unwrap(),
        head,
        "erasure appends nothing to the log"
    );
    // The aggregate still loads: redacted events decode.
    let fresh = Commands::new(Arc::clone(&w.store), CacheConfig::default());
    assert!(fresh.load_conversation(id).await.unwrap().state.is_some());
}

#[tokio::test]
async fn an_expected_version_is_checked_atomically_with_the_append() {
    let w = world().await;
    let id = start(&w, &w.commands).await;
    let rename = |t: &str| ConversationCommand::Rename {
        by: w.owner,
        title: Title::parse(t.into()).unwrap(),
    };
    let stale = w
        .commands
        .conversation_expecting(id, rename("x"), 5, &Context::new(w.owner))
        .await;
    assert!(
        matches!(
            stale,
            Err(CommandError::VersionMismatch {
                actual: 0,
                expected: 5,
                ..
            })
        ),
        "{stale:?}"
    );
    // Several processes rename expecting version 0 at once: exactly one wins.
    let tasks: Vec<_> = (0..6)
        .map(|n| {
            let commands = Commands::new(Arc::clone(&w.store), CacheConfig::default());
            let owner = w.owner;
            let cmd = rename(&format!("title {n}"));
            tokio::spawn(async move {
                commands
                    .conversation_expecting(id, cmd, 0, &Context::new(owner))
                    .await
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(CommandError::VersionMismatch { .. }) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(
        w.store.stream_version(&id.stream_name()).await.unwrap(),
        Some(1)
    );
}
