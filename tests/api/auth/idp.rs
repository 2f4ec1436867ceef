//! An identity provider of the tests' own: an axum server on `127.0.0.1:0` serving a
//! JWK set the test decides (and counting how often it is fetched), with keys the test
//! made, signing whatever claims a test wants.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use colloquy::config::Settings;
use colloquy_gateway::auth::tokens::{JwtKeys, new_ed25519_private_key_pem, unix_now};
use secrecy::ExposeSecret as _;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// The provider's `iss`.
pub const ISSUER: &str = "https://idp.colloquy.test";
/// The audience its tokens are for (Colloquy's client id there).
pub const AUDIENCE: &str = "colloquy-tests";

/// The test keys (see `gateway/src/auth/testdata/README.md`).
const RSA_PEM: &str = include_str!("../../../gateway/src/auth/testdata/rsa-2048.pem");
const EC_PEM: &str = include_str!("../../../gateway/src/auth/testdata/ec-p256.pem");

/// An RSA key (RS256).
pub fn rsa_key() -> JwtKeys {
    JwtKeys::from_private_key_pem(RSA_PEM.as_bytes()).unwrap()
}

/// An EC P-256 key (ES256).
pub fn ec_key() -> JwtKeys {
    JwtKeys::from_private_key_pem(EC_PEM.as_bytes()).unwrap()
}

/// A new Ed25519 key (EdDSA).
pub fn ed_key() -> JwtKeys {
    JwtKeys::from_private_key_pem(new_ed25519_private_key_pem().expose_secret().as_bytes()).unwrap()
}

/// Claims of a valid token of the provider for `sub`, valid for five minutes.
pub fn claims(sub: &str) -> Value {
    let now = unix_now();
    json!({ "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300 })
}

/// `claims(sub)` with `changes` merged in (a `null` removes the claim).
pub fn claims_with(sub: &str, changes: Value) -> Value {
    let mut claims = claims(sub);
    for (key, value) in changes.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(key);
        } else {
            claims[key] = value.clone();
        }
    }
    claims
}

#[derive(Default)]
struct Shared {
    jwks: Mutex<Value>,
    fetches: AtomicUsize,
    failing: AtomicBool,
}

/// The running provider; stops when dropped.
pub struct Idp {
    /// Its JWK set's URL.
    pub jwks_url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl std::fmt::Debug for Idp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idp")
            .field("jwks_url", &self.jwks_url)
            .finish_non_exhaustive()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve_jwks(State(shared): State<Arc<Shared>>) -> Response {
    shared.fetches.fetch_add(1, Ordering::SeqCst);
    if shared.failing.load(Ordering::SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let jwks = shared.jwks.lock().unwrap().clone();
    axum::Json(jwks).into_response()
}

impl Idp {
    /// Starts a provider publishing `keys`.
    pub async fn start(keys: &[&JwtKeys]) -> Self {
        let shared = Arc::new(Shared::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new()
            .route("/jwks", axum::routing::get(serve_jwks))
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        let idp = Self {
            jwks_url: format!("http://{addr}/jwks"),
            shared,
            server,
        };
        idp.publish(keys);
        idp
    }

    /// Publishes exactly `keys` from now on.
    pub fn publish(&self, keys: &[&JwtKeys]) {
        let keys: Vec<Value> = keys
            .iter()
            .flat_map(|k| {
                serde_json::to_value(k.jwks()).unwrap()["keys"]
                    .as_array()
                    .unwrap()
                    .clone()
            })
            .collect();
        *self.shared.jwks.lock().unwrap() = json!({ "keys": keys });
    }

    /// How often the key set was requested.
    pub fn fetches(&self) -> usize {
        self.shared.fetches.load(Ordering::SeqCst)
    }

    /// Makes the key set answer 500 (or not).
    pub fn fail(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::SeqCst);
    }

    /// Configures `settings` to accept this provider's tokens of `algorithms`, fetching
    /// its key set at most once per `cooldown`.
    pub fn configure(&self, settings: &mut Settings, algorithms: &str, cooldown: &str) {
        settings.oidc_issuer = Some(ISSUER.to_owned());
        settings.oidc_audience = Some(AUDIENCE.to_owned());
        settings.oidc_jwks_url = Some(self.jwks_url.clone());
        settings.oidc_algorithms = Some(algorithms.to_owned());
        settings.oidc_jwks_cooldown = cooldown.to_owned();
    }
}

/// A directory of a test's own, removed when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("colloquy-keys-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
