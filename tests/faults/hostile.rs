//! Hostile input: clients that trickle their request heads a byte at a time (slowloris),
//! or their bodies, or connect and send nothing, clients that send requests and never read the
//! responses, bursts of logins from one address and from many, floods of live-feed
//! subscriptions, and events in the log that no build of Colloquy wrote. Each must
//! leave the server serving everyone else: no 5xx, no panic, the application's task
//! alive at the end, and every connection a hostile client holds given back within a
//! bound (`gateway::edges::Connections`, docs/OPERATIONS.md "Rate limits and edges").
//!
//! The fuzz of the HTTP API from `/openapi.json` is `tests/api/fuzz.rs`; the fuzz of
//! event decoding and upcasting is `domain/tests/decoding_fuzz.rs`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use colloquy_eventstore::{ExpectedVersion, NewEvent, StreamAppend};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

use crate::helpers::{SseReader, TestApp, TestUser, spawn_app_with};

/// The password of the users these tests register (the helpers' own).
const PASSWORD: &str = "correct horse battery staple";

/// Counts panics anywhere in this test's process (nextest runs each test in a process
/// of its own), on top of the usual report.
fn count_panics() -> Arc<AtomicUsize> {
    let panics = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&panics);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        counter.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    panics
}

/// What every test ends with: the application still runs, nothing panicked, and it
/// still answers.
async fn assert_unharmed(app: &TestApp, panics: &AtomicUsize) {
    let server = app.server.as_ref().unwrap();
    assert!(!server.is_finished(), "the application's task ended");
    assert_eq!(panics.load(Ordering::SeqCst), 0, "something panicked");
    let client = fresh_client(None);
    let response = tokio::time::timeout(
        Duration::from_secs(30),
        client.get(app.url("/healthz")).send(),
    )
    .await
    .expect("/healthz within 30 s")
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// A client of its own (no pooled connection shared with the test's other clients),
/// from `local` if given.
fn fresh_client(local: Option<IpAddr>) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(local)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Whether the server has closed `socket`: reads (discarding) until end of file or an
/// error, or until `within` passes with the connection still open.
async fn closed_by_server(socket: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match tokio::time::timeout(left, socket.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

// ------------------------------------------------------------ slow clients --

/// Slowloris: clients that trickle a request head one byte every 200 ms and never
/// finish it, and clients that connect and send nothing, more of them than the
/// connection cap. Each is cut off once the header read timeout (10 s) has passed, so
/// the places they held are given back and another client is served, within a bound.
/// Under `axum::serve` (no header read timeout) they were held forever.
#[tokio::test]
async fn slowloris_clients_are_cut_off_and_others_are_served() {
    let panics = count_panics();
    let cap = 16;
    let app = spawn_app_with(|s| s.max_connections = cap).await;
    app.wait_until_ready().await;

    // Twice the cap: half trickle, half are silent. Those beyond the cap wait in the
    // listen backlog (the kernel completes their handshakes) until places free up.
    let hostile = 2 * cap;
    let started = Instant::now();
    let mut tricklers = Vec::new();
    for i in 0..hostile {
        let addr = app.addr;
        tricklers.push(tokio::spawn(async move {
            let mut socket = TcpStream::connect(addr).await.unwrap();
            let head = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ");
            let mut buffer = [0u8; 1024];
            let trickle = i % 2 == 0;
            let mut sent = 0usize;
            // Bounded: the server must have closed the connection within 60 s (the
            // timeout is 10 s; some wait their turn in the backlog first).
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if trickle {
                    let byte = head.as_bytes().get(sent).copied().unwrap_or(b'a');
                    if socket.write_all(&[byte]).await.is_err() {
                        return true;
                    }
                    sent += 1;
                }
                match tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buffer))
                    .await
                {
                    Err(_) => {}
                    Ok(Ok(0) | Err(_)) => return true,
                    // Whatever the server says before closing (nothing, or a 408).
                    Ok(Ok(_)) => {}
                }
            }
            false
        }));
    }
    // Meanwhile another client is served, once the slow ones have been cut off.
    let client = fresh_client(None);
    let response = tokio::time::timeout(
        Duration::from_secs(60),
        client.get(app.url("/healthz")).send(),
    )
    .await
    .expect("a client is served within 60 s despite the slow ones")
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut cut = 0;
    for trickler in tricklers {
        cut += usize::from(trickler.await.unwrap());
    }
    assert_eq!(cut, hostile, "every slow client was cut off");
    eprintln!(
        "{hostile} slow clients cut off within {:?}",
        started.elapsed()
    );
    assert_unharmed(&app, &panics).await;
}

/// Clients that send requests for a large document, pipelined, and never read a byte
/// of the answers: the server's writes back up, and once a connection has taken
/// nothing for the write timeout (30 s) it is closed, so such clients, as many as the
/// connection cap, hold their places for that long only and another client is served.
#[tokio::test]
async fn clients_that_never_read_are_cut_off_and_others_are_served() {
    let panics = count_panics();
    let cap = 4;
    let app = spawn_app_with(|s| s.max_connections = cap).await;
    app.wait_until_ready().await;
    let document = app.get("/openapi.json").await.bytes().await.unwrap().len();
    // Enough requests that their answers exceed every buffer between the two ends.
    let requests = (8 * 1024 * 1024 / document).max(8);

    let mut stuck = Vec::new();
    for _ in 0..cap {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let socket = socket.connect(app.addr).await.unwrap();
        let request = format!(
            "GET /openapi.json HTTP/1.1\r\nHost: {}\r\nAccept-Encoding: identity\r\n\r\n",
            app.addr
        );
        let pipelined = request.repeat(requests);
        // The server stops reading once its writes back up: write in the background.
        let (reader, mut writer) = socket.into_split();
        let writing = tokio::spawn(async move {
            let _ = writer.write_all(pipelined.as_bytes()).await;
            writer
        });
        stuck.push((reader, writing));
    }
    // The cap is full of clients that read nothing: another is served once the server
    // has given up on one of them (after the write timeout, 30 s).
    let started = Instant::now();
    let client = fresh_client(None);
    let response = tokio::time::timeout(
        Duration::from_secs(90),
        client.get(app.url("/healthz")).send(),
    )
    .await
    .expect("a client is served within 90 s despite the stuck ones")
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    eprintln!("served after {:?}", started.elapsed());
    // Every stuck connection was closed by the server: what is left to read ends.
    for (reader, writing) in stuck {
        let writer = writing.await.unwrap();
        let mut socket = reader.reunite(writer).unwrap();
        assert!(
            closed_by_server(&mut socket, Duration::from_secs(90)).await,
            "a client that reads nothing was never cut off"
        );
    }
    assert_unharmed(&app, &panics).await;
}

// ------------------------------------------------------------ login bursts --

/// Logins with the right and wrong passwords, all at once: from one address the rate
/// limit answers 429 with `Retry-After` (before any hashing: at most the budget of
/// 20, plus 10 a second, got past it); from many addresses, each within its budget,
/// the bounded queue of password hashes answers the excess 429 at once. Meanwhile
/// another user's queries are answered, and afterwards the right password logs in.
#[tokio::test]
async fn login_bursts_are_refused_early_and_others_are_served() {
    let panics = count_panics();
    let app = spawn_app_with(|_| {}).await;
    app.wait_until_ready().await;
    let victim = app.register_and_login().await;
    let bystander = app.register_and_login().await;
    let login = |client: reqwest::Client, right: bool| {
        let url = app.url("/v1/auth/login");
        let body = json!({
            "email": victim.email,
            "password": if right { PASSWORD } else { "wrong password" },
        });
        async move {
            let response = client.post(url).json(&body).send().await.unwrap();
            let status = response.status();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (status, retry_after)
        }
    };

    // The bystander's queries, all through both bursts.
    let done = tokio_util::sync::CancellationToken::new();
    let queries = {
        let done = done.clone();
        let client = fresh_client(None);
        let url = app.url("/v1/conversations");
        let token = bystander.token.clone();
        tokio::spawn(async move {
            let mut answered = 0;
            while !done.is_cancelled() {
                let response = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.get(&url).bearer_auth(&token).send(),
                )
                .await
                .expect("a query is answered within 10 s during the burst")
                .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                answered += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answered
        })
    };

    // One address: 60 at once.
    let started = Instant::now();
    let client = fresh_client(None);
    let results =
        futures::future::join_all((0..60).map(|i| login(client.clone(), i % 2 == 0))).await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut passed = 0;
    let mut limited = 0;
    for (status, retry_after) in &results {
        match *status {
            StatusCode::OK | StatusCode::UNAUTHORIZED => passed += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited += 1;
                assert!(retry_after.is_some_and(|s| (1..=60).contains(&s)));
            }
            other => panic!("a login answered {other}"),
        }
    }
    eprintln!("one address: {passed} answered, {limited} limited in {elapsed:.1} s");
    assert!(
        limited > 0,
        "60 logins at once from one address were never limited"
    );
    // The budget: 20 at once, then 10 a second (and a little slack for rounding).
    let budget = 20.0 + 10.0 * elapsed + 2.0;
    assert!(
        f64::from(passed) <= budget,
        "{passed} logins got past a budget of {budget:.0}"
    );

    // Many addresses (127.0.0.2 and up, all this machine's), each within its budget of
    // 20: more at once than the hashing queue holds.
    let addresses = 24u8;
    let started = Instant::now();
    let bursts = (0..addresses).map(|a| {
        let client = fresh_client(Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + a))));
        futures::future::join_all((0..18).map(move |i| login(client.clone(), i % 3 == 0)))
    });
    let results: Vec<_> = futures::future::join_all(bursts)
        .await
        .into_iter()
        .flatten()
        .collect();
    let mut answered = [0usize; 3];
    for (status, retry_after) in &results {
        match *status {
            StatusCode::OK => answered[0] += 1,
            StatusCode::UNAUTHORIZED => answered[1] += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                answered[2] += 1;
                assert!(retry_after.is_some_and(|s| (1..=60).contains(&s)));
            }
            other => panic!("a login answered {other}"),
        }
    }
    eprintln!(
        "{} addresses: {} logged in, {} refused, {} told to wait, in {:?}",
        addresses,
        answered[0],
        answered[1],
        answered[2],
        started.elapsed()
    );
    assert!(answered[0] > 0 && answered[1] > 0, "{answered:?}");
    let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    if results.len() > 16 * cpus {
        assert!(
            answered[2] > 0,
            "{} logins at once from many addresses were all queued for hashing",
            results.len()
        );
    }

    done.cancel();
    let answered = queries.await.unwrap();
    assert!(answered > 0);
    eprintln!("the bystander's queries answered during the bursts: {answered}");

    // The right password still logs in (once the address's budget allows).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, retry_after) = login(fresh_client(None), true).await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            Instant::now() < deadline,
            "the right password never logged in again"
        );
        tokio::time::sleep(Duration::from_secs(retry_after.unwrap())).await;
    }
    assert_unharmed(&app, &panics).await;
}

// -------------------------------------------------------------- SSE floods --

/// One user opening more streams than their cap gets 429 with `Retry-After`; many
/// users together cannot open more than the gateway's cap (429 beyond it), while
/// queries and commands go on and the open streams deliver; a closed stream's place
/// is given back.
#[tokio::test]
async fn sse_floods_are_capped_per_user_and_per_gateway() {
    let panics = count_panics();
    let app = spawn_app_with(|s| {
        s.sse_max_streams_per_user = 3;
        s.sse_max_streams = 8;
    })
    .await;
    app.wait_until_ready().await;
    let users = [
        app.register_and_login().await,
        app.register_and_login().await,
        app.register_and_login().await,
        app.register_and_login().await,
    ];
    let open = |user: &TestUser| {
        let request = fresh_client(None)
            .get(app.url("/v1/events"))
            .bearer_auth(&user.token)
            .header("accept", "text/event-stream");
        async move { request.send().await.unwrap() }
    };
    let refused = |response: &reqwest::Response| {
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry_after));
    };

    // One user, five streams at once: three open, two are refused.
    let first = futures::future::join_all((0..5).map(|_| open(&users[0]))).await;
    let mut streams = Vec::new();
    for response in first {
        if response.status() == StatusCode::OK {
            streams.push((0, response));
        } else {
            refused(&response);
        }
    }
    assert_eq!(streams.len(), 3, "the per-user cap of 3");
    // Two more users, three each: the gateway's cap (8) lets five of them open.
    let more = futures::future::join_all((0..6).map(|i| {
        let user = &users[1 + i / 3];
        async move { (1 + i / 3, open(user).await) }
    }))
    .await;
    let mut gateway_refused = 0;
    for (user, response) in more {
        if response.status() == StatusCode::OK {
            streams.push((user, response));
        } else {
            refused(&response);
            gateway_refused += 1;
        }
    }
    assert_eq!(streams.len(), 8, "the gateway's cap of 8");
    assert_eq!(gateway_refused, 1);
    // A user with no stream at all is refused too while the gateway is full...
    refused(&open(&users[3]).await);
    // ...but queries and commands are served, and the open streams deliver, even after
    // longer than the header read timeout (10 s), which bounds only the wait for a
    // request's head, never a response in flight. (Waiting the time out is the point.)
    tokio::time::sleep(Duration::from_secs(11)).await;
    let conversation = app.create_conversation(&users[1]).await;
    let sent = app
        .send_message(&users[1], &conversation, "still here", false)
        .await;
    let response = app
        .request(
            reqwest::Method::GET,
            &format!("/v1/conversations/{conversation}/messages"),
            &users[1],
        )
        .header(
            "x-colloquy-min-position",
            sent["position"].as_i64().unwrap().to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let index = streams
        .iter()
        .position(|(user, _)| *user == 1)
        .expect("user 1 holds a stream");
    let mut reader = SseReader::new(streams.swap_remove(index).1);
    let event = reader.next_of("MessageSent").await;
    assert_eq!(event.json()["text"], "still here");
    // Closing a stream gives its place back (once the server notices).
    drop(reader);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = open(&users[3]).await;
        if response.status() == StatusCode::OK {
            break;
        }
        refused(&response);
        assert!(
            Instant::now() < deadline,
            "a closed stream's place was never given back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(streams);
    assert_unharmed(&app, &panics).await;
}

// ------------------------------------------------------- undecodable events --

/// Events in the log that no build of Colloquy wrote (as a foreign Message DB client
/// might): unknown types, known types with payloads that do not fit, odd schema
/// versions, payloads that are not objects, in a conversation's stream, a run's and a
/// foreign category. The projections skip them and go on, the live feed passes the
/// next real event on, and nothing crashes.
#[tokio::test]
async fn undecodable_events_in_the_log_are_skipped() {
    let panics = count_panics();
    let app = spawn_app_with(|_| {}).await;
    app.wait_until_ready().await;
    let user = app.register_and_login().await;
    let conversation = app.create_conversation(&user).await;
    let mut feed = SseReader::new(app.sse("/v1/events", &user, None).await);

    let bad: Vec<(&str, Value, Value)> = vec![
        ("MessageReacted", json!({"emoji": "👋"}), json!({})),
        (
            "MessageSent",
            json!({"messageId": 7, "text": ["x"]}),
            json!({}),
        ),
        (
            "MessageSent",
            json!({"text": "no id"}),
            json!({"schemaVersion": 1}),
        ),
        (
            "MessageSent",
            json!({"messageId": null}),
            json!({"schemaVersion": "2"}),
        ),
        ("MessageEdited", json!({}), json!({"schemaVersion": 99})),
        (
            "MessageDeleted",
            json!({"messageId": "x"}),
            json!({"schemaVersion": -1}),
        ),
        (
            "ConversationRenamed",
            json!({"title": "é".repeat(100_000)}),
            json!({"schemaVersion": 0}),
        ),
        (
            "RunCompleted",
            json!({"attempt": "one"}),
            json!({"schemaVersion": 1.5}),
        ),
        (
            "messageSent",
            json!({"": {"": [[[]]]}}),
            json!({"schemaVersion": null}),
        ),
    ];
    let stranger = uuid::Uuid::new_v4();
    let streams = [
        format!("conversation-{stranger}"),
        format!("agentRun-{}", uuid::Uuid::new_v4()),
        format!("conversation-{}", uuid::Uuid::new_v4().simple()),
        "foreign-1".to_owned(),
        "conversation".to_owned(),
        format!("agentRun-{stranger}"),
    ];
    let appends = streams
        .iter()
        .map(|stream| {
            let events = bad
                .iter()
                .map(|(event_type, data, metadata)| {
                    NewEvent::new(uuid::Uuid::new_v4(), *event_type, data.clone())
                        .with_metadata(metadata.clone())
                })
                .collect();
            StreamAppend::new(stream.clone(), ExpectedVersion::Any, events)
        })
        .collect();
    app.store.append(appends).await.unwrap();
    // What the store refuses (payloads that are not objects), written by a Message DB
    // client straight into the table.
    let pool = app.db.pool().await;
    for (data, metadata) in [
        ("[1, 2, 3]", Some(r#"["not", "an", "object"]"#)),
        (r#""a string""#, None),
        ("null", Some(r#"{"schemaVersion": 2}"#)),
    ] {
        sqlx::query(
            "SELECT message_store.write_message($1, $2, 'MessageSent', $3::jsonb, $4::jsonb)",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(format!("conversation-{stranger}"))
        .bind(data)
        .bind(metadata)
        .execute(&pool)
        .await
        .unwrap();
    }

    // A real message after them: projected, and passed on live.
    let sent = app
        .send_message(&user, &conversation, "after the garbage", false)
        .await;
    let position = sent["position"].as_i64().unwrap();
    let response = app
        .request(
            reqwest::Method::GET,
            &format!("/v1/conversations/{conversation}/messages"),
            &user,
        )
        .header("x-colloquy-min-position", position.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert!(
        body.to_string().contains("after the garbage"),
        "the projection went past the bad events: {body}"
    );
    let event = feed.next_of("MessageSent").await;
    assert_eq!(event.position(), position);
    // The projections' checkpoints are past every bad event (none stopped at one).
    let ready = app.wait_until_ready().await;
    eprintln!("{ready}");
    // The stranger's conversation, which has only bad events, is not found (404, not
    // 500) by its would-be reader.
    let response = app
        .request(
            reqwest::Method::GET,
            &format!("/v1/conversations/{stranger}"),
            &user,
        )
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_client_error(),
        "a conversation of bad events answered {}",
        response.status()
    );
    assert_unharmed(&app, &panics).await;
}

/// A client that sends its request head at once and then trickles the body (a byte
/// every 2 s), on a command and on login: each is answered 408 `request_timeout` within
/// the body bound (10 s), not held until the 30 s request timeout's 503, and the server
/// serves others meanwhile.
#[tokio::test]
async fn slow_request_bodies_are_answered_408_not_held() {
    let panics = count_panics();
    let app = spawn_app_with(|_| {}).await;
    let user = app.register_and_login().await;
    let body = json!({ "title": "a title that takes its time" }).to_string();
    let mut trickles = Vec::new();
    for (path, token) in [
        ("/v1/conversations", Some(user.token.clone())),
        ("/v1/auth/login", None),
    ] {
        let addr = app.addr;
        let body = body.clone();
        trickles.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut socket = TcpStream::connect(addr).await.unwrap();
            let auth = token
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: colloquy\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            socket.write_all(head.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let mut buffer = [0_u8; 4096];
            for byte in body.as_bytes() {
                // Stop trickling once the server has answered.
                if let Ok(read) =
                    tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buffer)).await
                {
                    answer.extend_from_slice(&buffer[..read.unwrap_or(0)]);
                    break;
                }
                if socket.write_all(&[*byte]).await.is_err() {
                    break;
                }
            }
            // Whatever else the server sends, until it closes or 5 s pass.
            while let Ok(Ok(read)) =
                tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buffer)).await
            {
                if read == 0 {
                    break;
                }
                answer.extend_from_slice(&buffer[..read]);
            }
            (started.elapsed(), String::from_utf8_lossy(&answer).into_owned())
        }));
    }
    // Meanwhile another user is served.
    let other = app.register_and_login().await;
    let conversation = app.create_conversation(&other).await;
    assert!(!conversation.is_empty());
    for trickle in trickles {
        let (elapsed, answer) = trickle.await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "expected 408 after {elapsed:?}: {answer}"
        );
        assert!(answer.contains("request_timeout"), "{answer}");
        assert!(
            elapsed < Duration::from_secs(25),
            "answered only after {elapsed:?}"
        );
    }
    assert_unharmed(&app, &panics).await;
}
