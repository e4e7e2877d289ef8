//! Without the `opentelemetry` feature: the same calls, doing nothing, compiled away.

use std::marker::PhantomData;

use chrono::{DateTime, Utc};

use super::{Operation, Settlement, Taken};
use crate::message::Message;
use crate::transport::Source;

/// Does nothing without the `opentelemetry` feature.
pub fn set_enabled(_enabled: bool) {}

/// Always `false` without the `opentelemetry` feature.
pub fn is_enabled() -> bool {
    false
}

/// Without the `opentelemetry` feature: hands `message` back untouched. With it, starts the
/// producer span and writes its trace context into the message's headers.
#[inline(always)]
pub fn produce(
    _system: &'static str,
    _operation: Operation,
    _destination: &str,
    message: Message,
) -> (Message, ProducerSpan) {
    (message, ProducerSpan(()))
}

/// The producer span [`produce`] started: nothing without the `opentelemetry` feature.
#[derive(Debug)]
pub struct ProducerSpan(());

impl ProducerSpan {
    /// Ends the span, with an error status if the send failed.
    #[inline(always)]
    pub fn finish(self, _result: &Result<(), crate::Error>) {}
}

pub(crate) struct WorkerTelemetry;

impl WorkerTelemetry {
    pub(crate) fn new(_system: &'static str, _source: &Source) -> Self {
        WorkerTelemetry
    }

    #[inline(always)]
    pub(crate) fn received(&self) {}

    #[inline(always)]
    pub(crate) fn reconnected(&self) {}

    #[inline(always)]
    pub(crate) fn start(&self, _message: &Message) -> DeliverySpan<'_> {
        DeliverySpan(PhantomData)
    }

    #[inline(always)]
    pub(crate) fn detached(&self) -> DeliverySpan<'_> {
        DeliverySpan(PhantomData)
    }
}

/// What [`DeliverySpan::enter`] returns: nothing to undo.
pub(crate) struct Entered;

pub(crate) struct Scope;

impl Scope {
    #[inline(always)]
    pub(crate) fn wrap<F: Future>(self, future: F) -> F {
        future
    }
}

pub(crate) struct DeliverySpan<'a>(PhantomData<&'a ()>);

impl DeliverySpan<'_> {
    #[inline(always)]
    pub(crate) fn scope(&self) -> Scope {
        Scope
    }

    #[inline(always)]
    pub(crate) fn enter(&self) -> Entered {
        Entered
    }

    #[inline(always)]
    pub(crate) fn handler_starting(
        &mut self,
        _not_before: Option<DateTime<Utc>>,
        _now: DateTime<Utc>,
    ) {
    }

    #[inline(always)]
    pub(crate) fn handler_finished(&mut self) {}

    #[inline(always)]
    pub(crate) fn settled(&self, _settlement: &Settlement<'_>, _taken: Taken<'_>) {}
}
