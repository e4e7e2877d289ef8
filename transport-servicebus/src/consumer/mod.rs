//! Consuming a queue or its dead letters in peek-lock mode.
//!
//! Every `azservicebus` receiver call takes `&mut self` (receive, settle, renew), so one task —
//! the consumer — owns the receiver and does all of it: it receives while fewer than
//! `prefetch` deliveries are out, carries out the settlements that deliveries send it, renews
//! the lock of every delivery it holds halfway to its expiry, and abandons deliveries that were
//! dropped unsettled. It outlives the delivery stream until every delivery handed out is
//! settled, then closes the receiver and its client with `dispose()`.
//!
//! Two ways of receiving, both with credit granted per call (no link prefetch: `fe2o3-amqp`'s
//! automatic credit tops the credit up on every settlement, however many messages wait
//! unseen in the client, so what a link holds locked would not be bounded):
//! - **One message at a time** (credit 1) while the queue seems empty. This call is abandoned
//!   whenever a settlement or a renewal is due, or when it has waited [`receive_wait`] (before
//!   the client's own wait ends and it drains the credit); that is safe because `fe2o3-amqp`'s
//!   receive is cancel-safe and a single-message receive keeps nothing in between.
//! - **A batch** of as many messages as the worker can take (`prefetch` minus those out) once
//!   the last receive found a message. A batch call keeps the messages it has received inside
//!   itself until it returns, so it is **never abandoned**: it ends when full, or after
//!   [`receive_batch_wait`] by draining its credit; settlements and renewals wait meanwhile
//!   (those already asked for are carried out before it starts). Every message it returns is
//!   handed out, or given back if the stream closed meanwhile. A full batch is followed by
//!   another; a short one goes back to one at a time.
//!
//! Either way no more than `prefetch` messages are handed out, and every message received is
//! held in the consumer's table with its lock renewed until it is settled or given back.
//! Messages that reach the client after a receive call ended (in answer to a drain, or on the
//! credit of an abandoned single receive) are returned first by the next call; when the
//! consumer closes, one last receive takes them and gives them back.
//!
//! [`receive_batch_wait`]: crate::ServiceBusOptions::receive_batch_wait
//! [`receive_wait`]: crate::ServiceBusOptions::receive_wait

mod actor;
mod commands;
mod locks;
mod settler;

use std::sync::Arc;

use azservicebus::{ServiceBusReceiverOptions, SubQueue};
use futures::StreamExt;
use redeliver_core::{ConsumeOptions, Delivery, DeliveryStream, Error, Source};
use tracing::info;

use crate::shared::Shared;

/// Consumes `source`: a stream that survives lost connections (see
/// [Reconnecting](redeliver_core::transport#reconnecting)). Each receiver that fails reports its
/// error and ends; the next poll opens a new receiver, with its own client, and an error to open
/// it is reported the same way (the worker backs off after each).
pub(crate) async fn consume(
    shared: &Arc<Shared>,
    source: &Source,
    options: ConsumeOptions,
) -> Result<DeliveryStream, Error> {
    let first = open(shared, source, options.clone()).await?;
    let reopening = Reopening {
        shared: Arc::clone(shared),
        source: source.clone(),
        options,
        current: Some(first),
    };
    Ok(Box::pin(futures::stream::unfold(
        reopening,
        Reopening::next,
    )))
}

/// The receivers of one [`consume`], one after the other.
struct Reopening {
    shared: Arc<Shared>,
    source: Source,
    options: ConsumeOptions,
    current: Option<DeliveryStream>,
}

impl Reopening {
    async fn next(mut self) -> Option<(Result<Delivery, Error>, Self)> {
        loop {
            match self.current.as_mut() {
                Some(stream) => match stream.next().await {
                    Some(item) => return Some((item, self)),
                    None => {
                        info!(source = %self.source, "opening a new receiver");
                        self.current = None;
                    }
                },
                None => match open(&self.shared, &self.source, self.options.clone()).await {
                    Ok(stream) => self.current = Some(stream),
                    Err(e) => return Some((Err(e), self)),
                },
            }
        }
    }
}

/// Opens a receiver on `source` with its own client and starts the consumer task; the stream
/// ends when the receiver fails.
async fn open(
    shared: &Arc<Shared>,
    source: &Source,
    options: ConsumeOptions,
) -> Result<DeliveryStream, Error> {
    let queue = source.endpoint_name().to_owned();
    let mut client = shared.new_client().await?;
    let receiver_options = ServiceBusReceiverOptions {
        // Credit is granted per receive call, so that only what is asked for is locked.
        prefetch_count: 0,
        sub_queue: if source.is_dead_letters() {
            SubQueue::DeadLetter
        } else {
            SubQueue::None
        },
        ..ServiceBusReceiverOptions::default()
    };
    let operation = format!("attaching a receiver to `{source}`");
    let attach = shared.bounded(
        &operation,
        client.create_receiver_for_queue(queue.clone(), receiver_options),
    );
    let receiver = match attach.await {
        Ok(Ok(receiver)) => receiver,
        Ok(Err(e)) => {
            let error = shared.client_error(e, &operation, Some(("queue", &queue)));
            shared.dispose_client(client).await;
            return Err(error);
        }
        Err(timeout) => {
            shared.dispose_client(client).await;
            return Err(timeout);
        }
    };
    Ok(actor::start(
        shared,
        client,
        receiver,
        source,
        options.prefetch,
    ))
}
