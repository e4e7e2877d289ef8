//! Handling one delivery: the not-before rule, decoding, the handler call, and settling what
//! was decided.

use std::any::Any;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::InvalidPayload;
use super::WorkerStats;
use super::decide::{Disposition, Rules};
use super::signal::Signal;
use super::stats::{Control, Counters, StatsSource, bump};
use super::waiting_room::WaitingRoom;
use crate::clock::Clock;
use crate::handler::{Context, Handler};
use crate::outcome::Outcome;
use crate::payload::Payload;
use crate::reasons::{INVALID_PAYLOAD, MALFORMED_HEADERS};
use crate::telemetry::{self, DeliverySpan, Settlement, Taken, WorkerTelemetry};
use crate::transport::{Delivery, Settled, Source, Transport};

/// What every lane of a worker shares.
pub(super) struct Shared<T, S, H> {
    /// The application state every handler call gets.
    pub(super) state: Arc<S>,
    pub(super) transport: Arc<dyn Transport>,
    /// Shared with every handler's [`Context`], so a delivery copies no name.
    pub(super) source: Arc<Source>,
    pub(super) rules: Rules,
    pub(super) handler: H,
    pub(super) invalid_payload: InvalidPayload,
    pub(super) clock: Clock,
    pub(super) stats: Counters,
    pub(super) control: Arc<Control>,
    pub(super) waiting: WaitingRoom,
    /// Spans and metrics (nothing without the `opentelemetry` feature).
    pub(super) telemetry: WorkerTelemetry,
    pub(super) _payload: PhantomData<fn() -> T>,
}

impl<T: Send + 'static, S: Send + Sync + 'static, H: Send + Sync + 'static> StatsSource
    for Shared<T, S, H>
{
    fn snapshot(&self) -> WorkerStats {
        self.stats.snapshot()
    }
}

impl<T, S, H> Shared<T, S, H>
where
    T: Payload,
    S: Send + Sync + 'static,
    H: Handler<T, S>,
{
    /// Handles and settles `delivery`, or gives it back with its not-before to wait aside for.
    pub(super) async fn process(
        &self,
        delivery: Delivery,
        fresh: bool,
        hard_stop: &Signal,
    ) -> Option<(Delivery, DateTime<Utc>)> {
        let message = delivery.message();
        let mut otel = self.telemetry.start(message);
        let span = {
            // The `tracing` span is a child of the consumer span (with `tracing-opentelemetry`).
            let _current = otel.enter();
            info_span!(
                "delivery",
                message_id = %message.id(),
                endpoint = %self.source,
                attempt = message.attempt(),
                outcome = tracing::field::Empty,
            )
        };
        let scope = otel.scope();
        let work = async {
            if fresh {
                bump(&self.stats.received);
                self.telemetry.received();
            }
            let (delivery, disposition) = self.decide(delivery, hard_stop, &mut otel).await;
            let disposition = match disposition {
                Disposition::Wait(not_before) if self.waiting.enter() => {
                    debug!(%not_before, "arrived early by less than the transport's precision; waiting aside");
                    tracing::Span::current().record("outcome", "waiting");
                    let waiting = Settlement {
                        outcome: "waiting",
                        reason: None,
                        retry: None,
                        attempt: delivery.message().attempt(),
                    };
                    otel.settled(&waiting, Taken::AsAsked);
                    return Some((delivery, not_before));
                }
                // No room to wait aside: the transport holds it instead.
                Disposition::Wait(not_before) => Disposition::Park(not_before),
                other => self
                    .rules
                    .keep_dead_letters(delivery.message(), other, self.clock.now()),
            };
            self.settle(delivery, disposition, &otel).await;
            None
        };
        scope.wrap(work.instrument(span)).await
    }

    /// Waits for `not_before` holding only the delivery, then hands it back to the lanes; gives
    async fn decide(
        &self,
        delivery: Delivery,
        hard_stop: &Signal,
        otel: &mut DeliverySpan<'_>,
    ) -> (Delivery, Disposition) {
        if let Some(problem) = delivery.problem() {
            let disposition = Disposition::DeadLetter {
                reason: MALFORMED_HEADERS.to_owned(),
                description: Some(problem.to_owned()),
            };
            return (delivery, disposition);
        }

        let early = self
            .rules
            .before_handling(delivery.message().not_before(), self.clock.now());
        if let Some(disposition) = early {
            return (delivery, disposition);
        }

        let payload = match T::decode(delivery.message()) {
            Ok(payload) => payload,
            Err(e) => {
                let disposition = match self.invalid_payload {
                    InvalidPayload::DeadLetter => Disposition::DeadLetter {
                        reason: INVALID_PAYLOAD.to_owned(),
                        description: Some(e.to_string()),
                    },
                    InvalidPayload::Discard => {
                        Disposition::Discard(format!("{INVALID_PAYLOAD}: {e}"))
                    }
                };
                return (delivery, disposition);
            }
        };

        let context = Context::new(
            Arc::clone(delivery.shared_message()),
            Arc::clone(&self.source),
            self.clock.now(),
            Arc::clone(&self.state),
            Arc::clone(&self.transport),
        );
        bump(&self.stats.handled);
        otel.handler_starting(delivery.message().not_before(), self.clock.now());
        let outcome = tokio::select! {
            biased;
            outcome = call(&self.handler, payload, context) => outcome,
            _ = hard_stop.wait() => return (delivery, Disposition::Abandon),
        };
        otel.handler_finished();
        let disposition = self
            .rules
            .after_handling(delivery.message(), outcome, self.clock.now());
        (delivery, disposition)
    }

    /// Settles `delivery` as decided; `otel` is its consumer span
    /// ([`WorkerTelemetry::detached`] outside one).
    pub(super) async fn settle(
        &self,
        delivery: Delivery,
        disposition: Disposition,
        otel: &DeliverySpan<'_>,
    ) {
        tracing::Span::current().record("outcome", disposition.name());
        // Taken apart before the disposition moves into the settlement, and recorded after it.
        let reason = match &disposition {
            Disposition::Discard(reason)
            | Disposition::DeadLetter { reason, .. }
            | Disposition::Retry { reason, .. } => telemetry_reason(reason),
            _ => None,
        };
        let retry = match &disposition {
            Disposition::Retry {
                not_before,
                delay,
                source,
                ..
            } => Some(telemetry::Retry {
                delay: *delay,
                source: *source,
                not_before: *not_before,
            }),
            _ => None,
        };
        let outcome = disposition.name();
        let attempt = delivery.message().attempt();
        let counter = match &disposition {
            Disposition::Complete => &self.stats.completed,
            Disposition::Discard(_) => &self.stats.discarded,
            Disposition::DeadLetter { .. } => &self.stats.dead_lettered,
            Disposition::Retry { .. } => &self.stats.retried,
            Disposition::Park(_) => &self.stats.parked,
            // Never settled: `process` hands a waiting delivery to the waiting room.
            Disposition::Wait(_) => return,
            Disposition::Abandon => &self.stats.abandoned,
        };
        let result = match disposition {
            Disposition::Complete => delivery.complete().await,
            Disposition::Discard(reason) => {
                info!(reason, "discarded");
                delivery.complete().await
            }
            Disposition::DeadLetter {
                reason,
                description,
            } => {
                warn!(reason, description, "dead-lettered");
                delivery
                    .dead_letter_at(reason, description, self.clock.now())
                    .await
            }
            Disposition::Retry {
                not_before,
                reason,
                delay,
                ..
            } => {
                info!(reason, %not_before, ?delay, "retry scheduled");
                delivery.retry(not_before, reason, delay).await
            }
            Disposition::Park(not_before) => {
                debug!(%not_before, "arrived before its not-before; parked again");
                delivery.park(not_before).await
            }
            Disposition::Abandon | Disposition::Wait(_) => delivery.abandon().await,
        };
        let settlement = Settlement {
            outcome,
            reason: reason.as_deref(),
            retry,
            attempt,
        };
        match result {
            Ok(Settled::AsAsked) => {
                bump(counter);
                otel.settled(&settlement, Taken::AsAsked);
            }
            Ok(Settled::DeadLettered { reason }) => {
                bump(&self.stats.dead_lettered);
                otel.settled(&settlement, Taken::DeadLettered(&reason));
                warn!(reason, "the transport dead-lettered the message instead");
            }
            Err(e) => {
                bump(&self.stats.settle_failures);
                otel.settled(&settlement, Taken::Failed);
                error!(error = %e, "could not settle the delivery; the transport will deliver it again");
            }
        }
    }
}

/// The reason as telemetry records it: copied only when something records it.
fn telemetry_reason(reason: &str) -> Option<String> {
    telemetry::is_enabled().then(|| reason.to_owned())
}

/// Calls the handler, turning a panic (while creating or polling its future) into a retry.
async fn call<T, S, H: Handler<T, S>>(handler: &H, payload: T, context: Context<S>) -> Outcome {
    let future =
        match std::panic::catch_unwind(AssertUnwindSafe(|| handler.handle(payload, context))) {
            Ok(future) => future,
            Err(panic) => return panicked(panic),
        };
    match AssertUnwindSafe(future).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(panic) => panicked(panic),
    }
}

fn panicked(panic: Box<dyn Any + Send>) -> Outcome {
    let text = panic_text(&*panic);
    error!(panic = %text, "the handler panicked; the message will be retried");
    Outcome::retry(format!("handler panicked: {text}"))
}

pub(super) fn panic_text(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic payload".to_owned())
}
