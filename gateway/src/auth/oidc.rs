//! Access tokens of an external identity provider (OpenID Connect), when configured
//! (`COLLOQUY_OIDC_ISSUER`, `COLLOQUY_OIDC_AUDIENCE`, `COLLOQUY_OIDC_JWKS_URL`,
//! `COLLOQUY_OIDC_ALGORITHMS`; ADR 0012).
//!
//! A token is the provider's when its (unverified) `iss` is the configured issuer; it is
//! then verified here and nowhere else:
//! - its `alg` must be in the allow-list (`none` and the HMAC algorithms can never be in
//!   it: a published key set has no secret to share);
//! - its key is the provider's JWK with the token's `kid` (without a `kid`, the one key
//!   of the set that fits the algorithm), of the algorithm's family and, when the JWK
//!   names an `alg`, of that algorithm;
//! - `iss`, `aud` (the configured audience among its values), `exp` and `nbf` (with
//!   [`CLOCK_LEEWAY`]) and a non-empty string `sub` are required.
//!
//! The key set is fetched with reqwest when first needed and kept for [`JWKS_TTL`]; a
//! token whose `kid` is not in it fetches it again (the provider has rotated its keys),
//! but fetches are single-flight and at least `COLLOQUY_OIDC_JWKS_COOLDOWN` apart, so a
//! flood of made-up `kid`s costs the provider at most one request per cooldown. A
//! failed fetch keeps the keys already known; with none known at all the request is
//! answered 503 (the provider is unreachable), not 401.
//!
//! The caller is the Colloquy user [`subject_user_id`]: a UUID (v5) derived from the
//! issuer and `sub`, the same on every gateway and every start, with no row and no
//! registration. Such a user never has the admin role.

use std::str::FromStr as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The signature algorithms of [`OidcSettings::algorithms`].
pub use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;
use uuid::Uuid;

use super::tokens::{CLOCK_LEEWAY, ISSUER};

/// The namespace of the user ids derived from a provider's subjects (UUID v5): fixed
/// for good, as every derived id depends on it.
pub const SUBJECT_NAMESPACE: Uuid = Uuid::from_u128(0xfe3f_39c6_4094_4697_bd32_cc42_1129_b342);
/// The algorithms accepted when `COLLOQUY_OIDC_ALGORITHMS` is unset: RS256, which every
/// OpenID provider supports (OpenID Connect Discovery 1.0, §3).
pub const DEFAULT_ALGORITHMS: &[Algorithm] = &[Algorithm::RS256];
/// The shortest time between two fetches of the key set, by default.
pub const DEFAULT_JWKS_COOLDOWN: Duration = Duration::from_secs(10);
/// How long a fetched key set is used before it is fetched again.
pub const JWKS_TTL: Duration = Duration::from_secs(10 * 60);
/// How long one fetch of the key set may take.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest key set read.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// The longest `sub` accepted (OpenID Connect Core 1.0, §2: at most 255 ASCII characters).
const MAX_SUBJECT_CHARS: usize = 255;

/// The Colloquy user id of the provider's subject `sub`.
pub fn subject_user_id(issuer: &str, sub: &str) -> Uuid {
    // The issuer cannot contain a line break (checked at start), so the pair is unambiguous.
    Uuid::new_v5(&SUBJECT_NAMESPACE, format!("{issuer}\n{sub}").as_bytes())
}

/// How the external identity provider is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcSettings {
    /// `COLLOQUY_OIDC_ISSUER`: the `iss` of the provider's tokens, exactly.
    pub issuer: String,
    /// `COLLOQUY_OIDC_AUDIENCE`: what the tokens' `aud` must contain (usually the client
    /// id Colloquy has at the provider).
    pub audience: String,
    /// `COLLOQUY_OIDC_JWKS_URL`: the provider's key set (`jwks_uri` of its discovery
    /// document); `https://`, or `http://` to a loopback address.
    pub jwks_url: String,
    /// `COLLOQUY_OIDC_ALGORITHMS`: the signature algorithms accepted.
    pub algorithms: Vec<Algorithm>,
    /// `COLLOQUY_OIDC_JWKS_COOLDOWN`: the shortest time between two fetches of the key set.
    pub jwks_cooldown: Duration,
    /// How long a fetched key set is used ([`JWKS_TTL`]).
    pub jwks_ttl: Duration,
}

impl OidcSettings {
    /// The settings from their raw values, each checked and named when wrong. `Ok(None)`
    /// when none of issuer, audience and JWKS URL is set (no provider); setting only some
    /// of them is an error.
    pub fn from_raw(
        issuer: Option<&str>,
        audience: Option<&str>,
        jwks_url: Option<&str>,
        algorithms: Option<&str>,
        jwks_cooldown: Duration,
    ) -> Result<Option<Self>, String> {
        fn set(value: Option<&str>) -> Option<&str> {
            value.map(str::trim).filter(|v| !v.is_empty())
        }
        let (issuer, audience, jwks_url) = match (set(issuer), set(audience), set(jwks_url)) {
            (None, None, None) => {
                if set(algorithms).is_some() {
                    return Err(
                        "COLLOQUY_OIDC_ALGORITHMS is set without COLLOQUY_OIDC_ISSUER, COLLOQUY_OIDC_AUDIENCE and COLLOQUY_OIDC_JWKS_URL".into(),
                    );
                }
                return Ok(None);
            }
            (Some(issuer), Some(audience), Some(url)) => (issuer, audience, url),
            (issuer, audience, url) => {
                let missing: Vec<&str> = [
                    ("COLLOQUY_OIDC_ISSUER", issuer),
                    ("COLLOQUY_OIDC_AUDIENCE", audience),
                    ("COLLOQUY_OIDC_JWKS_URL", url),
                ]
                .into_iter()
                .filter(|(_, value)| value.is_none())
                .map(|(key, _)| key)
                .collect();
                return Err(format!(
                    "an external identity provider needs COLLOQUY_OIDC_ISSUER, COLLOQUY_OIDC_AUDIENCE and COLLOQUY_OIDC_JWKS_URL; missing: {}",
                    missing.join(", ")
                ));
            }
        };
        if issuer == ISSUER {
            return Err(format!(
                "COLLOQUY_OIDC_ISSUER must differ from the issuer of Colloquy's own tokens ({ISSUER:?})"
            ));
        }
        if issuer.chars().any(char::is_control) || audience.chars().any(char::is_control) {
            return Err(
                "COLLOQUY_OIDC_ISSUER and COLLOQUY_OIDC_AUDIENCE must not contain control characters"
                    .into(),
            );
        }
        check_jwks_url(jwks_url)?;
        let algorithms = match set(algorithms) {
            Some(list) => parse_algorithms(list)?,
            None => DEFAULT_ALGORITHMS.to_vec(),
        };
        Ok(Some(Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            jwks_url: jwks_url.to_owned(),
            algorithms,
            jwks_cooldown,
            jwks_ttl: JWKS_TTL,
        }))
    }
}

/// `https://…`, or `http://` to a loopback address (a key set fetched in the clear
/// could be replaced on the way).
fn check_jwks_url(raw: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(raw)
        .map_err(|_| format!("COLLOQUY_OIDC_JWKS_URL must be a URL (got {raw:?})"))?;
    let Some(host) = url.host_str() else {
        return Err(format!("COLLOQUY_OIDC_JWKS_URL has no host (got {raw:?})"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(format!(
            "COLLOQUY_OIDC_JWKS_URL must be https:// (http:// only to a loopback address); got {raw:?}"
        )),
    }
}

/// A comma-separated list of JWS algorithm names (`RS256,ES256`).
fn parse_algorithms(list: &str) -> Result<Vec<Algorithm>, String> {
    let mut algorithms = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if name.eq_ignore_ascii_case("none") {
            return Err(
                "COLLOQUY_OIDC_ALGORITHMS: `none` (unsigned tokens) is never accepted".into(),
            );
        }
        let algorithm = Algorithm::from_str(name).map_err(|_| {
            format!(
                "COLLOQUY_OIDC_ALGORITHMS: unknown algorithm {name:?}; expected names such as RS256, PS256, ES256, ES384, EdDSA"
            )
        })?;
        if algorithm.family() == AlgorithmFamily::Hmac {
            return Err(format!(
                "COLLOQUY_OIDC_ALGORITHMS: {name} needs a shared secret, which a provider's published key set cannot hold"
            ));
        }
        if !algorithms.contains(&algorithm) {
            algorithms.push(algorithm);
        }
    }
    if algorithms.is_empty() {
        return Err("COLLOQUY_OIDC_ALGORITHMS must name at least one algorithm".into());
    }
    Ok(algorithms)
}

/// Why a provider's token was not accepted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OidcError {
    /// The token is not valid (401); the reason is for the logs only.
    #[error("{0}")]
    Rejected(String),
    /// No key of the provider could ever be fetched (503).
    #[error("the identity provider's keys cannot be fetched")]
    Unavailable,
}

fn rejected(why: impl Into<String>) -> OidcError {
    OidcError::Rejected(why.into())
}

/// One usable key of the provider's set.
#[derive(Clone)]
struct ProviderKey {
    kid: Option<String>,
    /// The JWK's `alg`, when it names one.
    algorithm: Option<Algorithm>,
    family: AlgorithmFamily,
    key: DecodingKey,
}

/// The key set as last fetched, and when.
#[derive(Default)]
struct Cache {
    keys: Option<Arc<Vec<ProviderKey>>>,
    fetched_at: Option<Instant>,
    /// When the last fetch (successful or not) ended.
    attempted_at: Option<Instant>,
    /// Fetches made so far: a caller that waited for another's fetch uses its result.
    generation: u64,
}

/// The claims read from a provider's token (the rest are checked by the validation).
#[derive(Deserialize)]
struct SubjectClaims {
    sub: String,
}

/// Verifies the provider's tokens; shared by every request of this process.
pub(crate) struct OidcVerifier {
    settings: OidcSettings,
    client: reqwest::Client,
    cache: Mutex<Cache>,
    /// Held while fetching: one fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuer", &self.settings.issuer)
            .field("algorithms", &self.settings.algorithms)
            .finish_non_exhaustive()
    }
}

impl OidcVerifier {
    pub(crate) fn new(settings: OidcSettings) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(JWKS_TIMEOUT)
            .user_agent(concat!("colloquy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client for COLLOQUY_OIDC_JWKS_URL: {e}"))?;
        Ok(Self {
            settings,
            client,
            cache: Mutex::new(Cache::default()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// The issuer whose tokens are verified here.
    pub(crate) fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// Verifies a token of the provider; the Colloquy user it stands for.
    pub(crate) async fn verify(&self, token: &str) -> Result<Uuid, OidcError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| rejected(format!("unreadable header: {e}")))?;
        let algorithm = header.alg;
        if !self.settings.algorithms.contains(&algorithm) {
            return Err(rejected(format!(
                "algorithm {algorithm:?} is not in COLLOQUY_OIDC_ALGORITHMS"
            )));
        }
        let key = self.key(header.kid.as_deref(), algorithm).await?;
        let claims =
            jsonwebtoken::decode::<SubjectClaims>(token, &key, &self.validation(algorithm))
                .map_err(|e| rejected(format!("invalid provider token: {e}")))?
                .claims;
        if claims.sub.is_empty()
            || claims.sub.chars().count() > MAX_SUBJECT_CHARS
            || claims.sub.chars().any(char::is_control)
        {
            return Err(rejected(
                "the token's sub is empty, too long or not printable",
            ));
        }
        Ok(subject_user_id(&self.settings.issuer, &claims.sub))
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = CLOCK_LEEWAY.as_secs();
        validation
    }

    /// The key for a token's `kid` and `alg`: from the cached set while it is fresh and
    /// has it; otherwise after fetching the set again, if the cooldown allows.
    async fn key(&self, kid: Option<&str>, algorithm: Algorithm) -> Result<DecodingKey, OidcError> {
        let (keys, fresh, generation) = {
            let cache = self.lock();
            let fresh = cache
                .fetched_at
                .is_some_and(|at| at.elapsed() < self.settings.jwks_ttl);
            (cache.keys.clone(), fresh, cache.generation)
        };
        if fresh
            && let Some(keys) = &keys
            && let Some(key) = find(keys, kid, algorithm)
        {
            return Ok(key.key.clone());
        }
        let Some(keys) = self.refresh(generation).await else {
            return Err(OidcError::Unavailable);
        };
        find(&keys, kid, algorithm)
            .map(|key| key.key.clone())
            .ok_or_else(|| {
                rejected(format!(
                    "no key of the provider fits kid {kid:?} and algorithm {algorithm:?}"
                ))
            })
    }

    /// Fetches the key set unless another caller did since `seen` or the cooldown has
    /// not passed; the keys known afterwards (`None`: none ever fetched).
    async fn refresh(&self, seen: u64) -> Option<Arc<Vec<ProviderKey>>> {
        let _flight = self.fetching.lock().await;
        {
            let cache = self.lock();
            let cooling = cache
                .attempted_at
                .is_some_and(|at| at.elapsed() < self.settings.jwks_cooldown);
            if cache.generation != seen || cooling {
                return cache.keys.clone();
            }
        }
        let fetched = self.fetch().await;
        let mut cache = self.lock();
        cache.generation += 1;
        cache.attempted_at = Some(Instant::now());
        match fetched {
            Ok(keys) => {
                tracing::info!(
                    keys = keys.len(),
                    url = %self.settings.jwks_url,
                    "fetched the identity provider's key set"
                );
                cache.keys = Some(Arc::new(keys));
                cache.fetched_at = cache.attempted_at;
            }
            Err(error) => {
                tracing::warn!(
                    error = %error,
                    url = %self.settings.jwks_url,
                    known = cache.keys.as_ref().map_or(0, |k| k.len()),
                    "cannot fetch the identity provider's key set; keeping the keys already known"
                );
            }
        }
        cache.keys.clone()
    }

    async fn fetch(&self) -> Result<Vec<ProviderKey>, String> {
        let mut response = self
            .client
            .get(&self.settings.jwks_url)
            .header(
                reqwest::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("reading the body failed: {e}"))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("the key set is larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        parse_key_set(&body)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The usable keys of a JWK set: signature keys of the asymmetric families (`use: enc`
/// keys, symmetric keys, and keys this build cannot read are left out, so that one odd
/// key does not hide the others).
fn parse_key_set(body: &[u8]) -> Result<Vec<ProviderKey>, String> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet =
        serde_json::from_slice(body).map_err(|e| format!("the body is not a JWK set: {e}"))?;
    let mut keys = Vec::new();
    for value in raw.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|usage| *usage != PublicKeyUse::Signature)
        {
            continue;
        }
        if !matches!(
            jwk.algorithm,
            AlgorithmParameters::RSA(_)
                | AlgorithmParameters::EllipticCurve(_)
                | AlgorithmParameters::OctetKeyPair(_)
        ) {
            continue;
        }
        let algorithm = match jwk.common.key_algorithm {
            Some(named) => match Algorithm::from_str(&named.to_string()) {
                Ok(algorithm) if algorithm.family() != AlgorithmFamily::Hmac => Some(algorithm),
                _ => continue,
            },
            None => None,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        keys.push(ProviderKey {
            kid: jwk.common.key_id.clone(),
            algorithm,
            family: key.family(),
            key,
        });
    }
    Ok(keys)
}

/// The key for `kid` (without one: the only key that fits) among those of
/// `algorithm`'s family whose own `alg`, if any, is `algorithm`.
fn find<'a>(
    keys: &'a [ProviderKey],
    kid: Option<&str>,
    algorithm: Algorithm,
) -> Option<&'a ProviderKey> {
    let mut fitting = keys.iter().filter(|key| {
        key.family == algorithm.family() && key.algorithm.is_none_or(|own| own == algorithm)
    });
    match kid {
        Some(kid) => fitting.find(|key| key.kid.as_deref() == Some(kid)),
        None => {
            let only = fitting.next()?;
            fitting.next().is_none().then_some(only)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tokens::JwtKeys;

    const COOLDOWN: Duration = Duration::from_secs(10);

    fn settings(
        issuer: Option<&str>,
        audience: Option<&str>,
        url: Option<&str>,
        algorithms: Option<&str>,
    ) -> Result<Option<OidcSettings>, String> {
        OidcSettings::from_raw(issuer, audience, url, algorithms, COOLDOWN)
    }

    const URL: &str = "https://idp.example.com/.well-known/jwks.json";

    #[test]
    fn settings_are_all_or_nothing_and_default_to_rs256() {
        assert_eq!(settings(None, None, None, None), Ok(None));
        assert_eq!(settings(Some(" "), None, None, None), Ok(None));
        let error = settings(Some("https://idp"), None, None, None).unwrap_err();
        assert!(
            error.contains("COLLOQUY_OIDC_AUDIENCE") && error.contains("COLLOQUY_OIDC_JWKS_URL"),
            "{error}"
        );
        assert!(!error.contains("missing: COLLOQUY_OIDC_ISSUER"), "{error}");
        let error = settings(None, None, None, Some("RS256")).unwrap_err();
        assert!(error.contains("COLLOQUY_OIDC_ALGORITHMS"), "{error}");
        let oidc = settings(Some("https://idp"), Some("colloquy-app"), Some(URL), None)
            .unwrap()
            .unwrap();
        assert_eq!(oidc.algorithms, [Algorithm::RS256]);
        assert_eq!(oidc.jwks_cooldown, COOLDOWN);
    }

    #[test]
    fn the_allow_list_refuses_none_hmac_and_unknown_names() {
        let with = |list| settings(Some("https://idp"), Some("app"), Some(URL), Some(list));
        assert_eq!(
            with(" ES256, RS256,ES256 ").unwrap().unwrap().algorithms,
            [Algorithm::ES256, Algorithm::RS256]
        );
        for (list, expected) in [
            ("none", "`none`"),
            ("RS256,NONE", "`none`"),
            ("HS256", "shared secret"),
            ("RS1024", "unknown algorithm"),
            (",", "at least one"),
        ] {
            let error = with(list).unwrap_err();
            assert!(error.contains("COLLOQUY_OIDC_ALGORITHMS"), "{error}");
            assert!(error.contains(expected), "{list}: {error}");
        }
    }

    #[test]
    fn the_key_set_url_is_https_or_loopback_and_the_issuer_not_ours() {
        let with_url = |url| settings(Some("https://idp"), Some("app"), Some(url), None);
        for url in [
            "http://127.0.0.1:8000/jwks",
            "http://localhost/jwks",
            "http://[::1]:9/jwks",
            URL,
        ] {
            assert!(with_url(url).is_ok(), "{url}");
        }
        for url in [
            "http://idp.example.com/jwks",
            "ftp://127.0.0.1/jwks",
            "jwks.json",
        ] {
            let error = with_url(url).unwrap_err();
            assert!(error.contains("COLLOQUY_OIDC_JWKS_URL"), "{url}: {error}");
        }
        let error = settings(Some("colloquy"), Some("app"), Some(URL), None).unwrap_err();
        assert!(error.contains("COLLOQUY_OIDC_ISSUER"), "{error}");
        let error = settings(Some("https://idp\n"), Some("a\u{7}"), Some(URL), None).unwrap_err();
        assert!(error.contains("control characters"), "{error}");
    }

    #[test]
    fn subjects_map_to_stable_distinct_users() {
        let a = subject_user_id("https://idp", "alice");
        assert_eq!(a, subject_user_id("https://idp", "alice"));
        assert_ne!(a, subject_user_id("https://idp", "bob"));
        assert_ne!(a, subject_user_id("https://other-idp", "alice"));
        assert_eq!(a.get_version_num(), 5);
        // Never the id of an account registered here (those are random, version 4).
        assert_ne!(a.get_version_num(), Uuid::new_v4().get_version_num());
    }

    #[test]
    fn key_sets_keep_only_signature_keys_of_asymmetric_families() {
        let rsa = JwtKeys::from_private_key_pem(include_bytes!("testdata/rsa-2048.pem")).unwrap();
        let ec = JwtKeys::from_private_key_pem(include_bytes!("testdata/ec-p256.pem")).unwrap();
        let mut set = serde_json::to_value(rsa.jwks()).unwrap();
        let ec_jwk = serde_json::to_value(ec.jwks()).unwrap()["keys"][0].clone();
        let keys = set["keys"].as_array_mut().unwrap();
        keys.push(ec_jwk.clone());
        let mut encryption = ec_jwk.clone();
        encryption["use"] = "enc".into();
        encryption["kid"] = "enc".into();
        keys.push(encryption);
        keys.push(serde_json::json!({ "kty": "oct", "k": "c2VjcmV0", "kid": "oct" }));
        keys.push(serde_json::json!({ "kty": "weird", "kid": "weird" }));
        let parsed = parse_key_set(set.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.len(), 2);
        let rsa_kid = rsa.key_id().unwrap();
        let ec_kid = ec.key_id().unwrap();
        assert!(find(&parsed, Some(rsa_kid), Algorithm::RS256).is_some());
        // The JWK names RS256: not usable for PS256, nor for another family.
        assert!(find(&parsed, Some(rsa_kid), Algorithm::PS256).is_none());
        assert!(find(&parsed, Some(rsa_kid), Algorithm::ES256).is_none());
        assert!(find(&parsed, Some(ec_kid), Algorithm::ES256).is_some());
        assert!(find(&parsed, Some("enc"), Algorithm::ES256).is_none());
        assert!(find(&parsed, Some("oct"), Algorithm::HS256).is_none());
        // Without a kid: the one key that fits, if there is exactly one.
        assert!(find(&parsed, None, Algorithm::ES256).is_some());
        let two_rsa: Vec<ProviderKey> = [parsed[0].clone(), parsed[0].clone()].into();
        assert!(find(&two_rsa, None, Algorithm::RS256).is_none());
        assert!(parse_key_set(b"[]").is_err());
    }
}
