//! `colloquy admin …`: the operators' tools on the command line. Each reads the same
//! configuration as `serve`, talks to the database directly (Postgres, or the embedded
//! mode's SQLite file; NATS where the key pool needs it) and calls the same library
//! functions as the HTTP routes under `/v1/admin`, so both show the same things. A readable table by default, JSON with
//! `--json`; exit status 0 on success, 1 on failure, 2 on bad usage.
//!
//! Writes the CLI appends to the log (a revived run) name [`OPERATOR`] as their acting
//! user: there is no logged-in user on a shell, and a fixed id keeps them findable.

use std::io::{BufRead as _, Write as _};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use colloquy_commands::cache::CacheConfig;
use colloquy_commands::{Commands, Context};
use colloquy_domain::{RunId, UserId};
use colloquy_eventstore::{Database, EventStore, LogFilter, RecordedEvent, Subscription};
use colloquy_gateway::admin::{projections, runs};
use colloquy_gateway::auth::input::{Email, Password};
use colloquy_gateway::auth::password::Passwords;
use colloquy_gateway::auth::store;
use colloquy_gateway::auth::{AccessClaims, JwtKeys};
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::config::{Config, Storage};

/// The acting user of what the CLI appends to the log: the nil UUID.
pub const OPERATOR: Uuid = Uuid::nil();

/// `colloquy admin`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Print JSON instead of a table (`events tail --follow`: one object per line).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Read models: their checkpoint, lag and state, and rebuilds.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// The raw events of one stream, as stored.
    #[command(subcommand)]
    Streams(StreamsCommand),
    /// The raw events of the whole log or a category.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Dead letters (runs whose retries ran out), and bringing one back.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// The agent's Gemini key pool: labels, budgets and health, never a key.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Accounts: create, grant or revoke the admin role, disable, forget.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Access tokens for scripts.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// After restoring a database backup (with every Colloquy process stopped): resets
    /// what points past the restored log. Deletes the JetStream stream (with its
    /// consumers) and the relay's checkpoint, so the relay republishes the restored log
    /// into a new stream at start; rebuilds any read model whose checkpoint is past the
    /// log's head; sets the database's search_path, which a dump does not carry. See
    /// docs/OPERATIONS.md, "Backup and restore".
    AfterRestore,
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Each read model's checkpoint, lag (events and seconds) and state (`live`,
    /// `catching_up` or `rebuilding`).
    Status,
    /// Rebuild one read model from the log and swap it in (as `colloquy replay <name>`);
    /// waits until it is done.
    Rebuild {
        /// The projection: messages, runs or search.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum StreamsCommand {
    /// A stream's events, oldest first, with type, data and metadata.
    Read {
        /// The stream name (e.g. `conversation-<id>`).
        stream: String,
        /// The first stream position to show.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..))]
        from: i64,
        /// Most events to show.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// The log's events in global order, from `--from` (default: the start), filtered
    /// by category and type; with --follow, keeps printing new ones until Ctrl-C.
    Tail {
        /// Only this category (the stream name before its first `-`, e.g.
        /// `conversation`).
        #[arg(long)]
        category: Option<String>,
        /// Only events of this type (e.g. `MessageSent`).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// The first global position to show.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
        from: i64,
        /// Most events to show (ignored with --follow).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: u32,
        /// Keep waiting for new events until Ctrl-C.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Runs the agent gave up on (their retries ran out), newest first.
    DeadLetters {
        /// Most runs to show.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=1_000))]
        limit: i64,
    },
    /// Bring a dead letter back: `retrying`, due now; the agent's sweep starts its
    /// next attempt. Fails for an unknown run or one that is not a dead letter.
    Retry {
        /// The run id.
        run_id: Uuid,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Each key's label, project, state, cooldown, requests and last error (shared
    /// through NATS, so every agent's spending shows). Never a key.
    Status,
    /// Probe a key (or every key) with Gemini now: enabled if accepted, disabled if
    /// rejected, unchanged if the probe cannot tell.
    Recheck {
        /// The key's label (default: every key).
        label: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create an account that can log in with an email and password.
    Create {
        /// The login email.
        #[arg(long)]
        email: String,
        /// Read the password from the first line of standard input (keeps it out of
        /// the shell history and the process list).
        #[arg(
            long,
            conflicts_with = "password",
            required_unless_present = "password"
        )]
        password_stdin: bool,
        /// The password (prefer --password-stdin).
        #[arg(long)]
        password: Option<String>,
        /// Give the account the admin role.
        #[arg(long)]
        admin: bool,
    },
    /// Give an account the admin role (effective at its next login or refresh).
    GrantAdmin {
        /// The user's id or email.
        user: String,
    },
    /// Take the admin role away (effective at its next refresh, at most 15 minutes).
    RevokeAdmin {
        /// The user's id or email.
        user: String,
    },
    /// Disable an account: login and refresh refuse it, and its refresh tokens are
    /// revoked; access tokens already issued live out their 15 minutes.
    Disable {
        /// The user's id or email.
        user: String,
    },
    /// Erase a user's text from the log (every event they wrote, every conversation
    /// they own); rebuild the read models afterwards (`colloquy replay --all`).
    Forget {
        /// The user id.
        user_id: Uuid,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Sign an access token for a user (with their admin role as stored), for scripts.
    /// Needs COLLOQUY_JWT_SECRET, the secret the gateways verify with.
    Issue {
        /// The user's id or email.
        user: String,
        /// How long the token is valid (e.g. `15m`, `1h`, `7d`).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

/// Runs `colloquy admin …`.
pub async fn run(config: &Config, args: &AdminArgs) -> anyhow::Result<()> {
    let json = args.json;
    match &args.command {
        AdminCommand::Projections(command) => run_projections(config, command, json).await,
        AdminCommand::Streams(StreamsCommand::Read {
            stream,
            from,
            limit,
        }) => {
            let (_, store) = connect(config).await?;
            let events = store
                .read_stream(stream, *from, *limit as usize)
                .await
                .context("Failed to read the stream")?;
            print_events(&events, json);
            Ok(())
        }
        AdminCommand::Events(EventsCommand::Tail {
            category,
            event_type,
            from,
            limit,
            follow,
        }) => {
            let (_, store) = connect(config).await?;
            let filter = category.clone().map_or(LogFilter::All, LogFilter::Category);
            let tail = Tail {
                store,
                filter,
                event_type: event_type.clone(),
                after: from - 1,
            };
            if *follow {
                tail.follow(json).await
            } else {
                let events = tail.read(*limit as usize).await?;
                print_events(&events, json);
                Ok(())
            }
        }
        AdminCommand::Runs(command) => run_runs(config, command, json).await,
        AdminCommand::Keys(command) => run_keys(config, command, json).await,
        AdminCommand::Users(command) => run_users(config, command, json).await,
        AdminCommand::AfterRestore => after_restore(config, json).await,
        AdminCommand::Tokens(TokensCommand::Issue { user, ttl }) => {
            // What the gateways sign with: the key file, the shared secret, or the
            // embedded mode's own secret (`serve` made it beside the file).
            let key_file = config.settings.jwt_private_key_file.as_deref();
            let secret = crate::app::jwt_secret(config)?;
            if secret.is_none() && key_file.is_none() {
                bail!(
                    "tokens issue needs COLLOQUY_JWT_SECRET or COLLOQUY_JWT_PRIVATE_KEY_FILE (what the gateways verify with); without either a token would be signed with a throwaway key"
                );
            }
            let keys = JwtKeys::from_settings(secret.as_ref(), key_file)?;
            let (db, _) = connect(config).await?;
            let account = account(&db, user).await?;
            if account.disabled {
                bail!("{} is disabled", account.email);
            }
            let mut claims = AccessClaims::new(account.id, account.is_admin);
            claims.exp = claims.iat + ttl.as_secs();
            let token = keys.sign(&claims).context("Failed to sign the token")?;
            if json {
                print_json(&json!({
                    "access_token": token,
                    "token_type": "Bearer",
                    "expires_in": ttl.as_secs(),
                    "user_id": account.id,
                    "admin": account.is_admin,
                }));
            } else {
                println!("{token}");
            }
            Ok(())
        }
    }
}

/// Opens the configured database (Postgres, migrated so a fresh database works, or the
/// embedded mode's file) and its log.
async fn connect(config: &Config) -> anyhow::Result<(Database, Arc<dyn EventStore>)> {
    crate::app::open_database(config, 4).await
}

fn commands(store: Arc<dyn EventStore>) -> Commands {
    Commands::new(store, CacheConfig::default())
}

async fn run_projections(
    config: &Config,
    command: &ProjectionsCommand,
    json: bool,
) -> anyhow::Result<()> {
    let (db, store) = connect(config).await?;
    match command {
        ProjectionsCommand::Status => {
            let states = projections::projection_states(&db).await?;
            let items: Vec<Value> = states
                .iter()
                .map(|found| {
                    json!({
                        "name": found.lag.projection.name(),
                        "checkpoint": found.lag.lag.checkpoint,
                        "lag_events": found.lag.lag.events,
                        "lag_seconds": found.lag.lag.seconds,
                        "state": found.state(false),
                    })
                })
                .collect();
            if json {
                print_json(&json!({ "items": items }));
            } else {
                print_table(
                    &["NAME", "CHECKPOINT", "LAG EVENTS", "LAG SECONDS", "STATE"],
                    &items,
                    &["name", "checkpoint", "lag_events", "lag_seconds", "state"],
                );
            }
            Ok(())
        }
        ProjectionsCommand::Rebuild { name } => {
            let projection = colloquy_projections::by_name(name).with_context(|| {
                format!("no projection named {name:?} (there are: messages, runs, search)")
            })?;
            let reached =
                colloquy_projections::replay::rebuild(&db, &store, projection.as_ref(), &|_, _| {})
                    .await?;
            if json {
                print_json(&json!({ "name": projection.name(), "position": reached }));
            } else {
                println!(
                    "{}: rebuilt to position {reached} and swapped in",
                    projection.name()
                );
            }
            Ok(())
        }
    }
}

/// `colloquy admin after-restore`: see [`AdminCommand::AfterRestore`].
async fn after_restore(config: &Config, json: bool) -> anyhow::Result<()> {
    let (db, store) = connect(config).await?;
    let head = store.head().await?;
    // Read models built past the restored log hold events that no longer exist.
    let mut rebuilt = Vec::new();
    for projection in colloquy_projections::all_projections() {
        let checkpoint =
            colloquy_projections::runner::read_checkpoint(&db, projection.schema()).await?;
        if checkpoint > head {
            colloquy_projections::replay::rebuild(&db, &store, projection.as_ref(), &|_, _| {})
                .await?;
            rebuilt.push(json!({ "name": projection.name(), "checkpoint_was": checkpoint }));
        }
    }
    // The stream holds the old log's events, positions the restored log will give to
    // other events: it goes, and the relay republishes the restored log from 0.
    let mut stream_deleted = None;
    if let (Storage::Postgres { nats_url, .. }, Database::Postgres(pool)) = (&config.storage, &db) {
        // A dump restored into a new database does not carry the database-level
        // search_path migration 0002 set (Message DB clients call its functions
        // unqualified).
        sqlx::query(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET search_path TO \"$user\", public, message_store', current_database()); END $$",
        )
        .execute(pool)
        .await
        .context("Failed to set the database's search_path (is this the database's owner?)")?;
        let nats = async_nats::ConnectOptions::new()
            .name("colloquy-admin")
            .connect(crate::app::nats_servers(nats_url)?)
            .await
            .context("Failed to connect to NATS (NATS_URL)")?;
        let js = async_nats::jetstream::new(nats);
        let name = &config.settings.stream;
        let deleted = match js.delete_stream(name).await {
            Ok(_) => true,
            Err(error)
                if matches!(&error.kind(),
                    async_nats::jetstream::context::DeleteStreamErrorKind::JetStream(e)
                        if e.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                false
            }
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("Failed to delete JetStream stream {name}"));
            }
        };
        sqlx::query("DELETE FROM colloquy.relay_checkpoint WHERE stream = $1")
            .bind(name)
            .execute(pool)
            .await
            .context("Failed to reset the relay checkpoint")?;
        stream_deleted = Some(deleted);
    }
    if json {
        print_json(&json!({
            "log_head": head,
            "rebuilt": rebuilt,
            "stream": config.settings.stream,
            "stream_deleted": stream_deleted,
        }));
    } else {
        println!("log head: {head}");
        if rebuilt.is_empty() {
            println!("read models: every checkpoint is within the log");
        }
        for item in &rebuilt {
            println!(
                "read model {}: checkpoint {} was past the log; rebuilt",
                item["name"].as_str().unwrap_or_default(),
                item["checkpoint_was"]
            );
        }
        match stream_deleted {
            Some(true) => println!(
                "JetStream stream {}: deleted; the relay republishes the log from position 0 when it starts",
                config.settings.stream
            ),
            Some(false) => println!(
                "JetStream stream {}: did not exist; the relay publishes the log from position 0 when it starts",
                config.settings.stream
            ),
            None => println!("no JetStream stream (embedded mode)"),
        }
    }
    Ok(())
}

async fn run_runs(config: &Config, command: &RunsCommand, json: bool) -> anyhow::Result<()> {
    let (db, store) = connect(config).await?;
    match command {
        RunsCommand::DeadLetters { limit } => {
            let items = runs::list_dead_letters(&db, None, *limit).await?;
            let items: Vec<Value> = items
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<_, _>>()?;
            if json {
                print_json(&json!({ "items": items }));
            } else {
                print_table(
                    &["ID", "CONVERSATION", "ATTEMPTS", "FINISHED", "ERROR"],
                    &items,
                    &["id", "conversation_id", "attempts", "finished_at", "error"],
                );
            }
            Ok(())
        }
        RunsCommand::Retry { run_id } => {
            let ctx = Context::new(UserId::from_uuid(OPERATOR));
            let position =
                runs::revive_dead_letter(&commands(store), RunId::from_uuid(*run_id), &ctx)
                    .await?
                    .with_context(|| format!("no run {run_id}"))?;
            if json {
                print_json(&json!({ "run_id": run_id, "position": position }));
            } else {
                println!("run {run_id} is retrying (position {position})");
            }
            Ok(())
        }
    }
}

async fn run_keys(config: &Config, command: &KeysCommand, json: bool) -> anyhow::Result<()> {
    let Storage::Postgres { nats_url, .. } = &config.storage else {
        bail!(
            "admin keys needs NATS_URL (the key pool's budgets are shared through NATS); in the embedded mode the pool lives inside `serve`: GET /v1/admin/keys shows it"
        );
    };
    let nats = async_nats::ConnectOptions::new()
        .name("colloquy-admin")
        .connect(crate::app::nats_servers(nats_url)?)
        .await
        .context("Failed to connect to NATS (NATS_URL)")?;
    let Some(pool) = crate::app::key_pool(config, Some(&nats), true).await? else {
        if json {
            print_json(&json!({ "items": [] }));
        } else {
            println!("no Gemini keys configured (GEMINI_API_KEYS)");
        }
        return Ok(());
    };
    match command {
        KeysCommand::Status => {
            let items: Vec<Value> = pool
                .snapshot()
                .await
                .context("Failed to read the key pool's budgets")?
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<_, _>>()?;
            if json {
                print_json(&json!({ "items": items }));
            } else {
                print_table(
                    &[
                        "LABEL",
                        "PROJECT",
                        "STATE",
                        "COOLDOWN UNTIL",
                        "REQ/MIN",
                        "REQ TODAY",
                        "LAST ERROR",
                    ],
                    &items,
                    &[
                        "label",
                        "project",
                        "state",
                        "cooldown_until",
                        "requests_this_minute",
                        "requests_today",
                        "last_error",
                    ],
                );
            }
            Ok(())
        }
        KeysCommand::Recheck { label } => {
            let settings = &config.settings;
            let client = colloquy_gemini_agent::gemini::GeminiClient::new(
                colloquy_gemini_agent::gemini::GeminiConfig {
                    base_url: settings.gemini_base_url.clone(),
                    proxy: settings.https_proxy.clone(),
                    ..colloquy_gemini_agent::gemini::GeminiConfig::default()
                },
            )
            .context("GEMINI_BASE_URL / HTTPS_PROXY")?;
            let probe = colloquy_gemini_agent::worker::ClientProbe(client);
            let labels: Vec<String> = match label {
                Some(label) => vec![label.clone()],
                None => pool.labels().map(str::to_owned).collect(),
            };
            let mut items = Vec::new();
            for label in labels {
                let check = pool.recheck(&label, &probe).await?;
                let mut item = serde_json::to_value(&check)?;
                if let Value::Object(map) = &mut item {
                    map.insert("label".to_owned(), Value::String(label));
                }
                items.push(item);
            }
            if json {
                print_json(&json!({ "items": items }));
            } else {
                print_table(
                    &["LABEL", "RESULT", "DETAIL"],
                    &items
                        .iter()
                        .map(|item| {
                            json!({
                                "label": item["label"],
                                "result": item["result"],
                                "detail": if item["reason"].is_null() { &item["detail"] } else { &item["reason"] },
                            })
                        })
                        .collect::<Vec<_>>(),
                    &["label", "result", "detail"],
                );
            }
            Ok(())
        }
    }
}

async fn run_users(config: &Config, command: &UsersCommand, json: bool) -> anyhow::Result<()> {
    let (db, store) = connect(config).await?;
    let show = |account: &store::Account, what: &str| {
        if json {
            print_json(&json!(account));
        } else {
            println!(
                "{what}: {} <{}> admin={} disabled={}",
                account.id, account.email, account.is_admin, account.disabled
            );
        }
    };
    match command {
        UsersCommand::Create {
            email,
            password_stdin,
            password,
            admin,
        } => {
            let email = Email::parse(email).map_err(|m| anyhow::anyhow!("--email: {m}"))?;
            let raw = if *password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .context("Failed to read the password from standard input")?;
                line.trim_end_matches(['\r', '\n']).to_owned()
            } else {
                password.clone().unwrap_or_default()
            };
            let password = Password::parse(SecretString::from(raw))
                .map_err(|m| anyhow::anyhow!("password: {m}"))?;
            let hash = Passwords::new().await?.hash(password.into_secret()).await?;
            let id = Uuid::new_v4();
            store::insert_user(&db, id, email.as_str(), &hash, None)
                .await
                .map_err(|error| match error {
                    store::InsertUserError::EmailTaken => {
                        anyhow::anyhow!("an account with this email already exists")
                    }
                    store::InsertUserError::Database(error) => {
                        anyhow::Error::new(error).context("Failed to create the account")
                    }
                })?;
            if *admin {
                store::set_admin(&db, id, true).await?;
            }
            show(&account(&db, &id.to_string()).await?, "created");
            Ok(())
        }
        UsersCommand::GrantAdmin { user } | UsersCommand::RevokeAdmin { user } => {
            let grant = matches!(command, UsersCommand::GrantAdmin { .. });
            let found = account(&db, user).await?;
            store::set_admin(&db, found.id, grant).await?;
            show(
                &account(&db, &found.id.to_string()).await?,
                if grant {
                    "admin granted"
                } else {
                    "admin revoked"
                },
            );
            Ok(())
        }
        UsersCommand::Disable { user } => {
            let found = account(&db, user).await?;
            let revoked = store::disable_account(&db, found.id).await?;
            let shown = account(&db, &found.id.to_string()).await?;
            if json {
                print_json(&json!({
                    "id": shown.id,
                    "email": shown.email,
                    "is_admin": shown.is_admin,
                    "disabled": shown.disabled,
                    "refresh_tokens_revoked": revoked,
                }));
            } else {
                show(
                    &shown,
                    &format!("disabled ({revoked} refresh token(s) revoked)"),
                );
            }
            Ok(())
        }
        UsersCommand::Forget { user_id } => {
            // The JetStream stream too, when there is one (the external mode).
            let fan_out = match &config.storage {
                Storage::Postgres { nats_url, .. } => {
                    let nats = async_nats::ConnectOptions::new()
                        .name("colloquy-admin")
                        .connect(crate::app::nats_servers(nats_url)?)
                        .await
                        .context("Failed to connect to NATS (NATS_URL) to purge the stream")?;
                    Some(colloquy_gateway::admin::FanOutStream {
                        jetstream: async_nats::jetstream::new(nats),
                        stream: config.settings.stream.clone(),
                        prefix: config.settings.subject_prefix.clone(),
                    })
                }
                Storage::Embedded { .. } => None,
            };
            let erasure = colloquy_gateway::admin::erase_user(
                &db,
                &db,
                &commands(store),
                fan_out.as_ref(),
                UserId::from_uuid(*user_id),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            if json {
                print_json(&json!(erasure));
            } else {
                println!(
                    "{user_id}: account {}; {} event(s) redacted in {} stream(s); read models rewritten: {}; {}",
                    if erasure.account_erased {
                        "deleted"
                    } else {
                        "already gone"
                    },
                    erasure.events_redacted,
                    erasure.streams.len(),
                    if erasure.read_models.is_empty() {
                        "none".to_owned()
                    } else {
                        erasure.read_models.join(", ")
                    },
                    match erasure.jetstream_messages_removed {
                        Some(n) => format!("{n} message(s) purged from the JetStream stream"),
                        None => "no JetStream stream (embedded mode)".to_owned(),
                    }
                );
            }
            Ok(())
        }
    }
}

/// The account with this id or email, or an error naming it.
async fn account(db: &Database, user: &str) -> anyhow::Result<store::Account> {
    store::find_account(db, user)
        .await?
        .with_context(|| format!("no user {user:?}"))
}

/// A read of the log from a position, filtered.
struct Tail {
    store: Arc<dyn EventStore>,
    filter: LogFilter,
    event_type: Option<String>,
    after: i64,
}

impl Tail {
    fn wanted(&self, event: &RecordedEvent) -> bool {
        self.event_type
            .as_deref()
            .is_none_or(|wanted| event.event_type == wanted)
    }

    /// Up to `limit` matching events after `self.after`, reading in batches.
    async fn read(&self, limit: usize) -> anyhow::Result<Vec<RecordedEvent>> {
        const BATCH: usize = 1_000;
        let mut found = Vec::new();
        let mut after = self.after;
        loop {
            let batch = self
                .store
                .read_log(&self.filter, after, BATCH)
                .await
                .context("Failed to read the log")?;
            let Some(last) = batch.last() else {
                return Ok(found);
            };
            after = last.global_position;
            let full = batch.len() == BATCH;
            for event in batch {
                if self.wanted(&event) {
                    found.push(event);
                    if found.len() == limit {
                        return Ok(found);
                    }
                }
            }
            if !full {
                return Ok(found);
            }
        }
    }

    /// Prints matching events as they are committed, until Ctrl-C.
    async fn follow(self, json: bool) -> anyhow::Result<()> {
        let mut subscription =
            Subscription::new(Arc::clone(&self.store), self.filter.clone(), self.after)
                .with_poll_interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok(()),
                event = subscription.next_event() => {
                    let event = event.context("Failed to read the log")?;
                    if self.wanted(&event) {
                        if json {
                            println!("{}", event_json(&event));
                        } else {
                            println!("{}", event_line(&event));
                        }
                        let _ = std::io::stdout().flush();
                    }
                }
            }
        }
    }
}

/// An event as the admin routes show it, plus its stream.
fn event_json(event: &RecordedEvent) -> Value {
    json!({
        "global_position": event.global_position,
        "stream_name": event.stream_name,
        "position": event.position,
        "time": event.time,
        "type": event.event_type,
        "data": event.data,
        "metadata": event.metadata,
        "id": event.id,
    })
}

fn event_line(event: &RecordedEvent) -> String {
    format!(
        "{:>8}  {}  {}@{}  {}  {}",
        event.global_position,
        event.time.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
        event.stream_name,
        event.position,
        event.event_type,
        event.data
    )
}

fn print_events(events: &[RecordedEvent], json: bool) {
    if json {
        let items: Vec<Value> = events.iter().map(event_json).collect();
        print_json(&json!({ "items": items }));
    } else if events.is_empty() {
        println!("(no events)");
    } else {
        for event in events {
            println!("{}", event_line(event));
        }
    }
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// Prints `items`' `keys` as aligned columns under `headers`.
fn print_table(headers: &[&str], items: &[Value], keys: &[&str]) {
    if items.is_empty() {
        println!("(none)");
        return;
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| {
            keys.iter()
                .map(|key| match &item[*key] {
                    Value::Null => "-".to_owned(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, header)| {
            rows.iter()
                .map(|row| row[i].chars().count())
                .chain([header.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row);
    }
}
