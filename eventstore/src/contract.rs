//! The contract every [`EventStore`] backend passes, written once. A backend's test
//! suite runs each function against a fresh, empty store with
//! [`contract_tests!`](crate::contract_tests).

#![allow(clippy::unwrap_used, reason = "test code: a failure is a test failure")]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::model::{ExpectedVersion, InvalidInput, LogFilter, NewEvent, StoreError, StreamAppend};
use crate::store::{EventStore, Selection, Subscription, SubscriptionItem};

/// Generates one `#[tokio::test]` per contract function; `$make` is an async
/// expression yielding `(guard, Arc<dyn EventStore>)` (the guard keeps the backing
/// database alive for the test).
#[macro_export]
macro_rules! contract_tests {
    ($make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let (_guard, store) = $make.await;
                $crate::contract::$name(store).await;
            }
        )*
    };
}

/// Every contract function, for `contract_tests!(make; all…)`.
#[macro_export]
macro_rules! all_contract_tests {
    ($make:expr) => {
        $crate::contract_tests!($make;
            expected_version_any_always_appends,
            expected_version_no_stream,
            expected_version_stream_exists,
            expected_version_exact,
            multi_stream_append_is_atomic,
            multi_stream_append_reports_every_stream,
            retrying_an_append_returns_the_original_positions,
            a_stored_id_with_other_data_is_a_conflict,
            mixing_stored_and_new_ids_is_a_conflict,
            concurrent_retries_write_once,
            bad_input_is_rejected_and_writes_nothing,
            reads_by_stream_category_and_all,
            reading_backward_from_a_position,
            concurrent_writers_are_seen_in_order_exactly_once,
            a_subscription_catches_up_then_is_woken,
            a_category_subscription_sees_only_its_category,
            consumer_group_members_split_a_category_by_stream,
            redaction_rewrites_data_and_keeps_positions,
        );
    };
}

fn event(event_type: &str, data: Value) -> NewEvent {
    NewEvent::new(Uuid::new_v4(), event_type, data)
}

fn append(stream: &str, expected: ExpectedVersion, events: Vec<NewEvent>) -> Vec<StreamAppend> {
    vec![StreamAppend::new(stream, expected, events)]
}

async fn all(store: &Arc<dyn EventStore>) -> Vec<crate::RecordedEvent> {
    store.read_log(&LogFilter::All, 0, 100_000).await.unwrap()
}

fn is_wrong_version(result: &Result<crate::AppendOutcome, StoreError>) -> bool {
    matches!(result, Err(StoreError::WrongExpectedVersion { .. }))
}

pub async fn expected_version_any_always_appends(store: Arc<dyn EventStore>) {
    let first = store
        .append(append(
            "thing-1",
            ExpectedVersion::Any,
            vec![event("A", json!({}))],
        ))
        .await
        .unwrap();
    assert_eq!(first.streams[0].version, 0);
    let second = store
        .append(append(
            "thing-1",
            ExpectedVersion::Any,
            vec![event("B", json!({}))],
        ))
        .await
        .unwrap();
    assert_eq!(second.streams[0].version, 1);
    assert!(second.last_position > first.last_position);
    assert!(!second.replayed);
}

pub async fn expected_version_no_stream(store: Arc<dyn EventStore>) {
    let ok = store
        .append(append(
            "thing-1",
            ExpectedVersion::NoStream,
            vec![event("A", json!({}))],
        ))
        .await;
    assert!(ok.is_ok());
    let again = store
        .append(append(
            "thing-1",
            ExpectedVersion::NoStream,
            vec![event("A", json!({}))],
        ))
        .await;
    match again {
        Err(StoreError::WrongExpectedVersion { actual, .. }) => assert_eq!(actual, 0),
        other => panic!("expected a version conflict, got {other:?}"),
    }
    let exact_minus_one = store
        .append(append(
            "thing-2",
            ExpectedVersion::Exact(-1),
            vec![event("A", json!({}))],
        ))
        .await;
    assert!(exact_minus_one.is_ok());
    assert_eq!(all(&store).await.len(), 2);
}

pub async fn expected_version_stream_exists(store: Arc<dyn EventStore>) {
    let missing = store
        .append(append(
            "thing-1",
            ExpectedVersion::StreamExists,
            vec![event("A", json!({}))],
        ))
        .await;
    assert!(is_wrong_version(&missing), "{missing:?}");
    store
        .append(append(
            "thing-1",
            ExpectedVersion::Any,
            vec![event("A", json!({}))],
        ))
        .await
        .unwrap();
    let exists = store
        .append(append(
            "thing-1",
            ExpectedVersion::StreamExists,
            vec![event("B", json!({}))],
        ))
        .await
        .unwrap();
    assert_eq!(exists.streams[0].version, 1);
}

pub async fn expected_version_exact(store: Arc<dyn EventStore>) {
    store
        .append(append(
            "thing-1",
            ExpectedVersion::Exact(-1),
            vec![event("A", json!({})), event("B", json!({}))],
        ))
        .await
        .unwrap();
    assert_eq!(store.stream_version("thing-1").await.unwrap(), Some(1));
    let stale = store
        .append(append(
            "thing-1",
            ExpectedVersion::Exact(0),
            vec![event("C", json!({}))],
        ))
        .await;
    match stale {
        Err(StoreError::WrongExpectedVersion { actual, stream, .. }) => {
            assert_eq!((actual, stream.as_str()), (1, "thing-1"));
        }
        other => panic!("expected a version conflict, got {other:?}"),
    }
    let ok = store
        .append(append(
            "thing-1",
            ExpectedVersion::Exact(1),
            vec![event("C", json!({}))],
        ))
        .await
        .unwrap();
    assert_eq!(ok.streams[0].version, 2);
    assert_eq!(store.stream_version("nothing-1").await.unwrap(), None);
}

pub async fn multi_stream_append_is_atomic(store: Arc<dyn EventStore>) {
    store
        .append(append(
            "b-1",
            ExpectedVersion::Any,
            vec![event("A", json!({}))],
        ))
        .await
        .unwrap();
    let head = store.head().await.unwrap();
    let result = store
        .append(vec![
            StreamAppend::new(
                "a-1",
                ExpectedVersion::NoStream,
                vec![event("A", json!({}))],
            ),
            // b-1 has version 0, so this expectation fails and a-1 must not be written.
            StreamAppend::new(
                "b-1",
                ExpectedVersion::NoStream,
                vec![event("B", json!({}))],
            ),
        ])
        .await;
    assert!(is_wrong_version(&result), "{result:?}");
    assert_eq!(store.head().await.unwrap(), head);
    assert_eq!(store.stream_version("a-1").await.unwrap(), None);
}

pub async fn multi_stream_append_reports_every_stream(store: Arc<dyn EventStore>) {
    let outcome = store
        .append(vec![
            StreamAppend::new(
                "a-1",
                ExpectedVersion::NoStream,
                vec![event("A", json!({"n": 1})), event("A", json!({"n": 2}))],
            ),
            StreamAppend::new(
                "b-1",
                ExpectedVersion::NoStream,
                vec![event("B", json!({}))],
            ),
        ])
        .await
        .unwrap();
    let versions: Vec<_> = outcome
        .streams
        .iter()
        .map(|s| (s.stream.as_str(), s.version))
        .collect();
    assert_eq!(versions, [("a-1", 1), ("b-1", 0)]);
    assert_eq!(outcome.positions.len(), 3);
    assert!(outcome.positions.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(outcome.last_position, outcome.positions[2]);
    let log = all(&store).await;
    let seen: Vec<_> = log.iter().map(|e| e.global_position).collect();
    assert_eq!(seen, outcome.positions);
}

pub async fn retrying_an_append_returns_the_original_positions(store: Arc<dyn EventStore>) {
    let events = vec![
        event("A", json!({"x": 1})),
        event("B", json!({"y": [1, 2]})),
    ];
    let first = store
        .append(append("thing-1", ExpectedVersion::NoStream, events.clone()))
        .await
        .unwrap();
    store
        .append(append(
            "other-1",
            ExpectedVersion::Any,
            vec![event("C", json!({}))],
        ))
        .await
        .unwrap();
    // The retry's expectation no longer holds, but it is recognised as a replay first.
    let retry = store
        .append(append("thing-1", ExpectedVersion::NoStream, events.clone()))
        .await
        .unwrap();
    let by_id = store
        .read_events_by_id(&[events[1].id, events[0].id, Uuid::new_v4()])
        .await
        .unwrap();
    assert_eq!(
        by_id.iter().map(|e| e.global_position).collect::<Vec<_>>(),
        first.positions
    );
    assert!(retry.replayed);
    assert_eq!(retry.positions, first.positions);
    assert_eq!(retry.last_position, first.last_position);
    assert_eq!(retry.streams, first.streams);
    assert_eq!(all(&store).await.len(), 3);
}

pub async fn a_stored_id_with_other_data_is_a_conflict(store: Arc<dyn EventStore>) {
    let original = event("A", json!({"x": 1}));
    store
        .append(append(
            "thing-1",
            ExpectedVersion::Any,
            vec![original.clone()],
        ))
        .await
        .unwrap();
    let mut changed = original.clone();
    changed.data = json!({"x": 2});
    let result = store
        .append(append("thing-1", ExpectedVersion::Any, vec![changed]))
        .await;
    match result {
        Err(StoreError::DuplicateEventId { id }) => assert_eq!(id, original.id),
        other => panic!("expected a duplicate id error, got {other:?}"),
    }
    let mut elsewhere = original.clone();
    elsewhere.event_type = "B".into();
    assert!(matches!(
        store
            .append(append("thing-1", ExpectedVersion::Any, vec![elsewhere]))
            .await,
        Err(StoreError::DuplicateEventId { .. })
    ));
    assert!(matches!(
        store
            .append(append("thing-2", ExpectedVersion::Any, vec![original]))
            .await,
        Err(StoreError::DuplicateEventId { .. })
    ));
    assert_eq!(all(&store).await.len(), 1);
}

pub async fn mixing_stored_and_new_ids_is_a_conflict(store: Arc<dyn EventStore>) {
    let stored = event("A", json!({}));
    store
        .append(append(
            "thing-1",
            ExpectedVersion::Any,
            vec![stored.clone()],
        ))
        .await
        .unwrap();
    let result = store
        .append(append(
            "thing-1",
            ExpectedVersion::Any,
            vec![stored, event("B", json!({}))],
        ))
        .await;
    assert!(
        matches!(result, Err(StoreError::DuplicateEventId { .. })),
        "{result:?}"
    );
    assert_eq!(all(&store).await.len(), 1);
}

pub async fn concurrent_retries_write_once(store: Arc<dyn EventStore>) {
    let events = vec![event("A", json!({"n": 1})), event("A", json!({"n": 2}))];
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = Arc::clone(&store);
            let events = events.clone();
            tokio::spawn(async move {
                store
                    .append(append("thing-1", ExpectedVersion::NoStream, events))
                    .await
            })
        })
        .collect();
    let mut positions = HashSet::new();
    let mut written = 0;
    for task in tasks {
        let outcome = task.await.unwrap().unwrap();
        positions.insert(outcome.positions.clone());
        if !outcome.replayed {
            written += 1;
        }
    }
    assert_eq!(written, 1, "exactly one of the identical appends writes");
    assert_eq!(positions.len(), 1, "every retry sees the same positions");
    assert_eq!(all(&store).await.len(), 2);
}

pub async fn bad_input_is_rejected_and_writes_nothing(store: Arc<dyn EventStore>) {
    type Case = (Vec<StreamAppend>, fn(&InvalidInput) -> bool);
    let cases: Vec<Case> = vec![
        (vec![], |e| matches!(e, InvalidInput::Empty)),
        (
            append("", ExpectedVersion::Any, vec![event("A", json!({}))]),
            |e| matches!(e, InvalidInput::EmptyStreamName),
        ),
        (
            append("a b-1", ExpectedVersion::Any, vec![event("A", json!({}))]),
            |e| matches!(e, InvalidInput::StreamNameCharacters(_)),
        ),
        (
            append("a\n-1", ExpectedVersion::Any, vec![event("A", json!({}))]),
            |e| matches!(e, InvalidInput::StreamNameCharacters(_)),
        ),
        (
            append(
                &"s".repeat(256),
                ExpectedVersion::Any,
                vec![event("A", json!({}))],
            ),
            |e| matches!(e, InvalidInput::StreamNameTooLong(256)),
        ),
        (
            append("s-1", ExpectedVersion::Any, vec![event("9A", json!({}))]),
            |e| matches!(e, InvalidInput::EventType(_)),
        ),
        (
            append("s-1", ExpectedVersion::Any, vec![event("A", json!("text"))]),
            |e| matches!(e, InvalidInput::DataNotObject),
        ),
        (
            append(
                "s-1",
                ExpectedVersion::Any,
                vec![event("A", json!({})).with_metadata(json!([1]))],
            ),
            |e| matches!(e, InvalidInput::MetadataNotObject),
        ),
        (
            append(
                "s-1",
                ExpectedVersion::Any,
                vec![event("A", json!({"t": "x".repeat(1024 * 1024)}))],
            ),
            |e| matches!(e, InvalidInput::TooLarge { .. }),
        ),
        (
            append(
                "s-1",
                ExpectedVersion::Any,
                vec![event("A", json!({"t": "a\u{0}"}))],
            ),
            |e| matches!(e, InvalidInput::Nul(_)),
        ),
        (
            append(
                "s-1",
                ExpectedVersion::Exact(-2),
                vec![event("A", json!({}))],
            ),
            |e| matches!(e, InvalidInput::ExpectedVersion(-2)),
        ),
    ];
    for (appends, expected) in cases {
        let described = format!("{:?}", appends.first().map(|a| &a.stream));
        match store.append(appends).await {
            Err(StoreError::Invalid(e)) => assert!(expected(&e), "{described}: wrong error {e:?}"),
            other => panic!("{described}: expected a validation error, got {other:?}"),
        }
    }
    // A valid event beside an invalid one is not written either.
    let mixed = vec![
        StreamAppend::new("ok-1", ExpectedVersion::Any, vec![event("A", json!({}))]),
        StreamAppend::new(
            "bad-1",
            ExpectedVersion::Any,
            vec![event("not valid", json!({}))],
        ),
    ];
    assert!(matches!(
        store.append(mixed).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(store.head().await.unwrap(), 0);
}

pub async fn reads_by_stream_category_and_all(store: Arc<dyn EventStore>) {
    for n in 0..3 {
        store
            .append(vec![
                StreamAppend::new(
                    "cat-1",
                    ExpectedVersion::Any,
                    vec![event("A", json!({"n": n}))],
                ),
                StreamAppend::new(
                    "dog-1",
                    ExpectedVersion::Any,
                    vec![event("B", json!({"n": n}))],
                ),
                StreamAppend::new(
                    "cat-2+x",
                    ExpectedVersion::Any,
                    vec![event("C", json!({"n": n})).with_metadata(json!({"m": n}))],
                ),
            ])
            .await
            .unwrap();
    }
    let stream = store.read_stream("cat-1", 1, 10).await.unwrap();
    assert_eq!(
        stream.iter().map(|e| e.position).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(stream[0].data, json!({"n": 1}));
    assert_eq!(stream[0].category(), "cat");
    let cats = store
        .read_log(&LogFilter::Category("cat".into()), 0, 100)
        .await
        .unwrap();
    assert_eq!(cats.len(), 6);
    assert!(cats.iter().all(|e| e.stream_name.starts_with("cat-")));
    assert!(
        cats.windows(2)
            .all(|w| w[0].global_position < w[1].global_position)
    );
    assert_eq!(
        cats.iter().find(|e| e.event_type == "C").unwrap().metadata,
        Some(json!({"m": 0}))
    );
    let everything = all(&store).await;
    assert_eq!(everything.len(), 9);
    let page = store
        .read_log(&LogFilter::All, everything[3].global_position, 2)
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|e| e.global_position).collect::<Vec<_>>(),
        [everything[4].global_position, everything[5].global_position]
    );
    assert_eq!(store.head().await.unwrap(), everything[8].global_position);
    let first = &everything[0];
    assert!(first.time <= chrono::Utc::now() + chrono::Duration::seconds(5));
}

pub async fn reading_backward_from_a_position(store: Arc<dyn EventStore>) {
    let events = (0..10).map(|n| event("A", json!({"n": n}))).collect();
    store
        .append(append("talk-1", ExpectedVersion::NoStream, events))
        .await
        .unwrap();
    let back = store
        .read_stream_backward("talk-1", Some(7), 3)
        .await
        .unwrap();
    assert_eq!(
        back.iter().map(|e| e.position).collect::<Vec<_>>(),
        [6, 5, 4]
    );
    let tail = store.read_stream_backward("talk-1", None, 2).await.unwrap();
    assert_eq!(tail.iter().map(|e| e.position).collect::<Vec<_>>(), [9, 8]);
}

/// Tails `filter` until `expected` events were seen or `deadline` passes; returns the
/// positions in the order they were delivered.
pub async fn tail(
    store: Arc<dyn EventStore>,
    filter: LogFilter,
    expected: usize,
    deadline: Duration,
) -> Vec<i64> {
    let mut subscription = Subscription::new(store, filter, 0).with_batch_size(7);
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(deadline, async {
        while seen.len() < expected {
            if let SubscriptionItem::Event(e) = subscription.next().await.unwrap() {
                seen.push(e.global_position);
            }
        }
    })
    .await;
    seen
}

pub async fn concurrent_writers_are_seen_in_order_exactly_once(store: Arc<dyn EventStore>) {
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 40;
    let total = WRITERS * PER_WRITER;
    // Half the writers write category "odd", half "even", so a category reader sees
    // a sparse subsequence of the log.
    let all_reader = tokio::spawn(tail(
        Arc::clone(&store),
        LogFilter::All,
        total,
        Duration::from_secs(60),
    ));
    let even_reader = tokio::spawn(tail(
        Arc::clone(&store),
        LogFilter::Category("even".into()),
        total / 2,
        Duration::from_secs(60),
    ));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let category = if w % 2 == 0 { "even" } else { "odd" };
                for n in 0..PER_WRITER {
                    store
                        .append(append(
                            &format!("{category}-{w}"),
                            ExpectedVersion::Exact(n as i64 - 1),
                            vec![event("A", json!({"w": w, "n": n}))],
                        ))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let log: Vec<i64> = all(&store)
        .await
        .iter()
        .map(|e| e.global_position)
        .collect();
    assert_eq!(log.len(), total);
    let seen_all = all_reader.await.unwrap();
    assert_eq!(
        seen_all, log,
        "the $all reader saw every event once, in order"
    );
    let even: Vec<i64> = store
        .read_log(&LogFilter::Category("even".into()), 0, 100_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.global_position)
        .collect();
    let seen_even = even_reader.await.unwrap();
    assert_eq!(
        seen_even, even,
        "the category reader saw its events once, in order"
    );
}

pub async fn a_subscription_catches_up_then_is_woken(store: Arc<dyn EventStore>) {
    for n in 0..5 {
        store
            .append(append(
                "s-1",
                ExpectedVersion::Any,
                vec![event("A", json!({"n": n}))],
            ))
            .await
            .unwrap();
    }
    let head = store.head().await.unwrap();
    // A poll interval far beyond the test's deadline: only a wake-up can deliver.
    let mut subscription = Subscription::new(Arc::clone(&store), LogFilter::All, 0)
        .with_poll_interval(Duration::from_secs(3600));
    for _ in 0..5 {
        assert!(matches!(
            subscription.next().await.unwrap(),
            SubscriptionItem::Event(_)
        ));
    }
    assert_eq!(
        subscription.next().await.unwrap(),
        SubscriptionItem::CaughtUp(head)
    );
    let writer = Arc::clone(&store);
    let appended = tokio::spawn(async move {
        writer
            .append(append(
                "s-2",
                ExpectedVersion::Any,
                vec![event("B", json!({}))],
            ))
            .await
            .unwrap()
    });
    let next = tokio::time::timeout(Duration::from_secs(10), subscription.next_event())
        .await
        .expect("woken by the append")
        .unwrap();
    let outcome = appended.await.unwrap();
    assert_eq!(next.global_position, outcome.last_position);
    assert_eq!(next.stream_name, "s-2");
    // From the middle: exclusive of the given position.
    let mut middle = Subscription::new(Arc::clone(&store), LogFilter::All, head - 2);
    assert_eq!(middle.next_event().await.unwrap().global_position, head - 1);
}

pub async fn a_category_subscription_sees_only_its_category(store: Arc<dyn EventStore>) {
    store
        .append(vec![
            StreamAppend::new("a-1", ExpectedVersion::Any, vec![event("A", json!({}))]),
            StreamAppend::new("b-1", ExpectedVersion::Any, vec![event("B", json!({}))]),
            StreamAppend::new("a-2", ExpectedVersion::Any, vec![event("A", json!({}))]),
        ])
        .await
        .unwrap();
    let seen = tail(
        Arc::clone(&store),
        LogFilter::Category("a".into()),
        2,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(seen.len(), 2);
    let log = all(&store).await;
    assert_eq!(seen, [log[0].global_position, log[2].global_position]);
}

pub async fn redaction_rewrites_data_and_keeps_positions(store: Arc<dyn EventStore>) {
    let mine =
        event("Said", json!({"text": "secret words"})).with_metadata(json!({"userId": "u1"}));
    let theirs =
        event("Said", json!({"text": "other words"})).with_metadata(json!({"userId": "u2"}));
    let kept = event("Other", json!({"text": "kept"}));
    store
        .append(vec![
            StreamAppend::new(
                "talk-1",
                ExpectedVersion::Any,
                vec![mine.clone(), theirs.clone()],
            ),
            StreamAppend::new("talk-2", ExpectedVersion::Any, vec![kept.clone()]),
        ])
        .await
        .unwrap();
    let before = all(&store).await;
    let redactor = |event_type: &str, data: &mut Value| {
        if event_type == "Said" {
            data["text"] = json!("");
            data["redacted"] = json!(true);
            true
        } else {
            false
        }
    };
    let changed = store
        .redact(
            &Selection::MetadataEquals {
                key: "userId".into(),
                value: "u1".into(),
            },
            &redactor,
        )
        .await
        .unwrap();
    assert_eq!(changed.changed, 1);
    assert_eq!(changed.streams, ["talk-1"]);
    let after = all(&store).await;
    assert_eq!(after.len(), before.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (b.global_position, b.id, &b.event_type),
            (a.global_position, a.id, &a.event_type)
        );
    }
    let text = |id: Uuid| after.iter().find(|e| e.id == id).unwrap().data["text"].clone();
    assert_eq!(text(mine.id), json!(""));
    assert_eq!(text(theirs.id), json!("other words"));
    let changed = store
        .redact(
            &Selection::Streams(vec!["talk-1".into(), "talk-2".into()]),
            &redactor,
        )
        .await
        .unwrap();
    assert_eq!(
        changed.changed, 2,
        "talk-1's remaining Said is redacted; Other is not"
    );
    assert_eq!(changed.streams, ["talk-1", "talk-2"]);
    let after = all(&store).await;
    let dump = serde_json::to_string(&after.iter().map(|e| &e.data).collect::<Vec<_>>()).unwrap();
    assert!(!dump.contains("secret words") && !dump.contains("other words"));
    assert!(dump.contains("kept"));
}

pub async fn consumer_group_members_split_a_category_by_stream(store: Arc<dyn EventStore>) {
    for n in 0..20 {
        store
            .append(vec![
                StreamAppend::new(
                    format!("job-{n}"),
                    ExpectedVersion::Any,
                    vec![event("A", json!({}))],
                ),
                // A compound id goes with its cardinal id's member.
                StreamAppend::new(
                    format!("job-{n}+retry"),
                    ExpectedVersion::Any,
                    vec![event("B", json!({}))],
                ),
                StreamAppend::new(
                    format!("other-{n}"),
                    ExpectedVersion::Any,
                    vec![event("C", json!({}))],
                ),
            ])
            .await
            .unwrap();
    }
    let whole: Vec<i64> = store
        .read_log(&LogFilter::Category("job".into()), 0, 1000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.global_position)
        .collect();
    let mut union = Vec::new();
    let mut owner = std::collections::HashMap::new();
    for member in 0..3 {
        let part = store
            .read_log(
                &LogFilter::CategoryMember {
                    category: "job".into(),
                    member,
                    size: 3,
                },
                0,
                1000,
            )
            .await
            .unwrap();
        assert!(
            !part.is_empty(),
            "20 streams over 3 members leave none empty"
        );
        for e in &part {
            let cardinal = e.stream_name.split('+').next().unwrap().to_owned();
            assert_eq!(*owner.entry(cardinal).or_insert(member), member);
            union.push(e.global_position);
        }
    }
    union.sort_unstable();
    assert_eq!(
        union, whole,
        "the members together see the category exactly once"
    );
}
