//! Access tokens (JWT) and refresh tokens (opaque random strings).
//!
//! Access tokens are short-lived and stateless: nothing is stored, so they cannot be
//! revoked; a logout or a disabled account takes effect at the next refresh, at most
//! [`ACCESS_TOKEN_TTL`] later. Refresh tokens are stored (their SHA-256 only) and
//! rotate on every use; see `store.rs` and the 0005 migration.
//!
//! The signing key is one of:
//! - a shared secret (`COLLOQUY_JWT_SECRET`): HS256, and nothing is published;
//! - an asymmetric private key in a PEM file (`COLLOQUY_JWT_PRIVATE_KEY_FILE`): RSA
//!   (PKCS#8 or PKCS#1, at least 2048 bits) signs RS256, EC P-256 ES256, EC P-384 ES384
//!   and Ed25519 EdDSA. The algorithm follows from the key and is the only one accepted;
//!   every token names the key by `kid` (its RFC 7638 thumbprint), and the public half
//!   is published as a JWK set at `GET /.well-known/jwks.json` so that other services
//!   can verify Colloquy's tokens without sharing a secret.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use pkcs8::der::zeroize::Zeroizing;
use pkcs8::{ObjectIdentifier, PrivateKeyInfo};
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
/// The smallest RSA key accepted (RFC 7518 §3.3: 2048 bits or larger).
pub const MIN_RSA_BITS: usize = 2048;
/// The algorithm of a shared secret.
const HS256: Algorithm = Algorithm::HS256;

/// PKCS#8 algorithm identifiers of the keys accepted.
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
/// A PKCS#8 v1 Ed25519 private key up to its 32-byte seed (RFC 8410 §7): what
/// jsonwebtoken reads. A v2 key (with the public key) is rewritten to this form.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

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

/// Why the signing key could not be set up; each names the setting at fault, and none
/// repeats any part of the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "COLLOQUY_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes (RFC 7518 §3.2); generate one with `openssl rand -base64 48`"
    )]
    SecretTooShort,
    #[error(
        "COLLOQUY_JWT_SECRET and COLLOQUY_JWT_PRIVATE_KEY_FILE are both set: set one (the key file signs with an asymmetric key and publishes its public half; the secret signs HS256)"
    )]
    BothKeys,
    #[error("COLLOQUY_JWT_PRIVATE_KEY_FILE: cannot read {path}: {source}")]
    KeyFileUnreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("COLLOQUY_JWT_PRIVATE_KEY_FILE: {0}")]
    InvalidPrivateKey(String),
}

fn invalid(why: impl Into<String>) -> KeyError {
    KeyError::InvalidPrivateKey(why.into())
}

/// The access-token signing and verification keys, with a validation that pins the
/// algorithm, the issuer and the audience.
#[derive(Clone)]
pub struct JwtKeys {
    algorithm: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// The public key as a JWK (with `kid` and `use: sig`): `None` for a shared secret.
    public: Option<Jwk>,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl JwtKeys {
    /// Keys from the configuration: the private key file if set, else
    /// `COLLOQUY_JWT_SECRET` if set; otherwise a random secret, with a warning (tokens
    /// then die with the process and are not accepted by any other process). Both set
    /// is an error.
    pub fn from_settings(
        secret: Option<&SecretString>,
        private_key_file: Option<&Path>,
    ) -> Result<Self, KeyError> {
        match (secret, private_key_file) {
            (Some(_), Some(_)) => Err(KeyError::BothKeys),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map(Zeroizing::new).map_err(|source| {
                    KeyError::KeyFileUnreadable {
                        path: path.display().to_string(),
                        source,
                    }
                })?;
                let keys = Self::from_private_key_pem(&pem)?;
                tracing::info!(
                    algorithm = ?keys.algorithm,
                    kid = keys.key_id().unwrap_or_default(),
                    "access tokens are signed with the key of COLLOQUY_JWT_PRIVATE_KEY_FILE; its public half is at /.well-known/jwks.json"
                );
                Ok(keys)
            }
            (Some(secret), None) => Self::hs256(secret.expose_secret().as_bytes()),
            (None, None) => {
                tracing::warn!(
                    "neither COLLOQUY_JWT_SECRET nor COLLOQUY_JWT_PRIVATE_KEY_FILE is set: access tokens are signed with a random key made at start, so they will not survive a restart or work across processes"
                );
                Ok(Self::random())
            }
        }
    }

    /// HS256 keys from a shared secret of at least [`MIN_SECRET_BYTES`].
    pub fn hs256(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(KeyError::SecretTooShort);
        }
        Ok(Self {
            algorithm: HS256,
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation: validation(HS256),
            public: None,
        })
    }

    /// HS256 keys from a fresh random 512-bit secret.
    pub fn random() -> Self {
        let mut secret = Zeroizing::new([0u8; 64]);
        rand::rng().fill_bytes(secret.as_mut());
        Self::hs256(secret.as_ref()).expect("BUG: 64 bytes is long enough")
    }

    /// Keys from a PEM-encoded private key: `PRIVATE KEY` (PKCS#8: RSA, EC P-256 or
    /// P-384, Ed25519) or `RSA PRIVATE KEY` (PKCS#1). The algorithm follows from the key.
    /// The key is tried once (a token signed and verified with its public half), so a
    /// key that cannot sign fails here rather than at the first login.
    pub fn from_private_key_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let (label, der) = pkcs8::der::pem::decode_vec(pem).map_err(|_| {
            invalid(
                "not one PEM-encoded private key (expected a file that is one `-----BEGIN PRIVATE KEY-----` block)",
            )
        })?;
        let der = Zeroizing::new(der);
        let (algorithm, encoding) = match label {
            "PRIVATE KEY" => pkcs8_key(&der)?,
            "RSA PRIVATE KEY" => (Algorithm::RS256, EncodingKey::from_rsa_der(&der)),
            "EC PRIVATE KEY" => {
                return Err(invalid(
                    "an EC key in SEC1 form; convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in <file> -out <new file>`",
                ));
            }
            "ENCRYPTED PRIVATE KEY" => {
                return Err(invalid(
                    "the key is encrypted; store it decrypted (`openssl pkcs8 -in <file> -out <new file>`) with permissions only the server's user can read",
                ));
            }
            other => {
                return Err(invalid(format!(
                    "a PEM block labelled {other:?}; expected a private key (PRIVATE KEY or RSA PRIVATE KEY)"
                )));
            }
        };
        Self::asymmetric(algorithm, encoding)
    }

    fn asymmetric(algorithm: Algorithm, encoding: EncodingKey) -> Result<Self, KeyError> {
        let mut jwk = Jwk::from_encoding_key(&encoding, algorithm)
            .map_err(|e| invalid(format!("the {algorithm:?} key cannot be read ({e})")))?;
        if let AlgorithmParameters::RSA(rsa) = &jwk.algorithm {
            let modulus = URL_SAFE_NO_PAD
                .decode(&rsa.n)
                .map_err(|_| invalid("the RSA key cannot be read"))?;
            let bits = modulus.len() * 8;
            if bits < MIN_RSA_BITS {
                return Err(invalid(format!(
                    "the RSA key has {bits} bits; at least {MIN_RSA_BITS} are required"
                )));
            }
        }
        let kid = jwk
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| invalid(format!("the key's thumbprint cannot be computed ({e})")))?;
        jwk.common.key_id = Some(kid);
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        let decoding = DecodingKey::from_jwk(&jwk)
            .map_err(|e| invalid(format!("the public key cannot be derived ({e})")))?;
        let keys = Self {
            algorithm,
            encoding,
            decoding,
            validation: validation(algorithm),
            public: Some(jwk),
        };
        let probe = keys
            .sign(&AccessClaims::new(Uuid::nil(), false))
            .map_err(|e| invalid(format!("the key cannot sign ({e})")))?;
        keys.verify(&probe).map_err(|e| {
            invalid(format!(
                "a token signed with the key does not verify with its public half ({e})"
            ))
        })?;
        Ok(keys)
    }

    /// The one algorithm signed and accepted.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The `kid` of every token (an asymmetric key's RFC 7638 thumbprint); `None` for a
    /// shared secret.
    pub fn key_id(&self) -> Option<&str> {
        self.public.as_ref()?.common.key_id.as_deref()
    }

    /// The public keys that verify these tokens, as `GET /.well-known/jwks.json` serves
    /// them: the key file's public half, or none for a shared secret (which is never
    /// published).
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: self.public.iter().cloned().collect(),
        }
    }

    /// Signs `claims` (whatever they say: tests use this to mint bad tokens, and to
    /// play an identity provider), with this key's algorithm and `kid`.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(self.algorithm);
        header.kid = self.key_id().map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding)
    }

    /// Verifies the signature (this key's algorithm only: `alg: none` and every other
    /// algorithm are refused), `exp`, `iss` and `aud`.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, jsonwebtoken::errors::Error> {
        jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
    }
}

/// The validation of Colloquy's own tokens: `algorithm` only, the issuer and audience,
/// and an unexpired `exp` (with [`CLOCK_LEEWAY`]).
fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.algorithms = vec![algorithm];
    validation.set_issuer(&[ISSUER]);
    validation.set_audience(&[AUDIENCE]);
    // (`iat`, `admin` and `jti` are required by `AccessClaims` itself.)
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.validate_exp = true;
    validation.leeway = CLOCK_LEEWAY.as_secs();
    validation
}

/// The algorithm and signing key of a PKCS#8 private key.
fn pkcs8_key(der: &[u8]) -> Result<(Algorithm, EncodingKey), KeyError> {
    let info = PrivateKeyInfo::try_from(der).map_err(|_| invalid("not a PKCS#8 private key"))?;
    let oid = info.algorithm.oid;
    if oid == RSA_ENCRYPTION {
        // jsonwebtoken takes the PKCS#1 key inside.
        Ok((
            Algorithm::RS256,
            EncodingKey::from_rsa_der(info.private_key),
        ))
    } else if oid == EC_PUBLIC_KEY {
        match info.algorithm.parameters_oid() {
            Ok(curve) if curve == SECP256R1 => {
                Ok((Algorithm::ES256, EncodingKey::from_ec_der(der)))
            }
            Ok(curve) if curve == SECP384R1 => {
                Ok((Algorithm::ES384, EncodingKey::from_ec_der(der)))
            }
            _ => Err(invalid(
                "an EC key on a curve other than P-256 or P-384; use P-256 (ES256)",
            )),
        }
    } else if oid == ED25519 {
        // The private key is an OCTET STRING holding the 32-byte seed.
        let seed = match info.private_key {
            [0x04, 0x20, seed @ ..] if seed.len() == 32 => seed,
            _ => return Err(invalid("the Ed25519 key cannot be read")),
        };
        let mut v1 = Zeroizing::new(Vec::with_capacity(48));
        v1.extend_from_slice(&ED25519_PKCS8_V1_PREFIX);
        v1.extend_from_slice(seed);
        Ok((Algorithm::EdDSA, EncodingKey::from_ed_der(&v1)))
    } else {
        Err(invalid(format!(
            "a key of algorithm {oid}; expected RSA, EC P-256 or P-384, or Ed25519"
        )))
    }
}

/// A new Ed25519 private key, PEM-encoded PKCS#8 (`-----BEGIN PRIVATE KEY-----`): what
/// `COLLOQUY_JWT_PRIVATE_KEY_FILE` reads, like `openssl genpkey -algorithm ed25519`.
pub fn new_ed25519_private_key_pem() -> SecretString {
    let mut der = Zeroizing::new(Vec::with_capacity(48));
    der.extend_from_slice(&ED25519_PKCS8_V1_PREFIX);
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(seed.as_mut());
    der.extend_from_slice(seed.as_ref());
    let pem = pkcs8::der::pem::encode_string("PRIVATE KEY", pkcs8::LineEnding::LF, &der)
        .expect("BUG: 48 bytes always encode");
    SecretString::from(pem)
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

    const RSA_PKCS8: &str = include_str!("testdata/rsa-2048.pem");
    const RSA_PKCS1: &str = include_str!("testdata/rsa-2048-pkcs1.pem");
    const EC_P256: &str = include_str!("testdata/ec-p256.pem");
    const EC_P256_SEC1: &str = include_str!("testdata/ec-p256-sec1.pem");
    const ED25519_PEM: &str = include_str!("testdata/ed25519.pem");

    fn from_pem(pem: &str) -> Result<JwtKeys, KeyError> {
        JwtKeys::from_private_key_pem(pem.as_bytes())
    }

    #[test]
    fn each_key_type_pins_its_algorithm_and_publishes_only_its_public_half() {
        let generated = new_ed25519_private_key_pem();
        for (pem, algorithm, kty) in [
            (RSA_PKCS8, Algorithm::RS256, "RSA"),
            (RSA_PKCS1, Algorithm::RS256, "RSA"),
            (EC_P256, Algorithm::ES256, "EC"),
            (ED25519_PEM, Algorithm::EdDSA, "OKP"),
            (generated.expose_secret(), Algorithm::EdDSA, "OKP"),
        ] {
            let keys = from_pem(pem).unwrap();
            assert_eq!(keys.algorithm(), algorithm);
            let claims = AccessClaims::new(Uuid::new_v4(), true);
            let token = keys.sign(&claims).unwrap();
            assert_eq!(keys.verify(&token).unwrap(), claims);
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.alg, algorithm);
            let kid = keys.key_id().unwrap().to_owned();
            assert_eq!(header.kid.as_deref(), Some(kid.as_str()));

            let jwks = serde_json::to_value(keys.jwks()).unwrap();
            let keys_json = jwks["keys"].as_array().unwrap();
            assert_eq!(keys_json.len(), 1, "{jwks}");
            let jwk = &keys_json[0];
            assert_eq!(jwk["kty"], kty, "{jwk}");
            assert_eq!(jwk["kid"], kid.as_str());
            assert_eq!(jwk["use"], "sig");
            assert_eq!(jwk["alg"], format!("{algorithm:?}"));
            for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
                assert!(jwk.get(private).is_none(), "{private} published: {jwk}");
            }
            // Another service verifies with the published key alone.
            let set: JwkSet = serde_json::from_value(jwks).unwrap();
            let decoding = DecodingKey::from_jwk(set.find(&kid).unwrap()).unwrap();
            let verified =
                jsonwebtoken::decode::<AccessClaims>(&token, &decoding, &validation(algorithm))
                    .unwrap();
            assert_eq!(verified.claims, claims);
        }
        // The same RSA key in either encoding is the same key.
        assert_eq!(
            from_pem(RSA_PKCS8).unwrap().key_id(),
            from_pem(RSA_PKCS1).unwrap().key_id()
        );
    }

    #[test]
    fn an_ed25519_key_with_its_public_key_inside_is_the_same_key() {
        let v1 = from_pem(ED25519_PEM).unwrap();
        let (_, der) = pkcs8::der::pem::decode_vec(ED25519_PEM.as_bytes()).unwrap();
        let seed = &der[16..];
        let jwks = serde_json::to_value(v1.jwks()).unwrap();
        let public = URL_SAFE_NO_PAD
            .decode(jwks["keys"][0]["x"].as_str().unwrap())
            .unwrap();
        // PKCS#8 v2 (RFC 8410 §7): version 1, and the public key as [1] BIT STRING.
        let mut v2 = vec![
            0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        v2.extend_from_slice(seed);
        v2.extend_from_slice(&[0x81, 0x21, 0x00]);
        v2.extend_from_slice(&public);
        let pem =
            pkcs8::der::pem::encode_string("PRIVATE KEY", pkcs8::LineEnding::LF, &v2).unwrap();
        let keys = from_pem(&pem).unwrap();
        assert_eq!(keys.key_id(), v1.key_id());
        let token = keys
            .sign(&AccessClaims::new(Uuid::new_v4(), false))
            .unwrap();
        v1.verify(&token).unwrap();
    }

    #[test]
    fn a_key_file_refuses_other_algorithms_and_alg_none() {
        let keys = from_pem(ED25519_PEM).unwrap();
        let claims = AccessClaims::new(Uuid::new_v4(), false);
        // HS256 with the public key as the secret (the classic key confusion).
        let public = serde_json::to_value(keys.jwks()).unwrap()["keys"][0]["x"]
            .as_str()
            .unwrap()
            .to_owned();
        let confused = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(public.as_bytes()),
        )
        .unwrap();
        assert!(keys.verify(&confused).is_err());
        assert!(
            keys.verify(&from_pem(EC_P256).unwrap().sign(&claims).unwrap())
                .is_err()
        );
        assert!(
            keys.verify(&JwtKeys::random().sign(&claims).unwrap())
                .is_err()
        );
        let signed = keys.sign(&claims).unwrap();
        let payload = signed.split('.').nth(1).unwrap();
        let none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        assert!(keys.verify(&format!("{none}.{payload}.")).is_err());
        // A shared secret publishes nothing.
        assert!(JwtKeys::random().jwks().keys.is_empty());
        assert_eq!(JwtKeys::random().key_id(), None);
    }

    #[test]
    fn unusable_key_files_are_refused_naming_the_setting_and_never_the_key() {
        let cases = [
            (EC_P256_SEC1.to_owned(), "openssl pkcs8 -topk8"),
            ("not a key".to_owned(), "PEM"),
            (
                RSA_PKCS8.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY"),
                "encrypted",
            ),
            (RSA_PKCS8.replace("PRIVATE KEY", "PUBLIC KEY"), "PUBLIC KEY"),
            // A PKCS#8 block whose contents are an RSA key's PKCS#1 form.
            (
                RSA_PKCS1.replace("RSA PRIVATE KEY", "PRIVATE KEY"),
                "not a PKCS#8",
            ),
        ];
        for (pem, expected) in cases {
            let error = from_pem(&pem).unwrap_err().to_string();
            assert!(
                error.starts_with("COLLOQUY_JWT_PRIVATE_KEY_FILE: "),
                "{error}"
            );
            assert!(error.contains(expected), "{expected}: {error}");
            let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            if body.len() >= 20 {
                assert!(!error.contains(&body[..20]), "{error}");
            }
        }
    }

    #[test]
    fn settings_pick_one_key_and_refuse_both() {
        let dir = std::env::temp_dir().join(format!("colloquy-key-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key.pem");
        std::fs::write(&file, EC_P256).unwrap();
        let secret = SecretString::from("0123456789abcdef0123456789abcdef");
        let keys = JwtKeys::from_settings(None, Some(&file)).unwrap();
        assert_eq!(keys.algorithm(), Algorithm::ES256);
        let keys = JwtKeys::from_settings(Some(&secret), None).unwrap();
        assert_eq!(keys.algorithm(), Algorithm::HS256);
        assert!(matches!(
            JwtKeys::from_settings(Some(&secret), Some(&file)),
            Err(KeyError::BothKeys)
        ));
        let missing = dir.join("missing.pem");
        let error = JwtKeys::from_settings(None, Some(&missing)).unwrap_err();
        assert!(
            matches!(error, KeyError::KeyFileUnreadable { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("missing.pem"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
