//! Middleware: code that runs around every handler call of a consumer (or of every consumer of
//! a host), to time it out, limit it, trace it or count it, without the handler knowing.
//!
//! A [`Middleware`] gets the call's [`Context`] and the rest of the chain as [`Next`]; it may
//! act before and after [`Next::run`], change the [`Outcome`], or not call the handler at all.
//! Layers run in the order they were added, the first outermost.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::handler::{Context, Handler};
use crate::outcome::Outcome;

/// A boxed future of an outcome, as middleware returns it.
pub type BoxOutcome<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// Code that runs around handler calls.
///
/// ```
/// use redeliver_core::Context;
/// use redeliver_core::host::middleware::{BoxOutcome, Middleware, Next};
///
/// /// Logs every outcome.
/// struct LogOutcomes;
///
/// impl<S: Send + Sync + 'static> Middleware<S> for LogOutcomes {
///     fn handle<'a>(&'a self, context: &'a Context<S>, next: Next<'a>) -> BoxOutcome<'a> {
///         Box::pin(async move {
///             let outcome = next.run().await;
///             println!("{}: {}", context.message_id(), outcome.kind());
///             outcome
///         })
///     }
/// }
/// ```
pub trait Middleware<S>: Send + Sync + 'static {
    /// Handles one call: usually runs `next` and returns its outcome.
    fn handle<'a>(&'a self, context: &'a Context<S>, next: Next<'a>) -> BoxOutcome<'a>;
}

/// The rest of the chain: the layers after this one, then the handler.
pub struct Next<'a> {
    run: Box<dyn FnOnce() -> BoxOutcome<'a> + Send + 'a>,
}

impl Next<'_> {
    /// Runs the rest of the chain.
    pub async fn run(self) -> Outcome {
        (self.run)().await
    }
}

/// A handler call that takes longer than its limit is stopped and the message retried, with
/// the reason `handler timed out after <limit>`.
#[derive(Clone, Copy, Debug)]
pub struct Timeout {
    limit: Duration,
}

impl Timeout {
    /// Stops handler calls after `limit`.
    pub fn new(limit: Duration) -> Self {
        Timeout { limit }
    }
}

impl<S: Send + Sync + 'static> Middleware<S> for Timeout {
    fn handle<'a>(&'a self, _: &'a Context<S>, next: Next<'a>) -> BoxOutcome<'a> {
        Box::pin(async move {
            match tokio::time::timeout(self.limit, next.run()).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::retry(format!("handler timed out after {:?}", self.limit)),
            }
        })
    }
}

/// At most this many handler calls at once, across every consumer the layer is given to (a
/// host's `max_concurrency`). A delivery waits for its turn after it was taken from the
/// transport.
#[derive(Clone, Debug)]
pub struct ConcurrencyLimit {
    permits: Arc<Semaphore>,
}

impl ConcurrencyLimit {
    /// At most `limit` calls at once.
    pub fn new(limit: usize) -> Self {
        ConcurrencyLimit {
            permits: Arc::new(Semaphore::new(limit)),
        }
    }
}

impl<S: Send + Sync + 'static> Middleware<S> for ConcurrencyLimit {
    fn handle<'a>(&'a self, _: &'a Context<S>, next: Next<'a>) -> BoxOutcome<'a> {
        Box::pin(async move {
            // The semaphore is never closed, so a permit always comes.
            let _permit = self.permits.acquire().await;
            next.run().await
        })
    }
}

/// A handler with layers around it.
pub(crate) struct Layered<H, S> {
    pub(crate) handler: H,
    pub(crate) layers: Arc<[Arc<dyn Middleware<S>>]>,
}

impl<T, S, H> Handler<T, S> for Layered<H, S>
where
    T: Send + 'static,
    S: Send + Sync + 'static,
    H: Handler<T, S>,
{
    async fn handle(&self, message: T, context: Context<S>) -> Outcome {
        layered(&self.handler, &self.layers, message, &context).await
    }
}

fn layered<'a, T, S, H>(
    handler: &'a H,
    layers: &'a [Arc<dyn Middleware<S>>],
    message: T,
    context: &'a Context<S>,
) -> BoxOutcome<'a>
where
    T: Send + 'static,
    S: Send + Sync + 'static,
    H: Handler<T, S>,
{
    let inner: Box<dyn FnOnce(Context<S>) -> BoxOutcome<'a> + Send + 'a> =
        Box::new(move |context| Box::pin(handler.handle(message, context)));
    chain(layers, context, inner)
}

fn chain<'a, S: Send + Sync + 'static>(
    layers: &'a [Arc<dyn Middleware<S>>],
    context: &'a Context<S>,
    inner: Box<dyn FnOnce(Context<S>) -> BoxOutcome<'a> + Send + 'a>,
) -> BoxOutcome<'a> {
    match layers.split_first() {
        None => inner(context.clone()),
        Some((first, rest)) => first.handle(
            context,
            Next {
                run: Box::new(move || chain(rest, context, inner)),
            },
        ),
    }
}
