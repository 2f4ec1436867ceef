//! Typed, layered configuration: defaults, then an optional TOML file, then the
//! environment. The file uses the same keys as the environment (`DATABASE_URL = "…"`).
//! Everything is validated at start, and an error names the setting at fault.
//! Secrets are [`SecretString`]s; [`Settings::redacted`] is what `colloquy config` prints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use colloquy_gateway::auth::OidcSettings;
use colloquy_gemini_agent::keys::{KeysFile, PoolConfig, parse_key_list};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Every key Colloquy reads, as named in the environment and in the config file.
pub const KEYS: &[&str] = &[
    "DATABASE_URL",
    "NATS_URL",
    "COLLOQUY_BIND",
    "COLLOQUY_DATA_DIR",
    "COLLOQUY_REQUIRE_EXTERNAL",
    "COLLOQUY_JWT_SECRET",
    "COLLOQUY_JWT_PRIVATE_KEY_FILE",
    "COLLOQUY_OIDC_ISSUER",
    "COLLOQUY_OIDC_AUDIENCE",
    "COLLOQUY_OIDC_JWKS_URL",
    "COLLOQUY_OIDC_ALGORITHMS",
    "COLLOQUY_OIDC_JWKS_COOLDOWN",
    "COLLOQUY_CORS_ORIGINS",
    "COLLOQUY_TRUSTED_PROXIES",
    "COLLOQUY_STREAM",
    "COLLOQUY_STREAM_REPLICAS",
    "COLLOQUY_DUPLICATE_WINDOW",
    "COLLOQUY_SUBJECT_PREFIX",
    "COLLOQUY_PROJECTION_LAG_BUDGET",
    "COLLOQUY_SHUTDOWN_GRACE",
    "COLLOQUY_SSE_MAX_STREAMS_PER_USER",
    "COLLOQUY_SSE_MAX_STREAMS",
    "COLLOQUY_MAX_CONNECTIONS",
    "COLLOQUY_DATABASE_POOL_SIZE",
    "COLLOQUY_COMMANDS_PER_SECOND",
    "COLLOQUY_COMMAND_BURST",
    "COLLOQUY_SSE_BUFFER",
    "GEMINI_API_KEYS",
    "GEMINI_API_KEYS_FILE",
    "GEMINI_BASE_URL",
    "GEMINI_MODEL",
    "HTTPS_PROXY",
    "GEMINI_RPM",
    "GEMINI_RPD",
    "GEMINI_TPM",
    "GEMINI_RETRY_TIMEOUTS",
    "COLLOQUY_AGENT_CONCURRENCY",
    "COLLOQUY_RETRY_DELAYS",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "RUST_LOG",
];

/// The raw settings, as layered from defaults, file and environment.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `postgres://…` or `sqlite://…`; unset means the embedded mode.
    #[serde(rename = "DATABASE_URL", default, serialize_with = "ser_secret_opt")]
    pub database_url: Option<SecretString>,
    /// NATS server(s), comma-separated.
    #[serde(rename = "NATS_URL", default, serialize_with = "ser_url_opt")]
    pub nats_url: Option<String>,
    #[serde(rename = "COLLOQUY_BIND")]
    pub bind: SocketAddr,
    /// Where the embedded mode keeps its SQLite file.
    #[serde(rename = "COLLOQUY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Refuse to start without Postgres and NATS (set by the deploy files).
    #[serde(rename = "COLLOQUY_REQUIRE_EXTERNAL", deserialize_with = "de_flag")]
    pub require_external: bool,
    #[serde(
        rename = "COLLOQUY_JWT_SECRET",
        default,
        serialize_with = "ser_secret_opt"
    )]
    pub jwt_secret: Option<SecretString>,
    /// A PEM private key (RSA, EC P-256/P-384, Ed25519) that signs access tokens instead
    /// of `COLLOQUY_JWT_SECRET`; its public half is served at `/.well-known/jwks.json`.
    #[serde(rename = "COLLOQUY_JWT_PRIVATE_KEY_FILE", default)]
    pub jwt_private_key_file: Option<PathBuf>,
    /// The external identity provider's `iss` (with audience and JWKS URL: all or none).
    #[serde(rename = "COLLOQUY_OIDC_ISSUER", default)]
    pub oidc_issuer: Option<String>,
    /// What the provider's tokens' `aud` must contain.
    #[serde(rename = "COLLOQUY_OIDC_AUDIENCE", default)]
    pub oidc_audience: Option<String>,
    /// The provider's key set (`https://`, or `http://` to a loopback address).
    #[serde(rename = "COLLOQUY_OIDC_JWKS_URL", default)]
    pub oidc_jwks_url: Option<String>,
    /// Signature algorithms accepted from the provider, comma-separated (default `RS256`).
    #[serde(rename = "COLLOQUY_OIDC_ALGORITHMS", default)]
    pub oidc_algorithms: Option<String>,
    /// The shortest time between two fetches of the provider's key set, e.g. `10s`.
    #[serde(rename = "COLLOQUY_OIDC_JWKS_COOLDOWN")]
    pub oidc_jwks_cooldown: String,
    /// Allowed CORS origins, comma-separated.
    #[serde(rename = "COLLOQUY_CORS_ORIGINS", default)]
    pub cors_origins: Option<String>,
    /// Reverse proxies whose `X-Forwarded-For` names the client (for the per-address
    /// limit of the auth routes): addresses or networks, comma-separated.
    #[serde(rename = "COLLOQUY_TRUSTED_PROXIES", default)]
    pub trusted_proxies: Option<String>,
    /// JetStream stream name.
    #[serde(rename = "COLLOQUY_STREAM")]
    pub stream: String,
    #[serde(rename = "COLLOQUY_STREAM_REPLICAS")]
    pub stream_replicas: usize,
    /// JetStream duplicate window, e.g. `2m`.
    #[serde(rename = "COLLOQUY_DUPLICATE_WINDOW")]
    pub duplicate_window: String,
    /// First token of every NATS subject (`<prefix>.ev.…`, `<prefix>.live.…`).
    #[serde(rename = "COLLOQUY_SUBJECT_PREFIX")]
    pub subject_prefix: String,
    /// Readiness fails when a projection lags more than this, e.g. `5s`.
    #[serde(rename = "COLLOQUY_PROJECTION_LAG_BUDGET")]
    pub projection_lag_budget: String,
    /// How long shutdown waits for in-flight work, e.g. `10s`.
    #[serde(rename = "COLLOQUY_SHUTDOWN_GRACE")]
    pub shutdown_grace: String,
    /// Commands (non-GET requests) one user may send per second, sustained (429 above).
    #[serde(rename = "COLLOQUY_COMMANDS_PER_SECOND")]
    pub commands_per_second: u32,
    /// Commands one user may send at once after being idle.
    #[serde(rename = "COLLOQUY_COMMAND_BURST")]
    pub command_burst: u32,
    /// Concurrent SSE streams one user may hold on one gateway (429 above it).
    #[serde(rename = "COLLOQUY_SSE_MAX_STREAMS_PER_USER")]
    pub sse_max_streams_per_user: usize,
    /// Concurrent SSE streams of all users on one gateway (429 above it).
    #[serde(rename = "COLLOQUY_SSE_MAX_STREAMS")]
    pub sse_max_streams: usize,
    /// HTTP connections one process holds open at once; further clients wait in the
    /// listen backlog.
    #[serde(rename = "COLLOQUY_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Postgres connections one process may open (its pool's size). Every process of a
    /// deployment counts against the server's `max_connections`.
    #[serde(rename = "COLLOQUY_DATABASE_POOL_SIZE")]
    pub database_pool_size: u32,
    /// Events the live feed holds per user with open streams, for slow SSE clients; one
    /// further behind is told to reconnect and resume.
    #[serde(rename = "COLLOQUY_SSE_BUFFER")]
    pub sse_buffer: usize,
    /// `label=key@project,…`
    #[serde(rename = "GEMINI_API_KEYS", default, serialize_with = "ser_keys_opt")]
    pub gemini_api_keys: Option<SecretString>,
    #[serde(rename = "GEMINI_API_KEYS_FILE", default)]
    pub gemini_api_keys_file: Option<PathBuf>,
    #[serde(rename = "GEMINI_BASE_URL")]
    pub gemini_base_url: String,
    #[serde(rename = "GEMINI_MODEL")]
    pub gemini_model: String,
    #[serde(rename = "HTTPS_PROXY", default, serialize_with = "ser_url_opt")]
    pub https_proxy: Option<String>,
    #[serde(rename = "GEMINI_RPM", default)]
    pub gemini_rpm: Option<u32>,
    #[serde(rename = "GEMINI_RPD", default)]
    pub gemini_rpd: Option<u32>,
    #[serde(rename = "GEMINI_TPM", default)]
    pub gemini_tpm: Option<u32>,
    /// Retry a call after a 504 or a time limit (within the attempt, like a 500); off by
    /// default because such a call may have been billed.
    #[serde(rename = "GEMINI_RETRY_TIMEOUTS", deserialize_with = "de_flag")]
    pub gemini_retry_timeouts: bool,
    #[serde(rename = "COLLOQUY_AGENT_CONCURRENCY")]
    pub agent_concurrency: usize,
    /// Escalating delays before a run is retried, e.g. `1m,10m,1h,1d`.
    #[serde(rename = "COLLOQUY_RETRY_DELAYS")]
    pub retry_delays: String,
    #[serde(rename = "OTEL_EXPORTER_OTLP_ENDPOINT", default)]
    pub otel_endpoint: Option<String>,
    #[serde(rename = "RUST_LOG", default)]
    pub rust_log: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: None,
            nats_url: None,
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            require_external: false,
            jwt_secret: None,
            jwt_private_key_file: None,
            oidc_issuer: None,
            oidc_audience: None,
            oidc_jwks_url: None,
            oidc_algorithms: None,
            oidc_jwks_cooldown: "10s".into(),
            cors_origins: None,
            trusted_proxies: None,
            stream: "COLLOQUY".into(),
            stream_replicas: 1,
            duplicate_window: "2m".into(),
            subject_prefix: "colloquy".into(),
            projection_lag_budget: "5s".into(),
            shutdown_grace: "10s".into(),
            commands_per_second: 20,
            command_burst: 40,
            sse_max_streams_per_user: 16,
            sse_max_streams: colloquy_gateway::LiveSettings::DEFAULT_MAX_STREAMS,
            max_connections: colloquy_gateway::edges::Connections::DEFAULT_MAX,
            database_pool_size: 16,
            sse_buffer: 256,
            gemini_api_keys: None,
            gemini_api_keys_file: None,
            gemini_base_url: "https://generativelanguage.googleapis.com".into(),
            gemini_model: "gemini-2.5-flash".into(),
            https_proxy: None,
            gemini_rpm: None,
            gemini_rpd: None,
            gemini_tpm: None,
            gemini_retry_timeouts: false,
            agent_concurrency: 4,
            retry_delays: "1m,10m,1h,1d".into(),
            otel_endpoint: None,
            rust_log: None,
        }
    }
}

/// Where the log lives.
#[derive(Debug, Clone)]
pub enum Storage {
    Postgres { url: SecretString, nats_url: String },
    Embedded { sqlite_url: String },
}

/// Settings after validation, with parsed values.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
    pub storage: Storage,
    pub duplicate_window: Duration,
    pub projection_lag_budget: Duration,
    pub shutdown_grace: Duration,
    pub retry_delays: Vec<Duration>,
    /// The Gemini key pool: keys by project, budgets.
    pub gemini_pool: PoolConfig,
    pub cors_origins: Vec<String>,
    /// `COLLOQUY_TRUSTED_PROXIES`, parsed.
    pub trusted_proxies: colloquy_gateway::auth::TrustedProxies,
    /// The external identity provider, when `COLLOQUY_OIDC_*` configure one.
    pub oidc: Option<OidcSettings>,
}

impl Settings {
    /// Layers defaults, the file (if any) and the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Self::figment(file, Env::raw().only(KEYS).lowercase(false))
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
    }

    fn figment(file: Option<&Path>, env: Env) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(env)
    }

    /// Validates and parses everything, naming the setting at fault.
    pub fn validate(self) -> anyhow::Result<Config> {
        let storage = match &self.database_url {
            None => {
                if self.require_external {
                    bail!(
                        "COLLOQUY_REQUIRE_EXTERNAL is set but DATABASE_URL is not: the external mode needs Postgres and NATS"
                    );
                }
                let path = self.data_dir.join("colloquy.sqlite");
                Storage::Embedded {
                    sqlite_url: format!("sqlite://{}?mode=rwc", path.display()),
                }
            }
            Some(url) => {
                let raw = url.expose_secret();
                if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
                    let Some(nats_url) = self.nats_url.clone().filter(|u| !u.trim().is_empty())
                    else {
                        bail!("NATS_URL is required when DATABASE_URL points at Postgres");
                    };
                    Storage::Postgres {
                        url: url.clone(),
                        nats_url,
                    }
                } else if raw.starts_with("sqlite:") {
                    if self.require_external {
                        bail!(
                            "COLLOQUY_REQUIRE_EXTERNAL is set but DATABASE_URL is a SQLite URL: the external mode needs Postgres"
                        );
                    }
                    Storage::Embedded {
                        sqlite_url: raw.to_owned(),
                    }
                } else {
                    bail!("DATABASE_URL must start with postgres://, postgresql:// or sqlite:");
                }
            }
        };
        if self.stream.is_empty()
            || !self
                .stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            bail!("COLLOQUY_STREAM must be a non-empty name of letters, digits, '_' and '-'");
        }
        if !(1..=5).contains(&self.stream_replicas) {
            bail!("COLLOQUY_STREAM_REPLICAS must be between 1 and 5");
        }
        if self.commands_per_second == 0 || self.command_burst == 0 {
            bail!("COLLOQUY_COMMANDS_PER_SECOND and COLLOQUY_COMMAND_BURST must be at least 1");
        }
        if self.sse_max_streams_per_user == 0 {
            bail!("COLLOQUY_SSE_MAX_STREAMS_PER_USER must be at least 1");
        }
        if self.sse_max_streams == 0 {
            bail!("COLLOQUY_SSE_MAX_STREAMS must be at least 1");
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            bail!("COLLOQUY_MAX_CONNECTIONS must be between 1 and 1000000");
        }
        if !(4..=1_000).contains(&self.database_pool_size) {
            // Below 4, the connection the wake-ups listen on, the group-commit writer's
            // and a projector's transaction leave nothing for queries.
            bail!("COLLOQUY_DATABASE_POOL_SIZE must be between 4 and 1000");
        }
        if !(16..=1_000_000).contains(&self.sse_buffer) {
            bail!("COLLOQUY_SSE_BUFFER must be between 16 and 1000000 events");
        }
        if self.subject_prefix.is_empty()
            || self
                .subject_prefix
                .chars()
                .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace())
        {
            bail!(
                "COLLOQUY_SUBJECT_PREFIX must be one NATS subject token (no '.', '*', '>' or spaces)"
            );
        }
        if self.agent_concurrency == 0 {
            bail!("COLLOQUY_AGENT_CONCURRENCY must be at least 1");
        }
        let duplicate_window = duration("COLLOQUY_DUPLICATE_WINDOW", &self.duplicate_window)?;
        let projection_lag_budget = duration(
            "COLLOQUY_PROJECTION_LAG_BUDGET",
            &self.projection_lag_budget,
        )?;
        let shutdown_grace = duration("COLLOQUY_SHUTDOWN_GRACE", &self.shutdown_grace)?;
        let retry_delays = self
            .retry_delays
            .split(',')
            .map(|d| duration("COLLOQUY_RETRY_DELAYS", d))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if self.jwt_secret.is_some() && self.jwt_private_key_file.is_some() {
            bail!(
                "COLLOQUY_JWT_SECRET and COLLOQUY_JWT_PRIVATE_KEY_FILE are both set: set one (the key file signs with an asymmetric key and publishes its public half; the secret signs HS256)"
            );
        }
        let oidc = OidcSettings::from_raw(
            self.oidc_issuer.as_deref(),
            self.oidc_audience.as_deref(),
            self.oidc_jwks_url.as_deref(),
            self.oidc_algorithms.as_deref(),
            duration("COLLOQUY_OIDC_JWKS_COOLDOWN", &self.oidc_jwks_cooldown)?,
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let gemini_pool = self.gemini_pool()?;
        url::parse("GEMINI_BASE_URL", &self.gemini_base_url)?;
        if let Some(proxy) = &self.https_proxy {
            url::parse("HTTPS_PROXY", proxy)?;
        }
        if let Some(endpoint) = &self.otel_endpoint {
            url::parse("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)?;
        }
        let cors_origins = self
            .cors_origins
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let trusted_proxies = self
            .trusted_proxies
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| anyhow::anyhow!("COLLOQUY_TRUSTED_PROXIES: {e}"))?;
        Ok(Config {
            storage,
            duplicate_window,
            projection_lag_budget,
            shutdown_grace,
            retry_delays,
            gemini_pool,
            cors_origins,
            trusted_proxies,
            oidc,
            settings: self,
        })
    }

    /// The key pool: `GEMINI_API_KEYS`, then the keys file, over the default budgets
    /// `GEMINI_RPM` / `GEMINI_RPD` / `GEMINI_TPM`.
    fn gemini_pool(&self) -> anyhow::Result<PoolConfig> {
        let keys = match &self.gemini_api_keys {
            Some(list) => parse_key_list(list.expose_secret())
                .map_err(|e| anyhow::anyhow!("GEMINI_API_KEYS: {e}"))?,
            None => Vec::new(),
        };
        let mut pool = PoolConfig::new(keys);
        if let Some(rpm) = self.gemini_rpm {
            pool.defaults.rpm = rpm;
        }
        if let Some(rpd) = self.gemini_rpd {
            pool.defaults.rpd = rpd;
        }
        if self.gemini_tpm.is_some() {
            pool.defaults.tpm = self.gemini_tpm;
        }
        if let Some(file) = &self.gemini_api_keys_file {
            let file =
                KeysFile::load(file).map_err(|e| anyhow::anyhow!("GEMINI_API_KEYS_FILE: {e}"))?;
            pool.merge_file(file);
        }
        pool.validate()
            .map_err(|e| anyhow::anyhow!("GEMINI_API_KEYS / GEMINI_API_KEYS_FILE: {e}"))?;
        Ok(pool)
    }

    /// The effective settings as `KEY = value` lines, secrets redacted.
    pub fn redacted(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("BUG: settings always serialise")
    }
}

mod url {
    /// A cheap shape check: a scheme and a host.
    pub fn parse(key: &str, value: &str) -> anyhow::Result<()> {
        let ok = value
            .split_once("://")
            .is_some_and(|(scheme, rest)| !scheme.is_empty() && !rest.is_empty());
        if ok {
            Ok(())
        } else {
            anyhow::bail!("{key} must be a URL like https://host:port (got {value:?})")
        }
    }
}

fn duration(key: &str, value: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(value.trim())
        .with_context(|| format!("{key}: {value:?} is not a duration like 30s, 2m or 1h"))
}

const REDACTED: &str = "[redacted]";

fn ser_secret_opt<S: serde::Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        None => s.serialize_none(),
        Some(secret) => s.serialize_str(&redact_url(secret.expose_secret())),
    }
}

fn ser_url_opt<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        None => s.serialize_none(),
        Some(url) => s.serialize_str(&redact_url(url)),
    }
}

fn ser_keys_opt<S: serde::Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        None => s.serialize_none(),
        Some(secret) => {
            let shown: Vec<String> = secret
                .expose_secret()
                .split([',', '\n'])
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(|e| match e.split_once('=') {
                    Some((label, rest)) => {
                        let project = rest.rsplit_once('@').map_or("?", |(_, p)| p);
                        format!("{label}={REDACTED}@{project}")
                    }
                    None => REDACTED.to_owned(),
                })
                .collect();
            s.serialize_str(&shown.join(","))
        }
    }
}

/// Shows a URL's scheme, host and path but never its password; a value that is not a
/// URL with credentials (a bare secret) is redacted whole.
pub fn redact_url(value: &str) -> String {
    match value.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:{REDACTED}@{host}")
            }
            None => value.to_owned(),
        },
        None => REDACTED.to_owned(),
    }
}

fn de_flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Int(i64),
        Text(String),
    }
    match Flag::deserialize(d)? {
        Flag::Bool(b) => Ok(b),
        Flag::Int(i) => Ok(i != 0),
        Flag::Text(t) => match t.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "" | "0" | "false" | "no" | "off" => Ok(false),
            other => Err(serde::de::Error::custom(format!(
                "expected a flag (1/0, true/false), got {other:?}"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> anyhow::Result<Config> {
        let figment = Figment::from(Serialized::defaults(Settings::default())).merge(
            figment::providers::Toml::string(
                &pairs
                    .iter()
                    .map(|(k, v)| format!("{k} = {v:?}\n"))
                    .collect::<String>(),
            ),
        );
        let settings: Settings = figment
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        settings.validate()
    }

    #[test]
    fn defaults_are_the_embedded_mode() {
        let config = load(&[]).expect("defaults validate");
        assert!(matches!(config.storage, Storage::Embedded { .. }));
        assert_eq!(config.settings.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(config.retry_delays.len(), 4);
        assert_eq!(config.retry_delays[3], Duration::from_secs(86_400));
    }

    #[test]
    fn postgres_without_nats_names_the_setting() {
        let err = load(&[("DATABASE_URL", "postgres://u:p@h/db")]).unwrap_err();
        assert!(err.to_string().contains("NATS_URL"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (key, value) in [
            ("COLLOQUY_DUPLICATE_WINDOW", "soon"),
            ("COLLOQUY_RETRY_DELAYS", "1m,,1h"),
            ("DATABASE_URL", "mysql://x"),
            ("COLLOQUY_STREAM", "a.b"),
            ("COLLOQUY_SUBJECT_PREFIX", "a.b"),
            ("GEMINI_BASE_URL", "not a url"),
            ("COLLOQUY_DATABASE_POOL_SIZE", "many"),
            ("COLLOQUY_TRUSTED_PROXIES", "10.0.0.0/8,the-ingress"),
        ] {
            let err = load(&[(key, value)]).unwrap_err();
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
        let err = load(&[("COLLOQUY_BIND", "nowhere")]).unwrap_err();
        assert!(err.to_string().contains("COLLOQUY_BIND"), "{err}");
        let pool = |size| {
            Settings {
                database_pool_size: size,
                ..Settings::default()
            }
            .validate()
        };
        let err = pool(3).unwrap_err();
        assert!(
            err.to_string().contains("COLLOQUY_DATABASE_POOL_SIZE"),
            "{err}"
        );
        assert_eq!(pool(4).unwrap().settings.database_pool_size, 4);
        assert_eq!(load(&[]).unwrap().settings.database_pool_size, 16);
    }

    #[test]
    fn an_identity_provider_is_configured_all_or_nothing() {
        let provider = [
            ("COLLOQUY_OIDC_ISSUER", "https://idp.example.com"),
            ("COLLOQUY_OIDC_AUDIENCE", "colloquy-app"),
            (
                "COLLOQUY_OIDC_JWKS_URL",
                "https://idp.example.com/.well-known/jwks.json",
            ),
        ];
        assert!(load(&[]).unwrap().oidc.is_none());
        let oidc = load(&provider).unwrap().oidc.unwrap();
        assert_eq!(oidc.issuer, "https://idp.example.com");
        assert_eq!(oidc.algorithms, [jsonwebtoken_rs256()]);
        assert_eq!(oidc.jwks_cooldown, Duration::from_secs(10));
        let err = load(&provider[..2]).unwrap_err();
        assert!(err.to_string().contains("COLLOQUY_OIDC_JWKS_URL"), "{err}");
        for (key, value) in [
            ("COLLOQUY_OIDC_ALGORITHMS", "none"),
            ("COLLOQUY_OIDC_JWKS_COOLDOWN", "often"),
        ] {
            let mut pairs = provider.to_vec();
            pairs.push((key, value));
            let err = load(&pairs).unwrap_err();
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
        let err = load(&[
            ("COLLOQUY_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
            ("COLLOQUY_JWT_PRIVATE_KEY_FILE", "/etc/colloquy/jwt.pem"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("both set"), "{err}");
    }

    fn jsonwebtoken_rs256() -> colloquy_gateway::auth::oidc::Algorithm {
        colloquy_gateway::auth::oidc::Algorithm::RS256
    }

    #[test]
    fn retrying_timeouts_is_a_flag_off_by_default() {
        assert!(!load(&[]).unwrap().settings.gemini_retry_timeouts);
        for (value, expected) in [
            ("true", true),
            ("1", true),
            ("on", true),
            ("false", false),
            ("0", false),
            ("", false),
        ] {
            let config = load(&[("GEMINI_RETRY_TIMEOUTS", value)]).unwrap();
            assert_eq!(config.settings.gemini_retry_timeouts, expected, "{value:?}");
        }
        let err = load(&[("GEMINI_RETRY_TIMEOUTS", "sometimes")]).unwrap_err();
        assert!(err.to_string().contains("GEMINI_RETRY_TIMEOUTS"), "{err}");
    }

    #[test]
    fn a_malformed_key_entry_is_rejected_without_echoing_it() {
        let err = load(&[("GEMINI_API_KEYS", "main=sekrit-no-project")]).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("GEMINI_API_KEYS"), "{text}");
        assert!(!text.contains("sekrit"), "{text}");
    }

    #[test]
    fn gemini_keys_parse_with_projects() {
        let config = load(&[("GEMINI_API_KEYS", "a=k1@p1, b=k2@p2")]).expect("valid keys");
        let shown: Vec<_> = config
            .gemini_pool
            .keys
            .iter()
            .map(|k| (k.label.as_str(), k.project.as_str(), k.key.expose_secret()))
            .collect();
        assert_eq!(shown, [("a", "p1", "k1"), ("b", "p2", "k2")]);
    }

    #[test]
    fn redaction_hides_every_secret() {
        let config = load(&[
            (
                "DATABASE_URL",
                "postgres://app:pg-pass-123@db:5432/colloquy",
            ),
            ("NATS_URL", "nats://n:nats-pass-456@nats:4222"),
            ("COLLOQUY_JWT_SECRET", "jwt-secret-789"),
            ("GEMINI_API_KEYS", "main=AIza-key-000@proj-a"),
            ("HTTPS_PROXY", "http://px:proxy-pass-111@proxy:3128"),
        ])
        .expect("valid");
        let shown = config.settings.redacted().to_string();
        for secret in [
            "pg-pass-123",
            "nats-pass-456",
            "jwt-secret-789",
            "AIza-key-000",
            "proxy-pass-111",
        ] {
            assert!(!shown.contains(secret), "{secret} leaked in {shown}");
        }
        assert!(
            shown.contains("postgres://app:[redacted]@db:5432/colloquy"),
            "{shown}"
        );
        assert!(shown.contains("main=[redacted]@proj-a"), "{shown}");
        // Debug output must not leak either (secrecy's Debug is redacted).
        let debug = format!("{config:?}");
        assert!(!debug.contains("jwt-secret-789") && !debug.contains("AIza-key-000"));
    }
}
