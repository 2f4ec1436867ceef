//! Password hashing: Argon2id with the `argon2` crate's defaults, which are OWASP's
//! recommendation (m = 19 MiB, t = 2, p = 1). Hashing runs on tokio's blocking pool so
//! it never stalls the async runtime, and at most one hash per CPU runs at a time, so a
//! burst cannot take 19 MiB × the blocking pool's 512 threads. At most
//! [`QUEUED_PER_CPU`] hashes per CPU wait for their turn; one more (a burst of logins
//! from many addresses, each within its rate limit) is answered 429 `rate_limited` with
//! `Retry-After` at once, so no request waits behind an unbounded queue of hashes.
//!
//! Login does the same work whether or not the account exists: an unknown email is
//! verified against a dummy hash made at start with the same parameters.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::{Error as HashError, PasswordHasher as _, PasswordVerifier as _};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Hashes waiting or running at once, per CPU; one more is refused (429).
pub const QUEUED_PER_CPU: usize = 16;

/// Hashes and verifies passwords off the async runtime.
#[derive(Debug, Clone)]
pub struct Passwords {
    dummy_hash: Arc<str>,
    /// One per hash that may run at once.
    permits: Arc<Semaphore>,
    /// One per hash that may be running or waiting for a permit.
    queue: Arc<Semaphore>,
}

fn argon2() -> Argon2<'static> {
    // Argon2id, version 0x13, m = 19456 KiB, t = 2, p = 1.
    Argon2::default()
}

impl Passwords {
    /// Makes the dummy hash (one hash's work, on the blocking pool).
    pub async fn new() -> Result<Self, ApiError> {
        let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        Self::with_limits(cpus, cpus * QUEUED_PER_CPU).await
    }

    /// At most `running` hashes at once and `queued` running or waiting.
    async fn with_limits(running: usize, queued: usize) -> Result<Self, ApiError> {
        let dummy = SecretString::from(uuid::Uuid::new_v4().to_string());
        let dummy_hash = tokio::task::spawn_blocking(move || hash(&dummy)).await??;
        Ok(Self {
            dummy_hash: dummy_hash.into(),
            permits: Arc::new(Semaphore::new(running.max(1))),
            queue: Arc::new(Semaphore::new(queued.max(running).max(1))),
        })
    }

    /// A place in the queue of hashes, or 429 when it is full.
    fn enqueue(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
        self.queue.try_acquire().map_err(|_| {
            tracing::debug!("password hashing is saturated; a request is refused");
            ApiError::RateLimited {
                retry_after: std::time::Duration::from_secs(1),
            }
        })
    }

    /// The PHC string of `password` with a fresh random salt.
    pub async fn hash(&self, password: SecretString) -> Result<String, ApiError> {
        let _queued = self.enqueue()?;
        let _permit = self.permits.acquire().await.map_err(ApiError::internal)?;
        tokio::task::spawn_blocking(move || hash(&password)).await?
    }

    /// Whether `password` matches `stored`; with no `stored` hash (no such account) it
    /// verifies against the dummy hash, doing the same work, and answers false.
    pub async fn verify(
        &self,
        password: SecretString,
        stored: Option<String>,
    ) -> Result<bool, ApiError> {
        let real = stored.is_some();
        let hash: Arc<str> = stored.map_or_else(|| Arc::clone(&self.dummy_hash), Arc::from);
        let _queued = self.enqueue()?;
        let _permit = self.permits.acquire().await.map_err(ApiError::internal)?;
        let matched = tokio::task::spawn_blocking(move || {
            match argon2().verify_password(password.expose_secret().as_bytes(), &*hash) {
                Ok(()) => true,
                Err(HashError::PasswordInvalid) => false,
                Err(error) => {
                    // A corrupt stored hash: nobody can log in with it.
                    tracing::error!(error = %error, "a stored password hash cannot be verified");
                    false
                }
            }
        })
        .await?;
        Ok(real && matched)
    }
}

fn hash(password: &SecretString) -> Result<String, ApiError> {
    argon2()
        .hash_password(password.expose_secret().as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| ApiError::internal(format!("argon2 hashing failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_its_password_only() {
        let passwords = Passwords::new().await.unwrap();
        let hash = passwords
            .hash(SecretString::from("correct horse"))
            .await
            .unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        let ok = |p: &str, h: Option<String>| passwords.verify(SecretString::from(p), h);
        assert!(ok("correct horse", Some(hash.clone())).await.unwrap());
        assert!(!ok("wrong horse", Some(hash)).await.unwrap());
        assert!(!ok("anything", None).await.unwrap());
    }

    #[tokio::test]
    async fn hashes_beyond_the_queue_are_refused_at_once() {
        let passwords = Passwords::with_limits(1, 3).await.unwrap();
        let results = futures::future::join_all(
            (0..10).map(|_| passwords.verify(SecretString::from("guess"), None)),
        )
        .await;
        let refused = results
            .iter()
            .filter(|r| matches!(r, Err(ApiError::RateLimited { .. })))
            .count();
        // Three got a place (one hashing, two waiting); the seven others none.
        assert_eq!(refused, 7, "{results:?}");
        assert!(results.iter().filter(|r| matches!(r, Ok(false))).count() == 3);
        // The queue is free again once they are done.
        assert_eq!(passwords.queue.available_permits(), 3);
        assert_eq!(passwords.permits.available_permits(), 1);
        assert!(
            !passwords
                .verify(SecretString::from("x"), None)
                .await
                .unwrap()
        );
    }
}
