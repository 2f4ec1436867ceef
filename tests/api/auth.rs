//! Authentication end to end: register, login, the bearer extractor on `/v1/me`,
//! refresh-token rotation and reuse detection, logout, validation and the error
//! format (problem+json), the per-address rate limit of the auth routes, and signing
//! with a private key file whose public half is published at `/.well-known/jwks.json`.
//!
//! Also here: tokens of an external identity provider (`oidc`, with a provider of the
//! tests' own, `idp`) and the authorization matrix over every route (`matrix`).

mod idp;
mod matrix;
mod oidc;

use colloquy_eventstore::Database;
use colloquy_gateway::auth::tokens::{AccessClaims, JwtKeys, unix_now};
use reqwest::{Response, StatusCode};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::AssertSqlSafe;

use crate::helpers::{TestApp, spawn_app_with};
use idp::TempDir;

/// The signing secret of every test app here, so tests can mint their own tokens.
const SECRET: &str = "test-secret-of-at-least-thirty-two-bytes!";
const PASSWORD: &str = "correct horse battery staple";

async fn spawn() -> TestApp {
    spawn_app_with(|s| s.jwt_secret = Some(SecretString::from(SECRET))).await
}

fn keys() -> JwtKeys {
    JwtKeys::hs256(SECRET.as_bytes()).unwrap()
}

async fn post(app: &TestApp, path: &str, body: &Value) -> Response {
    app.client
        .post(app.url(path))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn post_with_bearer(app: &TestApp, path: &str, token: &str, body: &Value) -> Response {
    app.client
        .post(app.url(path))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn me(app: &TestApp, token: &str) -> Response {
    app.client
        .get(app.url("/v1/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn register(app: &TestApp, email: &str) -> String {
    let response = post(
        app,
        "/v1/auth/register",
        &json!({ "email": email, "password": PASSWORD, "display_name": "Ada" }),
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    body["user_id"].as_str().unwrap().to_owned()
}

/// Logs in and returns the token response, checking its shape.
async fn login(app: &TestApp, email: &str) -> Value {
    let response = post(
        app,
        "/v1/auth/login",
        &json!({ "email": email, "password": PASSWORD }),
    )
    .await;
    tokens(response).await
}

async fn refresh(app: &TestApp, refresh_token: &Value) -> Response {
    post(
        app,
        "/v1/auth/refresh",
        &json!({ "refresh_token": refresh_token }),
    )
    .await
}

async fn tokens(response: Response) -> Value {
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert!(body["access_token"].as_str().unwrap().split('.').count() == 3);
    assert_eq!(body["refresh_token"].as_str().unwrap().len(), 43);
    body
}

/// Checks the response is an RFC 9457 problem with this status and code; returns it.
async fn problem(response: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let header_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["type"], "about:blank", "{body}");
    assert_eq!(body["title"], status.canonical_reason().unwrap(), "{body}");
    assert!(body["detail"].is_string(), "{body}");
    assert_eq!(body["request_id"], header_id.as_str(), "{body}");
    body
}

#[tokio::test]
async fn a_session_registers_logs_in_refreshes_and_logs_out() {
    let app = spawn().await;
    let user_id = register(&app, "ada@example.com").await;

    let first = login(&app, "ada@example.com").await;
    let response = me(&app, first["access_token"].as_str().unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({ "user_id": user_id, "admin": false }));

    // Refresh rotates: a new refresh token, and a working access token.
    let second = tokens(refresh(&app, &first["refresh_token"]).await).await;
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    let response = me(&app, second["access_token"].as_str().unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let third = tokens(refresh(&app, &second["refresh_token"]).await).await;

    // Reusing a rotated token is refused and revokes the whole family: the newest
    // token of that session stops working too.
    problem(
        refresh(&app, &first["refresh_token"]).await,
        StatusCode::UNAUTHORIZED,
        "invalid_refresh_token",
    )
    .await;
    problem(
        refresh(&app, &third["refresh_token"]).await,
        StatusCode::UNAUTHORIZED,
        "invalid_refresh_token",
    )
    .await;

    // A new login is a new family, untouched by the revocation.
    let session = login(&app, "ADA@example.com").await;
    let access = session["access_token"].as_str().unwrap();
    let body = json!({ "refresh_token": session["refresh_token"] });

    // Logout needs a bearer token.
    problem(
        post(&app, "/v1/auth/logout", &body).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    let response = post_with_bearer(&app, "/v1/auth/logout", access, &body).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    problem(
        refresh(&app, &session["refresh_token"]).await,
        StatusCode::UNAUTHORIZED,
        "invalid_refresh_token",
    )
    .await;
    // Logging out again is harmless.
    let response = post_with_bearer(&app, "/v1/auth/logout", access, &body).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    // An unknown refresh token is refused the same way.
    problem(
        refresh(&app, &json!("not-a-token")).await,
        StatusCode::UNAUTHORIZED,
        "invalid_refresh_token",
    )
    .await;
}

#[tokio::test]
async fn a_taken_email_is_409_whatever_its_case() {
    let app = spawn().await;
    register(&app, "ada@example.com").await;
    let response = post(
        &app,
        "/v1/auth/register",
        &json!({ "email": " ADA@Example.com ", "password": "another password" }),
    )
    .await;
    problem(response, StatusCode::CONFLICT, "email_taken").await;
}

#[tokio::test]
async fn invalid_registrations_are_422_naming_each_field() {
    let app = spawn().await;
    let fields = |body: &Value| -> Vec<String> {
        let mut fields: Vec<String> = body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
                e["field"].as_str().unwrap().to_owned()
            })
            .collect();
        fields.sort();
        fields
    };
    let cases = [
        (
            json!({ "email": "not-an-email", "password": "short", "display_name": "x".repeat(101) }),
            vec!["display_name", "email", "password"],
        ),
        (
            json!({ "email": "ada@example.com", "password": "p".repeat(1025) }),
            vec!["password"],
        ),
        (
            json!({ "email": "ada@example.com", "password": PASSWORD, "display_name": "Ada\u{7}" }),
            vec!["display_name"],
        ),
        // Schema violations: a missing field, a field of the wrong type.
        (json!({ "email": "ada@example.com" }), vec!["password"]),
        (json!({ "email": 42, "password": PASSWORD }), vec!["email"]),
    ];
    for (body, expected) in cases {
        let response = post(&app, "/v1/auth/register", &body).await;
        let problem = problem(
            response,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        )
        .await;
        assert_eq!(fields(&problem), expected, "{body}");
    }
    // Nothing was created: the address is still free.
    register(&app, "ada@example.com").await;
}

#[tokio::test]
async fn bad_credentials_get_the_same_401_whatever_is_wrong() {
    let app = spawn().await;
    let user_id = register(&app, "ada@example.com").await;
    register(&app, "bob@example.com").await;
    let disable = "SET disabled = true WHERE email = 'bob@example.com'";
    match app.db.database().await {
        Database::Postgres(pool) => {
            sqlx::query(AssertSqlSafe(format!("UPDATE colloquy.users {disable}")))
                .execute(&pool)
                .await
                .unwrap();
        }
        Database::Sqlite(pool) => {
            sqlx::query(AssertSqlSafe(format!("UPDATE colloquy_users {disable}")))
                .execute(&pool)
                .await
                .unwrap();
        }
    }

    let mut bodies = Vec::new();
    for (email, password) in [
        ("ada@example.com", "wrong password"),
        ("nobody@example.com", PASSWORD),
        ("bob@example.com", PASSWORD),
    ] {
        let response = post(
            &app,
            "/v1/auth/login",
            &json!({ "email": email, "password": password }),
        )
        .await;
        let mut body = problem(response, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
        body.as_object_mut().unwrap().remove("request_id");
        bodies.push(serde_json::to_vec(&body).unwrap());
    }
    assert_eq!(bodies[0], bodies[1], "wrong password vs unknown email");
    assert_eq!(bodies[0], bodies[2], "wrong password vs disabled account");
    assert!(
        !String::from_utf8_lossy(&bodies[0]).contains(&user_id),
        "nothing about the account leaks"
    );
}

#[tokio::test]
async fn malformed_bodies_are_400_and_other_content_types_415() {
    let app = spawn().await;
    let send = |content_type: &'static str, body: &'static str| {
        app.client
            .post(app.url("/v1/auth/login"))
            .header("content-type", content_type)
            .header("x-request-id", "req-from-the-client")
            .body(body)
            .send()
    };
    let response = send("application/json", "{\"email\": ").await.unwrap();
    let body = problem(response, StatusCode::BAD_REQUEST, "malformed_json").await;
    assert_eq!(body["request_id"], "req-from-the-client");
    let response = send("text/plain", "{}").await.unwrap();
    problem(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    // No content type at all is the same.
    let response = app
        .client
        .post(app.url("/v1/auth/register"))
        .body("{}")
        .send()
        .await
        .unwrap();
    problem(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    // Unknown paths and methods answer in the same format.
    problem(
        app.get("/v1/nowhere").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    problem(
        app.get("/v1/auth/login").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
}

#[tokio::test]
async fn me_refuses_every_token_that_is_not_valid() {
    let app = spawn().await;
    let user_id = register(&app, "ada@example.com").await;
    let session = login(&app, "ada@example.com").await;
    let valid = session["access_token"].as_str().unwrap().to_owned();
    let claims = AccessClaims::new(user_id.parse().unwrap(), false);

    // Positive control: a token minted with the same secret and claims is accepted.
    let minted = keys().sign(&claims).unwrap();
    assert_eq!(me(&app, &minted).await.status(), StatusCode::OK);

    let (header, rest) = valid.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();
    // Flip one character of the signature (staying in the base64url alphabet).
    let mut tampered_sig: Vec<char> = signature.chars().collect();
    tampered_sig[5] = if tampered_sig[5] == 'A' { 'B' } else { 'A' };
    let tampered_sig: String = tampered_sig.into_iter().collect();
    // {"alg":"none","typ":"JWT"}, the same claims, no signature.
    let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
    let mint = |claims: AccessClaims| keys().sign(&claims).unwrap();

    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("not a JWT", Some("garbage".to_owned())),
        (
            "expired",
            Some(mint(AccessClaims {
                iat: unix_now() - 7200,
                exp: unix_now() - 3600,
                ..claims.clone()
            })),
        ),
        (
            "tampered signature",
            Some(format!("{header}.{payload}.{tampered_sig}")),
        ),
        ("alg none", Some(format!("{none_header}.{payload}."))),
        (
            "alg none, with the old signature",
            Some(format!("{none_header}.{payload}.{signature}")),
        ),
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
    ];
    for (case, token) in cases {
        let mut request = app.client.get(app.url("/v1/me"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{case}");
        assert!(
            response.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer"),
            "{case}"
        );
        problem(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    // A scheme other than Bearer is refused too.
    let response = app
        .client
        .get(app.url("/v1/me"))
        .header("authorization", format!("Basic {valid}"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

#[tokio::test]
async fn a_burst_of_logins_from_one_address_is_rate_limited() {
    let app = spawn().await;
    let body = json!({ "email": "nobody@example.com", "password": "wrong password" });
    // The budget is 20 at once, refilling at 10 a second: 40 concurrent requests must
    // overflow it. A few rounds at most, in case the machine is very slow.
    for round in 0..5 {
        let responses =
            futures::future::join_all((0..40).map(|_| post(&app, "/v1/auth/login", &body))).await;
        let mut limited = None;
        for response in responses {
            match response.status() {
                StatusCode::UNAUTHORIZED => {}
                StatusCode::TOO_MANY_REQUESTS => limited = Some(response),
                other => panic!("unexpected {other}"),
            }
        }
        if let Some(response) = limited {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=60).contains(&retry_after), "{retry_after}");
            problem(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
            return;
        }
        eprintln!("round {round}: no 429 yet");
    }
    panic!("40 × 5 concurrent logins were never rate-limited");
}

/// Statuses of `n` concurrent refreshes with an unknown token (no hashing: the limit is
/// what answers first), each sent with the `X-Forwarded-For` that `forwarded_for`
/// gives it.
async fn refresh_burst(
    app: &TestApp,
    n: usize,
    forwarded_for: impl Fn(usize) -> String,
) -> Vec<u16> {
    let body = json!({ "refresh_token": "not-a-token" });
    let requests = (0..n).map(|i| {
        app.client
            .post(app.url("/v1/auth/refresh"))
            .header("x-forwarded-for", forwarded_for(i))
            .json(&body)
            .send()
    });
    futures::future::join_all(requests)
        .await
        .into_iter()
        .map(|response| response.unwrap().status().as_u16())
        .collect()
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_limit_is_per_forwarded_client() {
    // The test's requests come from 127.0.0.1, here the trusted proxy.
    let app = spawn_app_with(|s| {
        s.jwt_secret = Some(SecretString::from(SECRET));
        s.trusted_proxies = Some("127.0.0.1".to_owned());
    })
    .await;
    // 60 clients at once, one request each: nobody is over a budget of 20.
    let statuses = refresh_burst(&app, 60, |i| format!("203.0.113.{i}")).await;
    assert!(
        statuses.iter().all(|s| *s == 401),
        "distinct clients share no budget: {statuses:?}"
    );
    // One client 100 times at once is over its budget (20 at once, 10 a second more),
    // whatever it writes before the proxy's entry.
    let statuses = refresh_burst(&app, 100, |i| format!("10.{i}.0.1, 198.51.100.1")).await;
    assert!(statuses.contains(&429), "{statuses:?}");

    // Without trusting the peer, the header is the client's own words: ignored.
    let untrusting = spawn().await;
    let statuses = refresh_burst(&untrusting, 100, |i| format!("203.0.113.{i}")).await;
    assert!(
        statuses.contains(&429),
        "an untrusted X-Forwarded-For is ignored: {statuses:?}"
    );
}

#[tokio::test]
async fn commands_are_rate_limited_per_user_and_queries_are_not() {
    let app = crate::helpers::spawn_app_with(|settings| {
        settings.commands_per_second = 1;
        settings.command_burst = 3;
    })
    .await;
    let user = app.register_and_login().await;
    let other = app.register_and_login().await;
    let mut statuses = Vec::new();
    // 10 commands: all of them pass only if they took over 7 s.
    for _ in 0..10 {
        let response = app
            .request(reqwest::Method::POST, "/v1/conversations", &user)
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
        }
        statuses.push(response.status().as_u16());
    }
    assert_eq!(&statuses[..3], [201, 201, 201], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    // Another user has a budget of their own; reads are not counted.
    let response = app
        .request(reqwest::Method::POST, "/v1/conversations", &other)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    for _ in 0..5 {
        let response = app
            .request(reqwest::Method::GET, "/v1/conversations", &user)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}

/// Reads `GET /.well-known/jwks.json`, checking how it is served.
async fn published_keys(app: &TestApp) -> Value {
    let response = app.get("/.well-known/jwks.json").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["cache-control"], "public, max-age=300");
    response.json().await.unwrap()
}

#[tokio::test]
async fn a_private_key_file_signs_tokens_that_others_verify_with_the_published_key() {
    let dir = TempDir::new();
    let file = dir.0.join("jwt.pem");
    std::fs::write(
        &file,
        include_str!("../../gateway/src/auth/testdata/rsa-2048.pem"),
    )
    .unwrap();
    let app = spawn_app_with(|s| {
        s.jwt_secret = None;
        s.jwt_private_key_file = Some(file.clone());
    })
    .await;
    let user_id = register(&app, "ada@example.com").await;
    let session = login(&app, "ada@example.com").await;
    let token = session["access_token"].as_str().unwrap();
    assert_eq!(me(&app, token).await.status(), StatusCode::OK);

    // The algorithm follows from the key, and the token names its key.
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    let kid = header.kid.expect("a kid");

    // Another service verifies it with the published key alone.
    let published = published_keys(&app).await;
    let keys = published["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{published}");
    for private in ["d", "p", "q", "dp", "dq", "qi"] {
        assert!(keys[0].get(private).is_none(), "{private} is published");
    }
    assert_eq!(keys[0]["use"], "sig");
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(published.clone()).unwrap();
    let jwk = set.find(&kid).expect("the token's kid is published");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_issuer(&["colloquy"]);
    validation.set_audience(&["colloquy"]);
    let verified = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
        &validation,
    )
    .unwrap();
    assert_eq!(verified.claims["sub"], user_id.as_str());

    // Refreshed tokens are signed the same way; a tool with the same file mints tokens
    // the gateway accepts.
    let refreshed = tokens(refresh(&app, &session["refresh_token"]).await).await;
    let refreshed =
        jsonwebtoken::decode_header(refreshed["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(refreshed.kid.as_deref(), Some(kid.as_str()));
    let tool = JwtKeys::from_settings(None, Some(&file)).unwrap();
    let claims = AccessClaims::new(user_id.parse().unwrap(), false);
    assert_eq!(
        me(&app, &tool.sign(&claims).unwrap()).await.status(),
        StatusCode::OK
    );

    // Nothing else is accepted: a shared secret, another key, alg none, and HS256
    // keyed with the public key (key confusion).
    let modulus = keys[0]["n"].as_str().unwrap();
    let payload = token.split('.').nth(1).unwrap();
    let rejected = [
        JwtKeys::hs256(SECRET.as_bytes())
            .unwrap()
            .sign(&claims)
            .unwrap(),
        idp::ec_key().sign(&claims).unwrap(),
        idp::ed_key().sign(&claims).unwrap(),
        format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}."),
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(modulus.as_bytes()),
        )
        .unwrap(),
    ];
    for token in rejected {
        problem(
            me(&app, &token).await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        )
        .await;
    }
}

#[tokio::test]
async fn with_a_shared_secret_no_key_is_published() {
    let app = spawn().await;
    assert_eq!(published_keys(&app).await, json!({ "keys": [] }));
}
