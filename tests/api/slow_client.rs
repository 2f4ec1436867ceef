//! A live-feed client that stops reading is cut off instead of holding memory and its
//! stream slot: it falls behind the hub's ring (`COLLOQUY_SSE_BUFFER`), the server ends
//! its stream (the slot is free again at once; the connection gets a `retry:` hint after
//! what was already queued), it resumes with `Last-Event-ID` without losing anything,
//! and another client receives everything throughout.
//!
//! The stuck client is a raw socket with a small receive buffer that the test never
//! reads until the end, so the server's writes back up after a bounded amount of data.
//! Every wait is on a condition: the flood goes on only until the server has let go.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

use crate::helpers::{SseReader, TestApp, TestUser, spawn_app_with};

/// Text of each flooding message: large, so that few of them fill the socket buffers.
const BIG: usize = 30_000;
/// The most messages the flood may take before the server must have let go.
const MAX_MESSAGES: usize = 1500;

/// An SSE request on a raw socket whose response body is not read.
struct StuckClient {
    socket: TcpStream,
    /// What was read with the head.
    received: Vec<u8>,
}

impl StuckClient {
    async fn open(app: &TestApp, path: &str, user: &TestUser) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        // Small, and fixed (no autotuning): the kernel buffers little for this client.
        socket.set_recv_buffer_size(4096).unwrap();
        let mut socket = socket.connect(app.addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
            app.addr, user.token
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut received = Vec::new();
        let mut buffer = [0u8; 1024];
        while !received.windows(4).any(|w| w == b"\r\n\r\n") {
            let read = tokio::time::timeout(Duration::from_secs(20), socket.read(&mut buffer))
                .await
                .expect("the response head within 20 s")
                .unwrap();
            assert!(read > 0, "the server closed before answering");
            received.extend_from_slice(&buffer[..read]);
        }
        let head = String::from_utf8_lossy(&received).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        Self { socket, received }
    }

    /// Reads the rest of the response, to its last chunk; its body.
    async fn finish(mut self) -> String {
        let mut buffer = vec![0u8; 64 * 1024];
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.received.ends_with(b"\r\n0\r\n\r\n") {
            let left = deadline.saturating_duration_since(Instant::now());
            let read = tokio::time::timeout(left, self.socket.read(&mut buffer))
                .await
                .expect("the end of the response within 60 s")
                .unwrap();
            assert!(read > 0, "the connection closed before the response ended");
            self.received.extend_from_slice(&buffer[..read]);
        }
        let start = self
            .received
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap()
            + 4;
        dechunk(&self.received[start..])
    }
}

/// The body of a chunked transfer coding, up to its last (empty) chunk.
fn dechunk(mut raw: &[u8]) -> String {
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_field = std::str::from_utf8(&raw[..line_end]).unwrap();
        let size = usize::from_str_radix(size_field.split(';').next().unwrap().trim(), 16).unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return String::from_utf8(body).unwrap();
        }
        body.extend_from_slice(&raw[..size]);
        assert_eq!(&raw[size..size + 2], b"\r\n");
        raw = &raw[size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_while_others_keep_receiving() {
    let app = spawn_app_with(|s| {
        s.sse_buffer = 16;
        s.sse_max_streams_per_user = 1;
        s.commands_per_second = 100_000;
        s.command_burst = 100_000;
    })
    .await;
    let slow = app.register_and_login().await;
    let fast = app.register_and_login().await;
    let slow_conversation = app.create_conversation(&slow).await;
    let fast_conversation = app.create_conversation(&fast).await;

    let stuck = StuckClient::open(&app, "/v1/events", &slow).await;
    let mut fast_events = SseReader::new(
        app.sse(
            &format!("/v1/conversations/{fast_conversation}/events"),
            &fast,
            None,
        )
        .await,
    );
    // The stuck stream holds the slow user's one slot.
    let probe = app.sse("/v1/events", &slow, Some(0)).await;
    assert_eq!(probe.status(), StatusCode::TOO_MANY_REQUESTS);

    let big = "x".repeat(BIG);
    let mut sent = Vec::new();
    let mut fast_sent = 0;
    let resumed = loop {
        assert!(
            sent.len() < MAX_MESSAGES,
            "{MAX_MESSAGES} messages of {BIG} characters and the stuck stream still holds its slot"
        );
        let body = app
            .send_message(
                &slow,
                &slow_conversation,
                &format!("{}{big}", sent.len()),
                false,
            )
            .await;
        sent.push(body["position"].as_i64().unwrap());
        if sent.len() % 10 == 0 {
            // The other client keeps receiving, in order, while the stuck one backs up.
            let text = format!("fast {fast_sent}");
            app.send_message(&fast, &fast_conversation, &text, false)
                .await;
            fast_sent += 1;
            assert_eq!(
                fast_events.next_of("MessageSent").await.json()["text"],
                text
            );
        }
        // Once the server has ended the stuck stream, its slot is free: a new stream
        // opens, resuming from the start of the log.
        let probe = app.sse("/v1/events", &slow, Some(0)).await;
        match probe.status() {
            StatusCode::TOO_MANY_REQUESTS => {}
            StatusCode::OK => break probe,
            other => panic!("unexpected {other}"),
        }
    };
    eprintln!("the stuck stream was ended after {} messages", sent.len());

    // When the stuck client reads again it gets what was queued for it, then the
    // reconnect hint, then the end of the response.
    let body = stuck.finish().await;
    let blocks: Vec<&str> = body.split("\n\n").filter(|b| !b.is_empty()).collect();
    let last = *blocks.last().unwrap();
    assert!(last.lines().any(|l| l.starts_with("retry:")), "{last}");
    assert!(last.contains("fell behind"), "{last}");
    let ids: Vec<i64> = blocks
        .iter()
        .filter_map(|b| b.lines().find_map(|l| l.strip_prefix("id:")))
        .map(|id| id.trim().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
    assert!(
        ids.last().is_none_or(|id| id < sent.last().unwrap()),
        "the stuck client did not get everything"
    );

    // Resuming loses nothing: every message, once, in order.
    let mut resumed = SseReader::new(resumed);
    for (i, position) in sent.iter().enumerate() {
        let event = resumed.next_of("MessageSent").await;
        assert_eq!(event.position(), *position);
        assert!(
            event.json()["text"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{i}x"))
        );
    }

    // The other client's stream was never ended.
    let text = "after the cut";
    app.send_message(&fast, &fast_conversation, text, false)
        .await;
    let event = fast_events.next_of("MessageSent").await;
    assert_eq!(event.json()["text"], text);
    assert!(event.retry.is_none());
}
