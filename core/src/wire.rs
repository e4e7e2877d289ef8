//! How broker transports carry the framework's retry state: one set of header names, shared by
//! every transport, so that a message means the same wherever it travels.
//!
//! Broker-native fields (message id, content type, correlation id, reply-to, subject) go into the
//! broker's own properties; the framework's state goes into headers named here, which the
//! framework owns. Handlers see neither these headers nor broker history such as `x-death`.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};

use crate::message::{DeadLetterInfo, FrameworkState, Headers, Message};

/// Every header starting with this belongs to the framework.
pub const PREFIX: &str = "redeliver-";
/// Which handler call the message is for (2, 3, ...). Absent on a first attempt: a message
/// without it is on attempt 1, like any message from another producer, and a first send
/// carries no header table for the broker to parse (measured: publishing through RabbitMQ went
/// from about 0.8 to about 0.9 of raw `lapin`).
pub const ATTEMPT: &str = "redeliver-attempt";
/// The not-before instant, RFC 3339 in UTC.
pub const NOT_BEFORE: &str = "redeliver-not-before";
/// Why the previous attempt failed.
pub const LAST_FAILURE: &str = "redeliver-last-failure";
/// The delay chosen after the previous attempt, in milliseconds.
pub const LAST_DELAY_MS: &str = "redeliver-last-delay-ms";
/// Why the message was dead-lettered.
pub const DEAD_LETTER_REASON: &str = "redeliver-dead-letter-reason";
/// Details of why the message was dead-lettered.
pub const DEAD_LETTER_DESCRIPTION: &str = "redeliver-dead-letter-description";

/// When the first failure of the message happened, RFC 3339 in UTC.
pub const FIRST_FAILED_AT: &str = "redeliver-first-failed-at";
/// When the last failure of the message happened, RFC 3339 in UTC.
pub const LAST_FAILED_AT: &str = "redeliver-last-failed-at";
/// How many times the message was replayed from the dead letters. Absent: never.
pub const REPLAY_COUNT: &str = "redeliver-replay-count";
/// When the message was last replayed from the dead letters, RFC 3339 in UTC.
pub const REPLAYED_AT: &str = "redeliver-replayed-at";

/// The longest failure or dead-letter reason the framework writes, in bytes. Longer reasons
/// (an HTTP error body, say) are cut at this length with a marker, so that the framework's
/// headers always fit a broker's limits (a RabbitMQ header frame, Service Bus's property size);
/// the whole text is logged by the worker.
pub const MAX_REASON_BYTES: usize = 1024;
/// The longest dead-letter description the framework writes, in bytes; cut like a reason.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;

/// `text` cut to at most `max` bytes (at a character boundary), ending with a marker that says
/// how long it was, when it is longer.
pub fn truncate(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let marker = format!("… [truncated, {} bytes in all]", text.len());
    let mut end = max.saturating_sub(marker.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = text;
    cut.truncate(end);
    cut.push_str(&marker);
    cut
}

/// The problem text for a framework header that arrived with a value of another type than the
/// text the framework writes (`found` names the type: `an array`, `a table`, ...). Transports
/// whose headers are typed report it with [`Decoded::add_problem`], so the message is
/// dead-lettered with reason [`MALFORMED_HEADERS`](crate::reasons::MALFORMED_HEADERS) like a
/// malformed text value.
pub fn mistyped(key: &str, found: &str) -> String {
    format!("`{key}` holds {found}, not text")
}

/// The headers to put on the wire: the application's headers (minus any that use the reserved
/// prefix) followed by the framework's state.
pub fn encode_headers(message: &Message) -> Headers {
    let mut headers: Headers = message
        .headers()
        .iter()
        .filter(|(k, _)| !k.starts_with(PREFIX))
        .collect();
    if message.attempt() > 1 {
        headers.insert(ATTEMPT, message.attempt().to_string());
    }
    if let Some(at) = message.not_before() {
        // Millisecond precision on the wire, rounded up: a not-before is never moved earlier.
        // (By hand: chrono's rounding fails past the year 2262 and would leave `at` to be
        // truncated, earlier, by the formatting.)
        let sub_millisecond = i64::from(at.timestamp_subsec_nanos() % 1_000_000);
        let at = match sub_millisecond {
            0 => at,
            nanos => at
                .checked_add_signed(TimeDelta::nanoseconds(1_000_000 - nanos))
                .unwrap_or(at),
        };
        headers.insert(NOT_BEFORE, at.to_rfc3339_opts(SecondsFormat::Millis, true));
    }
    if let Some(reason) = message.last_failure() {
        headers.insert(LAST_FAILURE, reason);
    }
    if let Some(delay) = message.last_delay() {
        headers.insert(LAST_DELAY_MS, delay.as_millis().to_string());
    }
    let instant = |at: DateTime<Utc>| at.to_rfc3339_opts(SecondsFormat::Micros, true);
    if let Some(at) = message.first_failed_at() {
        headers.insert(FIRST_FAILED_AT, instant(at));
    }
    if let Some(at) = message.last_failed_at() {
        headers.insert(LAST_FAILED_AT, instant(at));
    }
    if message.replay_count() > 0 {
        headers.insert(REPLAY_COUNT, message.replay_count().to_string());
    }
    if let Some(at) = message.replayed_at() {
        headers.insert(REPLAYED_AT, instant(at));
    }
    if let Some(info) = message.dead_letter() {
        headers.insert(DEAD_LETTER_REASON, info.reason.clone());
        if let Some(description) = &info.description {
            headers.insert(DEAD_LETTER_DESCRIPTION, description.clone());
        }
    }
    headers
}

/// A message rebuilt from the wire.
#[derive(Debug)]
pub struct Decoded {
    /// The message, with the framework headers moved into its fields.
    pub message: Message,
    /// What was wrong with the framework headers, if anything. A malformed value is left at its
    /// default (attempt 1, no not-before) and reported here, so that the worker can dead-letter
    /// the message with reason [`MALFORMED_HEADERS`](crate::reasons::MALFORMED_HEADERS) instead
    /// of losing it or guessing.
    pub problem: Option<String>,
}

impl Decoded {
    /// Adds a problem a transport found itself (see [`mistyped`]).
    pub fn add_problem(&mut self, problem: String) {
        self.problem = Some(match self.problem.take() {
            Some(earlier) => format!("{earlier}; {problem}"),
            None => problem,
        });
    }
}

/// Moves the framework's headers out of `message`'s headers into its fields. A message without
/// any framework header (sent by another producer) is attempt 1 with no not-before.
pub fn decode_headers(message: Message) -> Decoded {
    let mut headers = message.headers().clone();
    let mut problems = Vec::new();

    let attempt = match headers.remove(ATTEMPT) {
        None => 1,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) if n >= 1 => n,
            _ => {
                problems.push(format!("`{ATTEMPT}` is `{v}`, not a whole number >= 1"));
                1
            }
        },
    };
    let not_before = headers.remove(NOT_BEFORE).and_then(|v| {
        DateTime::parse_from_rfc3339(v.trim())
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| problems.push(format!("`{NOT_BEFORE}` is `{v}`, not an RFC 3339 time")))
            .ok()
    });
    let last_failure = headers.remove(LAST_FAILURE);
    let last_delay = headers.remove(LAST_DELAY_MS).and_then(|v| {
        v.trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| problems.push(format!("`{LAST_DELAY_MS}` is `{v}`, not milliseconds")))
            .ok()
    });
    let mut instant = |key: &str| {
        headers.remove(key).and_then(|v| {
            DateTime::parse_from_rfc3339(v.trim())
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| problems.push(format!("`{key}` is `{v}`, not an RFC 3339 time")))
                .ok()
        })
    };
    let first_failed_at = instant(FIRST_FAILED_AT);
    let last_failed_at = instant(LAST_FAILED_AT);
    let replayed_at = instant(REPLAYED_AT);
    let replay_count = match headers.remove(REPLAY_COUNT) {
        None => 0,
        Some(v) => v.trim().parse::<u32>().unwrap_or_else(|_| {
            problems.push(format!("`{REPLAY_COUNT}` is `{v}`, not a whole number"));
            0
        }),
    };
    let dead_letter = headers
        .remove(DEAD_LETTER_REASON)
        .map(|reason| DeadLetterInfo {
            reason,
            description: headers.remove(DEAD_LETTER_DESCRIPTION),
        });
    // Unknown framework headers (from a newer version) are dropped rather than shown to handlers.
    let foreign: Vec<String> = headers
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, _)| k.to_owned())
        .collect();
    for key in foreign {
        headers.remove(&key);
    }

    let mut message = message
        .with_headers(headers)
        .with_attempt(attempt)
        .with_last_failure(last_failure, last_delay)
        .with_dead_letter(dead_letter)
        .with_failure_times(first_failed_at, last_failed_at)
        .with_replay(replay_count, replayed_at);
    if let Some(at) = not_before {
        message = message.with_not_before(at);
    }
    Decoded {
        message,
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_far_not_before_is_rounded_up_on_the_wire_too() {
        // Found by the `wire_headers` fuzz target: past 2262 the not-before came back earlier.
        for secs in [1_700_000_000, 163_208_849_255] {
            let at = DateTime::from_timestamp(secs, 73_730).unwrap();
            let wire = encode_headers(&Message::new("x").with_not_before(at));
            let back = decode_headers(Message::new("x").with_headers(wire)).message;
            let read = back.not_before().unwrap();
            assert!(read >= at, "{read} is earlier than {at}");
            assert_eq!(read - at, TimeDelta::nanoseconds(1_000_000 - 73_730));
        }
    }

    #[test]
    fn framework_state_round_trips_through_headers() {
        let at = DateTime::parse_from_rfc3339("2026-11-21T10:00:01.250Z")
            .unwrap()
            .with_timezone(&Utc);
        let m = Message::new("x")
            .with_header("tenant", "a")
            .next_attempt(at, "timeout".into(), Duration::from_millis(1500))
            .with_dead_letter(Some(DeadLetterInfo {
                reason: "rate-limited".into(),
                description: Some("HTTP 429".into()),
            }))
            .with_replay(2, Some(at));
        assert_eq!(
            m.first_failed_at(),
            Some(at - TimeDelta::milliseconds(1500))
        );
        let wire = encode_headers(&m);
        assert_eq!(wire.get(REPLAY_COUNT), Some("2"));
        assert_eq!(
            wire.get(FIRST_FAILED_AT),
            Some("2026-11-21T09:59:59.750000Z")
        );
        assert_eq!(wire.get(ATTEMPT), Some("2"));
        let back = decode_headers(Message::new("x").with_id(m.id().clone()).with_headers(wire));
        assert_eq!(back.problem, None);
        assert_eq!(back.message, m);
    }

    #[test]
    fn the_not_before_is_rounded_up_never_down() {
        let at = DateTime::parse_from_rfc3339("2026-11-21T10:00:01.250000001Z")
            .unwrap()
            .with_timezone(&Utc);
        let wire = encode_headers(&Message::new("x").with_not_before(at));
        assert_eq!(wire.get(NOT_BEFORE), Some("2026-11-21T10:00:01.251Z"));
    }

    #[test]
    fn reserved_headers_set_by_applications_are_not_sent() {
        let m = Message::new("x").with_header("redeliver-attempt", "99");
        assert_eq!(
            encode_headers(&m).get(ATTEMPT),
            None,
            "attempt 1 goes without"
        );
        let m = m.with_attempt(3);
        assert_eq!(encode_headers(&m).get(ATTEMPT), Some("3"));
    }

    #[test]
    fn long_texts_are_cut_with_a_marker() {
        let long = "é".repeat(1000);
        let cut = truncate(long.clone(), 100);
        assert!(cut.len() <= 100, "{}", cut.len());
        assert!(cut.ends_with("… [truncated, 2000 bytes in all]"), "{cut}");
        assert!(long.starts_with(cut.trim_end_matches("… [truncated, 2000 bytes in all]")));
        assert_eq!(truncate("short".to_owned(), 100), "short");
    }

    #[test]
    fn problems_found_by_a_transport_are_added() {
        let mut d = decode_headers(Message::new("x").with_header(ATTEMPT, "zero"));
        d.add_problem(mistyped(NOT_BEFORE, "a table"));
        let problem = d.problem.unwrap();
        assert!(problem.contains("redeliver-attempt"), "{problem}");
        assert!(
            problem.contains("`redeliver-not-before` holds a table, not text"),
            "{problem}"
        );
    }

    #[test]
    fn a_foreign_message_is_a_first_attempt() {
        let d = decode_headers(Message::new("x").with_header("other", "1"));
        assert_eq!(d.problem, None);
        assert_eq!(d.message.attempt(), 1);
        assert_eq!(d.message.not_before(), None);
        assert_eq!(d.message.headers().get("other"), Some("1"));
    }

    #[test]
    fn malformed_headers_are_reported_not_guessed() {
        let d = decode_headers(
            Message::new("x")
                .with_header(ATTEMPT, "zero")
                .with_header(NOT_BEFORE, "tomorrow")
                .with_header("redeliver-future-thing", "1"),
        );
        let problem = d.problem.unwrap();
        assert!(problem.contains("redeliver-attempt"), "{problem}");
        assert!(problem.contains("redeliver-not-before"), "{problem}");
        assert_eq!(d.message.attempt(), 1);
        assert!(d.message.headers().is_empty());
    }
}
