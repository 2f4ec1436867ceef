//! Access tokens (JWT, HS256) and refresh tokens (opaque random strings).
//!
//! Access tokens are short-lived and stateless: nothing is stored, so they cannot be
//! revoked; a logout or a disabled account takes effect at the next refresh, at most
//! [`ACCESS_TOKEN_TTL`] later. Refresh tokens are stored (their SHA-256 only) and
//! rotate on every use; see `store.rs` and the 0005 migration.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore as _;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// `iss` of every access token, and the only issuer accepted.
pub const ISSUER: &str = "colloquy";
/// `aud` of every access token, and the only audience accepted.
pub const AUDIENCE: &str = "colloquy";
/// How long an access token is valid.
pub const ACCESS_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a refresh token is valid after it is issued (each rotation issues a new
/// one, so an active session slides forward; an idle one ends after this).
pub const REFRESH_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Clock skew tolerated on `exp` between the processes that sign and verify.
pub const CLOCK_LEEWAY: Duration = Duration::from_secs(30);
/// The shortest HS256 secret accepted: RFC 7518 §3.2 requires a key at least as long
/// as the hash output (256 bits).
pub const MIN_SECRET_BYTES: usize = 32;
/// The one algorithm signed and accepted.
const ALGORITHM: Algorithm = Algorithm::HS256;

/// The claims of a Colloquy access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The user id.
    pub sub: Uuid,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    pub iss: String,
    pub aud: String,
    /// Whether the user has the admin role.
    pub admin: bool,
    /// A unique id per token, for tracing a token in logs without logging the token.
    pub jti: Uuid,
}

impl AccessClaims {
    /// Claims for `user`, valid for [`ACCESS_TOKEN_TTL`] from now.
    pub fn new(user: Uuid, admin: bool) -> Self {
        let now = unix_now();
        Self {
            sub: user,
            exp: now + ACCESS_TOKEN_TTL.as_secs(),
            iat: now,
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            admin,
            jti: Uuid::new_v4(),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why the signing key could not be set up; each names the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "COLLOQUY_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes (RFC 7518 §3.2); generate one with `openssl rand -base64 48`"
    )]
    SecretTooShort,
    #[error(
        "COLLOQUY_JWT_PRIVATE_KEY_FILE is set, but asymmetric signing keys are not supported yet: unset it and set COLLOQUY_JWT_SECRET (HS256) instead"
    )]
    PrivateKeyFileUnsupported,
}

/// The access-token signing and verification keys, with a validation that pins HS256,
/// the issuer and the audience.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys")
            .field("algorithm", &ALGORITHM)
            .finish_non_exhaustive()
    }
}

impl JwtKeys {
    /// Keys from the configuration: `COLLOQUY_JWT_SECRET` if set; otherwise a random
    /// secret, with a warning (tokens then die with the process and are not accepted by
    /// any other process).
    pub fn from_settings(
        secret: Option<&SecretString>,
        private_key_file: Option<&Path>,
    ) -> Result<Self, KeyError> {
        if private_key_file.is_some() {
            return Err(KeyError::PrivateKeyFileUnsupported);
        }
        if let Some(secret) = secret {
            return Self::hs256(secret.expose_secret().as_bytes());
        }
        tracing::warn!(
            "neither COLLOQUY_JWT_SECRET nor COLLOQUY_JWT_PRIVATE_KEY_FILE is set: access tokens are signed with a random key made at start, so they will not survive a restart or work across processes"
        );
        Ok(Self::random())
    }

    /// HS256 keys from a shared secret of at least [`MIN_SECRET_BYTES`].
    pub fn hs256(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(KeyError::SecretTooShort);
        }
        let mut validation = Validation::new(ALGORITHM);
        validation.algorithms = vec![ALGORITHM];
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        // (`iat`, `admin` and `jti` are required by `AccessClaims` itself.)
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.leeway = CLOCK_LEEWAY.as_secs();
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        })
    }

    /// HS256 keys from a fresh random 512-bit secret.
    pub fn random() -> Self {
        let mut secret = [0u8; 64];
        rand::rng().fill_bytes(&mut secret);
        Self::hs256(&secret).expect("BUG: 64 bytes is long enough")
    }

    /// Signs `claims` (whatever they say: tests use this to mint bad tokens).
    pub fn sign(&self, claims: &AccessClaims) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(&Header::new(ALGORITHM), claims, &self.encoding)
    }

    /// Verifies the signature (HS256 only: `alg: none` and every other algorithm are
    /// refused), `exp`, `iss` and `aud`.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, jsonwebtoken::errors::Error> {
        jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
    }
}

/// A new refresh token: 32 random bytes, base64url without padding (43 characters).
pub fn new_refresh_token() -> SecretString {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    SecretString::from(URL_SAFE_NO_PAD.encode(bytes))
}

/// What is stored for a refresh token: its SHA-256.
pub fn refresh_token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_signed_token_verifies() {
        let keys = JwtKeys::hs256(SECRET).unwrap();
        let claims = AccessClaims::new(Uuid::new_v4(), true);
        let token = keys.sign(&claims).unwrap();
        assert_eq!(keys.verify(&token).unwrap(), claims);
    }

    #[test]
    fn another_key_expiry_issuer_or_audience_is_refused() {
        let keys = JwtKeys::hs256(SECRET).unwrap();
        let other = JwtKeys::random();
        let claims = AccessClaims::new(Uuid::new_v4(), false);
        assert!(keys.verify(&other.sign(&claims).unwrap()).is_err());
        let expired = AccessClaims {
            exp: unix_now() - 3600,
            ..claims.clone()
        };
        assert!(keys.verify(&keys.sign(&expired).unwrap()).is_err());
        let issuer = AccessClaims {
            iss: "someone-else".into(),
            ..claims.clone()
        };
        assert!(keys.verify(&keys.sign(&issuer).unwrap()).is_err());
        let audience = AccessClaims {
            aud: "someone-else".into(),
            ..claims
        };
        assert!(keys.verify(&keys.sign(&audience).unwrap()).is_err());
    }

    #[test]
    fn short_secrets_are_refused_naming_the_setting() {
        let error = JwtKeys::hs256(b"short").unwrap_err();
        assert!(error.to_string().contains("COLLOQUY_JWT_SECRET"));
    }

    #[test]
    fn refresh_tokens_are_43_url_safe_characters_and_hash_to_32_bytes() {
        let token = new_refresh_token();
        let token = token.expose_secret();
        assert_eq!(token.len(), 43);
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_eq!(refresh_token_hash(token).len(), 32);
        assert_ne!(new_refresh_token().expose_secret(), token);
    }
}
