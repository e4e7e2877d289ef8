//! The handler contract: what application code implements.
//!
//! A handler receives the decoded message and its [`Context`] and returns an [`Outcome`] — or a
//! `Result` whose error says what to do (see [`IntoOutcome`]). It never acknowledges, retries or
//! dead-letters by itself: the worker does that from the outcome, the same way on every
//! transport. A handler that panics is treated as [`Outcome::Retry`]: a crash is a failure,
//! never a loss.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::Error;
use crate::failure::IntoOutcome;
use crate::message::{CAUSATION_ID, DeadLetterInfo, Headers, MESSAGE_TYPE, Message, MessageId};
use crate::outcome::Outcome;
use crate::transport::{Source, Transport};

/// Handles messages of type `T` (decoded from the body, JSON by default), with the application
/// state `S` (none by default).
///
/// Implemented for every `Fn(T, Context<S>) -> impl Future<Output = R>` where `R` is an
/// [`Outcome`], `Result<(), E>` or `Result<Outcome, E>` (see [`IntoOutcome`]), so a closure or
/// an `async fn` is a handler, and `?` works in it:
///
/// ```
/// use redeliver_core::{Context, Failure, Outcome};
///
/// #[derive(serde::Deserialize)]
/// struct OrderPlaced { order_id: u64 }
///
/// async fn on_order_placed(event: OrderPlaced, ctx: Context) -> Outcome {
///     println!("order {} (attempt {})", event.order_id, ctx.attempt());
///     Outcome::success()
/// }
///
/// async fn charge(event: OrderPlaced, _: Context) -> Result<(), Failure> {
///     let amount: u64 = "12".parse()?; // any error: retried, with its message as the reason
///     if amount == 0 {
///         return Err(Failure::dead_letter("nothing to charge"));
///     }
///     Ok(())
/// }
/// # fn assert_handler<H: redeliver_core::Handler<OrderPlaced>>(_: H) {}
/// # assert_handler(on_order_placed);
/// # assert_handler(charge);
/// ```
pub trait Handler<T, S = ()>: Send + Sync + 'static {
    /// Handles one message.
    fn handle(&self, message: T, context: Context<S>) -> impl Future<Output = Outcome> + Send;
}

impl<T, S, F, Fut> Handler<T, S> for F
where
    F: Fn(T, Context<S>) -> Fut + Send + Sync + 'static,
    Fut: Future + Send,
    Fut::Output: IntoOutcome,
    S: Send + Sync + 'static,
{
    fn handle(&self, message: T, context: Context<S>) -> impl Future<Output = Outcome> + Send {
        let handled = self(message, context);
        async move { handled.await.into_outcome() }
    }
}

/// Everything about a delivery except its decoded body: the message's fields, the application
/// state `S` (shared by every handler call, never copied), and a way to send further messages.
pub struct Context<S = ()> {
    message: Arc<Message>,
    source: Arc<Source>,
    received_at: DateTime<Utc>,
    state: Arc<S>,
    transport: Arc<dyn Transport>,
}

impl<S> Clone for Context<S> {
    fn clone(&self) -> Self {
        Context {
            message: Arc::clone(&self.message),
            source: Arc::clone(&self.source),
            received_at: self.received_at,
            state: Arc::clone(&self.state),
            transport: Arc::clone(&self.transport),
        }
    }
}

impl<S> fmt::Debug for Context<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("message", &self.message)
            .field("source", &self.source)
            .field("received_at", &self.received_at)
            .finish_non_exhaustive()
    }
}

impl<S> Context<S> {
    /// The context of `message` from `source`, received at `received_at`, with the worker's
    /// state and transport.
    pub(crate) fn new(
        message: Arc<Message>,
        source: Arc<Source>,
        received_at: DateTime<Utc>,
        state: Arc<S>,
        transport: Arc<dyn Transport>,
    ) -> Self {
        Context {
            message,
            source,
            received_at,
            state,
            transport,
        }
    }

    /// The application state given to the worker or host.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The application state, shared (to move into a task that outlives the handler call).
    pub fn shared_state(&self) -> &Arc<S> {
        &self.state
    }

    /// Sends `message` to `endpoint` on the transport this message came from, as part of the
    /// same conversation: it gets this message's correlation id (or, if this message has none,
    /// its id) unless it has one of its own, and this message's id as its
    /// [`CAUSATION_ID`] header. Returns once the transport has taken the message.
    pub async fn send(&self, endpoint: &str, message: Message) -> Result<(), Error> {
        self.transport.send(endpoint, self.caused(message)).await
    }

    /// Publishes `message` to `topic`, carrying the correlation and causation ids as
    /// [`send`](Context::send) does.
    pub async fn publish(&self, topic: &str, message: Message) -> Result<(), Error> {
        self.transport.publish(topic, self.caused(message)).await
    }

    /// `message` with this message's correlation id and id as its cause.
    fn caused(&self, mut message: Message) -> Message {
        if message.correlation_id().is_none() {
            let correlation = self
                .message
                .correlation_id()
                .unwrap_or(self.message.id().as_str())
                .to_owned();
            message = message.with_correlation_id(correlation);
        }
        if message.headers().get(CAUSATION_ID).is_none() {
            message = message.with_header(CAUSATION_ID, self.message.id().as_str());
        }
        message
    }

    /// The whole message, body bytes included.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The message id, the same on every attempt.
    pub fn message_id(&self) -> &MessageId {
        self.message.id()
    }

    /// Which handler call this is: 1 for the first. See [`Message::attempt`].
    pub fn attempt(&self) -> u32 {
        self.message.attempt()
    }

    /// The application headers.
    pub fn headers(&self) -> &Headers {
        self.message.headers()
    }

    /// The message type (the [`MESSAGE_TYPE`] header), if any.
    pub fn message_type(&self) -> Option<&str> {
        self.message.headers().get(MESSAGE_TYPE)
    }

    /// The correlation id, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        self.message.correlation_id()
    }

    /// Where replies should go, if anywhere.
    pub fn reply_to(&self) -> Option<&str> {
        self.message.reply_to()
    }

    /// The subject, if any.
    pub fn subject(&self) -> Option<&str> {
        self.message.subject()
    }

    /// The message's not-before. The handler is never called before it.
    pub fn not_before(&self) -> Option<DateTime<Utc>> {
        self.message.not_before()
    }

    /// Why the previous attempt failed, on a retry.
    pub fn last_failure(&self) -> Option<&str> {
        self.message.last_failure()
    }

    /// Why the message was dead-lettered, when handling dead letters.
    pub fn dead_letter(&self) -> Option<&DeadLetterInfo> {
        self.message.dead_letter()
    }

    /// Where the message was consumed from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The name of the endpoint the message was consumed from.
    pub fn endpoint(&self) -> &str {
        self.source.endpoint_name()
    }

    /// When the worker received the message, on the transport's clock.
    pub fn received_at(&self) -> DateTime<Utc> {
        self.received_at
    }
}
