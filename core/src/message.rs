//! The message model: what a handler receives and what travels through a transport.
//!
//! A [`Message`] carries the application's part (id, body, headers, correlation id, reply-to,
//! subject) and the framework's part (attempt, not-before, last failure, dead-letter reason).
//! The framework's part is owned by redeliver and means the same on every transport: it is never
//! derived from broker-specific counters such as RabbitMQ's `x-death` or Service Bus's delivery
//! count.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;

/// The content type of JSON bodies, the default encoding.
pub const JSON: &str = "application/json";

/// The header naming what kind of message this is (`order-placed`), by which an endpoint that
/// carries several kinds routes each to its handler. An application header: other clients see
/// and can set it.
pub const MESSAGE_TYPE: &str = "message-type";

/// The header holding the id of the message whose handler sent this one (set by
/// [`Context::send`](crate::Context::send)), for tracing a conversation.
pub const CAUSATION_ID: &str = "causation-id";

/// Identifies a message. Stays the same across every retry, park and dead letter of that
/// message, so handlers can use it as an idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(String);

impl MessageId {
    /// A new random id (a UUID v4).
    pub fn random() -> Self {
        MessageId(uuid::Uuid::new_v4().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for MessageId {
    fn from(id: String) -> Self {
        MessageId(id)
    }
}

impl From<&str> for MessageId {
    fn from(id: &str) -> Self {
        MessageId(id.to_owned())
    }
}

/// Application headers: text keys and text values, the form every broker can carry.
///
/// Keys starting with [`wire::PREFIX`](crate::wire::PREFIX) (`redeliver-`) are reserved for the
/// framework: transports overwrite them on the way out and strip them on the way in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(BTreeMap<String, String>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers::default()
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Sets `key` to `value`, returning the previous value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.0.insert(key.into(), value.into())
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// The headers in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Headers(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// Why a message was dead-lettered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// A short, stable reason (`invalid payload`, `rate-limited`, ...), suitable for grouping.
    pub reason: String,
    /// Details for a person: the decoder's error, the last failure, how many attempts were made.
    pub description: Option<String>,
}

/// A message: application data plus the framework's retry state.
///
/// Build one with [`Message::new`] or [`Message::json`] and the `with_*` methods; read one in a
/// handler through its [`Context`](crate::Context).
///
/// # Examples
///
/// ```
/// # use redeliver_core as redeliver;
/// use redeliver::Message;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct OrderShipped {
///     order_id: u32,
/// }
///
/// let message = Message::json(&OrderShipped { order_id: 1001 })?
///     // An idempotency key: every retry and dead letter of this message keeps it.
///     .with_id("order-1001-shipped")
///     .with_header("tenant", "acme")
///     .with_subject("webhook");
/// assert_eq!(message.content_type(), Some("application/json"));
/// assert_eq!(message.attempt(), 1, "attempts count handler calls, from 1");
/// assert_eq!(message.decode::<OrderShipped>()?, OrderShipped { order_id: 1001 });
/// // A body that is not the handler's type is an error, never a panic.
/// assert!(message.decode::<Vec<String>>().is_err());
/// # Ok::<(), redeliver::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    id: MessageId,
    body: Bytes,
    content_type: Option<String>,
    headers: Headers,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    subject: Option<String>,
    attempt: u32,
    not_before: Option<DateTime<Utc>>,
    last_failure: Option<String>,
    last_delay: Option<Duration>,
    dead_letter: Option<DeadLetterInfo>,
    first_failed_at: Option<DateTime<Utc>>,
    last_failed_at: Option<DateTime<Utc>>,
    replay_count: u32,
    replayed_at: Option<DateTime<Utc>>,
}

impl Message {
    /// A message with a random id, the given body, no content type and attempt 1.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Message {
            id: MessageId::random(),
            body: body.into(),
            content_type: None,
            headers: Headers::new(),
            correlation_id: None,
            reply_to: None,
            subject: None,
            attempt: 1,
            not_before: None,
            last_failure: None,
            last_delay: None,
            dead_letter: None,
            first_failed_at: None,
            last_failed_at: None,
            replay_count: 0,
            replayed_at: None,
        }
    }

    /// A message whose body is `value` serialized as JSON, with content type
    /// `application/json`.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        let body = serde_json::to_vec(value).map_err(|e| Error::InvalidMessage {
            message: "the value cannot be serialized as JSON".into(),
            source: Some(e.into()),
        })?;
        Ok(Message::new(body).with_content_type(JSON))
    }

    /// Decodes the body into `T`.
    ///
    /// JSON is used when the content type is absent, `application/json` or ends in `+json`;
    /// any other content type is an [`Error::InvalidMessage`] naming it.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        if let Some(ct) = &self.content_type {
            let essence = ct.split(';').next().unwrap_or("").trim();
            if !(essence.eq_ignore_ascii_case(JSON)
                || essence.to_ascii_lowercase().ends_with("+json"))
            {
                return Err(Error::invalid_message(format!(
                    "content type `{ct}` cannot be decoded; redeliver decodes JSON \
                     (`application/json` or `*+json`)"
                )));
            }
        }
        serde_json::from_slice(&self.body).map_err(|e| Error::InvalidMessage {
            message: format!(
                "the body is not a valid JSON {}: {e}",
                short_type_name::<T>()
            ),
            source: Some(e.into()),
        })
    }

    /// Replaces the id. Use it to carry an idempotency key (an event's id) so that retries and
    /// duplicates can be recognised.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<MessageId>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the content type (a MIME type).
    #[must_use]
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Adds an application header.
    #[must_use]
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key, value);
        self
    }

    /// Replaces all application headers.
    #[must_use]
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// Sets the message type (the [`MESSAGE_TYPE`] header).
    #[must_use]
    pub fn with_message_type(self, message_type: impl Into<String>) -> Self {
        self.with_header(MESSAGE_TYPE, message_type)
    }

    /// Sets the correlation id (request/reply).
    #[must_use]
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the endpoint replies should go to.
    #[must_use]
    pub fn with_reply_to(mut self, endpoint: impl Into<String>) -> Self {
        self.reply_to = Some(endpoint.into());
        self
    }

    /// Sets the subject (routing key on RabbitMQ, `Subject` on Service Bus).
    #[must_use]
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Asks that the message not be handed to a handler before `at` (`NotBeforeUtc`).
    #[must_use]
    pub fn with_not_before(mut self, at: DateTime<Utc>) -> Self {
        self.not_before = Some(at);
        self
    }

    /// The copy that carries the next attempt: attempt + 1, the given not-before, the reason
    /// this attempt failed and the delay chosen. Everything else, the id included, is kept.
    #[must_use]
    pub(crate) fn next_attempt(
        &self,
        not_before: DateTime<Utc>,
        reason: String,
        delay: Duration,
    ) -> Self {
        let mut next = self.clone();
        next.attempt = self.attempt.saturating_add(1);
        next.not_before = Some(not_before);
        next.last_failure = Some(reason);
        next.last_delay = Some(delay);
        // The failure happened when the delay was chosen: `delay` before the not-before.
        let failed_at = not_before
            .checked_sub_signed(chrono::TimeDelta::from_std(delay).unwrap_or_default())
            .unwrap_or(not_before);
        next.record_failure(failed_at);
        next
    }

    /// Records a failure at `at`: the first failure time if there was none, and the last.
    pub(crate) fn record_failure(&mut self, at: DateTime<Utc>) {
        self.first_failed_at.get_or_insert(at);
        self.last_failed_at = Some(at);
    }

    /// The message id, the same on every attempt.
    pub fn id(&self) -> &MessageId {
        &self.id
    }

    /// The body bytes.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The content type, if set.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The application headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The application headers, to change (the trace context is written into them).
    #[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
    pub(crate) fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    /// The correlation id, if set.
    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }

    /// The reply-to endpoint, if set.
    pub fn reply_to(&self) -> Option<&str> {
        self.reply_to.as_deref()
    }

    /// The subject, if set.
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// Which handler call this is: 1 for the first, 2 for the first retry, and so on.
    ///
    /// Counted by the framework and carried in the message, so it is the same on every
    /// transport. A delivery that was handed back without a handler result (shutdown, a crash,
    /// an early delivery parked again) keeps its number.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The earliest instant a handler may receive the message, if any (`NotBeforeUtc`).
    pub fn not_before(&self) -> Option<DateTime<Utc>> {
        self.not_before
    }

    /// Why the previous attempt failed, on a retry.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// The delay chosen after the previous attempt, on a retry.
    pub fn last_delay(&self) -> Option<Duration> {
        self.last_delay
    }

    /// Why the message was dead-lettered, on a dead letter.
    pub fn dead_letter(&self) -> Option<&DeadLetterInfo> {
        self.dead_letter.as_ref()
    }

    /// When the first attempt that failed failed (a retry or a dead letter), if any did.
    pub fn first_failed_at(&self) -> Option<DateTime<Utc>> {
        self.first_failed_at
    }

    /// When the last failure happened (the one that dead-lettered a dead letter), if any.
    pub fn last_failed_at(&self) -> Option<DateTime<Utc>> {
        self.last_failed_at
    }

    /// How many times the message was replayed from the dead letters
    /// ([`DeadLetters::replay`](crate::dead_letters::DeadLetters::replay)); 0 if never.
    pub fn replay_count(&self) -> u32 {
        self.replay_count
    }

    /// When the message was last replayed from the dead letters, if ever.
    pub fn replayed_at(&self) -> Option<DateTime<Utc>> {
        self.replayed_at
    }
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base)
}

/// The framework's own state on a [`Message`]: its attempt, the previous failure, why it was
/// dead-lettered. Set by transports that rebuild a message they received; applications never
/// need it, since the worker counts attempts and records failures. Part of the transport
/// author's API (`redeliver::transport`).
pub trait FrameworkState: Sized + sealed::Sealed {
    /// Sets the attempt number (at least 1).
    #[must_use]
    fn with_attempt(self, attempt: u32) -> Self;

    /// Sets the reason the previous attempt failed and the delay chosen after it.
    #[must_use]
    fn with_last_failure(self, reason: Option<String>, delay: Option<Duration>) -> Self;

    /// Records why the message was dead-lettered.
    #[must_use]
    fn with_dead_letter(self, info: Option<DeadLetterInfo>) -> Self;

    /// Sets when the first and the last failure happened.
    #[must_use]
    fn with_failure_times(self, first: Option<DateTime<Utc>>, last: Option<DateTime<Utc>>) -> Self;

    /// Sets how many times the message was replayed from the dead letters, and when last.
    #[must_use]
    fn with_replay(self, count: u32, at: Option<DateTime<Utc>>) -> Self;
}

impl FrameworkState for Message {
    fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt.max(1);
        self
    }

    fn with_last_failure(mut self, reason: Option<String>, delay: Option<Duration>) -> Self {
        self.last_failure = reason;
        self.last_delay = delay;
        self
    }

    fn with_dead_letter(mut self, info: Option<DeadLetterInfo>) -> Self {
        self.dead_letter = info;
        self
    }

    fn with_failure_times(
        mut self,
        first: Option<DateTime<Utc>>,
        last: Option<DateTime<Utc>>,
    ) -> Self {
        self.first_failed_at = first;
        self.last_failed_at = last;
        self
    }

    fn with_replay(mut self, count: u32, at: Option<DateTime<Utc>>) -> Self {
        self.replay_count = count;
        self.replayed_at = at;
        self
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Message {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Order {
        id: u32,
    }

    #[test]
    fn json_round_trip() {
        let m = Message::json(&Order { id: 7 }).unwrap();
        assert_eq!(m.content_type(), Some(JSON));
        assert_eq!(m.decode::<Order>().unwrap(), Order { id: 7 });
        assert_eq!(m.attempt(), 1);
    }

    #[test]
    fn plus_json_and_missing_content_types_decode_as_json() {
        let m = Message::new(r#"{"id":1}"#)
            .with_content_type("application/cloudevents+json; charset=utf-8");
        assert_eq!(m.decode::<Order>().unwrap(), Order { id: 1 });
        let m = Message::new(r#"{"id":2}"#);
        assert_eq!(m.decode::<Order>().unwrap(), Order { id: 2 });
    }

    #[test]
    fn undecodable_bodies_say_why() {
        let e = Message::new("not json").decode::<Order>().unwrap_err();
        assert!(e.to_string().contains("not a valid JSON Order"), "{e}");
        let e = Message::new("x")
            .with_content_type("text/plain")
            .decode::<Order>()
            .unwrap_err();
        assert!(e.to_string().contains("`text/plain`"), "{e}");
    }

    #[test]
    fn next_attempt_keeps_the_id_and_counts() {
        let m = Message::new("x").with_header("k", "v");
        let at = Utc::now();
        let next = m.next_attempt(at, "boom".into(), Duration::from_secs(2));
        assert_eq!(next.id(), m.id());
        assert_eq!(next.attempt(), 2);
        assert_eq!(next.not_before(), Some(at));
        assert_eq!(next.last_failure(), Some("boom"));
        assert_eq!(next.headers().get("k"), Some("v"));
    }

    #[test]
    fn attempt_is_never_zero() {
        assert_eq!(Message::new("x").with_attempt(0).attempt(), 1);
    }
}
