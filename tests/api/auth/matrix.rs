//! The authorization matrix: every operation of `/openapi.json`, called with every kind
//! of bad token, as another user, as a user without the admin role and as an admin.
//!
//! For each operation the document marks as needing a token (and every `/v1` operation
//! but register, login and refresh must be one of them):
//! - no token, a malformed one, an expired one, a tampered signature or payload,
//!   `alg: none`, a wrong issuer or audience, another secret, and the identity
//!   provider's tokens that are expired, for another audience, of an algorithm outside
//!   the allow-list or signed with an unknown key: 401 `unauthorized` problem+json with
//!   `WWW-Authenticate: Bearer`. The local tokens carry an admin's claims, so each would
//!   be fully privileged if it were accepted.
//! - `/v1/admin/…`: 403 `forbidden` for a user without the role (a local account, and a
//!   provider's user, who never has it); served for an admin.
//! - an operation on another user's conversation, message or run: 404 `not_found` for
//!   another local user and for a provider's user, and served for the owner (queries).
//!
//! Operations the document marks public are checked to answer without a token.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use colloquy_gateway::auth::tokens::{AccessClaims, JwtKeys, unix_now};
use reqwest::{Method, Response, StatusCode};
use secrecy::SecretString;
use serde_json::{Value, json};

use super::idp::{self, Idp, claims_with};
use super::{SECRET, problem};
use crate::helpers::{TestApp, TestUser, spawn_app_with};

/// One operation of the document.
#[derive(Debug)]
struct Operation {
    method: Method,
    /// The path as documented (`/v1/conversations/{id}`).
    template: String,
    /// The document says it needs a bearer token.
    protected: bool,
}

impl Operation {
    fn admin(&self) -> bool {
        self.template.starts_with("/v1/admin/")
    }

    /// Whether its path names a conversation, message or run.
    fn owned(&self) -> bool {
        ["{id}", "{message_id}", "{run_id}"]
            .iter()
            .any(|p| self.template.contains(p))
            && !self.admin()
    }

    fn is_stream(&self) -> bool {
        self.template.ends_with("/events")
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.template)
    }
}

fn operations(doc: &Value) -> Vec<Operation> {
    let mut operations = Vec::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if !["get", "put", "post", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            let protected = operation["security"]
                .as_array()
                .is_some_and(|requirements| !requirements.is_empty());
            operations.push(Operation {
                method: method.to_uppercase().parse().unwrap(),
                template: template.clone(),
                protected,
            });
        }
    }
    operations
}

/// What the path parameters stand for.
struct Ids {
    conversation: String,
    message: String,
    run: String,
}

impl Ids {
    /// The operation's path with the owner's resources (admin routes: harmless values
    /// that change nothing).
    fn path(&self, operation: &Operation) -> String {
        let run = if operation.admin() {
            uuid::Uuid::new_v4().to_string()
        } else {
            self.run.clone()
        };
        operation
            .template
            .replace("{id}", &self.conversation)
            .replace("{message_id}", &self.message)
            .replace("{run_id}", &run)
            .replace("{name}", "no-such-projection")
            .replace(
                "{stream_name}",
                &format!("conversation-{}", self.conversation),
            )
            .replace("{user_id}", &uuid::Uuid::new_v4().to_string())
    }
}

/// A valid body for the operation, where it takes one.
fn body(operation: &Operation) -> Option<Value> {
    match (operation.method.as_str(), operation.template.as_str()) {
        ("POST", "/v1/conversations") => Some(json!({ "title": "matrix" })),
        ("PATCH", "/v1/conversations/{id}") => Some(json!({ "title": "renamed" })),
        ("POST", "/v1/conversations/{id}/messages") => Some(json!({ "text": "hello" })),
        ("PATCH", "/v1/conversations/{id}/messages/{message_id}") => {
            Some(json!({ "text": "edited" }))
        }
        ("POST", "/v1/conversations/{id}/runs") => Some(json!({})),
        ("POST", "/v1/auth/logout") => Some(json!({ "refresh_token": "x".repeat(43) })),
        ("GET", _) | ("DELETE", _) => None,
        _ => None,
    }
}

/// The query parameters an operation needs to do anything.
fn query(operation: &Operation) -> &'static str {
    if operation.template == "/v1/search" {
        "?q=needle"
    } else {
        ""
    }
}

struct Caller<'a> {
    app: &'a TestApp,
    /// Its own client address, so its calls to the auth routes have their own budget.
    client: reqwest::Client,
    /// Queries wait for this position, so the owner's resources are in the read models.
    min_position: i64,
}

impl Caller<'_> {
    async fn call(&self, operation: &Operation, path: &str, token: Option<&str>) -> Response {
        let mut request = self
            .client
            .request(
                operation.method.clone(),
                self.app.url(&format!("{path}{}", query(operation))),
            )
            .timeout(Duration::from_secs(15));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body(operation) {
            request = request.json(&body);
        }
        if operation.method == Method::GET {
            request = request.header("x-colloquy-min-position", self.min_position.to_string());
        }
        if operation.is_stream() {
            request = request.header("accept", "text/event-stream");
        }
        request.send().await.unwrap()
    }
}

/// Every bad token: `(case, token)`. Local ones carry `admin`'s claims.
fn bad_tokens(admin: &TestUser, provider_key: &JwtKeys) -> Vec<(&'static str, Option<String>)> {
    let keys = JwtKeys::hs256(SECRET.as_bytes()).unwrap();
    let claims = AccessClaims::new(admin.id.parse().unwrap(), true);
    let mint = |claims: AccessClaims| keys.sign(&claims).unwrap();
    let valid = mint(claims.clone());
    let (header, rest) = valid.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();
    let mut flipped: Vec<char> = signature.chars().collect();
    flipped[5] = if flipped[5] == 'A' { 'B' } else { 'A' };
    let flipped: String = flipped.into_iter().collect();
    // Another user's claims under the admin token's signature.
    let other_payload = mint(AccessClaims::new(uuid::Uuid::new_v4(), true))
        .split('.')
        .nth(1)
        .unwrap()
        .to_owned();
    let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
    let now = unix_now();
    let provider = |changes: Value| provider_key.sign(&claims_with("carol", changes)).unwrap();
    vec![
        ("no token", None),
        ("not a JWT", Some("not-a-jwt".to_owned())),
        (
            "expired",
            Some(mint(AccessClaims {
                iat: now - 7200,
                exp: now - 3600,
                ..claims.clone()
            })),
        ),
        (
            "tampered signature",
            Some(format!("{header}.{payload}.{flipped}")),
        ),
        (
            "tampered payload",
            Some(format!("{header}.{other_payload}.{signature}")),
        ),
        ("alg none", Some(format!("{none_header}.{payload}."))),
        (
            "wrong issuer",
            Some(mint(AccessClaims {
                iss: "someone-else".into(),
                ..claims.clone()
            })),
        ),
        (
            "wrong audience",
            Some(mint(AccessClaims {
                aud: "someone-else".into(),
                ..claims.clone()
            })),
        ),
        (
            "another secret",
            Some(JwtKeys::random().sign(&claims).unwrap()),
        ),
        (
            "provider token, expired",
            Some(provider(json!({ "iat": now - 7200, "exp": now - 3600 }))),
        ),
        (
            "provider token, wrong audience",
            Some(provider(json!({ "aud": "another-client" }))),
        ),
        (
            "provider token, algorithm not allowed",
            Some(idp::ec_key().sign(&idp::claims("carol")).unwrap()),
        ),
        (
            "provider token, unknown key",
            Some(idp::ed_key().sign(&idp::claims("carol")).unwrap()),
        ),
        (
            "provider's issuer, Colloquy's secret",
            Some(keys.sign(&idp::claims("carol")).unwrap()),
        ),
    ]
}

#[tokio::test]
async fn every_route_refuses_bad_tokens_hides_other_users_resources_and_guards_admin_routes() {
    let provider_key = idp::rsa_key();
    let idp = Idp::start(&[&provider_key, &idp::ec_key()]).await;
    let app = spawn_app_with(|s| {
        s.jwt_secret = Some(SecretString::from(SECRET));
        s.commands_per_second = 10_000;
        s.command_burst = 10_000;
        idp.configure(s, "RS256", "1h");
    })
    .await;
    let owner = app.register_and_login().await;
    let other = app.register_and_login().await;
    let admin = app.register_admin().await;
    let provider_user = provider_key.sign(&idp::claims("carol")).unwrap();

    // The owner's conversation, message and run.
    let conversation = app.create_conversation(&owner).await;
    let sent = app
        .send_message(&owner, &conversation, "a needle in the matrix", true)
        .await;
    let ids = Ids {
        conversation,
        message: sent["message_id"].as_str().unwrap().to_owned(),
        run: sent["run_id"].as_str().unwrap().to_owned(),
    };
    let caller = Caller {
        app: &app,
        client: reqwest::Client::builder()
            .local_address(IpAddr::from([127, 0, 0, 2]))
            .build()
            .unwrap(),
        min_position: sent["position"].as_i64().unwrap(),
    };

    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    let operations = operations(&doc);
    let public_v1: BTreeSet<String> = operations
        .iter()
        .filter(|o| !o.protected && o.template.starts_with("/v1/"))
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        public_v1,
        BTreeSet::from([
            "POST /v1/auth/login".to_owned(),
            "POST /v1/auth/refresh".to_owned(),
            "POST /v1/auth/register".to_owned(),
        ]),
        "every other /v1 operation needs a token"
    );

    let bad = bad_tokens(&admin, &provider_key);
    let mut checked = (0, 0, 0);
    for operation in &operations {
        let path = ids.path(operation);
        if !operation.protected {
            let response = caller.call(operation, &path, None).await;
            assert_ne!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{operation} is documented as public"
            );
            continue;
        }
        for (case, token) in &bad {
            let response = caller.call(operation, &path, token.as_deref()).await;
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{operation}: {case}"
            );
            assert!(
                response.headers()["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Bearer"),
                "{operation}: {case}"
            );
            problem(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
        }
        checked.0 += 1;
        if operation.admin() {
            for (who, token) in [
                ("a user", &owner.token),
                ("a provider's user", &provider_user),
            ] {
                let response = caller.call(operation, &path, Some(token)).await;
                assert_eq!(
                    response.status(),
                    StatusCode::FORBIDDEN,
                    "{operation}: {who}"
                );
                problem(response, StatusCode::FORBIDDEN, "forbidden").await;
            }
            let response = caller.call(operation, &path, Some(&admin.token)).await;
            let status = response.status();
            assert!(
                status.is_success() || status == StatusCode::NOT_FOUND,
                "{operation} as an admin: {status} {}",
                response.text().await.unwrap()
            );
            checked.1 += 1;
        } else if operation.owned() {
            for (who, token) in [
                ("another user", &other.token),
                ("a provider's user", &provider_user),
            ] {
                let response = caller.call(operation, &path, Some(token)).await;
                assert_eq!(
                    response.status(),
                    StatusCode::NOT_FOUND,
                    "{operation}: {who}"
                );
                problem(response, StatusCode::NOT_FOUND, "not_found").await;
            }
            if operation.method == Method::GET {
                // The ids are real: the owner is served.
                let response = caller.call(operation, &path, Some(&owner.token)).await;
                assert_eq!(
                    response.status(),
                    StatusCode::OK,
                    "{operation} as its owner"
                );
            }
            checked.2 += 1;
        }
    }
    // What the matrix covered: every protected operation, the 7 admin ones, and the
    // 12 that take a conversation, message or run id.
    assert!(checked.0 >= 25, "{checked:?}");
    assert_eq!(checked.1, 7, "{checked:?}");
    assert_eq!(checked.2, 12, "{checked:?}");

    // Search shows nobody else's messages, not even with their conversation's id.
    for (who, token, hits) in [
        ("the owner", &owner.token, 1),
        ("another user", &other.token, 0),
        ("a provider's user", &provider_user, 0),
    ] {
        let response = caller
            .client
            .get(app.url(&format!(
                "/v1/search?q=needle&conversation_id={}",
                ids.conversation
            )))
            .bearer_auth(token)
            .header("x-colloquy-min-position", caller.min_position.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{who}");
        let page: Value = response.json().await.unwrap();
        assert_eq!(
            page["items"].as_array().unwrap().len(),
            hits,
            "{who}: {page}"
        );
    }
}
