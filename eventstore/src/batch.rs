//! The decisions an append batch makes once it holds the ordering lock, shared by
//! every backend: which requests are replays of stored events, which conflict, which
//! fail their expected version, and the rows the rest will write.
//!
//! Backends supply what they read under the lock (stored events with the requested
//! ids, and current stream versions); this module does no I/O.

use std::collections::HashMap;

use serde_json::Value;
use uuid::Uuid;

use crate::model::{
    AppendOutcome, ExpectedVersion, GlobalPosition, StoreError, StreamAppend, StreamWritten,
};

/// An already stored event whose id an append uses again.
#[derive(Debug, Clone)]
pub struct StoredId {
    pub id: Uuid,
    pub stream_name: String,
    pub event_type: String,
    pub data: Value,
    pub global_position: GlobalPosition,
    pub position: i64,
}

/// One row to insert, in the order positions must be drawn.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: Uuid,
    pub stream_name: String,
    pub event_type: String,
    pub position: i64,
    pub data: Value,
    pub metadata: Option<Value>,
}

/// What became of one request of the batch.
#[derive(Debug)]
pub enum Planned {
    /// Writes `rows[start..end]` of the batch; the streams end at these versions.
    Write {
        start: usize,
        end: usize,
        streams: Vec<StreamWritten>,
    },
    /// Every event was already stored with the same content.
    Replay(AppendOutcome),
    /// The same events as an earlier request of this batch (a concurrent retry).
    SameAs(usize),
    Reject(StoreError),
}

/// Plans a batch. `versions` holds the current version of every stream the batch
/// names that exists; it is updated as requests are accepted.
pub fn plan(
    requests: &[&[StreamAppend]],
    stored: &HashMap<Uuid, StoredId>,
    versions: &mut HashMap<String, i64>,
    rows: &mut Vec<Row>,
) -> Vec<Planned> {
    // Ids written by earlier requests of this batch: id -> (request index, content).
    let mut pending: HashMap<Uuid, (usize, &str, &str, &Value)> = HashMap::new();
    let mut planned = Vec::with_capacity(requests.len());
    for (index, appends) in requests.iter().enumerate() {
        let outcome = plan_one(appends, stored, &pending, versions, rows);
        if let Planned::Write { .. } = outcome {
            for append in *appends {
                for e in &append.events {
                    pending.insert(e.id, (index, &append.stream, &e.event_type, &e.data));
                }
            }
        }
        planned.push(outcome);
    }
    planned
}

fn plan_one(
    appends: &[StreamAppend],
    stored: &HashMap<Uuid, StoredId>,
    pending: &HashMap<Uuid, (usize, &str, &str, &Value)>,
    versions: &mut HashMap<String, i64>,
    rows: &mut Vec<Row>,
) -> Planned {
    let events = || {
        appends
            .iter()
            .flat_map(|a| a.events.iter().map(move |e| (a, e)))
    };
    let total = events().count();

    // Idempotence: all ids stored with the same content is a replay; any other use of
    // a stored id is a conflict.
    let known = events().filter(|(_, e)| stored.contains_key(&e.id)).count();
    if known > 0 {
        let mut positions = Vec::with_capacity(total);
        for (append, event) in events() {
            let same = stored.get(&event.id).filter(|s| {
                s.stream_name == append.stream
                    && s.event_type == event.event_type
                    && s.data == event.data
            });
            match same {
                Some(s) if known == total => positions.push(s.global_position),
                _ => return Planned::Reject(StoreError::DuplicateEventId { id: event.id }),
            }
        }
        let streams = appends
            .iter()
            .map(|a| StreamWritten {
                stream: a.stream.clone(),
                version: a
                    .events
                    .iter()
                    .filter_map(|e| stored.get(&e.id).map(|s| s.position))
                    .max()
                    .unwrap_or(-1),
            })
            .collect();
        let last_position = positions.iter().copied().max().unwrap_or(0);
        return Planned::Replay(AppendOutcome {
            streams,
            positions,
            last_position,
            replayed: true,
        });
    }
    let in_batch = events()
        .filter(|(_, e)| pending.contains_key(&e.id))
        .count();
    if in_batch > 0 {
        let mut earlier = None;
        for (append, event) in events() {
            match pending.get(&event.id) {
                Some(&(req, stream, event_type, data))
                    if in_batch == total
                        && stream == append.stream
                        && event_type == event.event_type
                        && *data == event.data
                        && earlier.is_none_or(|r| r == req) =>
                {
                    earlier = Some(req);
                }
                _ => return Planned::Reject(StoreError::DuplicateEventId { id: event.id }),
            }
        }
        return Planned::SameAs(earlier.expect("BUG: a non-empty append has an event"));
    }

    // Expected versions, all checked before any row is planned.
    for append in appends {
        let actual = versions.get(&append.stream).copied().unwrap_or(-1);
        let ok = match append.expected {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == -1,
            ExpectedVersion::StreamExists => actual >= 0,
            ExpectedVersion::Exact(v) => actual == v,
        };
        if !ok {
            return Planned::Reject(StoreError::WrongExpectedVersion {
                stream: append.stream.clone(),
                expected: append.expected,
                actual,
            });
        }
    }
    let start = rows.len();
    let mut streams = Vec::with_capacity(appends.len());
    for append in appends {
        let version = versions.entry(append.stream.clone()).or_insert(-1);
        for event in &append.events {
            *version += 1;
            rows.push(Row {
                id: event.id,
                stream_name: append.stream.clone(),
                event_type: event.event_type.clone(),
                position: *version,
                data: event.data.clone(),
                metadata: event.metadata.clone(),
            });
        }
        streams.push(StreamWritten {
            stream: append.stream.clone(),
            version: *version,
        });
    }
    Planned::Write {
        start,
        end: rows.len(),
        streams,
    }
}

/// Turns plans into outcomes once the written rows have global positions
/// (`global_positions[i]` belongs to `rows[i]`).
pub fn outcomes(
    planned: Vec<Planned>,
    global_positions: &[GlobalPosition],
) -> Vec<Result<AppendOutcome, StoreError>> {
    let mut done: Vec<Option<AppendOutcome>> = Vec::with_capacity(planned.len());
    let mut results = Vec::with_capacity(planned.len());
    for plan in planned {
        let result = match plan {
            Planned::Write {
                start,
                end,
                streams,
            } => {
                let positions = global_positions[start..end].to_vec();
                let last_position = positions.iter().copied().max().unwrap_or(0);
                Ok(AppendOutcome {
                    streams,
                    positions,
                    last_position,
                    replayed: false,
                })
            }
            Planned::Replay(outcome) => Ok(outcome),
            Planned::SameAs(earlier) => Ok(AppendOutcome {
                replayed: true,
                ..done[earlier]
                    .clone()
                    .expect("BUG: a request is only the same as an earlier written one")
            }),
            Planned::Reject(e) => Err(e),
        };
        done.push(result.as_ref().ok().cloned());
        results.push(result);
    }
    results
}
