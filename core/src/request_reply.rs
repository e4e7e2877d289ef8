//! Request/reply over any transport: a [`Requester`] sends a request with a reply-to endpoint and
//! a fresh correlation id, waits for the reply with a time-out and tries again a configured number
//! of times; a responder answers with [`reply_to`], copying the correlation id.
//!
//! Replies carry a [`StatusEnvelope`]: `statusCode`, `statusMessage`, optional `httpStatus` and
//! optional `messages` (JSON, camel case), plus the response's own fields. Each entry of
//! `messages` needs only `key` and `severity`; `status`, `text` and `timestamp` are optional.
//!
//! # Partners that do not use redeliver
//! On RabbitMQ a request carries what a plain AMQP client expects: `reply_to` is the name of the
//! queue to publish the reply to (through the default exchange), `correlation_id` is a UUID,
//! `app_id` is [`RequestOptions::app_id`], `content_type` is `application/json` and the delivery
//! mode is persistent. A plain responder answers by publishing to the `reply_to` queue with the
//! request's `correlation_id`; a plain requester sets those properties and gets its reply with
//! the correlation id copied.
//!
//! With a RabbitMQ name prefix, an endpoint `replies` is the queue `{prefix}replies`: that is
//! what `reply_to` carries, and a `reply_to` starting with the prefix is the endpoint again when a
//! request arrives. A `reply_to` of a broker-named queue (`amq.gen-*`, direct reply-to
//! `amq.rabbitmq.reply-to`) is answered as it is. A partner's reply queue with any other name
//! gets the prefix added when it is answered: with a prefix, partners name their reply queues
//! with it, or use broker-named ones.
//!
//! Replies the requester cannot use are handled by its reply worker, the same way on every
//! transport:
//! - a reply **without a correlation id** is dead-lettered with reason
//!   [`MISSING_CORRELATION_ID`];
//! - a reply whose body is **not valid JSON** is dead-lettered with reason
//!   [`INVALID_PAYLOAD`](crate::reasons::INVALID_PAYLOAD);
//! - a reply with an **unknown correlation id** (it came after its request timed out, or belongs
//!   to another client) is put back and retried a few times, in case its request is still being
//!   registered, then dead-lettered with reason [`UNKNOWN_CORRELATION_ID`].
//!
//! Requests are at-least-once like every message: a responder may see a request twice, and a
//! request that timed out may still be handled. Each try has its own correlation id, so a late
//! reply to an earlier try is never taken for the answer to a later one.
//!
//! # Examples
//!
//! A responder and a requester on the in-memory transport (on a broker, only the transport
//! changes):
//!
//! ```
//! # mod redeliver { pub use redeliver_core::*; pub mod memory { pub use redeliver_memory::*; } }
//! use std::sync::Arc;
//!
//! use redeliver::memory::MemoryTransport;
//! use redeliver::request_reply::{RequestOptions, Requester, StatusEnvelope, reply_to};
//! use redeliver::{Context, Outcome, Topology, Transport, Worker};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Quote {
//!     price_cents: u32,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), redeliver::Error> {
//! let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
//! transport
//!     .declare(&Topology::new().endpoint("quotes").endpoint("quote-replies"))
//!     .await?;
//!
//! // The responder answers each request (a product name) on the request's reply-to endpoint.
//! let replies = Arc::clone(&transport);
//! let responder = Worker::builder(Arc::clone(&transport), "quotes")
//!     .start(move |product: String, ctx: Context| {
//!         let replies = Arc::clone(&replies);
//!         async move {
//!             let quote = Quote { price_cents: 100 * product.len() as u32 };
//!             let (endpoint, reply) = match reply_to(&ctx, &StatusEnvelope::new(200, "OK", quote)) {
//!                 Ok(reply) => reply,
//!                 // A request without reply-to cannot be answered: keep it for a person.
//!                 Err(e) => return Outcome::dead_letter(e.to_string()),
//!             };
//!             match replies.send(&endpoint, reply).await {
//!                 Ok(()) => Outcome::success(),
//!                 Err(e) => Outcome::retry(e.to_string()),
//!             }
//!         }
//!     })
//!     .await?;
//!
//! // The requester waits 30 s per try, 3 tries, each with a new correlation id.
//! let requester =
//!     Requester::start(Arc::clone(&transport), "quote-replies", RequestOptions::default()).await?;
//! let reply: StatusEnvelope<Quote> = requester.request("quotes", "book").await?;
//! assert!(reply.is_success());
//! assert_eq!(reply.body.price_cents, 400);
//!
//! requester.shutdown().await;
//! responder.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::Error;
use crate::handler::Context;
use crate::message::{Message, MessageId};
use crate::outcome::Outcome;
use crate::retry::{Backoff, BackoffPolicy, Jitter};
use crate::transport::Transport;
use crate::worker::Worker;

/// Dead-letter reason of a reply without a correlation id.
pub const MISSING_CORRELATION_ID: &str = "missing correlation id";
/// Dead-letter reason of a reply whose correlation id matches no waiting request.
pub const UNKNOWN_CORRELATION_ID: &str = "unknown correlation id";
/// The header carrying the requesting application's id. The RabbitMQ transport carries it in the
/// AMQP `app_id` property instead (both ways), so that plain AMQP clients see it where they look.
pub const APP_ID: &str = "app-id";

/// A reply's status envelope, plus the response's own fields in `body` (flattened into the same
/// JSON object).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusEnvelope<T = serde_json::Map<String, serde_json::Value>> {
    /// An HTTP-like status code: 2xx for success.
    pub status_code: u16,
    /// A short text for the status.
    pub status_message: String,
    /// The HTTP status the responder got or would answer with, when it differs from
    /// `status_code` or the partner sends both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Details: validation results, warnings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<StatusMessage>>,
    /// The response's own fields.
    #[serde(flatten)]
    pub body: T,
}

impl<T> StatusEnvelope<T> {
    /// An envelope with `status_code`, `status_message` and `body`, without messages.
    pub fn new(status_code: u16, status_message: impl Into<String>, body: T) -> Self {
        StatusEnvelope {
            status_code,
            status_message: status_message.into(),
            http_status: None,
            messages: None,
            body,
        }
    }

    /// Sets [`http_status`](StatusEnvelope::http_status).
    #[must_use]
    pub fn with_http_status(mut self, http_status: u16) -> Self {
        self.http_status = Some(http_status);
        self
    }

    /// Adds one entry to [`messages`](StatusEnvelope::messages).
    #[must_use]
    pub fn with_message(mut self, message: StatusMessage) -> Self {
        self.messages.get_or_insert_with(Vec::new).push(message);
        self
    }

    /// Whether the status code is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status_code)
    }
}

/// One detail of a [`StatusEnvelope`]: `key` and `severity` are required, the rest is optional
/// (absent fields are not serialized).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusMessage {
    /// What it is about (a field name, a rule).
    pub key: String,
    /// `error`, `warning`, `info`, ...
    pub severity: String,
    /// A status code for this detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Text for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// When it was produced (RFC 3339), as the partner wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

impl StatusMessage {
    /// A detail with only the required fields.
    pub fn new(key: impl Into<String>, severity: impl Into<String>) -> Self {
        StatusMessage {
            key: key.into(),
            severity: severity.into(),
            status: None,
            text: None,
            timestamp: None,
        }
    }

    /// Sets [`status`](StatusMessage::status).
    #[must_use]
    pub fn with_status(mut self, status: impl Into<String>) -> Self {
        self.status = Some(status.into());
        self
    }

    /// Sets [`text`](StatusMessage::text).
    #[must_use]
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    /// Sets [`timestamp`](StatusMessage::timestamp).
    #[must_use]
    pub fn with_timestamp(mut self, timestamp: impl Into<String>) -> Self {
        self.timestamp = Some(timestamp.into());
        self
    }
}

/// Builds the reply to the request in `ctx`: `envelope` as JSON, with the request's correlation
/// id. Returns the endpoint to send it to (the request's reply-to) and the message.
pub fn reply_to<T: Serialize, S>(
    ctx: &Context<S>,
    envelope: &StatusEnvelope<T>,
) -> Result<(String, Message), Error> {
    let endpoint = ctx.reply_to().ok_or_else(|| {
        Error::invalid_message("the request has no reply-to endpoint to answer to")
    })?;
    let mut reply = Message::json(envelope)?;
    if let Some(correlation_id) = ctx.correlation_id() {
        reply = reply.with_correlation_id(correlation_id);
    }
    Ok((endpoint.to_owned(), reply))
}

/// Options of a [`Requester`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RequestOptions {
    /// How long to wait for each try's reply. Default 30 s.
    pub timeout: Duration,
    /// How many tries, each with a new correlation id. Default 3.
    pub attempts: u32,
    /// Sent in the [`APP_ID`] header (the `app_id` property on RabbitMQ), if set.
    pub app_id: Option<String>,
    /// How many times a reply with an unknown correlation id is tried before it is
    /// dead-lettered. Default 3.
    pub unknown_reply_attempts: u32,
    /// The delay between those tries. Default 1 s.
    pub unknown_reply_delay: Duration,
}

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions {
            timeout: Duration::from_secs(30),
            attempts: 3,
            app_id: None,
            unknown_reply_attempts: 3,
            unknown_reply_delay: Duration::from_secs(1),
        }
    }
}

impl RequestOptions {
    /// Sets [`timeout`](RequestOptions::timeout).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`attempts`](RequestOptions::attempts).
    #[must_use]
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }

    /// Sets [`app_id`](RequestOptions::app_id).
    #[must_use]
    pub fn with_app_id(mut self, app_id: impl Into<String>) -> Self {
        self.app_id = Some(app_id.into());
        self
    }

    /// Sets how often, and how far apart, a reply with an unknown correlation id is tried.
    #[must_use]
    pub fn with_unknown_replies(mut self, attempts: u32, delay: Duration) -> Self {
        self.unknown_reply_attempts = attempts;
        self.unknown_reply_delay = delay;
        self
    }

    fn validate(&self) -> Result<(), Error> {
        if self.attempts == 0 {
            return Err(Error::config("attempts", "must be at least 1, got 0"));
        }
        if self.timeout.is_zero() {
            return Err(Error::config("timeout", "must be longer than zero"));
        }
        if self.unknown_reply_attempts == 0 {
            return Err(Error::config(
                "unknown_reply_attempts",
                "must be at least 1, got 0",
            ));
        }
        Ok(())
    }
}

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Message>>>>;

/// Sends requests and waits for their replies on its own reply endpoint.
pub struct Requester {
    transport: Arc<dyn Transport>,
    reply_endpoint: String,
    options: RequestOptions,
    waiting: Waiting,
    worker: Worker,
}

impl std::fmt::Debug for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requester")
            .field("reply_endpoint", &self.reply_endpoint)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Requester {
    /// Starts consuming replies on `reply_endpoint`, which must exist on the transport and be
    /// used by this requester only.
    pub async fn start(
        transport: Arc<dyn Transport>,
        reply_endpoint: impl Into<String>,
        options: RequestOptions,
    ) -> Result<Self, Error> {
        options.validate()?;
        let reply_endpoint = reply_endpoint.into();
        let waiting: Waiting = Arc::default();
        let policy = BackoffPolicy::builder()
            .max_attempts(options.unknown_reply_attempts)
            .backoff(Backoff::fixed(options.unknown_reply_delay))
            .jitter(Jitter::None)
            .build()?;
        let handler_waiting = Arc::clone(&waiting);
        let worker = Worker::builder(Arc::clone(&transport), reply_endpoint.as_str())
            .concurrency(16)
            .retry_policy(policy)
            .start(move |_: serde_json::Value, ctx: Context| {
                let outcome = deliver_reply(&handler_waiting, &ctx);
                async move { outcome }
            })
            .await?;
        Ok(Requester {
            transport,
            reply_endpoint,
            options,
            waiting,
            worker,
        })
    }

    /// Sends `request` to `endpoint` and returns the reply's envelope with the response decoded
    /// as `R`. Each try waits [`timeout`](RequestOptions::timeout); after
    /// [`attempts`](RequestOptions::attempts) tries without a reply the result is
    /// [`Error::Timeout`]. A reply whose body is not a `StatusEnvelope<R>` is
    /// [`Error::InvalidMessage`]. A non-2xx status is returned as a reply, not an error: check
    /// [`StatusEnvelope::is_success`].
    pub async fn request<Q, R>(
        &self,
        endpoint: &str,
        request: &Q,
    ) -> Result<StatusEnvelope<R>, Error>
    where
        Q: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        for attempt in 1..=self.options.attempts {
            let correlation_id = MessageId::random().to_string();
            let mut message = Message::json(request)?
                .with_reply_to(&self.reply_endpoint)
                .with_correlation_id(&correlation_id);
            if let Some(app_id) = &self.options.app_id {
                message = message.with_header(APP_ID, app_id);
            }
            let (tx, rx) = oneshot::channel();
            self.lock().insert(correlation_id.clone(), tx);
            let sent = self.transport.send(endpoint, message).await;
            if let Err(e) = sent {
                self.lock().remove(&correlation_id);
                return Err(e);
            }
            match tokio::time::timeout(self.options.timeout, rx).await {
                Ok(Ok(reply)) => return reply.decode::<StatusEnvelope<R>>(),
                Ok(Err(_)) => return Err(Error::Closed),
                Err(_) => {
                    self.lock().remove(&correlation_id);
                    tracing::warn!(
                        endpoint,
                        attempt,
                        correlation_id,
                        "no reply within the time-out"
                    );
                }
            }
        }
        Err(Error::Timeout {
            operation: format!(
                "waiting for a reply from `{endpoint}` ({} tries)",
                self.options.attempts
            ),
            after: self.options.timeout * self.options.attempts,
        })
    }

    /// Stops consuming replies. Requests still waiting fail with [`Error::Closed`].
    pub async fn shutdown(self) {
        self.lock().clear();
        self.worker.shutdown().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Message>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn deliver_reply(waiting: &Waiting, ctx: &Context) -> Outcome {
    let Some(correlation_id) = ctx.correlation_id() else {
        return Outcome::dead_letter(MISSING_CORRELATION_ID);
    };
    let waiter = waiting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(correlation_id);
    match waiter {
        // A waiter that gave up in the meantime drops the reply: it is handled either way.
        Some(waiter) => {
            let _ = waiter.send(ctx.message().clone());
            Outcome::success()
        }
        None => Outcome::retry(UNKNOWN_CORRELATION_ID),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_camel_case_and_flatten_the_body() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Quote {
            price: u32,
        }
        let envelope = StatusEnvelope::new(200, "OK", Quote { price: 12 });
        let json = serde_json::to_value(&envelope).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"statusCode": 200, "statusMessage": "OK", "price": 12})
        );
        let back: StatusEnvelope<Quote> = serde_json::from_value(json).unwrap();
        assert_eq!(back, envelope);

        let with_messages: StatusEnvelope = serde_json::from_value(serde_json::json!({
            "statusCode": 422, "statusMessage": "Unprocessable",
            "messages": [{"key": "vat", "severity": "error", "status": "INVALID", "text": "bad VAT number"}]
        }))
        .unwrap();
        assert!(!with_messages.is_success());
        assert_eq!(with_messages.messages.unwrap()[0].key, "vat");
    }

    #[test]
    fn envelopes_follow_the_contract_with_every_optional_field_and_with_none() {
        let full = serde_json::json!({
            "statusCode": 422, "statusMessage": "Unprocessable", "httpStatus": 400,
            "messages": [{
                "key": "vat", "severity": "error", "status": "INVALID",
                "text": "bad VAT number", "timestamp": "2026-12-01T10:00:00Z"
            }],
            "reference": "r-1"
        });
        let envelope: StatusEnvelope = serde_json::from_value(full.clone()).unwrap();
        assert_eq!(envelope.http_status, Some(400));
        assert_eq!(
            envelope.messages.as_deref(),
            Some(
                &[StatusMessage::new("vat", "error")
                    .with_status("INVALID")
                    .with_text("bad VAT number")
                    .with_timestamp("2026-12-01T10:00:00Z")][..]
            )
        );
        assert_eq!(envelope.body.get("reference"), Some(&"r-1".into()));
        // `httpStatus` is a field of the envelope, not left in (or lost from) the body.
        assert_eq!(envelope.body.len(), 1);
        assert_eq!(serde_json::to_value(&envelope).unwrap(), full);

        let minimal = serde_json::json!({
            "statusCode": 200, "statusMessage": "OK",
            "messages": [{"key": "vat", "severity": "info"}]
        });
        let envelope: StatusEnvelope<serde_json::Value> =
            serde_json::from_value(minimal.clone()).unwrap();
        assert_eq!(envelope.http_status, None);
        assert_eq!(
            envelope.messages.as_deref(),
            Some(&[StatusMessage::new("vat", "info")][..])
        );
        assert_eq!(
            serde_json::to_value(
                StatusEnvelope::new(200, "OK", serde_json::json!({}))
                    .with_message(StatusMessage::new("vat", "info"))
            )
            .unwrap(),
            minimal
        );
    }

    #[test]
    fn invalid_options_name_the_field() {
        let field = |o: RequestOptions| match o.validate().unwrap_err() {
            Error::Config { field, .. } => field,
            e => panic!("{e}"),
        };
        assert_eq!(
            field(RequestOptions::default().with_attempts(0)),
            "attempts"
        );
        assert_eq!(
            field(RequestOptions::default().with_timeout(Duration::ZERO)),
            "timeout"
        );
    }
}
