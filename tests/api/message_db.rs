//! Message DB compatibility across languages: what the Rust API writes, a real
//! Message DB client (message-db-py, installed by scripts/test) reads, and the other
//! way round. The Python side connects as Message DB's `message_store` role.

use std::process::Command;
use std::sync::Arc;

use colloquy_commands::cache::CacheConfig;
use colloquy_commands::{Commands, Context};
use colloquy_domain::{ConversationCommand, ConversationId, MessageId, MessageText, Title, UserId};
use colloquy_eventstore::{EventStore, PgEventStore, PgOptions};
use colloquy_testkit::TestDatabase;
use serde_json::{Value, json};
use uuid::Uuid;

/// Runs a Python snippet with message-db-py connected to `url` as `message_store`;
/// the snippet prints one JSON document, which is returned.
fn python(url: &str, body: &str) -> Value {
    let script = format!(
        "import json, sys\nfrom message_db.client import MessageDB\nclient = MessageDB.from_url(sys.argv[1], max_connections=2)\n{body}\n"
    );
    let url = url.replacen("postgres@", "message_store@", 1);
    let output = Command::new("python3")
        .args(["-c", &script, &url])
        .output()
        .expect("python3 runs (scripts/test installs message-db-py)");
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the snippet prints JSON")
}

#[tokio::test]
async fn a_message_db_client_reads_what_colloquy_wrote_and_colloquy_reads_what_it_wrote() {
    let db = TestDatabase::new().await;
    let store: Arc<dyn EventStore> = Arc::new(PgEventStore::with_pool(
        db.pool().await,
        PgOptions::default(),
    ));
    let commands = Commands::new(Arc::clone(&store), CacheConfig::default());
    let owner = UserId::from_uuid(Uuid::new_v4());
    let id = ConversationId::from_uuid(Uuid::new_v4());
    let ctx = Context::new(owner);
    commands
        .conversation(
            id,
            ConversationCommand::Start {
                id,
                owner,
                title: Some(Title::parse("Polyglot".into()).unwrap()),
                system_prompt: None,
                model: None,
            },
            &ctx,
        )
        .await
        .unwrap();
    commands
        .conversation(
            id,
            ConversationCommand::SendMessage {
                message_id: MessageId::from_uuid(Uuid::new_v4()),
                by: owner,
                text: MessageText::parse("héllo <b>\"world\"</b> 🎉".into()).unwrap(),
            },
            &ctx,
        )
        .await
        .unwrap();

    // Python reads Colloquy's stream and category.
    let stream = id.stream_name();
    let read = python(
        &db.url,
        &format!(
            "s = client.read_stream('{stream}')\nc = client.read_category('conversation')\nprint(json.dumps({{'stream': [[m['type'], m['position'], m['data']] for m in s], 'category': len(c)}}))"
        ),
    );
    assert_eq!(read["stream"][0][0], "ConversationStarted");
    assert_eq!(read["stream"][1][0], "MessageSent");
    assert_eq!(read["stream"][1][1], 1);
    assert_eq!(read["stream"][1][2]["text"], "héllo <b>\"world\"</b> 🎉");
    assert_eq!(read["category"], 2);

    // Python appends to the same stream with an expected version, and a wrong one.
    let message_id = Uuid::new_v4();
    let data = json!({"messageId": message_id, "author": "user", "authorId": owner.to_string(), "text": "from python"});
    let wrote = python(
        &db.url,
        &format!(
            "ok = client.write('{stream}', 'MessageSent', {data}, {{'schemaVersion': 2, 'userId': '{owner}'}}, expected_version=1)\ntry:\n    client.write('{stream}', 'MessageSent', {data}, None, expected_version=0)\n    wrong = None\nexcept Exception as e:\n    wrong = str(e)\nprint(json.dumps({{'position': ok, 'wrong': wrong}}))",
            data = data.to_string().replace("null", "None"),
        ),
    );
    assert_eq!(wrote["position"], 2);
    assert!(
        wrote["wrong"]
            .as_str()
            .is_some_and(|e| e.contains("Wrong expected version")),
        "{wrote}"
    );

    // The Rust API reads what Python wrote: the raw event, and the domain's view.
    let events = store.read_stream(&stream, 2, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].data["text"], "from python");
    let fresh = Commands::new(Arc::clone(&store), CacheConfig::default());
    let loaded = fresh.load_conversation(id).await.unwrap();
    assert_eq!(loaded.version, 2);
    assert!(
        loaded
            .state
            .unwrap()
            .message(MessageId::from_uuid(message_id))
            .is_some()
    );
}
