//! `colloquy bench append`: what appending costs, against what Postgres can do at all.
//!
//! One run, one scratch database, these scenarios:
//!
//! 1. **distinct streams**: `--writers` tasks, each appending one event per append to
//!    a new stream (`ExpectedVersion::NoStream`) through [`PgEventStore::append`]
//!    (group commit under the commit-ordering lock).
//! 2. **distinct, no gathering**: the same through a second store on the same pool
//!    whose group-commit writer takes each batch without first letting the callers it
//!    has just answered queue again (`BatchConfig::gather_yields` 0): what gathering
//!    brings, side by side.
//! 3. **contended streams**: as 1, to 4 shared streams with `ExpectedVersion::Any`.
//! 4. **raw ceiling**: the same number of connections, each doing one single-row
//!    autocommit INSERT into `bench_raw.messages`, a plain table with the columns and
//!    indexes of `message_store.messages` but no ordering lock and no triggers. The
//!    denominator of every write ratio.
//! 5. **Message DB write_message**: one `message_store.write_message` per transaction
//!    (it takes the same ordering lock).
//! 6. **read $all**: the whole log in pages of 1,000 through [`EventStore::read_log`].
//! 7. **load a conversation**: a 10,000-event conversation written with the domain
//!    crate, read in pages, decoded and folded.
//!
//! Scenarios 1–5 are warmed up, then run in rounds, interleaved (the order rotates
//! each round), so they share the machine's state. Group-commit batch sizes are read
//! back afterwards from the rows' inserting transaction ids (`xmin`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use colloquy_domain::conversation::{
    Author, ConversationRenamed, ConversationStarted, MessageDeleted, MessageEdited, MessageSent,
    RunClosed, RunOpened, RunOutcome,
};
use colloquy_domain::{
    Aggregate as _, Conversation, ConversationEvent, ConversationId, DomainEvent as _, MessageId,
    RunId, UserId,
};
use colloquy_eventstore::{
    EventStore as _, ExpectedVersion, LogFilter, NewEvent, PgEventStore, PgOptions, StreamAppend,
};
use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::Row as _;
use uuid::Uuid;

use super::report::{self, Latency, Machine, Row, Target};
use super::scratch::ScratchDb;

/// Arguments of `colloquy bench append`.
#[derive(Debug, Clone, clap::Args)]
pub struct AppendArgs {
    /// Concurrent writers (tasks for the store, connections for raw SQL).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub writers: u32,
    /// How long each write scenario is measured (split over the rounds).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, conflicts_with = "events")]
    pub duration: Duration,
    /// Measure each write scenario over this many events instead of a duration.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub events: Option<u64>,
    /// Serialised size of each event's data (a JSON object).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(16..=1_048_576))]
    pub payload_bytes: u64,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The Postgres server to use (default: DATABASE_URL). A scratch database is
    /// created on it and dropped at the end.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Warm-up per write scenario, before measuring.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Interleaved rounds the write scenarios are measured in.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Read `$all` over at least this many events (bulk appends fill up to it).
    #[arg(long, default_value_t = 100_000)]
    pub read_events: u64,
    /// The store's group-commit writer tasks (`BatchConfig::writers`; default: the
    /// store's default).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub batch_writers: Option<u32>,
    /// The store's group-commit gathering (`BatchConfig::gather_yields`; 0 turns it
    /// off; default: the store's default).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub batch_gather_yields: Option<u32>,
    /// Do not ANALYZE the tables after the warm-up and the bulk fill: measure a fresh
    /// database as it is before autovacuum has looked at it.
    #[arg(long)]
    pub skip_analyze: bool,
    /// Length of the conversation that is loaded.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(2..=1_000_000))]
    pub conversation_events: u64,
}

/// The JSON document `--json` prints.
#[derive(Debug, Serialize)]
struct Report {
    command: &'static str,
    scratch_database: String,
    settings: Value,
    machine: Machine,
    scenarios: Vec<Row>,
    targets: Vec<Target>,
    commit_anatomy: Anatomy,
}

/// Runs the benchmark in a scratch database on the server of `url`, and drops it.
pub async fn run(url: &str, args: &AppendArgs) -> anyhow::Result<()> {
    let scratch = ScratchDb::create(url).await?;
    progress(
        args,
        &format!("scratch database {} created", scratch.name()),
    );
    let result = tokio::select! {
        result = measure(&scratch, args) => result,
        signal = tokio::signal::ctrl_c() => {
            signal.context("Failed to listen for Ctrl-C")?;
            Err(anyhow::anyhow!("interrupted"))
        }
    };
    let name = scratch.name().to_owned();
    let dropped = scratch.drop_database().await;
    let report = result?;
    dropped?;
    progress(args, &format!("scratch database {name} dropped"));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report, args));
    }
    Ok(())
}

fn progress(args: &AppendArgs, message: &str) {
    if !args.json {
        eprintln!("· {message}");
    }
}

fn text(report: &Report, args: &AppendArgs) -> String {
    let measured = args.events.map_or_else(
        || {
            format!(
                "{} per write scenario",
                humantime::format_duration(args.duration)
            )
        },
        |n| format!("{} events per write scenario", report::thousands(n as f64)),
    );
    let defaults = colloquy_eventstore::batcher::BatchConfig::default();
    let batch_writers = args.batch_writers.map_or(defaults.writers, |w| w as usize);
    let gather_yields = args
        .batch_gather_yields
        .map_or(defaults.gather_yields, |y| y as usize);
    format!(
        "colloquy bench append: {} writers, {measured} in {} interleaved rounds, {}-byte payloads, {batch_writers} batch writer(s) gathering for up to {gather_yields} yields{}\n{}\n\n{}\ntargets:\n{}",
        args.writers,
        args.rounds,
        args.payload_bytes,
        if args.skip_analyze {
            ", no ANALYZE"
        } else {
            ""
        },
        report.machine.summary(),
        report::table(&report.scenarios),
        report::targets(&report.targets),
    ) + &report.commit_anatomy.text()
}

/// The write scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Distinct,
    /// Distinct streams through a second store whose writer does not gather
    /// (`gather_yields` 0): group commit's gathering, side by side with it.
    DistinctUngathered,
    Raw,
    WriteMessage,
    Contended,
}

impl Scenario {
    /// In the table's order; the raw ceiling is [`Scenario::RAW`].
    const ALL: [Scenario; 5] = [
        Scenario::Distinct,
        Scenario::DistinctUngathered,
        Scenario::Contended,
        Scenario::Raw,
        Scenario::WriteMessage,
    ];
    const RAW: usize = 3;

    /// The category the measured events go to (warm-up goes to `benchWarmup`).
    fn category(self) -> &'static str {
        match self {
            Scenario::Distinct => "benchDistinct",
            Scenario::DistinctUngathered => "benchUngathered",
            Scenario::Raw => "benchRaw",
            Scenario::WriteMessage => "benchMdb",
            Scenario::Contended => "benchContended",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Distinct => "distinct streams",
            Scenario::DistinctUngathered => "distinct, no gathering",
            Scenario::Raw => "raw INSERT ceiling",
            Scenario::WriteMessage => "Message DB write_message",
            Scenario::Contended => "contended streams (4)",
        }
    }
}

/// When writers stop.
#[derive(Debug, Clone)]
enum Stop {
    At(Instant),
    /// After this many operations in total.
    Count(Arc<AtomicI64>),
}

/// What a set of writers did.
#[derive(Debug)]
struct Measured {
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    histogram: Histogram<u64>,
}

impl Measured {
    fn empty() -> Self {
        Self {
            ops: 0,
            errors: 0,
            first_error: None,
            elapsed: Duration::ZERO,
            histogram: report::histogram(),
        }
    }

    fn merge(&mut self, other: Self) {
        self.ops += other.ops;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.elapsed += other.elapsed;
        self.histogram
            .add(&other.histogram)
            .expect("BUG: histograms with the same bounds add up");
    }

    fn per_sec(&self) -> f64 {
        per_sec(self.ops, self.elapsed)
    }
}

fn per_sec(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        count as f64 / elapsed.as_secs_f64()
    }
}

/// One operation of a writer: `(writer, sequence number)`; each call writes one event.
type Op = Arc<dyn Fn(u32, u64) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// Boxes an operation.
fn boxed_op<F, Fut>(f: F) -> Op
where
    F: Fn(u32, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    Arc::new(move |writer, seq| Box::pin(f(writer, seq)))
}

/// Runs `writers` tasks calling `op` until `stop`, timing every call.
async fn drive(writers: u32, stop: Stop, op: Op) -> Measured {
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|writer| {
            let op = Arc::clone(&op);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut measured = Measured::empty();
                for seq in 0_u64.. {
                    let go = match &stop {
                        Stop::At(deadline) => Instant::now() < *deadline,
                        Stop::Count(left) => left.fetch_sub(1, Ordering::Relaxed) > 0,
                    };
                    if !go {
                        break;
                    }
                    let t0 = Instant::now();
                    let result = op(writer, seq).await;
                    report::record(&mut measured.histogram, t0.elapsed());
                    match result {
                        Ok(()) => measured.ops += 1,
                        Err(error) => {
                            measured.errors += 1;
                            if measured.first_error.is_none() {
                                measured.first_error = Some(format!("{error:#}"));
                            }
                        }
                    }
                }
                measured
            })
        })
        .collect();
    let mut total = Measured::empty();
    for task in futures::future::join_all(tasks).await {
        match task {
            Ok(measured) => total.merge(measured),
            Err(error) => {
                total.errors += 1;
                total.first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    total.elapsed = started.elapsed();
    total
}

/// What the write scenarios share.
#[derive(Debug, Clone)]
struct Ctx {
    store: PgEventStore,
    /// The same store without gathering, for [`Scenario::DistinctUngathered`].
    ungathered: PgEventStore,
    /// `writers` connections for the raw-SQL scenarios.
    direct: PgPool,
    data: Value,
    metadata: Value,
}

impl Ctx {
    /// The operation of a scenario; `tag` makes its stream names unique per phase.
    fn op(&self, write: Scenario, category: &'static str, tag: String) -> Op {
        let ctx = self.clone();
        let tag: Arc<str> = tag.into();
        match write {
            Scenario::Distinct | Scenario::DistinctUngathered => boxed_op(move |writer, seq| {
                let store = if write == Scenario::Distinct {
                    ctx.store.clone()
                } else {
                    ctx.ungathered.clone()
                };
                let append = StreamAppend::new(
                    format!("{category}-{tag}w{writer}x{seq}"),
                    ExpectedVersion::NoStream,
                    vec![ctx.event()],
                );
                async move {
                    store.append(vec![append]).await?;
                    Ok::<(), anyhow::Error>(())
                }
            }),
            Scenario::Contended => boxed_op(move |writer, seq| {
                let store = ctx.store.clone();
                // Spread the writers over the 4 streams, each writer moving on every
                // append.
                let stream = (u64::from(writer) + seq) % 4;
                let append = StreamAppend::new(
                    format!("{category}-{tag}s{stream}"),
                    ExpectedVersion::Any,
                    vec![ctx.event()],
                );
                async move {
                    store.append(vec![append]).await?;
                    Ok::<(), anyhow::Error>(())
                }
            }),
            Scenario::Raw => boxed_op(move |writer, seq| {
                let pool = ctx.direct.clone();
                let stream = format!("{category}-{tag}w{writer}x{seq}");
                let data = ctx.data.clone();
                let metadata = ctx.metadata.clone();
                async move {
                    sqlx::query(
                        "INSERT INTO bench_raw.messages (id, stream_name, type, position, data, metadata)
                         VALUES ($1, $2, 'MessageSent', 0, $3, $4)
                         RETURNING global_position",
                    )
                    .bind(Uuid::new_v4())
                    .bind(stream)
                    .bind(data)
                    .bind(metadata)
                    .fetch_one(&pool)
                    .await?;
                    Ok::<(), anyhow::Error>(())
                }
            }),
            Scenario::WriteMessage => boxed_op(move |writer, seq| {
                let pool = ctx.direct.clone();
                let stream = format!("{category}-{tag}w{writer}x{seq}");
                let data = ctx.data.clone();
                let metadata = ctx.metadata.clone();
                async move {
                    sqlx::query(
                        "SELECT message_store.write_message($1, $2, 'MessageSent', $3, $4, -1)",
                    )
                    .bind(Uuid::new_v4().to_string())
                    .bind(stream)
                    .bind(data)
                    .bind(metadata)
                    .fetch_one(&pool)
                    .await?;
                    Ok::<(), anyhow::Error>(())
                }
            }),
        }
    }

    fn event(&self) -> NewEvent {
        NewEvent::new(Uuid::new_v4(), "MessageSent", self.data.clone())
            .with_metadata(self.metadata.clone())
    }
}

/// A JSON object of `{"text": "…"}` whose serialised size is `bytes`.
fn payload(bytes: u64) -> Value {
    let overhead = r#"{"text":""}"#.len();
    let len = usize::try_from(bytes)
        .unwrap_or(usize::MAX)
        .saturating_sub(overhead);
    let words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod ";
    let text: String = words.chars().cycle().take(len).collect();
    json!({ "text": text })
}

const RAW_TABLE: &str = "
CREATE SCHEMA bench_raw;
CREATE TABLE bench_raw.messages (
  global_position bigserial PRIMARY KEY,
  position bigint NOT NULL,
  time TIMESTAMP WITHOUT TIME ZONE DEFAULT (now() AT TIME ZONE 'utc') NOT NULL,
  stream_name text NOT NULL,
  type text NOT NULL,
  data jsonb,
  metadata jsonb,
  id UUID NOT NULL DEFAULT gen_random_uuid()
);
CREATE UNIQUE INDEX messages_id ON bench_raw.messages (id);
CREATE UNIQUE INDEX messages_stream ON bench_raw.messages (stream_name, position);
CREATE INDEX messages_category ON bench_raw.messages (
  message_store.category(stream_name),
  global_position,
  message_store.category(metadata->>'correlationStreamName')
);";

async fn measure(scratch: &ScratchDb, args: &AppendArgs) -> anyhow::Result<Report> {
    let admin = scratch.pool(1).await?;
    sqlx::raw_sql(RAW_TABLE)
        .execute(&admin)
        .await
        .context("Failed to create bench_raw.messages")?;
    let mut machine = Machine::probe(&admin).await;

    // The store as `PgEventStore::connect` builds it (16 connections, default batching).
    let store_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(scratch.options().clone())
        .await
        .context("Failed to connect to the scratch database")?;
    let mut options = PgOptions::default();
    if let Some(writers) = args.batch_writers {
        options.batch.writers = writers as usize;
    }
    if let Some(yields) = args.batch_gather_yields {
        options.batch.gather_yields = yields as usize;
    }
    let batch = format!("{:?}", options.batch);
    let mut without_gathering = options.clone();
    without_gathering.batch.gather_yields = 0;
    let store = PgEventStore::with_pool(store_pool.clone(), options);
    let ungathered = PgEventStore::with_pool(store_pool.clone(), without_gathering);
    let direct = scratch.pool(args.writers).await?;
    let ctx = Ctx {
        store: store.clone(),
        ungathered: ungathered.clone(),
        direct: direct.clone(),
        data: payload(args.payload_bytes),
        metadata: json!({ "schemaVersion": 1 }),
    };

    let result = scenarios(&ctx, &admin, args).await;

    drop(ctx);
    drop(store);
    drop(ungathered);
    // Let the store's notification listener see that it was stopped before its pool
    // closes (otherwise it may log a reconnect warning).
    tokio::time::sleep(Duration::from_millis(100)).await;
    for pool in [&store_pool, &direct, &admin] {
        // The store's notification listener lets go of its connection once the store
        // is dropped; dropping the database ends whatever is left anyway.
        let _ = tokio::time::timeout(Duration::from_secs(3), pool.close()).await;
    }
    machine.load_after = report::load_average();
    let (scenarios, targets, commit_anatomy) = result?;
    Ok(Report {
        command: "bench append",
        scratch_database: scratch.name().to_owned(),
        settings: json!({
            "writers": args.writers,
            "duration_s": args.events.is_none().then_some(args.duration.as_secs_f64()),
            "events": args.events,
            "payload_bytes": args.payload_bytes,
            "warmup_s": args.warmup.as_secs_f64(),
            "rounds": args.rounds,
            "read_events": args.read_events,
            "conversation_events": args.conversation_events,
            "store_pool_connections": 16,
            "analyzed_after_warmup_and_bulk": !args.skip_analyze,
            "batch": batch,
        }),
        machine,
        scenarios,
        targets,
        commit_anatomy,
    })
}

async fn scenarios(
    ctx: &Ctx,
    admin: &PgPool,
    args: &AppendArgs,
) -> anyhow::Result<(Vec<Row>, Vec<Target>, Anatomy)> {
    // Warm-up: connections, prepared statements, caches, the batcher.
    for write in Scenario::ALL {
        progress(args, &format!("warming up: {}", write.name()));
        let op = ctx.op(write, "benchWarmup", write.category().to_owned());
        let warm = drive(args.writers, Stop::At(Instant::now() + args.warmup), op).await;
        if warm.ops == 0 {
            anyhow::bail!(
                "{} failed while warming up: {}",
                write.name(),
                warm.first_error.unwrap_or_default()
            );
        }
    }

    // A store that has been running has table statistics (autovacuum analyzes as the
    // log grows). A fresh database has none, and plans cached while the log was empty
    // (a sequential scan for the id lookup of every batch) would be measured instead:
    // see docs/PERFORMANCE.md.
    if !args.skip_analyze {
        analyze(admin).await?;
    }

    progress(args, "timing the steps of one append");
    let anatomy = anatomy(&ctx.direct, &ctx.data, &ctx.metadata).await?;

    let mut results: Vec<Measured> = Scenario::ALL.iter().map(|_| Measured::empty()).collect();
    for round in 0..args.rounds {
        progress(args, &format!("round {}/{}", round + 1, args.rounds));
        for i in 0..Scenario::ALL.len() {
            let index = (i + round as usize) % Scenario::ALL.len();
            let write = Scenario::ALL[index];
            let stop = match args.events {
                Some(n) => {
                    let share = n / u64::from(args.rounds)
                        + u64::from(round + 1 == args.rounds) * (n % u64::from(args.rounds));
                    Stop::Count(Arc::new(AtomicI64::new(
                        i64::try_from(share).unwrap_or(i64::MAX),
                    )))
                }
                None => Stop::At(Instant::now() + args.duration / args.rounds),
            };
            let op = ctx.op(write, write.category(), format!("r{round}"));
            let measured = drive(args.writers, stop, op).await;
            results[index].merge(measured);
        }
    }

    let raw_rate = results[Scenario::RAW].per_sec();
    let mut rows = Vec::new();
    for (write, measured) in Scenario::ALL.into_iter().zip(results) {
        let mut details = serde_json::Map::new();
        let mut notes = Vec::new();
        match write {
            Scenario::Distinct | Scenario::DistinctUngathered | Scenario::Contended => {
                let batches = batch_sizes(admin, write.category(), measured.elapsed).await?;
                notes.push(format!(
                    "{:.1} appends/commit (p50 {}, max {}), {} commits/s",
                    batches.mean,
                    batches.p50,
                    batches.max,
                    report::thousands(batches.per_sec)
                ));
                details.insert("group_commit".to_owned(), serde_json::to_value(&batches)?);
                if write == Scenario::Contended {
                    notes.push("expected version Any: 0 conflicts".to_owned());
                    details.insert("conflicts".to_owned(), json!(0));
                }
            }
            Scenario::Raw => notes.push("1 row per transaction, no lock".to_owned()),
            Scenario::WriteMessage => notes.push("1 call per transaction".to_owned()),
        }
        if measured.errors > 0 {
            notes.push(format!("{} errors", measured.errors));
        }
        let latency_of = match write {
            Scenario::Distinct | Scenario::DistinctUngathered | Scenario::Contended => {
                "append (1 event)"
            }
            Scenario::Raw => "INSERT",
            Scenario::WriteMessage => "write_message",
        };
        rows.push(Row {
            key: match write {
                Scenario::Distinct => "distinct_streams",
                Scenario::DistinctUngathered => "distinct_streams_no_gathering",
                Scenario::Raw => "raw_ceiling",
                Scenario::WriteMessage => "write_message",
                Scenario::Contended => "contended_streams",
            },
            name: write.name().to_owned(),
            events: measured.ops,
            seconds: measured.elapsed.as_secs_f64(),
            events_per_sec: measured.per_sec(),
            latency_of,
            latency: Latency::of(&measured.histogram),
            ratio_to_raw: (raw_rate > 0.0).then(|| measured.per_sec() / raw_rate),
            errors: measured.errors,
            first_error: measured.first_error,
            details: Value::Object(details),
            notes: notes.join("; "),
        });
    }
    let bulk = bulk_fill(&ctx.store, args).await?;
    rows.push(bulk);
    if !args.skip_analyze {
        analyze(admin).await?;
    }
    rows.push(read_all(&ctx.store, args).await?);
    rows.push(load_conversation(&ctx.store, args).await?);

    let find = |key: &str| rows.iter().find(|r| r.key == key);
    let mut targets = Vec::new();
    if let Some(distinct) = find("distinct_streams") {
        let ratio = distinct.ratio_to_raw.unwrap_or(0.0);
        targets.push(Target {
            name: "distinct streams ÷ raw ceiling".to_owned(),
            value: ratio,
            unit: "×",
            target: "≥ 1.00".to_owned(),
            met: ratio >= 1.0,
        });
        targets.push(Target {
            name: format!("distinct streams p99 at {} writers", args.writers),
            value: distinct.latency.p99_ms,
            unit: "ms",
            target: "≤ 5 ms at 16 writers".to_owned(),
            met: distinct.latency.p99_ms <= 5.0,
        });
    }
    if let Some(read) = find("read_all") {
        targets.push(Target {
            name: "read $all".to_owned(),
            value: read.events_per_sec,
            unit: "events/s",
            target: "≥ 100,000 events/s".to_owned(),
            met: read.events_per_sec >= 100_000.0,
        });
    }
    Ok((rows, targets, anatomy))
}

/// One append alone: the statement `PgEventStore`'s batch writer sends for a
/// one-event batch whose state is as expected (eventstore/src/postgres.rs,
/// `write_batch`), timed on an idle lock, next to one autocommit INSERT into the raw
/// table.
#[derive(Debug, Serialize)]
struct Anatomy {
    samples: u32,
    /// `message_store.write_batch` in autocommit: lock, check, insert, commit.
    write_batch: Latency,
    raw_autocommit_insert: Latency,
}

impl Anatomy {
    fn text(&self) -> String {
        let step = |name: &str, l: &Latency| format!("{name} {:.2}/{:.2}", l.p50_ms, l.p99_ms);
        format!(
            "\none append alone (the statement of eventstore's write_batch, sequential, {} samples; p50/p99 ms):\n  {}\n  {}\n",
            self.samples,
            step(
                "write_batch (lock, check, insert, commit)",
                &self.write_batch
            ),
            step("raw autocommit INSERT", &self.raw_autocommit_insert),
        )
    }
}

async fn anatomy(pool: &PgPool, data: &Value, metadata: &Value) -> anyhow::Result<Anatomy> {
    const SAMPLES: u32 = 200;
    let mut conn = pool.acquire().await?;
    let mut steps: [Histogram<u64>; 2] = std::array::from_fn(|_| report::histogram());
    for n in 0..SAMPLES {
        let id = Uuid::new_v4();
        let stream = format!("benchProbe-{n}");
        let t0 = Instant::now();
        let rows = sqlx::query(
            "SELECT kind, event_id, event_stream_name, event_type, event_data,
                    event_global_position, event_position
               FROM message_store.write_batch($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(vec![id])
        .bind(vec![stream.as_str()])
        .bind(vec!["MessageSent"])
        .bind(vec![0_i64])
        .bind(vec![data])
        .bind(vec![Some(metadata)])
        .bind(vec![stream.as_str()])
        .bind(vec![-1_i64])
        .bind(vec![id])
        .fetch_all(&mut *conn)
        .await?;
        anyhow::ensure!(
            rows.len() == 1 && rows[0].try_get::<&str, _>("kind")? == "written",
            "message_store.write_batch did not write the probe"
        );
        let t1 = Instant::now();
        sqlx::query(
            "INSERT INTO bench_raw.messages (id, stream_name, type, position, data, metadata)
             VALUES ($1, $2, 'MessageSent', 0, $3, $4)
             RETURNING global_position",
        )
        .bind(Uuid::new_v4())
        .bind(&stream)
        .bind(data)
        .bind(metadata)
        .fetch_one(&mut *conn)
        .await?;
        let t2 = Instant::now();
        for (h, d) in steps.iter_mut().zip([t1 - t0, t2 - t1]) {
            report::record(h, d);
        }
    }
    let [write_batch, raw] = steps.map(|h| Latency::of(&h));
    Ok(Anatomy {
        samples: SAMPLES,
        write_batch,
        raw_autocommit_insert: raw,
    })
}

/// Updates the planner's statistics of the log and the raw table (which invalidates
/// plans cached on pooled connections).
async fn analyze(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql("ANALYZE message_store.messages; ANALYZE bench_raw.messages;")
        .execute(pool)
        .await
        .context("Failed to analyze the scratch tables")?;
    Ok(())
}

/// Group-commit batch sizes of a category, read back from the rows' inserting
/// transactions (`xmin`): every batch is one transaction.
#[derive(Debug, Serialize)]
struct Batches {
    commits: u64,
    events: u64,
    mean: f64,
    p50: u64,
    p90: u64,
    max: u64,
    /// Commits per second of measuring.
    per_sec: f64,
}

async fn batch_sizes(pool: &PgPool, category: &str, elapsed: Duration) -> anyhow::Result<Batches> {
    let rows = sqlx::query(
        "SELECT count(*) AS n FROM message_store.messages
          WHERE message_store.category(stream_name) = $1
          GROUP BY xmin::text::bigint",
    )
    .bind(category)
    .fetch_all(pool)
    .await
    .context("Failed to read batch sizes")?;
    let mut sizes: Vec<u64> = rows
        .iter()
        .map(|r| r.try_get::<i64, _>("n").map(i64::unsigned_abs))
        .collect::<Result<_, _>>()?;
    sizes.sort_unstable();
    let commits = sizes.len() as u64;
    let events: u64 = sizes.iter().sum();
    let at = |q: f64| {
        sizes
            .get(((sizes.len() as f64 * q) as usize).min(sizes.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Ok(Batches {
        commits,
        events,
        mean: if commits == 0 {
            0.0
        } else {
            events as f64 / commits as f64
        },
        p50: at(0.5),
        p90: at(0.9),
        max: sizes.last().copied().unwrap_or(0),
        per_sec: per_sec(commits, elapsed),
    })
}

/// Appends in bulk (1,000 events per append, 10 new streams of 100) until the log
/// holds `--read-events`, and at least 20,000 events so that the row is always there.
async fn bulk_fill(store: &PgEventStore, args: &AppendArgs) -> anyhow::Result<Row> {
    const PER_APPEND: u64 = 1_000;
    const TASKS: u32 = 4;
    let head = u64::try_from(store.head().await?).unwrap_or(0);
    let wanted = args.read_events.saturating_sub(head).max(20_000);
    let appends = wanted.div_ceil(PER_APPEND);
    progress(
        args,
        &format!(
            "bulk append: {} events in {appends} appends of {PER_APPEND}",
            report::thousands((appends * PER_APPEND) as f64)
        ),
    );
    let data = payload(args.payload_bytes);
    let op: Op = {
        let store = store.clone();
        boxed_op(move |writer, seq| {
            let store = store.clone();
            let appends: Vec<StreamAppend> = (0..10)
                .map(|s| {
                    StreamAppend::new(
                        format!("benchBulk-w{writer}x{seq}s{s}"),
                        ExpectedVersion::NoStream,
                        (0..PER_APPEND / 10)
                            .map(|_| {
                                NewEvent::new(Uuid::new_v4(), "MessageSent", data.clone())
                                    .with_metadata(json!({ "schemaVersion": 1 }))
                            })
                            .collect(),
                    )
                })
                .collect();
            async move {
                store.append(appends).await?;
                Ok::<(), anyhow::Error>(())
            }
        })
    };
    let left = Arc::new(AtomicI64::new(i64::try_from(appends).unwrap_or(i64::MAX)));
    let measured = drive(TASKS, Stop::Count(left), op).await;
    let events = measured.ops * PER_APPEND;
    Ok(Row {
        key: "bulk_append",
        name: "bulk append (fill for $all)".to_owned(),
        events,
        seconds: measured.elapsed.as_secs_f64(),
        events_per_sec: per_sec(events, measured.elapsed),
        latency_of: "1000-event append",
        latency: Latency::of(&measured.histogram),
        ratio_to_raw: None,
        errors: measured.errors,
        first_error: measured.first_error,
        details: json!({ "tasks": TASKS, "events_per_append": PER_APPEND, "streams_per_append": 10 }),
        notes: format!("{TASKS} tasks, 10 streams × 100 events per append"),
    })
}

/// Reads the whole log from 0 in pages of 1,000, three times; reports the median pass.
async fn read_all(store: &PgEventStore, args: &AppendArgs) -> anyhow::Result<Row> {
    const PAGE: usize = 1_000;
    const PASSES: usize = 3;
    progress(args, "reading $all");
    let mut histogram = report::histogram();
    let mut passes = Vec::with_capacity(PASSES);
    for _ in 0..PASSES {
        let started = Instant::now();
        let mut after = 0;
        let mut events = 0_u64;
        loop {
            let t0 = Instant::now();
            let page = store.read_log(&LogFilter::All, after, PAGE).await?;
            report::record(&mut histogram, t0.elapsed());
            let Some(last) = page.last() else { break };
            after = last.global_position;
            events += page.len() as u64;
            if page.len() < PAGE {
                break;
            }
        }
        passes.push((events, started.elapsed()));
    }
    passes.sort_by(|a, b| per_sec(a.0, a.1).total_cmp(&per_sec(b.0, b.1)));
    let (events, elapsed) = passes[PASSES / 2];
    Ok(Row {
        key: "read_all",
        name: "read $all".to_owned(),
        events,
        seconds: elapsed.as_secs_f64(),
        events_per_sec: per_sec(events, elapsed),
        latency_of: "1000-event page",
        latency: Latency::of(&histogram),
        ratio_to_raw: None,
        errors: 0,
        first_error: None,
        details: json!({
            "passes": PASSES,
            "page": PAGE,
            "pass_events_per_sec": passes.iter().map(|(n, d)| per_sec(*n, *d)).collect::<Vec<_>>(),
        }),
        notes: format!("median of {PASSES} full passes, from position 0"),
    })
}

/// A realistic conversation: mostly user messages and agent runs (RunOpened, the
/// assistant's reply, RunClosed), some edits and deletions, the odd rename.
fn conversation(events: usize, seed: u64) -> (ConversationId, Vec<ConversationEvent>) {
    const WORDS: &[&str] = &[
        "the",
        "agent",
        "should",
        "answer",
        "with",
        "a",
        "short",
        "summary",
        "of",
        "what",
        "we",
        "discussed",
        "yesterday",
        "about",
        "deploying",
        "Postgres",
        "and",
        "NATS",
        "cluster",
        "please",
        "include",
        "numbers",
        "latency",
        "throughput",
        "é",
        "naïve",
        "😀",
        "\"quoted\"",
        "line\nbreak",
        "plan",
        "for",
        "next",
        "week",
    ];
    fn text(rng: &mut StdRng, min: usize, max: usize) -> String {
        let n = rng.random_range(min..=max);
        let mut s = String::new();
        for i in 0..n {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        }
        s
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let id = ConversationId::from_uuid(Uuid::new_v4());
    let owner = UserId::from_uuid(Uuid::new_v4());
    let mut out: Vec<ConversationEvent> = vec![
        ConversationStarted {
            conversation_id: id,
            owner,
            title: Some("Bench conversation".to_owned()),
            system_prompt: Some("You are a helpful assistant.".to_owned()),
            model: Some("gemini-2.5-flash".to_owned()),
            redacted: false,
        }
        .into(),
    ];
    let mut user_messages: Vec<MessageId> = Vec::new();
    while out.len() < events {
        let roll = rng.random_range(0..100);
        let pick = |rng: &mut StdRng, ids: &[MessageId]| ids[rng.random_range(0..ids.len())];
        if roll < 8 && !user_messages.is_empty() {
            let message_id = pick(&mut rng, &user_messages);
            out.push(
                MessageEdited {
                    message_id,
                    text: text(&mut rng, 3, 60),
                    redacted: false,
                }
                .into(),
            );
        } else if roll < 10 && user_messages.len() > 1 {
            // Deleted messages are neither edited nor prompted afterwards.
            let message_id = user_messages.remove(rng.random_range(0..user_messages.len() - 1));
            out.push(MessageDeleted { message_id }.into());
        } else if roll < 11 {
            out.push(
                ConversationRenamed {
                    title: text(&mut rng, 1, 6),
                    redacted: false,
                }
                .into(),
            );
        } else if roll < 40 && !user_messages.is_empty() && out.len() + 3 <= events {
            let run_id = RunId::from_uuid(Uuid::new_v4());
            let prompt = *user_messages.last().expect("BUG: checked non-empty");
            out.push(
                RunOpened {
                    run_id,
                    prompt_message_id: prompt,
                }
                .into(),
            );
            out.push(
                MessageSent {
                    message_id: MessageId::from_uuid(Uuid::new_v4()),
                    author: Author::Assistant,
                    author_id: None,
                    text: text(&mut rng, 30, 250),
                    reply_to: Some(prompt),
                    run_id: Some(run_id),
                    redacted: false,
                }
                .into(),
            );
            out.push(
                RunClosed {
                    run_id,
                    outcome: RunOutcome::Succeeded,
                }
                .into(),
            );
        } else {
            let message_id = MessageId::from_uuid(Uuid::new_v4());
            user_messages.push(message_id);
            out.push(
                MessageSent {
                    message_id,
                    author: Author::User,
                    author_id: Some(owner),
                    text: text(&mut rng, 3, 60),
                    reply_to: None,
                    run_id: None,
                    redacted: false,
                }
                .into(),
            );
        }
    }
    (id, out)
}

/// Writes a long conversation, then times loading it as a command handler does: read
/// in pages, decode (upcasting), fold.
async fn load_conversation(store: &PgEventStore, args: &AppendArgs) -> anyhow::Result<Row> {
    const PAGE: usize = 1_000;
    const LOADS: usize = 9;
    let wanted = usize::try_from(args.conversation_events).unwrap_or(usize::MAX);
    progress(
        args,
        &format!(
            "writing a {}-event conversation",
            report::thousands(wanted as f64)
        ),
    );
    let (id, events) = conversation(wanted, 0x00c0_11a9);
    let stream = format!("{}-{id}", Conversation::CATEGORY);
    let mut version = -1_i64;
    let mut stored_bytes = 0_usize;
    for chunk in events.chunks(500) {
        let new: Vec<NewEvent> = chunk
            .iter()
            .map(|e| {
                let data = e.to_data();
                stored_bytes += data.to_string().len();
                NewEvent::new(Uuid::new_v4(), e.event_type(), data)
                    .with_metadata(json!({ "schemaVersion": e.schema_version() }))
            })
            .collect();
        let outcome = store
            .append(vec![StreamAppend::new(
                stream.clone(),
                ExpectedVersion::Exact(version),
                new,
            )])
            .await?;
        version = outcome.streams[0].version;
    }

    progress(args, "loading the conversation");
    let mut histogram = report::histogram();
    let mut samples = Vec::with_capacity(LOADS);
    let mut state = None;
    // One unmeasured load first.
    for load in 0..=LOADS {
        let started = Instant::now();
        let mut read = Duration::ZERO;
        let mut folded: Option<Conversation> = None;
        let mut from = 0;
        let mut count = 0_usize;
        loop {
            let t0 = Instant::now();
            let page = store.read_stream(&stream, from, PAGE).await?;
            read += t0.elapsed();
            let full = page.len() == PAGE;
            for recorded in page {
                from = recorded.position + 1;
                count += 1;
                let version = recorded
                    .metadata
                    .as_ref()
                    .and_then(|m| m.get("schemaVersion"))
                    .and_then(Value::as_u64)
                    .and_then(|v| u32::try_from(v).ok())
                    .unwrap_or(1);
                let event =
                    ConversationEvent::from_stored(&recorded.event_type, version, recorded.data)
                        .with_context(|| format!("event {} does not decode", recorded.position))?;
                folded = Conversation::evolve(folded, &event);
            }
            if !full {
                break;
            }
        }
        let total = started.elapsed();
        anyhow::ensure!(
            count == events.len(),
            "read {count} of {} events",
            events.len()
        );
        if load > 0 {
            report::record(&mut histogram, total);
            samples.push((total, read));
        }
        state = folded;
    }
    let state = state.context("the conversation folded to nothing")?;
    // The fold must agree with folding the events as written.
    anyhow::ensure!(
        Conversation::fold(&events).as_ref() == Some(&state),
        "the loaded conversation differs from the one written"
    );
    samples.sort();
    let (median, read) = samples[samples.len() / 2];
    let decode_fold = median.saturating_sub(read);
    let heap = state.approx_heap_bytes();
    Ok(Row {
        key: "conversation_load",
        name: format!(
            "load a {}-event conversation",
            report::thousands(wanted as f64)
        ),
        events: events.len() as u64,
        seconds: median.as_secs_f64(),
        events_per_sec: per_sec(events.len() as u64, median),
        latency_of: "whole load",
        latency: Latency {
            p50_ms: median.as_secs_f64() * 1000.0,
            ..Latency::of(&histogram)
        },
        ratio_to_raw: None,
        errors: 0,
        first_error: None,
        details: json!({
            "loads": LOADS,
            "median_ms": median.as_secs_f64() * 1000.0,
            "median_read_ms": read.as_secs_f64() * 1000.0,
            "median_decode_fold_ms": decode_fold.as_secs_f64() * 1000.0,
            "load_ms": samples.iter().map(|(t, _)| t.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
            "approx_heap_bytes": heap,
            "messages": state.message_count(),
            "stored_data_bytes": stored_bytes,
        }),
        notes: format!(
            "median of {LOADS}: read {:.0} ms + decode/fold {:.0} ms; state ≈ {} bytes for {} messages ({:.1} MB of data)",
            read.as_secs_f64() * 1000.0,
            decode_fold.as_secs_f64() * 1000.0,
            report::thousands(heap as f64),
            report::thousands(state.message_count() as f64),
            stored_bytes as f64 / 1_000_000.0,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_the_requested_size() {
        for bytes in [16, 200, 4096] {
            assert_eq!(payload(bytes).to_string().len() as u64, bytes);
        }
    }

    #[test]
    fn conversation_is_valid_and_long_enough() {
        let (id, events) = conversation(2_000, 1);
        assert_eq!(events.len(), 2_000);
        let state = Conversation::fold(&events).expect("started");
        assert_eq!(state.id(), id);
        assert!(state.open_run().is_none());
        assert!(state.message_count() > 1_000);
        // Every event round-trips through its stored form.
        for e in &events {
            let back =
                ConversationEvent::from_stored(e.event_type(), e.schema_version(), e.to_data())
                    .expect("decodes");
            assert_eq!(&back, e);
        }
    }

    #[test]
    fn arguments_parse() {
        use clap::Parser as _;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            bench: crate::bench::BenchCommand,
        }
        let cli =
            Cli::try_parse_from(["x", "append", "--writers", "4", "--events", "100", "--json"])
                .expect("parses");
        let crate::bench::BenchCommand::Append(args) = cli.bench else {
            panic!("`append` parses as BenchCommand::Append");
        };
        assert_eq!(args.writers, 4);
        assert_eq!(args.events, Some(100));
        assert!(args.json);
        assert!(Cli::try_parse_from(["x", "append", "--events", "1", "--duration", "1s"]).is_err());
    }
}
