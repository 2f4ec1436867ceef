//! The read side end to end: the application's relay publishes the log to JetStream,
//! its projectors follow the stream, and the log heals what NATS loses.

use std::sync::Arc;
use std::time::Duration;

use colloquy_commands::cache::CacheConfig;
use colloquy_commands::{Commands, Context};
use colloquy_domain::{ConversationCommand, ConversationId, MessageId, MessageText, UserId};
use colloquy_eventstore::{EventStore, PgEventStore, PgOptions};

use crate::helpers::{TestApp, assert_read_models_equal_a_replay, read_models_reach, spawn_app};

async fn writer(app: &TestApp) -> (Arc<dyn EventStore>, Commands) {
    let store: Arc<dyn EventStore> = Arc::new(PgEventStore::with_pool(
        app.db.pool().await,
        PgOptions::default(),
    ));
    let commands = Commands::new(Arc::clone(&store), CacheConfig::default());
    (store, commands)
}

async fn conversation_with_messages(commands: &Commands, n: usize) -> (ConversationId, i64) {
    let owner = UserId::from_uuid(uuid::Uuid::new_v4());
    let id = ConversationId::from_uuid(uuid::Uuid::new_v4());
    let ctx = Context::new(owner);
    let mut last = commands
        .conversation(
            id,
            ConversationCommand::Start {
                id,
                owner,
                title: None,
                system_prompt: None,
                model: None,
            },
            &ctx,
        )
        .await
        .unwrap()
        .position;
    for i in 0..n {
        last = commands
            .conversation(
                id,
                ConversationCommand::SendMessage {
                    message_id: MessageId::from_uuid(uuid::Uuid::new_v4()),
                    by: owner,
                    text: MessageText::parse(format!("message {i}")).unwrap(),
                },
                &ctx,
            )
            .await
            .unwrap()
            .position;
    }
    (id, last)
}

/// Every read model has applied the log up to `position` (bounded wait).
async fn all_reach(app: &TestApp, position: i64) {
    read_models_reach(&app.db.database().await, position, Duration::from_secs(30)).await;
}

async fn stream_messages(app: &TestApp) -> u64 {
    let client = async_nats::connect(colloquy_testkit::nats_url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(app.prefix.to_uppercase()).await.unwrap();
    stream.info().await.unwrap().state.messages
}

async fn delete_stream(app: &TestApp) {
    let client = async_nats::connect(colloquy_testkit::nats_url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let _ = js.delete_stream(app.prefix.to_uppercase()).await;
}

#[tokio::test]
async fn events_reach_every_read_model_through_the_fan_out() {
    let app = spawn_app().await;
    app.wait_until_ready().await;
    let (store, commands) = writer(&app).await;
    let (id, last) = conversation_with_messages(&commands, 5).await;
    all_reach(&app, last).await;
    let pool = app.db.pool().await;
    let count: i32 =
        sqlx::query_scalar("SELECT message_count FROM rm_messages.conversations WHERE id = $1")
            .bind(id.as_uuid())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(count, 5);
    // The relay published every event once.
    let head = store.head().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while stream_messages(&app).await < u64::try_from(head).unwrap() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the stream holds the log");
    assert_eq!(stream_messages(&app).await, u64::try_from(head).unwrap());
    delete_stream(&app).await;
}

#[tokio::test]
async fn a_purged_stream_is_healed_from_the_log() {
    let app = spawn_app().await;
    app.wait_until_ready().await;
    let (store, commands) = writer(&app).await;
    let (_, first) = conversation_with_messages(&commands, 3).await;
    all_reach(&app, first).await;
    // Lose everything NATS held, then keep writing.
    let client = async_nats::connect(colloquy_testkit::nats_url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    js.get_stream(app.prefix.to_uppercase())
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    let (_, second) = conversation_with_messages(&commands, 3).await;
    all_reach(&app, second).await;
    let pool = app.db.pool().await;
    assert_read_models_equal_a_replay(&pool.clone().into(), &store).await;
    let conversations: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_messages.conversations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(conversations, 2);
    delete_stream(&app).await;
}

#[tokio::test]
async fn fan_out_resumes_after_nats_restarts_and_commands_never_stop() {
    let mut nats = colloquy_testkit::NatsServer::start().await;
    let url = nats.url();
    let app = crate::helpers::spawn_app_with(|s| s.nats_url = Some(url)).await;
    app.wait_until_ready().await;
    let (store, commands) = writer(&app).await;
    let (_, first) = conversation_with_messages(&commands, 2).await;
    all_reach(&app, first).await;
    nats.kill();
    // The log is the source of truth: commands are accepted while NATS is down.
    let (_, during) = conversation_with_messages(&commands, 2).await;
    nats.restart().await;
    let (_, after) = conversation_with_messages(&commands, 2).await;
    assert!(after > during);
    all_reach(&app, after).await;
    let pool = app.db.pool().await;
    assert_read_models_equal_a_replay(&pool.clone().into(), &store).await;
    // The relay caught the stream up too, each event once.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let head = u64::try_from(store.head().await.unwrap()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(mut stream) = js.get_stream(app.prefix.to_uppercase()).await
                && let Ok(info) = stream.info().await
                && info.state.messages >= head
            {
                return info.state.messages;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .map(|messages| assert_eq!(messages, head))
    .expect("the relay republishes what NATS missed");
}
