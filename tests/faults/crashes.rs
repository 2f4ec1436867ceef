//! Crashes: every role process killed with SIGKILL under load and started again.
//!
//! The test runs the built binary's `colloquy bench chaos` for a short while against
//! the test Postgres server (a scratch database of its own) and the test NATS server (a
//! private subject prefix and stream): four processes (gateway, relay, projector,
//! agent) in the external mode, users sending keyed messages (half asking the agent)
//! and retrying with the same key after a cut, a random role killed every few seconds
//! (each at least once). After the faults stop and everything settles, the bench's
//! report must show that every accepted command is in the log exactly once, the stream
//! holds each event once, every run ended exactly once with at most one reply, and the
//! read models equal a fresh replay. Longer runs: `colloquy bench chaos --duration …`
//! (docs/RELIABILITY.md).

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

/// The whole run's bound: 25 s of faults, the processes' start, a settle bounded at
/// 90 s (a run held by a killed agent comes back after the consumer's 30 s ack wait)
/// and the checks; well under nextest's 180 s.
const BOUND: Duration = Duration::from_secs(170);

#[tokio::test]
async fn killing_each_role_under_load_loses_and_duplicates_nothing() {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_colloquy"))
        .args([
            "bench",
            "chaos",
            "--duration",
            "25s",
            "--fault-every",
            "3s",
            "--max-down",
            "1500ms",
            "--settle-timeout",
            "90s",
            "--seed",
            "11",
            "--json",
        ])
        .env_remove("COLLOQUY_CONFIG")
        .env("DATABASE_URL", colloquy_testkit::admin_url())
        .env("NATS_URL", colloquy_testkit::nats_url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the colloquy binary starts");
    let output = tokio::time::timeout(BOUND, child.wait_with_output())
        .await
        .expect("bench chaos finished within its bound")
        .expect("bench chaos ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!(
            "no JSON report ({error}); status {}:\n{stdout}\n{stderr}",
            output.status
        )
    });
    let context = format!("report:\n{report:#}\nstderr:\n{stderr}");

    for role in ["gateway", "relay", "projector", "agent"] {
        let kills = report["faults"][role].as_u64().unwrap_or(0);
        assert!(kills >= 1, "the {role} was never killed; {context}");
    }
    let accepted = report["commands"]["accepted"].as_u64().unwrap_or(0);
    let with_run = report["commands"]["accepted_with_run"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        accepted >= 50 && with_run >= 10,
        "too little work got through ({accepted} sends, {with_run} with a run); {context}"
    );
    assert_eq!(report["lost"], 0, "accepted commands lost; {context}");
    assert_eq!(report["duplicated"], 0, "duplicates; {context}");
    let checks = &report["checks"];
    assert_eq!(checks["missing_from_stream"], 0, "{context}");
    assert_eq!(checks["foreign_in_stream"], 0, "{context}");
    assert_eq!(checks["runs_not_terminal"], 0, "runs left open; {context}");
    assert_eq!(checks["runs_terminal_more_than_once"], 0, "{context}");
    assert_eq!(checks["runs_replied_more_than_once"], 0, "{context}");
    assert_eq!(
        checks["verify_clean"], true,
        "read models differ from a replay; {context}"
    );
    assert_eq!(
        report["settle"]["settled"], true,
        "did not settle; {context}"
    );
    assert_eq!(
        report["commands"]["unexpected"],
        Value::Array(vec![]),
        "answers no fault explains; {context}"
    );
    assert_eq!(report["ok"], true, "{context}");
    assert!(output.status.success(), "bench chaos failed: {context}");
}
