//! The accounts store (`colloquy_gateway::auth::store`) on both backends: each test
//! runs once on the embedded mode's SQLite file (`<name>::sqlite`) and once on a
//! Postgres test database (`<name>::postgres`), with the same expectations.

#![allow(clippy::unwrap_used, reason = "test code")]

use std::path::PathBuf;

use chrono::{Duration, Utc};
use colloquy_eventstore::Database;
use colloquy_gateway::auth::input::Email;
use colloquy_gateway::auth::store::{self, InsertUserError, PresentedToken, Transaction};
use colloquy_gateway::auth::tokens::{new_refresh_token, refresh_token_hash};
use colloquy_testkit::TestDatabase;
use secrecy::ExposeSecret as _;
use uuid::Uuid;

/// A test's own database, removed when dropped.
struct TestDb {
    db: Database,
    _keep: Keep,
}

enum Keep {
    Postgres(#[allow(dead_code, reason = "held for its Drop")] TestDatabase),
    Sqlite(#[allow(dead_code, reason = "held for its Drop")] TempDir),
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TestDb {
    /// A fresh SQLite file, opened and migrated as `colloquy serve` does it.
    async fn sqlite() -> Self {
        let dir = std::env::temp_dir().join(format!("colloquy-auth-{}", Uuid::new_v4().simple()));
        let pool = colloquy_eventstore::sqlite::open(&dir.join("colloquy.db"))
            .await
            .expect("the SQLite file opens and migrates");
        Self {
            db: Database::Sqlite(pool),
            _keep: Keep::Sqlite(TempDir(dir)),
        }
    }

    /// A fresh, migrated Postgres database.
    async fn postgres() -> Self {
        let database = TestDatabase::new().await;
        Self {
            db: Database::Postgres(database.pool().await),
            _keep: Keep::Postgres(database),
        }
    }
}

/// For each scenario `name(&Database)`, the tests `name::sqlite` and `name::postgres`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let test = super::TestDb::sqlite().await;
                super::$name(&test.db).await;
            }

            #[tokio::test]
            async fn postgres() {
                let test = super::TestDb::postgres().await;
                super::$name(&test.db).await;
            }
        }
    )*};
}

on_both_backends!(
    registered_account_is_found_by_email_and_id,
    duplicate_email_is_refused_whatever_its_case,
    refresh_token_rotates_within_its_family,
    reusing_a_rotated_token_revokes_its_family,
    expired_token_is_reported_expired,
    logout_revokes_only_the_callers_family,
    admin_role_is_granted_and_revoked,
    disabling_revokes_every_session,
    forgetting_erases_the_account_and_its_tokens,
    concurrent_uses_of_one_token_are_serialised,
);

/// Registers `email` (normalised as the gateway does) and returns the new id.
async fn register(db: &Database, email: &str) -> Uuid {
    let id = Uuid::new_v4();
    let email = Email::parse(email).unwrap();
    store::insert_user(db, id, email.as_str(), "$argon2id$test", Some("Ada"))
        .await
        .unwrap();
    id
}

/// Issues a refresh token of `family` for `user` (as login does); returns its hash.
async fn issue(db: &Database, user: Uuid, family: Uuid) -> Vec<u8> {
    let hash = refresh_token_hash(new_refresh_token().expose_secret());
    let mut tx = Transaction::begin(db).await.unwrap();
    store::insert_refresh_token(&mut tx, family, user, &hash)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    hash
}

/// Rotates the token with hash `old` (as refresh does): marks it and issues its
/// successor; returns the successor's hash.
async fn rotate(db: &Database, old: &[u8]) -> Vec<u8> {
    let mut tx = Transaction::begin(db).await.unwrap();
    let presented = store::lock_refresh_token(&mut tx, old)
        .await
        .unwrap()
        .expect("the token exists");
    assert!(!presented.rotated && !presented.revoked && !presented.expired);
    store::mark_rotated(&mut tx, presented.id).await.unwrap();
    let hash = refresh_token_hash(new_refresh_token().expose_secret());
    store::insert_refresh_token(&mut tx, presented.family, presented.user_id, &hash)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    hash
}

/// The token with this hash as refresh sees it (in a transaction of its own).
async fn presented(db: &Database, hash: &[u8]) -> Option<PresentedToken> {
    let mut tx = Transaction::begin(db).await.unwrap();
    let token = store::lock_refresh_token(&mut tx, hash).await.unwrap();
    tx.commit().await.unwrap();
    token
}

async fn registered_account_is_found_by_email_and_id(db: &Database) {
    let id = register(db, "ada@example.com").await;

    let credentials = store::credentials(db, "ada@example.com")
        .await
        .unwrap()
        .expect("the account");
    assert_eq!(credentials.id, id);
    assert_eq!(credentials.password_hash, "$argon2id$test");
    assert!(!credentials.is_admin);
    assert!(!credentials.disabled);
    assert!(
        store::credentials(db, "bob@example.com")
            .await
            .unwrap()
            .is_none()
    );

    for key in [id.to_string(), " ADA@Example.com ".to_owned()] {
        let account = store::find_account(db, &key).await.unwrap().expect(&key);
        assert_eq!(account.id, id);
        assert_eq!(account.email, "ada@example.com");
        assert!(!account.is_admin && !account.disabled);
    }
    assert!(store::find_account(db, "nobody").await.unwrap().is_none());
    assert!(
        store::find_account(db, &Uuid::new_v4().to_string())
            .await
            .unwrap()
            .is_none()
    );
}

async fn duplicate_email_is_refused_whatever_its_case(db: &Database) {
    let first = register(db, "Ada@Example.com").await;

    let again = Email::parse("ada@EXAMPLE.COM").unwrap();
    let refused = store::insert_user(db, Uuid::new_v4(), again.as_str(), "h", None).await;
    assert!(
        matches!(refused, Err(InsertUserError::EmailTaken)),
        "{refused:?}"
    );
    // Another writer that forgot to lower-case is stopped by the table itself.
    let upper = store::insert_user(db, Uuid::new_v4(), "BOB@EXAMPLE.COM", "h", None).await;
    assert!(
        matches!(upper, Err(InsertUserError::Database(_))),
        "{upper:?}"
    );

    let credentials = store::credentials(db, "ada@example.com").await.unwrap();
    assert_eq!(credentials.unwrap().id, first);
    // Another email is still free.
    register(db, "bob@example.com").await;
}

async fn refresh_token_rotates_within_its_family(db: &Database) {
    let user = register(db, "ada@example.com").await;
    let family = Uuid::new_v4();
    let first = issue(db, user, family).await;

    let fresh = presented(db, &first).await.expect("the first token");
    assert_eq!((fresh.family, fresh.user_id), (family, user));
    assert!(!fresh.expired && !fresh.rotated && !fresh.revoked);
    assert!(!fresh.is_admin && !fresh.disabled);

    let second = rotate(db, &first).await;
    let old = presented(db, &first).await.unwrap();
    assert!(old.rotated && !old.revoked);
    let new = presented(db, &second).await.expect("the successor");
    assert_eq!(new.family, family);
    assert!(!new.expired && !new.rotated && !new.revoked);
    assert!(presented(db, &[7; 32]).await.is_none());
}

async fn reusing_a_rotated_token_revokes_its_family(db: &Database) {
    let user = register(db, "ada@example.com").await;
    let family = Uuid::new_v4();
    let first = issue(db, user, family).await;
    let second = rotate(db, &first).await;
    // Another session of the same user.
    let elsewhere = issue(db, user, Uuid::new_v4()).await;

    // What refresh does when it is shown `first` again.
    let mut tx = Transaction::begin(db).await.unwrap();
    let reused = store::lock_refresh_token(&mut tx, &first)
        .await
        .unwrap()
        .unwrap();
    assert!(reused.rotated);
    let revoked = store::revoke_family(&mut tx, reused.family).await.unwrap();
    tx.commit().await.unwrap();

    assert_eq!(revoked, 2, "both tokens of the family");
    assert!(presented(db, &first).await.unwrap().revoked);
    assert!(presented(db, &second).await.unwrap().revoked);
    assert!(!presented(db, &elsewhere).await.unwrap().revoked);
}

async fn expired_token_is_reported_expired(db: &Database) {
    let user = register(db, "ada@example.com").await;
    let hash = issue(db, user, Uuid::new_v4()).await;
    let past = Utc::now() - Duration::seconds(1);
    match db {
        Database::Postgres(pool) => {
            sqlx::query("UPDATE colloquy.refresh_tokens SET expires_at = $1")
                .bind(past)
                .execute(pool)
                .await
                .unwrap();
        }
        Database::Sqlite(pool) => {
            sqlx::query("UPDATE colloquy_refresh_tokens SET expires_at = $1")
                .bind(past)
                .execute(pool)
                .await
                .unwrap();
        }
    }
    let token = presented(db, &hash).await.unwrap();
    assert!(token.expired && !token.rotated && !token.revoked);
}

async fn logout_revokes_only_the_callers_family(db: &Database) {
    let user = register(db, "ada@example.com").await;
    let other = register(db, "bob@example.com").await;
    let first = issue(db, user, Uuid::new_v4()).await;
    let second = rotate(db, &first).await;
    let elsewhere = issue(db, user, Uuid::new_v4()).await;

    // Another user's logout with this token revokes nothing.
    assert_eq!(
        store::revoke_family_of(db, other, &second).await.unwrap(),
        0
    );
    assert!(!presented(db, &second).await.unwrap().revoked);
    // An unknown token neither.
    assert_eq!(
        store::revoke_family_of(db, user, &[7; 32]).await.unwrap(),
        0
    );

    assert_eq!(store::revoke_family_of(db, user, &second).await.unwrap(), 2);
    assert!(presented(db, &first).await.unwrap().revoked);
    assert!(presented(db, &second).await.unwrap().revoked);
    assert!(!presented(db, &elsewhere).await.unwrap().revoked);
    // Idempotent.
    assert_eq!(store::revoke_family_of(db, user, &second).await.unwrap(), 0);
}

async fn admin_role_is_granted_and_revoked(db: &Database) {
    let user = register(db, "ada@example.com").await;
    let hash = issue(db, user, Uuid::new_v4()).await;

    store::set_admin(db, user, true).await.unwrap();
    let credentials = store::credentials(db, "ada@example.com").await.unwrap();
    assert!(credentials.unwrap().is_admin);
    assert!(
        store::find_account(db, "ada@example.com")
            .await
            .unwrap()
            .unwrap()
            .is_admin
    );
    // Refresh copies the current flag into the next access token.
    assert!(presented(db, &hash).await.unwrap().is_admin);

    store::set_admin(db, user, false).await.unwrap();
    let credentials = store::credentials(db, "ada@example.com").await.unwrap();
    assert!(!credentials.unwrap().is_admin);
    assert!(!presented(db, &hash).await.unwrap().is_admin);
}

async fn disabling_revokes_every_session(db: &Database) {
    let user = register(db, "ada@example.com").await;
    let other = register(db, "bob@example.com").await;
    let first = issue(db, user, Uuid::new_v4()).await;
    let second = rotate(db, &first).await;
    let elsewhere = issue(db, user, Uuid::new_v4()).await;
    let theirs = issue(db, other, Uuid::new_v4()).await;

    assert_eq!(store::disable_account(db, user).await.unwrap(), 3);

    let credentials = store::credentials(db, "ada@example.com").await.unwrap();
    assert!(credentials.unwrap().disabled);
    for hash in [&first, &second, &elsewhere] {
        let token = presented(db, hash).await.unwrap();
        assert!(token.revoked && token.disabled);
    }
    let theirs = presented(db, &theirs).await.unwrap();
    assert!(!theirs.revoked && !theirs.disabled);
    // Again: nothing left to revoke.
    assert_eq!(store::disable_account(db, user).await.unwrap(), 0);
}

async fn forgetting_erases_the_account_and_its_tokens(db: &Database) {
    let user = register(db, "ada@example.com").await;
    let other = register(db, "bob@example.com").await;
    let first = issue(db, user, Uuid::new_v4()).await;
    let second = rotate(db, &first).await;
    let theirs = issue(db, other, Uuid::new_v4()).await;

    assert!(store::forget_account(db, user).await.unwrap());

    assert!(
        store::credentials(db, "ada@example.com")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store::find_account(db, &user.to_string())
            .await
            .unwrap()
            .is_none()
    );
    assert!(presented(db, &first).await.is_none());
    assert!(presented(db, &second).await.is_none());
    assert!(presented(db, &theirs).await.is_some());
    assert!(
        store::find_account(db, "bob@example.com")
            .await
            .unwrap()
            .is_some()
    );
    // Nothing left the second time; the email is free again.
    assert!(!store::forget_account(db, user).await.unwrap());
    let again = register(db, "ada@example.com").await;
    assert_ne!(again, user);
}

async fn concurrent_uses_of_one_token_are_serialised(db: &Database) {
    let user = register(db, "ada@example.com").await;
    let hash = issue(db, user, Uuid::new_v4()).await;

    // Each attempt does what refresh does: read the token, and rotate it if it is fresh.
    // Exactly one may find it fresh, and none may fail.
    let attempts = (0..6).map(|_| {
        let db = db.clone();
        let hash = hash.clone();
        tokio::spawn(async move {
            let mut tx = Transaction::begin(&db).await?;
            let token = store::lock_refresh_token(&mut tx, &hash)
                .await?
                .expect("the token");
            if token.rotated {
                return Ok::<_, sqlx::Error>(false);
            }
            // Widen the window in which a second reader could slip in.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            store::mark_rotated(&mut tx, token.id).await?;
            let next = refresh_token_hash(new_refresh_token().expose_secret());
            store::insert_refresh_token(&mut tx, token.family, token.user_id, &next).await?;
            tx.commit().await?;
            Ok(true)
        })
    });
    let mut rotated = 0;
    for attempt in futures::future::join_all(attempts).await {
        if attempt.unwrap().expect("no attempt fails") {
            rotated += 1;
        }
    }
    assert_eq!(rotated, 1);
}
