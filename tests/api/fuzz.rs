//! The API against its own OpenAPI document: schemathesis (a property-based tester
//! for OpenAPI, from PyPI) reads `/openapi.json` from a running app and sends every
//! operation generated requests — valid ones, boundary values and invalid ones — as a
//! registered user, and checks every response: never a 5xx, and the status, content
//! type, headers and body as the document says.
//!
//! Also here: every operation the document lists is served by the router.
//!
//! schemathesis comes from `tests/requirements.txt`; `scripts/test` installs it and
//! exports its path as `COLLOQUY_TEST_SCHEMATHESIS`. Without that variable the test
//! fails (it does not skip: a fuzz that silently does not run proves nothing).
//!
//! What is not fuzzed: the three SSE routes (`…/events`). A stream that opens stays
//! open (heartbeats, no end), and schemathesis reads a response to its end; their
//! errors are the same extractors as the other routes' and are covered by `live`.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::spawn_app;

/// schemathesis' configuration: the minimum position of the queries is pinned to 0.
/// A query waits up to 5 s for a position its read model has not reached and then
/// answers 503 with `Retry-After`, as the contract says (api.md, "Queries"); generated
/// positions are almost all ones the log never reaches, so fuzzing them would only
/// spend the run waiting and report the documented 503 as a server error. How the
/// header and the parameter are parsed and waited on is covered by `conversations`.
const CONFIG: &str = r#"
[parameters]
"query.min_position" = 0
"header.X-Colloquy-Min-Position" = "0"
"#;

/// How many generated examples per operation and phase: enough to reach the
/// validation edges, small enough that the run takes under a minute on two cores.
const MAX_EXAMPLES: &str = "50";
/// A fixed seed: a failure reproduces with the same command.
const SEED: &str = "20240611";

fn schemathesis() -> String {
    std::env::var("COLLOQUY_TEST_SCHEMATHESIS").unwrap_or_else(|_| {
        panic!(
            "COLLOQUY_TEST_SCHEMATHESIS is not set: run the suite with scripts/test (it installs \
             tests/requirements.txt and sets it), or `pip install -r tests/requirements.txt` \
             and set COLLOQUY_TEST_SCHEMATHESIS to the `st` executable it installed"
        )
    })
}

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let docs = app.get("/docs").await;
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("openapi.json"));
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .split('/')
            .map(|segment| {
                if segment.starts_with('{') {
                    "00000000-0000-0000-0000-000000000000"
                } else {
                    segment
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in item.as_object().unwrap().keys() {
            let method: reqwest::Method = method.to_uppercase().parse().unwrap();
            // No token and no body: a routed operation answers 401, 415 or 200; only the
            // router's fallbacks answer 404 or 405 to that.
            let response = app
                .client
                .request(method.clone(), app.url(&concrete))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            assert!(
                ![404, 405].contains(&status),
                "{method} {path} is documented but not routed ({status})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_generated_requests_as_documented() {
    let st = schemathesis();
    let app = spawn_app().await;
    app.wait_until_ready().await;
    let user = app.register_and_login().await;
    // Something to find, page through and run on.
    let conversation = app.create_conversation(&user).await;
    app.send_message(&user, &conversation, "hello fuzz", false)
        .await;

    let config = std::env::temp_dir().join(format!("colloquy-fuzz-{}.toml", app.prefix));
    std::fs::write(&config, CONFIG).unwrap();

    let started = Instant::now();
    let output = tokio::process::Command::new(&st)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(app.url("/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {}", user.token)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
        ])
        .args(["--exclude-path-regex", "/events$"])
        .args(["--max-examples", MAX_EXAMPLES, "--seed", SEED])
        // One worker: the generator is not thread-safe (it fails with internal errors
        // under several).
        .args(["--workers", "1", "--request-timeout", "15"])
        .args(["--continue-on-failure", "--no-color", "--warnings", "off"])
        // Nothing written into the working tree: no example database, and any other
        // state schemathesis keeps goes to the temporary directory.
        .args(["--generation-database", "none"])
        .current_dir(std::env::temp_dir())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {st}: {e}"));
    let _ = std::fs::remove_file(&config);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found problems ({}, after {:?}):\n{stdout}\n{stderr}",
        output.status,
        started.elapsed()
    );
    println!("{stdout}");
}
