//! A transport in front of another that notes when each delivery reached the worker and its
//! not-before: how many deliveries arrived early and were held, unacknowledged, waiting aside
//! for their not-before at once (what the RabbitMQ transport's rounding down costs in prefetch).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use redeliver::transport::{ConsumeOptions, DeliveryStream};
use redeliver::{Capabilities, Clock, Error, Message, Source, Topology, Transport};

/// When a delivery arrived, and its not-before.
type Arrival = (DateTime<Utc>, Option<DateTime<Utc>>);

/// Passes everything through to the transport it wraps, noting every delivery's arrival.
#[derive(Debug)]
pub(crate) struct Arrivals {
    inner: Arc<dyn Transport>,
    seen: Arc<Mutex<Vec<Arrival>>>,
}

/// What the arrivals show about deliveries that came before their not-before.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Early {
    /// Deliveries that arrived before their not-before.
    pub(crate) count: usize,
    /// The most that were early at the same time (each from its arrival to its not-before).
    pub(crate) peak: usize,
    /// The earliest arrival, in milliseconds before the not-before.
    pub(crate) most_ms: f64,
}

impl Arrivals {
    pub(crate) fn new(inner: Arc<dyn Transport>) -> Self {
        Arrivals {
            inner,
            seen: Arc::default(),
        }
    }

    /// The deliveries so far that arrived before their not-before.
    pub(crate) fn early(&self) -> Early {
        let seen = self.seen.lock().expect("not poisoned");
        // +1 at an early arrival, -1 at its not-before; at equal instants the -1 first.
        let mut events: Vec<(DateTime<Utc>, i32)> = Vec::new();
        let mut most_ms: f64 = 0.0;
        for (arrived, not_before) in seen.iter() {
            if let Some(not_before) = not_before
                && arrived < not_before
            {
                events.push((*arrived, 1));
                events.push((*not_before, -1));
                most_ms = most_ms.max((*not_before - *arrived).as_seconds_f64() * 1000.0);
            }
        }
        let count = events.len() / 2;
        events.sort();
        let (mut now, mut peak) = (0i32, 0i32);
        for (_, step) in events {
            now += step;
            peak = peak.max(now);
        }
        Early {
            count,
            peak: usize::try_from(peak).unwrap_or(0),
            most_ms,
        }
    }
}

#[async_trait]
impl Transport for Arrivals {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn clock(&self) -> Clock {
        self.inner.clock()
    }

    async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        self.inner.declare(topology).await
    }

    async fn send(&self, endpoint: &str, message: Message) -> Result<(), Error> {
        self.inner.send(endpoint, message).await
    }

    async fn publish(&self, topic: &str, message: Message) -> Result<(), Error> {
        self.inner.publish(topic, message).await
    }

    async fn consume(
        &self,
        source: &Source,
        options: ConsumeOptions,
    ) -> Result<DeliveryStream, Error> {
        let stream = self.inner.consume(source, options).await?;
        let seen = Arc::clone(&self.seen);
        let clock = self.inner.clock();
        Ok(stream
            .inspect(move |delivery| {
                if let Ok(delivery) = delivery {
                    seen.lock()
                        .expect("not poisoned")
                        .push((clock.now(), delivery.message().not_before()));
                }
            })
            .boxed())
    }
}
