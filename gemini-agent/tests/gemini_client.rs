//! The Gemini client against the fake Gemini server, over real HTTP: replies, the ways
//! Gemini fails and how each failure is classified, and what goes over the wire.

use std::net::TcpListener as StdListener;
use std::time::Duration;

use colloquy_gemini_agent::fake::{
    FakeConfig, FakeGemini, Fault, FaultTarget, Quota, QuotaErrorStyle, RandomFaults, ReplyShape,
};
use colloquy_gemini_agent::gemini::{
    BlockReason, BlockedBy, CallFailure, Content, FinishReason, GeminiClient, GeminiConfig,
    GenerateContentRequest, GenerationConfig, KeyEffect, QuotaScope, ReplyStream, RetryTimeouts,
    Role, StreamEvent, TransportKind,
};
use futures::StreamExt;
use secrecy::SecretString;

const KEY_A: &str = "fake-key-alpha-0001";
const KEY_B: &str = "fake-key-bravo-0002";
const MODEL: &str = "gemini-2.5-flash";

struct Harness {
    fake: FakeGemini,
    client: GeminiClient,
}

fn config() -> FakeConfig {
    FakeConfig::default()
        .key(KEY_A, "project-a")
        .key(KEY_B, "project-b")
}

fn client_config(base_url: String) -> GeminiConfig {
    GeminiConfig {
        base_url,
        proxy: None,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(20),
        stream_idle_timeout: Duration::from_secs(20),
    }
}

async fn harness(config: FakeConfig) -> Harness {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = FakeGemini::start(config)
        .await
        .expect("the fake Gemini starts");
    let client =
        GeminiClient::new(client_config(fake.base_url())).expect("the client is configured");
    Harness { fake, client }
}

fn key(key: &str) -> SecretString {
    SecretString::from(key)
}

fn ask(text: &str) -> GenerateContentRequest {
    GenerateContentRequest {
        contents: vec![Content::user(text)],
        ..GenerateContentRequest::default()
    }
}

/// Every event of a stream, and the failure that ended it, if one did.
async fn drain(mut stream: ReplyStream) -> (Vec<StreamEvent>, Option<CallFailure>) {
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => events.push(event),
            Err(failure) => {
                assert!(stream.next().await.is_none(), "events after a failure");
                return (events, Some(failure));
            }
        }
    }
    (events, None)
}

fn text_of(events: &[StreamEvent]) -> String {
    events
        .iter()
        .filter_map(|event| match event {
            StreamEvent::Text(text) => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// Streams `text` with `key` and returns what came back.
async fn stream(h: &Harness, with: &str, text: &str) -> (Vec<StreamEvent>, Option<CallFailure>) {
    match h
        .client
        .stream_generate(&key(with), MODEL, &ask(text))
        .await
    {
        Ok(stream) => drain(stream).await,
        Err(failure) => (Vec::new(), Some(failure)),
    }
}

/// The failure of a call that must fail before any reply.
async fn failure(h: &Harness, with: &str) -> CallFailure {
    match h
        .client
        .stream_generate(&key(with), MODEL, &ask("hi"))
        .await
    {
        Ok(stream) => panic!("the call started: {:?}", drain(stream).await),
        Err(failure) => failure,
    }
}

#[tokio::test]
async fn a_streamed_reply_arrives_in_chunks_with_running_usage_and_a_finish_reason() {
    let h = harness(config()).await;
    h.fake.set_reply_shape(ReplyShape {
        chunks: 4,
        ..ReplyShape::default()
    });

    let (events, failure) = stream(&h, KEY_A, "hello there, Gemini").await;

    assert_eq!(failure, None);
    assert_eq!(text_of(&events), "echo: hello there, Gemini");
    let texts = events
        .iter()
        .filter(|event| matches!(event, StreamEvent::Text(_)))
        .count();
    assert_eq!(texts, 4);
    let running: Vec<u64> = events
        .iter()
        .filter_map(|event| match event {
            StreamEvent::Usage(usage) => Some(usage.candidates_token_count),
            _ => None,
        })
        .collect();
    assert_eq!(running.len(), 3, "one usage per chunk before the last");
    assert!(
        running.windows(2).all(|pair| pair[0] < pair[1]),
        "{running:?}"
    );
    let Some(StreamEvent::Finished { reason, usage }) = events.last() else {
        panic!("no finish: {events:?}");
    };
    assert_eq!(*reason, FinishReason::Stop);
    let usage = usage.unwrap();
    assert_eq!(usage.prompt_token_count, 5);
    assert!(usage.candidates_token_count > running[2]);
    assert_eq!(
        usage.total_token_count,
        usage.prompt_token_count + usage.candidates_token_count
    );
}

#[tokio::test]
async fn thought_parts_are_not_reply_text() {
    let h = harness(config()).await;
    h.fake.push_fault(Fault::Thoughts);

    let (events, failure) = stream(&h, KEY_A, "why?").await;

    assert_eq!(failure, None);
    assert_eq!(text_of(&events), "echo: why?");
    let Some(StreamEvent::Finished { usage, .. }) = events.last() else {
        panic!("no finish: {events:?}");
    };
    // The thought was sent (and counted), just not shown.
    assert!(usage.unwrap().thoughts_token_count > 0);
}

#[tokio::test]
async fn a_crlf_framed_stream_reads_the_same() {
    let h = harness(config()).await;
    h.fake.set_reply_shape(ReplyShape {
        chunks: 6,
        ..ReplyShape::default()
    });
    h.fake.push_fault(Fault::Crlf);

    let (events, failure) = stream(&h, KEY_A, "line endings").await;

    assert_eq!(failure, None);
    assert_eq!(text_of(&events), "echo: line endings");
    assert!(matches!(
        events.last(),
        Some(StreamEvent::Finished {
            reason: FinishReason::Stop,
            ..
        })
    ));
}

#[tokio::test]
async fn an_error_chunk_after_text_ends_the_stream_with_its_failure() {
    let h = harness(config()).await;
    h.fake.push_fault(Fault::ErrorMidStream);

    let (events, failure) = stream(&h, KEY_A, "hello there").await;

    assert!(!text_of(&events).is_empty(), "text came before the error");
    assert!(
        !events
            .iter()
            .any(|event| matches!(event, StreamEvent::Finished { .. }))
    );
    let failure = failure.unwrap();
    assert!(
        matches!(failure, CallFailure::Internal { .. }),
        "{failure:?}"
    );
    assert!(failure.is_retryable(RetryTimeouts::No));
    // The HTTP status was 200: the failure came inside the stream.
    assert_eq!(h.fake.status_counts().get(&200), Some(&1));
}

#[tokio::test]
async fn a_connection_cut_mid_stream_is_a_transport_failure_after_the_text() {
    let h = harness(config()).await;
    h.fake.push_fault(Fault::DropMidStream);

    let (events, failure) = stream(&h, KEY_A, "hello there").await;

    assert!(!text_of(&events).is_empty(), "text came before the cut");
    let failure = failure.unwrap();
    assert!(
        matches!(
            failure,
            CallFailure::Transport {
                kind: TransportKind::Dropped,
                ..
            }
        ),
        "{failure:?}"
    );
    assert_eq!(
        failure.key_effect(),
        KeyEffect::Backoff { retry_after: None }
    );
}

#[tokio::test]
async fn a_stream_that_ends_without_a_finish_reason_is_incomplete() {
    let h = harness(config()).await;
    h.fake.push_fault(Fault::EndWithoutFinish);

    let (events, failure) = stream(&h, KEY_A, "hello there").await;

    assert_eq!(text_of(&events), "echo: hello there");
    assert_eq!(failure, Some(CallFailure::Incomplete));
}

#[tokio::test]
async fn a_blocked_prompt_is_blocked_without_text_and_without_blaming_the_key() {
    let h = harness(config()).await;
    h.fake.push_fault(Fault::PromptBlocked);
    h.fake.push_fault(Fault::PromptBlocked);

    let (events, streamed) = stream(&h, KEY_A, "something bad").await;
    let unary = h
        .client
        .generate(&key(KEY_A), MODEL, &ask("something bad"))
        .await
        .unwrap_err();

    assert!(events.is_empty(), "{events:?}");
    let expected = CallFailure::Blocked {
        by: BlockedBy::Prompt(BlockReason::Safety),
    };
    assert_eq!(streamed.as_ref(), Some(&expected));
    assert_eq!(unary, expected);
    assert_eq!(unary.key_effect(), KeyEffect::None);
    assert!(!unary.is_retryable(RetryTimeouts::Yes));
}

#[tokio::test]
async fn a_safety_finish_blocks_the_reply_after_its_first_text() {
    let h = harness(config()).await;
    h.fake.push_fault(Fault::SafetyFinish);

    let (events, failure) = stream(&h, KEY_A, "hello there").await;

    assert!(!text_of(&events).is_empty());
    assert_eq!(
        failure,
        Some(CallFailure::Blocked {
            by: BlockedBy::Reply(FinishReason::Safety)
        })
    );
}

#[tokio::test]
async fn a_per_minute_quota_gives_a_429_with_its_limit_and_retry_delay() {
    let h = harness(config().quota(
        "project-a",
        Quota {
            rpm: Some(2),
            rpd: None,
        },
    ))
    .await;

    for _ in 0..2 {
        assert_eq!(stream(&h, KEY_A, "hi").await.1, None);
    }
    let failure = failure(&h, KEY_A).await;

    let CallFailure::RateLimited {
        retry_after,
        scope,
        quota_id,
        quota_value,
        ..
    } = &failure
    else {
        panic!("not rate limited: {failure:?}");
    };
    assert_eq!(*scope, QuotaScope::PerMinute);
    assert_eq!(*quota_value, Some(2));
    assert!(quota_id.as_deref().unwrap().contains("PerMinute"));
    let retry_after = retry_after.unwrap();
    assert!(
        retry_after > Duration::ZERO && retry_after <= Duration::from_secs(60),
        "{retry_after:?}"
    );
    assert_eq!(
        failure.key_effect(),
        KeyEffect::CoolProject {
            retry_after: Some(retry_after)
        }
    );
    // Another project has its own quota.
    assert_eq!(stream(&h, KEY_B, "hi").await.1, None);
    // And a reset gives the first project a new minute.
    h.fake.reset_quotas();
    assert_eq!(stream(&h, KEY_A, "hi").await.1, None);
    assert_eq!(h.fake.status_counts().get(&429), Some(&1));
}

#[tokio::test]
async fn keys_of_one_project_share_its_quota() {
    let h = harness(config().key("fake-key-alpha-0003", "project-a").quota(
        "project-a",
        Quota {
            rpm: Some(1),
            rpd: None,
        },
    ))
    .await;

    assert_eq!(stream(&h, KEY_A, "hi").await.1, None);
    let failure = failure(&h, "fake-key-alpha-0003").await;

    assert!(
        matches!(failure, CallFailure::RateLimited { .. }),
        "{failure:?}"
    );
}

#[tokio::test]
async fn a_per_day_quota_exhausts_the_project() {
    let h = harness(config().quota(
        "project-a",
        Quota {
            rpm: Some(100),
            rpd: Some(1),
        },
    ))
    .await;

    assert_eq!(stream(&h, KEY_A, "hi").await.1, None);
    let failure = failure(&h, KEY_A).await;

    assert!(
        matches!(
            failure,
            CallFailure::RateLimited {
                scope: QuotaScope::PerDay,
                quota_value: Some(1),
                ..
            }
        ),
        "{failure:?}"
    );
    assert_eq!(failure.key_effect(), KeyEffect::ExhaustProjectForDay);
    assert_eq!(
        failure.reason().split(" (").next(),
        Some("daily quota exhausted")
    );
}

#[tokio::test]
async fn a_429_without_details_takes_its_retry_delay_from_the_message() {
    let h = harness(config().quota(
        "project-a",
        Quota {
            rpm: Some(1),
            rpd: None,
        },
    ))
    .await;
    h.fake.set_quota_errors(QuotaErrorStyle::MessageOnly);
    assert_eq!(stream(&h, KEY_A, "hi").await.1, None);

    let failure = failure(&h, KEY_A).await;

    let CallFailure::RateLimited {
        retry_after,
        quota_id,
        ..
    } = &failure
    else {
        panic!("not rate limited: {failure:?}");
    };
    assert_eq!(*quota_id, None, "no details were sent");
    let retry_after = retry_after.unwrap();
    assert!(
        retry_after > Duration::ZERO && retry_after <= Duration::from_secs(60),
        "{retry_after:?}"
    );

    // With no hint at all the pool's default cooldown applies.
    h.fake.set_quota_errors(QuotaErrorStyle::Bare);
    let failure = self::failure(&h, KEY_A).await;
    assert_eq!(failure.retry_after(), None);
    assert!(matches!(
        failure,
        CallFailure::RateLimited {
            scope: QuotaScope::Unknown,
            ..
        }
    ));
    assert_eq!(
        failure.key_effect(),
        KeyEffect::CoolProject { retry_after: None }
    );
}

#[tokio::test]
async fn a_scripted_429_carries_its_hint_and_no_made_up_limit() {
    let h = harness(config()).await;
    h.fake.push_fault(Fault::RateLimited {
        per_day: true,
        retry_after: Duration::from_millis(4_200),
    });

    let failure = failure(&h, KEY_A).await;

    let CallFailure::RateLimited {
        retry_after,
        scope,
        quota_id,
        quota_value,
        ..
    } = failure
    else {
        panic!("not rate limited: {failure:?}");
    };
    // RetryInfo carries whole seconds, rounded up.
    assert_eq!(retry_after, Some(Duration::from_secs(5)));
    assert_eq!(scope, QuotaScope::PerDay);
    assert_eq!(
        quota_id.as_deref(),
        Some("GenerateRequestsPerDayPerProjectPerModel-FreeTier")
    );
    assert_eq!(quota_value, None);
}

#[tokio::test]
async fn an_unknown_key_is_invalid_and_disabled() {
    let h = harness(config()).await;

    let failure = failure(&h, "no-such-key-000000").await;
    let probed = h
        .client
        .probe(&key("no-such-key-000000"))
        .await
        .unwrap_err();

    assert!(
        matches!(&failure, CallFailure::KeyInvalid { reason, .. } if reason == "API_KEY_INVALID"),
        "{failure:?}"
    );
    assert!(matches!(failure.key_effect(), KeyEffect::DisableKey { .. }));
    assert!(matches!(probed, CallFailure::KeyInvalid { .. }));
    assert_eq!(h.client.probe(&key(KEY_A)).await, Ok(()));
}

#[tokio::test]
async fn a_suspended_key_is_unusable_until_unsuspended_and_never_shown() {
    let h = harness(config()).await;
    assert!(h.fake.suspend_key(KEY_A));

    let failure = failure(&h, KEY_A).await;

    assert!(
        matches!(&failure, CallFailure::KeyUnusable { reason, .. } if reason == "CONSUMER_SUSPENDED"),
        "{failure:?}"
    );
    assert!(matches!(failure.key_effect(), KeyEffect::DisableKey { .. }));
    // Gemini's message quotes the key; nothing the failure shows may.
    let shown = format!("{failure} | {failure:?} | {}", failure.reason());
    assert!(!shown.contains(KEY_A), "{shown}");
    assert!(shown.contains("has been suspended"), "{shown}");

    assert!(h.fake.unsuspend_key(KEY_A));
    assert_eq!(stream(&h, KEY_A, "hi").await.1, None);
}

#[tokio::test]
async fn server_errors_are_classified_by_status() {
    let h = harness(config()).await;
    h.fake.push_fault(Fault::Internal);
    h.fake.push_fault(Fault::Overloaded);
    h.fake.push_fault(Fault::DeadlineExceeded);

    let internal = failure(&h, KEY_A).await;
    let overloaded = failure(&h, KEY_A).await;
    let deadline = failure(&h, KEY_A).await;

    assert!(
        matches!(internal, CallFailure::Internal { .. }),
        "{internal:?}"
    );
    assert!(
        matches!(&overloaded, CallFailure::Overloaded { message, .. } if message.contains("overloaded")),
        "{overloaded:?}"
    );
    assert!(
        matches!(deadline, CallFailure::DeadlineExceeded { .. }),
        "{deadline:?}"
    );
    for failure in [&internal, &overloaded, &deadline] {
        assert_eq!(
            failure.key_effect(),
            KeyEffect::Backoff { retry_after: None }
        );
    }
    assert!(internal.is_retryable(RetryTimeouts::No));
    assert!(overloaded.is_retryable(RetryTimeouts::No));
    assert!(!deadline.is_retryable(RetryTimeouts::No));
    assert!(deadline.is_retryable(RetryTimeouts::Yes));
    let counts = h.fake.status_counts();
    assert_eq!(
        (counts.get(&500), counts.get(&503), counts.get(&504)),
        (Some(&1), Some(&1), Some(&1))
    );
}

#[tokio::test]
async fn a_scripted_fault_waits_for_the_key_it_targets() {
    let h = harness(config()).await;
    h.fake
        .push_fault_for(FaultTarget::Key(KEY_B.to_owned()), Fault::Overloaded);

    assert_eq!(stream(&h, KEY_A, "hi").await.1, None);
    assert_eq!(h.fake.pending_faults(), 1);
    assert!(matches!(
        failure(&h, KEY_B).await,
        CallFailure::Overloaded { .. }
    ));
    assert_eq!(h.fake.pending_faults(), 0);
}

#[tokio::test]
async fn random_faults_follow_their_probability() {
    let h = harness(config()).await;
    h.fake.set_random_faults(Some(RandomFaults {
        seed: 1,
        probability: 1.0,
        faults: vec![Fault::Overloaded],
    }));

    for _ in 0..3 {
        assert!(matches!(
            failure(&h, KEY_A).await,
            CallFailure::Overloaded { .. }
        ));
    }
    h.fake.set_random_faults(None);
    assert_eq!(stream(&h, KEY_A, "hi").await.1, None);
    assert_eq!(h.fake.status_counts().get(&503), Some(&3));
}

#[tokio::test]
async fn the_key_travels_only_in_its_header_and_the_request_in_gemini_terms() {
    let h = harness(config()).await;
    let request = GenerateContentRequest {
        contents: vec![
            Content::user("first"),
            Content::model("echo: first"),
            Content::user("second"),
        ],
        system_instruction: Some(Content::system("Answer briefly.")),
        generation_config: Some(GenerationConfig {
            temperature: Some(0.25),
            max_output_tokens: Some(256),
            ..GenerationConfig::default()
        }),
        safety_settings: Vec::new(),
    };
    let key_a = key(KEY_A);

    let reply = h
        .client
        .stream_generate(&key_a, MODEL, &request)
        .await
        .unwrap();
    let reply = reply.into_reply().await.unwrap();
    let unary = h.client.generate(&key_a, MODEL, &request).await.unwrap();
    let tokens = h
        .client
        .count_tokens(&key_a, MODEL, &request)
        .await
        .unwrap();
    h.client.probe(&key_a).await.unwrap();

    assert_eq!(reply.text, "echo: second");
    assert_eq!(unary.text(), "echo: second");
    // One token per four characters of every text, the system instruction included.
    assert_eq!(tokens, 2 + 3 + 2 + 4);
    let requests = h.fake.requests();
    assert_eq!(requests.len(), 4);
    for recorded in &requests {
        assert_eq!(recorded.api_key.as_deref(), Some(KEY_A));
        assert!(!recorded.key_in_query);
        assert!(!recorded.path.contains(KEY_A));
        assert!(
            !recorded
                .query
                .as_deref()
                .unwrap_or_default()
                .contains(KEY_A)
        );
    }
    let actions: Vec<_> = requests
        .iter()
        .map(|recorded| recorded.action.as_deref().unwrap_or_default())
        .collect();
    assert_eq!(
        actions,
        [
            "streamGenerateContent",
            "generateContent",
            "countTokens",
            "list"
        ]
    );
    assert_eq!(requests[0].query.as_deref(), Some("alt=sse"));
    assert_eq!(
        requests[0].path,
        format!("/v1beta/models/{MODEL}:streamGenerateContent")
    );
    let sent = requests[0].request.as_ref().unwrap();
    let roles: Vec<_> = sent.contents.iter().map(|content| content.role).collect();
    assert_eq!(
        roles,
        [Some(Role::User), Some(Role::Model), Some(Role::User)]
    );
    let body = requests[0].body.as_ref().unwrap();
    assert_eq!(
        body["systemInstruction"]["parts"][0]["text"],
        "Answer briefly."
    );
    assert!(body["systemInstruction"].get("role").is_none());
    assert_eq!(body["generationConfig"]["maxOutputTokens"], 256);
    assert_eq!(body["generationConfig"]["temperature"], 0.25);
    assert!(body.get("safetySettings").is_none());
    let counted = requests[2].body.as_ref().unwrap();
    assert_eq!(
        counted["generateContentRequest"]["model"],
        format!("models/{MODEL}")
    );
}

#[tokio::test]
async fn unary_generation_leaves_out_thoughts_and_reports_usage() {
    let h = harness(config()).await;
    h.fake.push_fault(Fault::Thoughts);

    let response = h
        .client
        .generate(&key(KEY_A), MODEL, &ask("ping"))
        .await
        .unwrap();

    assert_eq!(response.text(), "echo: ping");
    assert_eq!(response.finish_reason(), Some(&FinishReason::Stop));
    let usage = response.usage_metadata.unwrap();
    assert!(usage.thoughts_token_count > 0);
    assert_eq!(
        usage.total_token_count,
        usage.prompt_token_count + usage.candidates_token_count + usage.thoughts_token_count
    );
}

#[tokio::test]
async fn unary_generation_fails_like_a_stream() {
    let h = harness(config()).await;
    h.fake.push_fault(Fault::SafetyFinish);
    h.fake.push_fault(Fault::EndWithoutFinish);
    h.fake.push_fault(Fault::DropMidStream);
    h.fake.push_fault(Fault::ErrorMidStream);

    let mut failures = Vec::new();
    for _ in 0..4 {
        failures.push(
            h.client
                .generate(&key(KEY_A), MODEL, &ask("hello"))
                .await
                .unwrap_err(),
        );
    }

    assert_eq!(
        failures[0],
        CallFailure::Blocked {
            by: BlockedBy::Reply(FinishReason::Safety)
        }
    );
    assert_eq!(failures[1], CallFailure::Incomplete);
    assert!(
        matches!(
            failures[2],
            CallFailure::Transport {
                kind: TransportKind::Dropped,
                ..
            }
        ),
        "{:?}",
        failures[2]
    );
    assert!(
        matches!(failures[3], CallFailure::Internal { .. }),
        "{:?}",
        failures[3]
    );
}

#[tokio::test]
async fn an_unknown_model_is_not_found_and_a_bad_name_is_never_sent() {
    let h = harness(config()).await;

    let missing = h
        .client
        .stream_generate(&key(KEY_A), "gemini-0-nothing", &ask("hi"))
        .await
        .unwrap_err();
    assert!(
        matches!(missing, CallFailure::NotFound { .. }),
        "{missing:?}"
    );
    assert_eq!(missing.key_effect(), KeyEffect::None);

    h.fake.clear_requests();
    let bad = h
        .client
        .stream_generate(&key(KEY_A), "../models/x?key=y", &ask("hi"))
        .await
        .unwrap_err();
    assert!(matches!(bad, CallFailure::BadRequest { .. }), "{bad:?}");
    assert!(h.fake.requests().is_empty());
}

#[tokio::test]
async fn a_wrong_role_is_rejected_as_a_bad_request() {
    let h = harness(config()).await;
    let request = GenerateContentRequest {
        contents: vec![Content {
            role: Some(Role::Other),
            ..Content::user("hi")
        }],
        ..GenerateContentRequest::default()
    };

    let failure = h
        .client
        .generate(&key(KEY_A), MODEL, &request)
        .await
        .unwrap_err();

    assert!(
        matches!(&failure, CallFailure::BadRequest { message } if message.contains("valid role")),
        "{failure:?}"
    );
}

#[tokio::test]
async fn a_silent_server_trips_the_idle_timeout_before_and_during_a_stream() {
    let h = harness(config()).await;
    let impatient = GeminiClient::new(GeminiConfig {
        stream_idle_timeout: Duration::from_millis(200),
        ..client_config(h.fake.base_url())
    })
    .unwrap();
    // Far longer than the timeout: the test never waits for it (shutdown ends the pause).
    let long = Duration::from_secs(600);
    h.fake.push_fault(Fault::Latency {
        before_first_byte: long,
        between_chunks: Duration::ZERO,
    });
    h.fake.push_fault(Fault::Latency {
        before_first_byte: Duration::ZERO,
        between_chunks: long,
    });

    let before = impatient
        .stream_generate(&key(KEY_A), MODEL, &ask("hello there"))
        .await
        .unwrap_err();
    let stream = impatient
        .stream_generate(&key(KEY_A), MODEL, &ask("hello there"))
        .await
        .unwrap();
    let (events, during) = drain(stream).await;

    for failure in [&before, during.as_ref().unwrap()] {
        assert!(
            matches!(
                failure,
                CallFailure::Transport {
                    kind: TransportKind::Timeout,
                    ..
                }
            ),
            "{failure:?}"
        );
        assert!(!failure.is_retryable(RetryTimeouts::No));
    }
    // The first of three chunks arrived; the second never did.
    assert_eq!(text_of(&events), "echo: ");
    h.fake.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_failure() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let client = GeminiClient::new(client_config(format!("http://127.0.0.1:{port}"))).unwrap();

    let failure = client
        .stream_generate(&key(KEY_A), MODEL, &ask("hi"))
        .await
        .unwrap_err();

    assert!(
        matches!(
            failure,
            CallFailure::Transport {
                kind: TransportKind::Connect,
                ..
            }
        ),
        "{failure:?}"
    );
    assert!(failure.is_retryable(RetryTimeouts::No));
}

#[tokio::test]
async fn a_suspended_key_is_disabled_and_a_recheck_brings_it_back_once_gemini_takes_it() {
    use std::sync::Arc;

    use colloquy_gemini_agent::budget::MemoryBudgetStore;
    use colloquy_gemini_agent::clock::SystemClock;
    use colloquy_gemini_agent::keys::{KeyCheck, KeyPool, KeyState, Outcome, PoolConfig, PoolKey};
    use colloquy_gemini_agent::worker::ClientProbe;

    let h = harness(config()).await;
    assert!(h.fake.suspend_key(KEY_A));
    let pool = KeyPool::new(
        PoolConfig::new(vec![PoolKey::new("alpha", KEY_A, "project-a")]),
        Arc::new(MemoryBudgetStore::new()),
        Arc::new(SystemClock),
    )
    .unwrap();
    let lease = pool.acquire(10).await.unwrap();
    let failure = h
        .client
        .generate(lease.key(), MODEL, &ask("hi"))
        .await
        .unwrap_err();
    let KeyEffect::DisableKey { reason } = failure.key_effect() else {
        panic!("{failure:?}");
    };
    pool.report(lease, Outcome::KeyUnusable { reason })
        .await
        .unwrap();
    let state = |snapshot: Vec<colloquy_gemini_agent::keys::KeyStatus>| snapshot[0].state;
    assert_eq!(state(pool.snapshot().await.unwrap()), KeyState::Disabled);

    let probe = ClientProbe(h.client.clone());
    let checked = pool.recheck_disabled(&probe).await.unwrap();
    assert!(
        matches!(checked[0].1, KeyCheck::Rejected { .. }),
        "still suspended: {checked:?}"
    );
    assert_eq!(state(pool.snapshot().await.unwrap()), KeyState::Disabled);

    assert!(h.fake.unsuspend_key(KEY_A));
    let checked = pool.recheck_disabled(&probe).await.unwrap();
    assert_eq!(checked[0].1, KeyCheck::Usable);
    assert_eq!(state(pool.snapshot().await.unwrap()), KeyState::Ready);
    // Usable again: the pool leases it.
    assert_eq!(pool.acquire(10).await.unwrap().label(), "alpha");
}
