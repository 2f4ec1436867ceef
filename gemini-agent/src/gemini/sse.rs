//! Server-sent events: turns a response body, arriving in chunks of any size, into the
//! `data` payloads of its events.
//!
//! Gemini's `:streamGenerateContent?alt=sse` sends one `data: <json>` line per event and a
//! blank line after it, with LF or CRLF line endings. A network chunk can end anywhere:
//! inside a line, between the CR and LF of one line ending, or inside a multi-byte UTF-8
//! character. [`SseDecoder`] therefore works on bytes, keeps the unfinished line between
//! chunks, and only decodes text once a whole event is in.
//!
//! It follows the WHATWG event-stream rules for what the agent reads: lines end in LF, CRLF
//! or a lone CR; a line starting with `:` is a comment; `data` lines of one event are joined
//! with `\n`; one space after the colon is dropped; a leading byte-order mark is skipped;
//! fields other than `data` (`event`, `id`, `retry`) are ignored because Gemini sends none.
//! Invalid UTF-8 is replaced with U+FFFD, as the standard says; the JSON parser after this
//! then reports anything that matters.
//!
//! **End of stream.** The standard drops an event that the stream ends before its blank
//! line. This decoder differs in one case: if every line of the pending event was complete
//! (ended by a line break) the event is delivered, because a server that closes right after
//! its last `data:` line has sent a whole line, and dropping it could lose the chunk that
//! carries the `finishReason`. A line cut off without its line break is a truncated
//! transfer: that event is dropped. A stream that ends without a finish reason is reported
//! as incomplete by the client either way.

use std::collections::VecDeque;
use std::mem;

use futures::{Stream, StreamExt};

/// The largest event accepted by default. Gemini's chunks are a few kilobytes; the limit
/// only keeps a broken or hostile server from growing the buffer without end.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

const BOM: &[u8] = "\u{feff}".as_bytes();

/// An incremental decoder of an event stream: feed it bytes as they arrive, take out the
/// data of each finished event. It holds no I/O, so it is tested with any chunking.
#[derive(Debug)]
pub struct SseDecoder {
    /// The current line, not yet ended.
    line: Vec<u8>,
    /// The data of the current event, its lines joined with `\n`.
    data: Vec<u8>,
    /// Whether the current event has had a `data` field (an empty one counts).
    has_data: bool,
    /// The last byte was a CR: an LF that comes next belongs to the same line ending.
    after_cr: bool,
    /// Whether a line was seen yet (the byte-order mark can only start the first).
    seen_line: bool,
    max_event_bytes: usize,
}

/// Why decoding stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseDecodeError {
    /// An event (or one line) grew past the limit without ending.
    #[error("a server-sent event exceeded {limit} bytes")]
    EventTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl SseDecoder {
    /// A decoder with the [default event limit](DEFAULT_MAX_EVENT_BYTES).
    pub fn new() -> Self {
        Self::with_max_event_bytes(DEFAULT_MAX_EVENT_BYTES)
    }

    /// A decoder that fails once an event's data (or a single line) exceeds `limit` bytes.
    pub fn with_max_event_bytes(limit: usize) -> Self {
        Self {
            line: Vec::new(),
            data: Vec::new(),
            has_data: false,
            after_cr: false,
            seen_line: false,
            max_event_bytes: limit,
        }
    }

    /// Takes the next chunk of the body and returns the data of every event it finished,
    /// in order.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Vec<String>, SseDecodeError> {
        let mut events = Vec::new();
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
        }
        while let Some(end) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&bytes[..end]);
            let ending = bytes[end];
            bytes = &bytes[end + 1..];
            if ending == b'\r' {
                match bytes.strip_prefix(b"\n") {
                    Some(rest) => bytes = rest,
                    None if bytes.is_empty() => self.after_cr = true,
                    None => {}
                }
            }
            let line = mem::take(&mut self.line);
            self.process_line(&line, &mut events)?;
        }
        self.line.extend_from_slice(bytes);
        self.check_size()?;
        Ok(events)
    }

    /// The stream ended: returns the pending event if all its lines were complete (see the
    /// module docs for why this differs from the standard), and resets the decoder.
    pub fn finish(&mut self) -> Option<String> {
        let truncated = !self.line.is_empty();
        let pending = self.has_data && !truncated;
        let data = mem::take(&mut self.data);
        *self = Self::with_max_event_bytes(self.max_event_bytes);
        pending.then(|| decode(data))
    }

    fn process_line(
        &mut self,
        line: &[u8],
        events: &mut Vec<String>,
    ) -> Result<(), SseDecodeError> {
        let line = if self.seen_line {
            line
        } else {
            self.seen_line = true;
            line.strip_prefix(BOM).unwrap_or(line)
        };
        if line.is_empty() {
            if self.has_data {
                self.has_data = false;
                events.push(decode(mem::take(&mut self.data)));
            }
            return Ok(());
        }
        if line.starts_with(b":") {
            return Ok(());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
            self.check_size()?;
        }
        Ok(())
    }

    fn check_size(&self) -> Result<(), SseDecodeError> {
        if self.data.len() + self.line.len() > self.max_event_bytes {
            return Err(SseDecodeError::EventTooLarge {
                limit: self.max_event_bytes,
            });
        }
        Ok(())
    }
}

fn decode(data: Vec<u8>) -> String {
    String::from_utf8(data)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned())
}

/// Why an event stream ended early.
#[derive(Debug, thiserror::Error)]
pub enum SseError<E> {
    /// Reading the body failed.
    #[error("reading the event stream failed")]
    Body(#[source] E),
    /// The body was not a usable event stream.
    #[error(transparent)]
    Decode(#[from] SseDecodeError),
}

/// The `data` of each event of `body`, in order. The stream ends after the body ends (with
/// the pending event delivered as [`SseDecoder::finish`] describes) or after the first
/// error.
pub fn data_events<S, B, E>(body: S) -> impl Stream<Item = Result<String, SseError<E>>>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
{
    data_events_with_limit(body, DEFAULT_MAX_EVENT_BYTES)
}

/// [`data_events`] with a limit on the size of one event.
pub fn data_events_with_limit<S, B, E>(
    body: S,
    max_event_bytes: usize,
) -> impl Stream<Item = Result<String, SseError<E>>>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
{
    let state = State {
        body: Box::pin(body),
        decoder: SseDecoder::with_max_event_bytes(max_event_bytes),
        ready: VecDeque::new(),
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.ready.pop_front() {
                return Some((Ok(event), state));
            }
            if state.done {
                return None;
            }
            match state.body.next().await {
                Some(Ok(chunk)) => match state.decoder.feed(chunk.as_ref()) {
                    Ok(events) => state.ready.extend(events),
                    Err(error) => {
                        state.done = true;
                        return Some((Err(SseError::Decode(error)), state));
                    }
                },
                Some(Err(error)) => {
                    state.done = true;
                    return Some((Err(SseError::Body(error)), state));
                }
                None => {
                    state.done = true;
                    state.ready.extend(state.decoder.finish());
                }
            }
        }
    })
}

struct State<S> {
    body: std::pin::Pin<Box<S>>,
    decoder: SseDecoder,
    ready: VecDeque<String>,
    done: bool,
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use proptest::prelude::*;

    use super::*;

    /// Inputs and the events they hold.
    const CASES: &[(&str, &[&str])] = &[
        ("data: a\n\ndata: b\n\n", &["a", "b"]),
        ("data: a\r\n\r\ndata: b\r\n\r\n", &["a", "b"]),
        ("data: a\r\rdata: b\r\r", &["a", "b"]),
        ("data: a\r\n\ndata: b\r\r\n", &["a", "b"]),
        (
            "data: one\ndata: two\r\ndata: three\r\r",
            &["one\ntwo\nthree"],
        ),
        (": keep-alive\n\n: c\ndata: x\n: d\n\n", &["x"]),
        ("data:x\n\ndata:  y\n\n", &["x", " y"]),
        ("event: chunk\nid: 7\nretry: 10\ndata: y\n\n", &["y"]),
        (
            "data: h\u{e9}llo \u{2713} \u{1f389}\r\n\r\n",
            &["h\u{e9}llo \u{2713} \u{1f389}"],
        ),
        ("data\n\ndata:\n\n", &["", ""]),
        ("\u{feff}data: a\n\n", &["a"]),
        ("\n\r\n\rdata: a\n\n\n\n", &["a"]),
        ("event: only\n\n", &[]),
        ("data: {\"a\":\"b: c\"}\n\n", &["{\"a\":\"b: c\"}"]),
        // The last event has its line ending but not its blank line: delivered.
        ("data: a\n\ndata: b\n", &["a", "b"]),
        ("data: a\r\n\r\ndata: b\r\n", &["a", "b"]),
        ("data: a\r\rdata: b\r", &["a", "b"]),
        // The last line was cut off: that event is dropped.
        ("data: a\n\ndata: b", &["a"]),
        ("data: a\n\ndata: b\ndata: c", &["a"]),
        ("", &[]),
    ];

    fn decode_chunks(chunks: &[&[u8]]) -> Vec<String> {
        let mut decoder = SseDecoder::new();
        let mut events = Vec::new();
        for chunk in chunks {
            events.extend(decoder.feed(chunk).unwrap());
        }
        events.extend(decoder.finish());
        events
    }

    #[test]
    fn every_case_decodes_whole() {
        for (input, expected) in CASES {
            assert_eq!(decode_chunks(&[input.as_bytes()]), *expected, "{input:?}");
        }
    }

    #[test]
    fn every_case_decodes_split_at_every_byte() {
        for (input, expected) in CASES {
            let bytes = input.as_bytes();
            for at in 0..=bytes.len() {
                let (head, tail) = bytes.split_at(at);
                assert_eq!(
                    decode_chunks(&[head, tail]),
                    *expected,
                    "{input:?} split at {at}"
                );
            }
        }
    }

    #[test]
    fn every_case_decodes_split_at_every_pair_of_bytes() {
        for (input, expected) in CASES {
            let bytes = input.as_bytes();
            for first in 0..=bytes.len() {
                for second in first..=bytes.len() {
                    let chunks = [&bytes[..first], &bytes[first..second], &bytes[second..]];
                    assert_eq!(
                        decode_chunks(&chunks),
                        *expected,
                        "{input:?} split at {first} and {second}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_case_decodes_one_byte_at_a_time() {
        for (input, expected) in CASES {
            let chunks: Vec<&[u8]> = input.as_bytes().chunks(1).collect();
            assert_eq!(decode_chunks(&chunks), *expected, "{input:?}");
        }
    }

    #[test]
    fn an_event_is_delivered_as_soon_as_its_blank_line_arrives() {
        let mut decoder = SseDecoder::new();

        assert!(decoder.feed(b"data: a\r\n").unwrap().is_empty());
        // A CR alone already ends the blank line: no need to wait for a possible LF.
        assert_eq!(decoder.feed(b"\r").unwrap(), ["a"]);
        // The LF that follows belongs to that CR; it is not another blank line.
        assert_eq!(decoder.feed(b"\ndata: b\n\n").unwrap(), ["b"]);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(decode_chunks(&[b"data: a\xffb\n\n"]), ["a\u{fffd}b"]);
    }

    #[test]
    fn an_oversized_event_is_an_error() {
        // A line that never ends.
        let mut decoder = SseDecoder::with_max_event_bytes(8);
        assert!(decoder.feed(b"data: 12").is_ok());
        assert_eq!(
            decoder.feed(b"3"),
            Err(SseDecodeError::EventTooLarge { limit: 8 })
        );

        // An event whose data lines add up past the limit.
        let mut decoder = SseDecoder::with_max_event_bytes(8);
        assert!(decoder.feed(b"data: 12345\n").is_ok());
        assert_eq!(
            decoder.feed(b"data: 678\n"),
            Err(SseDecodeError::EventTooLarge { limit: 8 })
        );
    }

    #[tokio::test]
    async fn the_stream_adapter_yields_events_across_chunks() {
        let chunks: Vec<Result<Vec<u8>, Infallible>> = vec![
            Ok(b"data: {\"n\":".to_vec()),
            Ok(b"1}\r".to_vec()),
            Ok(b"\n\r\ndata: {\"n\":2}\r\n\r\ndata: {\"n\":3}\r\n".to_vec()),
        ];

        let events: Vec<String> = data_events(futures::stream::iter(chunks))
            .map(|event| event.unwrap())
            .collect()
            .await;

        assert_eq!(events, [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]);
    }

    #[tokio::test]
    async fn the_stream_adapter_stops_at_a_body_error_after_the_events_before_it() {
        let chunks: Vec<Result<&[u8], &str>> = vec![
            Ok(b"data: 1\n\ndata: 2"),
            Err("connection reset"),
            Ok(b"\n\n"),
        ];

        let events: Vec<Result<String, SseError<&str>>> =
            data_events(futures::stream::iter(chunks)).collect().await;

        assert_eq!(events.len(), 2);
        assert_eq!(events[0].as_ref().unwrap(), "1");
        assert!(matches!(events[1], Err(SseError::Body("connection reset"))));
    }

    /// One event's data lines, the line ending after each, and whether a comment precedes.
    fn event_strategy() -> impl Strategy<Value = (Vec<(String, usize)>, bool, usize)> {
        let line = proptest::collection::vec(
            any::<char>().prop_filter("no line breaks", |c| *c != '\n' && *c != '\r'),
            0..12,
        )
        .prop_map(|chars| chars.into_iter().collect::<String>());
        (
            proptest::collection::vec((line, 0..3usize), 1..4),
            any::<bool>(),
            0..3usize,
        )
    }

    const ENDINGS: [&str; 3] = ["\n", "\r\n", "\r"];

    proptest! {
        #[test]
        fn any_stream_decodes_the_same_under_any_chunking(
            events in proptest::collection::vec(event_strategy(), 0..6),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let mut input = String::new();
            let mut expected = Vec::new();
            // After a CR, an LF would join it as one CRLF ending, so use CRLF there.
            let end_line = |input: &mut String, ending: usize| {
                let ending = if input.ends_with('\r') && ending == 0 { 1 } else { ending };
                input.push_str(ENDINGS[ending]);
            };
            for (lines, comment, blank_ending) in &events {
                if *comment {
                    input.push_str(": comment");
                    end_line(&mut input, *blank_ending);
                }
                let mut data = Vec::new();
                for (line, ending) in lines {
                    input.push_str("data: ");
                    input.push_str(line);
                    end_line(&mut input, *ending);
                    data.push(line.as_str());
                }
                end_line(&mut input, *blank_ending);
                expected.push(data.join("\n"));
            }
            let bytes = input.as_bytes();
            let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for cut in cuts {
                chunks.push(&bytes[start..cut]);
                start = cut;
            }
            chunks.push(&bytes[start..]);

            prop_assert_eq!(decode_chunks(&chunks), expected);
        }
    }
}
