//! Handlers by message type on one endpoint.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::handler::{Context, Handler};
use crate::message::MESSAGE_TYPE;
use crate::outcome::Outcome;
use crate::payload::{Payload, RawBody};
use crate::reasons::{INVALID_PAYLOAD, UNKNOWN_MESSAGE_TYPE};

type Routed = Pin<Box<dyn Future<Output = Outcome> + Send>>;
type Route<S> = Arc<dyn Fn(Context<S>) -> Routed + Send + Sync>;

/// Several message types on one endpoint, each to its own handler, chosen by the message's
/// [`MESSAGE_TYPE`] header.
///
/// ```
/// use redeliver_core::{Consumer, Context, Outcome};
/// use redeliver_core::host::Routes;
///
/// #[derive(serde::Deserialize)]
/// struct OrderPlaced { order_id: u64 }
/// #[derive(serde::Deserialize)]
/// struct OrderCancelled { order_id: u64 }
///
/// async fn placed(_: OrderPlaced, _: Context) -> Outcome { Outcome::success() }
/// async fn cancelled(_: OrderCancelled, _: Context) -> Outcome { Outcome::success() }
///
/// let orders = Consumer::endpoint("orders").routes(
///     Routes::new()
///         .route("order-placed", placed)
///         .route("order-cancelled", cancelled),
/// );
/// ```
///
/// A message without the header, or with a type no route takes, is dead-lettered with reason
/// [`UNKNOWN_MESSAGE_TYPE`]; a body that does not decode into the route's type with reason
/// [`INVALID_PAYLOAD`](crate::reasons::INVALID_PAYLOAD).
pub struct Routes<S = ()> {
    routes: BTreeMap<String, Route<S>>,
}

impl<S> fmt::Debug for Routes<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.routes.keys()).finish()
    }
}

impl<S: Send + Sync + 'static> Default for Routes<S> {
    fn default() -> Self {
        Routes::new()
    }
}

impl<S: Send + Sync + 'static> Routes<S> {
    /// No routes.
    pub fn new() -> Self {
        Routes {
            routes: BTreeMap::new(),
        }
    }

    /// Messages whose [`MESSAGE_TYPE`] is `message_type` go to `handler`, decoded as `T`. A
    /// second route for the same type replaces the first.
    #[must_use]
    pub fn route<T, H>(mut self, message_type: impl Into<String>, handler: H) -> Self
    where
        T: Payload,
        H: Handler<T, S>,
    {
        let handler = Arc::new(handler);
        let route: Route<S> = Arc::new(move |context: Context<S>| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                match T::decode(context.message()) {
                    Ok(message) => handler.handle(message, context).await,
                    Err(e) => Outcome::dead_letter_with(INVALID_PAYLOAD, e.to_string()),
                }
            })
        });
        self.routes.insert(message_type.into(), route);
        self
    }

    /// The message types routed, in order.
    pub fn message_types(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }
}

impl<S: Send + Sync + 'static> Handler<RawBody, S> for Routes<S> {
    async fn handle(&self, _: RawBody, context: Context<S>) -> Outcome {
        let route = context
            .headers()
            .get(MESSAGE_TYPE)
            .and_then(|t| self.routes.get(t))
            .cloned();
        match route {
            Some(route) => route(context).await,
            None => {
                let found = match context.headers().get(MESSAGE_TYPE) {
                    Some(t) => format!("message type `{t}`"),
                    None => format!("no `{MESSAGE_TYPE}` header"),
                };
                let known: Vec<String> = self.routes.keys().map(|k| format!("`{k}`")).collect();
                Outcome::dead_letter_with(
                    UNKNOWN_MESSAGE_TYPE,
                    format!("{found}; this endpoint takes {}", known.join(", ")),
                )
            }
        }
    }
}
