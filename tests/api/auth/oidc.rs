//! Tokens of an external identity provider (`COLLOQUY_OIDC_*`), against a provider of
//! the test's own (`idp`): who the caller becomes, every way a token is refused, and how
//! the provider's key set is fetched (cached, again on an unknown `kid`, at most once
//! per cooldown, and what happens while the provider is down).

use colloquy_gateway::auth::oidc::subject_user_id;
use colloquy_gateway::auth::tokens::{JwtKeys, unix_now};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use serde_json::{Value, json};

use super::idp::{self, AUDIENCE, ISSUER, Idp, claims, claims_with};
use super::{SECRET, me, problem};
use crate::helpers::{TestApp, TestUser, spawn_app_with};

async fn spawn(idp: &Idp, algorithms: &str, cooldown: &str) -> TestApp {
    spawn_app_with(|s| {
        s.jwt_secret = Some(SecretString::from(SECRET));
        idp.configure(s, algorithms, cooldown);
    })
    .await
}

/// A caller with a provider token (the helpers' requests only need the token).
fn provider_user(token: String) -> TestUser {
    TestUser {
        id: String::new(),
        email: String::new(),
        token,
    }
}

async fn me_ok(app: &TestApp, token: &str) -> Value {
    let response = me(app, token).await;
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

#[tokio::test]
async fn provider_tokens_are_accepted_as_a_stable_user_who_is_never_admin() {
    let key = idp::rsa_key();
    let idp = Idp::start(&[&key]).await;
    let app = spawn(&idp, "RS256", "10s").await;
    let alice_id = subject_user_id(ISSUER, "alice").to_string();

    let alice = key.sign(&claims("alice")).unwrap();
    assert_eq!(
        me_ok(&app, &alice).await,
        json!({ "user_id": alice_id, "admin": false })
    );
    // A new token of the same subject is the same user; `aud` may be a list.
    let again = key
        .sign(&claims_with(
            "alice",
            json!({ "aud": ["another-client", AUDIENCE] }),
        ))
        .unwrap();
    assert_eq!(me_ok(&app, &again).await["user_id"], alice_id.as_str());
    // A role claimed by the provider's token grants nothing here.
    let claimed = key
        .sign(&claims_with(
            "alice",
            json!({ "admin": true, "roles": ["admin"] }),
        ))
        .unwrap();
    assert_eq!(me_ok(&app, &claimed).await["admin"], false);
    let response = app
        .client
        .get(app.url("/v1/admin/projections"))
        .bearer_auth(&claimed)
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::FORBIDDEN, "forbidden").await;

    // The user owns what they create, and nobody else sees it.
    let alice_user = provider_user(alice.clone());
    let created: Value = app
        .request(Method::POST, "/v1/conversations", &alice_user)
        .json(&json!({ "title": "mine" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conversation = created["id"].as_str().unwrap().to_owned();
    let listed: Value = app
        .request(Method::GET, "/v1/conversations", &alice_user)
        .header("x-colloquy-min-position", created["position"].to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"][0]["id"], conversation.as_str(), "{listed}");
    let bob = provider_user(key.sign(&claims("bob")).unwrap());
    let local = app.register_and_login().await;
    for other in [&bob, &local] {
        let response = app
            .request(
                Method::GET,
                &format!("/v1/conversations/{conversation}"),
                other,
            )
            .send()
            .await
            .unwrap();
        problem(response, StatusCode::NOT_FOUND, "not_found").await;
    }
    // Local accounts work beside the provider, and the key set was fetched once.
    assert_eq!(
        me_ok(&app, &local.token).await["user_id"],
        local.id.as_str()
    );
    assert_eq!(idp.fetches(), 1);
}

#[tokio::test]
async fn provider_tokens_are_refused_unless_every_check_passes() {
    let rsa = idp::rsa_key();
    let ed = idp::ed_key();
    let ec = idp::ec_key();
    let idp = Idp::start(&[&rsa, &ed, &ec]).await;
    let app = spawn(&idp, "RS256,EdDSA", "1h").await;
    let now = unix_now();

    // Positive controls: both allowed algorithms.
    me_ok(&app, &rsa.sign(&claims("alice")).unwrap()).await;
    me_ok(&app, &ed.sign(&claims("alice")).unwrap()).await;

    let valid = rsa.sign(&claims("alice")).unwrap();
    let (header, rest) = valid.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();
    let mut flipped: Vec<char> = signature.chars().collect();
    flipped[10] = if flipped[10] == 'A' { 'B' } else { 'A' };
    let flipped: String = flipped.into_iter().collect();
    let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
    // HS256 keyed with the public modulus, under the RSA key's kid: key confusion.
    let modulus = serde_json::to_value(rsa.jwks()).unwrap()["keys"][0]["n"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = rsa.key_id().map(str::to_owned);
    let confused = jsonwebtoken::encode(
        &hs_header,
        &claims("alice"),
        &EncodingKey::from_secret(modulus.as_bytes()),
    )
    .unwrap();
    let mint = |changes: Value| rsa.sign(&claims_with("alice", changes)).unwrap();

    let cases: Vec<(&str, String)> = vec![
        (
            "expired",
            mint(json!({ "iat": now - 7200, "exp": now - 3600 })),
        ),
        ("not yet valid", mint(json!({ "nbf": now + 3600 }))),
        ("no exp", mint(json!({ "exp": null }))),
        ("wrong audience", mint(json!({ "aud": "another-client" }))),
        (
            "audience list without ours",
            mint(json!({ "aud": ["a", "b"] })),
        ),
        ("no audience", mint(json!({ "aud": null }))),
        (
            "wrong issuer",
            mint(json!({ "iss": "https://other-idp.test" })),
        ),
        ("no subject", mint(json!({ "sub": null }))),
        ("empty subject", mint(json!({ "sub": "" }))),
        ("numeric subject", mint(json!({ "sub": 42 }))),
        (
            "tampered signature",
            format!("{header}.{payload}.{flipped}"),
        ),
        ("alg none", format!("{none_header}.{payload}.")),
        (
            "alg none, old signature",
            format!("{none_header}.{payload}.{signature}"),
        ),
        ("HS256 with the public key", confused),
        (
            "ES256: published, not allowed",
            ec.sign(&claims("alice")).unwrap(),
        ),
        ("unknown kid", idp::ed_key().sign(&claims("alice")).unwrap()),
        (
            "Colloquy's own secret, provider's issuer",
            JwtKeys::hs256(SECRET.as_bytes())
                .unwrap()
                .sign(&claims("alice"))
                .unwrap(),
        ),
    ];
    for (case, token) in cases {
        let response = me(&app, &token).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{case}");
        problem(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    // None of that made the gateway fetch the key set again (cooldown: 1 h).
    assert_eq!(idp.fetches(), 1);
}

#[tokio::test]
async fn a_flood_of_unknown_kids_fetches_the_key_set_at_most_once_per_cooldown() {
    let rsa = idp::rsa_key();
    let idp = Idp::start(&[&rsa]).await;
    let app = spawn(&idp, "RS256,EdDSA", "1h").await;
    me_ok(&app, &rsa.sign(&claims("alice")).unwrap()).await;
    assert_eq!(idp.fetches(), 1);

    let forged: Vec<String> = (0..50)
        .map(|_| idp::ed_key().sign(&claims("mallory")).unwrap())
        .collect();
    let statuses = futures::future::join_all(forged.iter().map(|token| me(&app, token))).await;
    for response in statuses {
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(idp.fetches(), 1, "the cooldown holds back every refetch");

    // The price: a key the provider starts using within the cooldown is refused until
    // the set is fetched again. Keys already known keep working.
    let rotated = idp::ed_key();
    idp.publish(&[&rsa, &rotated]);
    let response = me(&app, &rotated.sign(&claims("alice")).unwrap()).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    me_ok(&app, &rsa.sign(&claims("alice")).unwrap()).await;
    assert_eq!(idp.fetches(), 1);
}

#[tokio::test]
async fn a_rotated_key_is_fetched_on_its_first_token() {
    let rsa = idp::rsa_key();
    let ec = idp::ec_key();
    let idp = Idp::start(&[&rsa]).await;
    let app = spawn(&idp, "RS256,ES256", "0s").await;
    let alice = me_ok(&app, &rsa.sign(&claims("alice")).unwrap()).await;
    assert_eq!(idp.fetches(), 1);

    idp.publish(&[&rsa, &ec]);
    let rotated = me_ok(&app, &ec.sign(&claims("alice")).unwrap()).await;
    assert_eq!(rotated, alice, "the same subject is the same user");
    assert_eq!(idp.fetches(), 2);
    // Both keys are known now: no more fetches.
    me_ok(&app, &rsa.sign(&claims("alice")).unwrap()).await;
    me_ok(&app, &ec.sign(&claims("alice")).unwrap()).await;
    assert_eq!(idp.fetches(), 2);
}

#[tokio::test]
async fn an_unreachable_provider_is_503_and_never_locks_out_local_accounts() {
    let rsa = idp::rsa_key();
    let idp = Idp::start(&[&rsa]).await;
    idp.fail(true);
    let app = spawn(&idp, "RS256,EdDSA", "0s").await;
    let local = app.register_and_login().await;
    let token = rsa.sign(&claims("alice")).unwrap();

    // No key was ever fetched: the token cannot be checked, which is not its fault.
    let response = me(&app, &token).await;
    assert!(response.headers().contains_key("retry-after"));
    problem(response, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    assert_eq!(
        me_ok(&app, &local.token).await["user_id"],
        local.id.as_str()
    );

    // The provider is back.
    idp.fail(false);
    me_ok(&app, &token).await;
    // Down again: the keys already known keep working; an unknown kid is 401.
    idp.fail(true);
    let fetches = idp.fetches();
    let response = me(&app, &idp::ed_key().sign(&claims("alice")).unwrap()).await;
    problem(response, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_eq!(idp.fetches(), fetches + 1, "it tried");
    me_ok(&app, &token).await;
}

#[tokio::test]
async fn provider_users_have_a_command_budget_of_their_own() {
    let rsa = idp::rsa_key();
    let idp = Idp::start(&[&rsa]).await;
    let app = spawn_app_with(|s| {
        s.jwt_secret = Some(SecretString::from(SECRET));
        s.commands_per_second = 1;
        s.command_burst = 2;
        idp.configure(s, "RS256", "10s");
    })
    .await;
    let alice = provider_user(rsa.sign(&claims("alice")).unwrap());
    let bob = provider_user(rsa.sign(&claims("bob")).unwrap());
    let create = |user: &TestUser| {
        app.request(Method::POST, "/v1/conversations", user)
            .json(&json!({}))
            .send()
    };
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(create(&alice).await.unwrap().status().as_u16());
    }
    assert_eq!(&statuses[..2], [201, 201], "{statuses:?}");
    assert!(statuses[2..].contains(&429), "{statuses:?}");
    assert_eq!(create(&bob).await.unwrap().status(), StatusCode::CREATED);
}
