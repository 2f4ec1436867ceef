//! `colloquy bench replay | lag | relay`: the read side's figures.
//!
//! - **replay**: generates a realistic log of `--events` events (conversations with
//!   messages, edits, deletions, renames and agent runs) in a scratch database, then
//!   times rebuilding each read model from it (`projections::replay::rebuild`).
//! - **lag**: a relay and the `messages` projector following JetStream, while one task
//!   appends single events at `--rate` per second; for each event, the time from the
//!   append's commit to the read model's checkpoint passing it.
//! - **relay**: `--events` already in the log, then one relay publishes them all;
//!   events per second until the stream holds every one.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use colloquy_commands::relay::{Relay, RelayConfig, ensure_stream};
use colloquy_domain::conversation::{
    Author, ConversationRenamed, ConversationStarted, MessageDeleted, MessageEdited, MessageSent,
    RunClosed, RunOpened, RunOutcome,
};
use colloquy_domain::run::{RunCompleted, RunRequested, RunStarted, Usage};
use colloquy_domain::{
    ConversationEvent, ConversationId, DomainEvent, MessageId, RunEvent, RunId, UserId,
};
use colloquy_eventstore::{
    EventStore, ExpectedVersion, NewEvent, PgEventStore, PgOptions, StreamAppend,
};
use colloquy_projections::jetstream::FanOut;
use colloquy_projections::{Runner, all_projections, by_name, replay};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::report::{self, Latency, Machine, Row};
use super::scratch::ScratchDb;

/// Arguments of `colloquy bench replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Events in the generated log.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Postgres server to create the scratch database on (default: DATABASE_URL).
    #[arg(long)]
    pub database_url: Option<String>,
}

/// Arguments of `colloquy bench lag`.
#[derive(Debug, Clone, clap::Args)]
pub struct LagArgs {
    /// Appends per second.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u32,
    /// How long to append.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The Postgres server to use (default: DATABASE_URL). A scratch database is
    /// created on it and dropped at the end.
    #[arg(long)]
    pub database_url: Option<String>,
    /// NATS server with JetStream (default: NATS_URL).
    #[arg(long)]
    pub nats_url: Option<String>,
}

/// Arguments of `colloquy bench relay`.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// Events to publish.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The Postgres server to use (default: DATABASE_URL). A scratch database is
    /// created on it and dropped at the end.
    #[arg(long)]
    pub database_url: Option<String>,
    /// NATS server with JetStream (default: NATS_URL).
    #[arg(long)]
    pub nats_url: Option<String>,
}

fn row(
    key: &'static str,
    name: String,
    events: u64,
    seconds: f64,
    latency: Latency,
    latency_of: &'static str,
) -> Row {
    #[expect(clippy::cast_precision_loss, reason = "rates for humans")]
    let events_per_sec = events as f64 / seconds.max(1e-9);
    Row {
        key,
        name,
        events,
        seconds,
        events_per_sec,
        latency_of,
        latency,
        ratio_to_raw: None,
        errors: 0,
        first_error: None,
        details: json!({}),
        notes: String::new(),
    }
}

fn print(rows: &[Row], machine: &Machine, json: bool, title: &str) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"machine": machine, "scenarios": rows}))?
        );
    } else {
        println!("{title}\n{}\n\n{}", machine.summary(), report::table(rows));
    }
    Ok(())
}

/// Appends a realistic log of about `events` events in large multi-stream batches.
async fn generate(store: &PgEventStore, events: u64) -> anyhow::Result<u64> {
    let mut rng = StdRng::seed_from_u64(42);
    let mut written = 0_u64;
    let meta = |v: u32| json!({"schemaVersion": v});
    let encode = |e: &dyn Fn() -> (String, serde_json::Value, u32)| {
        let (t, d, v) = e();
        NewEvent::new(Uuid::new_v4(), t, d).with_metadata(meta(v))
    };
    while written < events {
        // One batch: 20 conversations of about 100 events each.
        let mut appends = Vec::new();
        for _ in 0..20 {
            let id = ConversationId::from_uuid(Uuid::new_v4());
            let owner = UserId::from_uuid(Uuid::new_v4());
            let mut conv: Vec<NewEvent> = Vec::new();
            let mut runs: Vec<StreamAppend> = Vec::new();
            let c = |e: ConversationEvent| {
                encode(&|| (e.event_type().to_owned(), e.to_data(), e.schema_version()))
            };
            conv.push(c(ConversationStarted {
                conversation_id: id,
                owner,
                title: Some(format!("Conversation {written}")),
                system_prompt: None,
                model: None,
                redacted: false,
            }
            .into()));
            let mut messages = Vec::new();
            for n in 0..30 {
                let message = MessageId::from_uuid(Uuid::new_v4());
                messages.push(message);
                let words = rng.random_range(5..60);
                let text: String = (0..words)
                    .map(|i| {
                        [
                            "fox", "dog", "quick", "lazy", "river", "tea", "plan", "idea",
                        ][(i + n) % 8]
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                conv.push(c(MessageSent {
                    message_id: message,
                    author: Author::User,
                    author_id: Some(owner),
                    text,
                    reply_to: None,
                    run_id: None,
                    redacted: false,
                }
                .into()));
                if rng.random_bool(0.1) {
                    conv.push(c(MessageEdited {
                        message_id: message,
                        text: "edited text about tea".into(),
                        redacted: false,
                    }
                    .into()));
                }
                if rng.random_bool(0.2) {
                    let run = RunId::from_uuid(Uuid::new_v4());
                    let reply = MessageId::from_uuid(Uuid::new_v4());
                    conv.push(c(RunOpened {
                        run_id: run,
                        prompt_message_id: message,
                    }
                    .into()));
                    let r = |e: RunEvent| {
                        encode(&|| (e.event_type().to_owned(), e.to_data(), e.schema_version()))
                    };
                    runs.push(StreamAppend::new(
                        run.stream_name(),
                        ExpectedVersion::NoStream,
                        vec![
                            r(RunRequested {
                                run_id: run,
                                conversation_id: id,
                                prompt_message_id: message,
                                model: None,
                                instructions: None,
                                requested_by: owner,
                                redacted: false,
                            }
                            .into()),
                            r(RunStarted {
                                attempt: 1,
                                key_label: "main".into(),
                            }
                            .into()),
                            r(RunCompleted {
                                attempt: 1,
                                reply_message_id: reply,
                                finish_reason: "STOP".into(),
                                usage: Usage {
                                    prompt_tokens: 100,
                                    candidates_tokens: 50,
                                    total_tokens: 150,
                                    thoughts_tokens: None,
                                },
                            }
                            .into()),
                        ],
                    ));
                    conv.push(c(MessageSent {
                        message_id: reply,
                        author: Author::Assistant,
                        author_id: None,
                        text: "a helpful answer about the river".into(),
                        reply_to: Some(message),
                        run_id: Some(run),
                        redacted: false,
                    }
                    .into()));
                    conv.push(c(RunClosed {
                        run_id: run,
                        outcome: RunOutcome::Succeeded,
                    }
                    .into()));
                }
            }
            conv.push(c(MessageDeleted {
                message_id: messages[3],
            }
            .into()));
            conv.push(c(ConversationRenamed {
                title: "Renamed".into(),
                redacted: false,
            }
            .into()));
            written += conv.len() as u64 + runs.iter().map(|a| a.events.len() as u64).sum::<u64>();
            appends.push(StreamAppend::new(
                id.stream_name(),
                ExpectedVersion::NoStream,
                conv,
            ));
            appends.extend(runs);
        }
        store.append(appends).await?;
    }
    Ok(written)
}

fn store_options() -> PgOptions {
    let mut options = PgOptions::default();
    options.batch.max_events = 10_000;
    options
}

/// `colloquy bench replay`.
pub async fn replay(url: &str, args: &ReplayArgs) -> anyhow::Result<()> {
    let scratch = ScratchDb::create(url).await?;
    let result = async {
        let pool = scratch.pool(8).await?;
        let store = PgEventStore::with_pool(pool.clone(), store_options());
        let started = Instant::now();
        let events = generate(&store, args.events).await?;
        if !args.json {
            eprintln!("· generated {events} events in {:.1?}", started.elapsed());
        }
        let machine = Machine::probe(&pool).await;
        let store: Arc<dyn EventStore> = Arc::new(store);
        let mut rows = Vec::new();
        for projection in all_projections() {
            let started = Instant::now();
            replay::rebuild(
                &pool.clone().into(),
                &store,
                projection.as_ref(),
                &|_, _| {},
            )
            .await?;
            let seconds = started.elapsed().as_secs_f64();
            rows.push(row(
                "replay",
                format!("rebuild {}", projection.name()),
                events,
                seconds,
                Latency::default(),
                "rebuild",
            ));
        }
        print(
            &rows,
            &machine,
            args.json,
            &format!("colloquy bench replay: {events} events"),
        )
    }
    .await;
    scratch.drop_database().await.ok();
    result
}

async fn nats(
    flag: Option<&str>,
    settings: &crate::config::Settings,
) -> anyhow::Result<async_nats::Client> {
    let url = flag
        .map(str::to_owned)
        .or_else(|| settings.nats_url.clone())
        .context("this benchmark needs NATS: set NATS_URL or pass --nats-url")?;
    async_nats::connect(url.as_str())
        .await
        .context("Failed to connect to NATS")
}

/// `colloquy bench relay`.
pub async fn relay(
    url: &str,
    settings: &crate::config::Settings,
    args: &RelayArgs,
) -> anyhow::Result<()> {
    let client = nats(args.nats_url.as_deref(), settings).await?;
    let js = async_nats::jetstream::new(client);
    let scratch = ScratchDb::create(url).await?;
    let name = format!("BENCH_{}", &Uuid::new_v4().simple().to_string()[..8]).to_uppercase();
    let result = async {
        let pool = scratch.pool(8).await?;
        let store = PgEventStore::with_pool(pool.clone(), store_options());
        let events = generate(&store, args.events).await?;
        let machine = Machine::probe(&pool).await;
        let config = RelayConfig::new(name.to_lowercase(), name.clone());
        ensure_stream(&js, &config).await?;
        let shutdown = CancellationToken::new();
        let relay = Relay::new(store.clone(), js.clone(), config);
        let started = Instant::now();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        let mut stream = js.get_stream(&name).await?;
        loop {
            if stream.info().await?.state.messages >= events {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "the relay did not finish in 10 minutes"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        shutdown.cancel();
        let _ = task.await;
        let rows = vec![row(
            "relay",
            "relay publishes the log".into(),
            events,
            seconds,
            Latency::default(),
            "-",
        )];
        print(
            &rows,
            &machine,
            args.json,
            &format!("colloquy bench relay: {events} events"),
        )
    }
    .await;
    let _ = js.delete_stream(&name).await;
    scratch.drop_database().await.ok();
    result
}

/// `colloquy bench lag`.
pub async fn lag(
    url: &str,
    settings: &crate::config::Settings,
    args: &LagArgs,
) -> anyhow::Result<()> {
    let client = nats(args.nats_url.as_deref(), settings).await?;
    let js = async_nats::jetstream::new(client);
    let scratch = ScratchDb::create(url).await?;
    let name = format!("BENCH_{}", &Uuid::new_v4().simple().to_string()[..8]).to_uppercase();
    let result = async {
        let pool = scratch.pool(12).await?;
        let store = PgEventStore::with_pool(pool.clone(), PgOptions::default());
        let machine = Machine::probe(&pool).await;
        let prefix = name.to_lowercase();
        let config = RelayConfig::new(prefix.clone(), name.clone());
        ensure_stream(&js, &config).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(Relay::new(store.clone(), js.clone(), config).run(shutdown.clone()));
        let shared: Arc<dyn EventStore> = Arc::new(store.clone());
        let runner = Runner::new(
            pool.clone().into(),
            Arc::clone(&shared),
            by_name("messages").expect("BUG: messages exists"),
        );
        let mut checkpoint = runner.watch();
        {
            let runner = runner.clone();
            let fan_out = FanOut {
                jetstream: js.clone(),
                stream: name.clone(),
                prefix,
            };
            let shutdown = shutdown.clone();
            tokio::spawn(async move { runner.follow_jetstream(fan_out, shutdown).await });
        }
        // Appends at a fixed rate; each (position, committed at) goes to the watcher.
        let (sent, mut pending) = tokio::sync::mpsc::unbounded_channel::<(i64, Instant)>();
        let total = (f64::from(args.rate) * args.duration.as_secs_f64()) as u64;
        let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
        let appender = {
            let store = store.clone();
            tokio::spawn(async move {
                let conversation = ConversationId::from_uuid(Uuid::new_v4());
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut tasks = Vec::new();
                for n in 0..total {
                    ticker.tick().await;
                    let store = store.clone();
                    let sent = sent.clone();
                    tasks.push(tokio::spawn(async move {
                        let started = ConversationStarted {
                            conversation_id: conversation,
                            owner: UserId::from_uuid(Uuid::nil()),
                            title: None,
                            system_prompt: None,
                            model: None,
                            redacted: false,
                        };
                        let event: ConversationEvent = if n == 0 {
                            started.into()
                        } else {
                            MessageSent {
                                message_id: MessageId::from_uuid(Uuid::new_v4()),
                                author: Author::User,
                                author_id: None,
                                text: format!("message {n}"),
                                reply_to: None,
                                run_id: None,
                                redacted: false,
                            }
                            .into()
                        };
                        let outcome = store
                            .append(vec![StreamAppend::new(
                                format!("conversation-{}", Uuid::new_v4()),
                                ExpectedVersion::Any,
                                vec![
                                    NewEvent::new(
                                        Uuid::new_v4(),
                                        event.event_type(),
                                        event.to_data(),
                                    )
                                    .with_metadata(
                                        json!({"schemaVersion": event.schema_version()}),
                                    ),
                                ],
                            )])
                            .await;
                        if let Ok(outcome) = outcome {
                            let _ = sent.send((outcome.last_position, Instant::now()));
                        }
                    }));
                }
                for task in tasks {
                    let _ = task.await;
                }
            })
        };
        let mut histogram = report::histogram();
        let mut waiting: VecDeque<(i64, Instant)> = VecDeque::new();
        let mut seen = 0_u64;
        let started = Instant::now();
        let deadline = started + args.duration + Duration::from_secs(60);
        while seen < total && Instant::now() < deadline {
            tokio::select! {
                Some(item) = pending.recv() => {
                    // Commits may report out of order; keep the queue sorted by position.
                    let at = waiting.partition_point(|(p, _)| *p < item.0);
                    waiting.insert(at, item);
                }
                changed = checkpoint.changed() => {
                    if changed.is_err() { break; }
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            let reached = *checkpoint.borrow();
            while waiting.front().is_some_and(|(p, _)| *p <= reached) {
                let (_, at) = waiting.pop_front().expect("BUG: front exists");
                report::record(&mut histogram, at.elapsed());
                seen += 1;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        shutdown.cancel();
        let _ = appender.await;
        let rows = vec![row(
            "lag",
            format!("append → visible in messages at {}/s", args.rate),
            seen,
            seconds,
            Latency::of(&histogram),
            "event",
        )];
        print(
            &rows,
            &machine,
            args.json,
            &format!(
                "colloquy bench lag: {} events/s for {}",
                args.rate,
                humantime::format_duration(args.duration)
            ),
        )
    }
    .await;
    let _ = js.delete_stream(&name).await;
    scratch.drop_database().await.ok();
    result
}
