//! The consumer task, which owns the receiver: it receives (one message at a time, or in
//! batches), within the prefetch, carries out the settlements its deliveries ask for, renews
//! their locks, gives held dead letters back when their retry is due, and closes the receiver.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use azservicebus::ServiceBusReceiver;
use azservicebus::primitives::service_bus_received_message::ServiceBusReceivedMessage;
use futures::Stream;
use redeliver_core::{Delivery, DeliveryStream, Error, Source};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, info, warn};

use super::commands::{Action, Command, Final};
use super::locks::{Locked, lock_lost};
use super::settler::Settler;
use crate::convert::{ids, incoming};
use crate::shared::{Client, Shared};

/// How long closing waits for a drained credit to be answered.
const DRAIN_WAIT: Duration = Duration::from_millis(50);
/// How much shorter than the try time-out the client's own receive wait is, so that its
/// try time-out never ends a receive first.
const CLIENT_WAIT_MARGIN: Duration = Duration::from_millis(500);

/// Starts the consumer task on `receiver` (attached on `client`, which the task closes with it);
/// the stream ends when the receiver fails.
pub(super) fn start(
    shared: &Arc<Shared>,
    client: Client,
    receiver: ServiceBusReceiver,
    source: &Source,
    prefetch: usize,
) -> DeliveryStream {
    let prefetch = prefetch.max(1);
    let (deliveries_tx, deliveries_rx) = mpsc::channel(prefetch);
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let consumer = Consumer {
        shared: Arc::clone(shared),
        client: Some(client),
        receiver: Some(receiver),
        source: source.clone(),
        prefetch,
        commands_tx,
        commands,
        deliveries: Some(deliveries_tx),
        locked: HashMap::new(),
        next_id: 0,
        credit_outstanding: 0,
        backlog: false,
        wait_after_drain: None,
        closing: None,
    };
    let commands = consumer.commands_tx.clone();
    tokio::spawn(consumer.run());
    Box::pin(Deliveries {
        deliveries: deliveries_rx,
        commands,
        closing: shared.closing.clone(),
    })
}

/// The stream of a consumer's deliveries. Dropped, it tells the consumer, which then gives
/// back what it holds and closes; [`Shared::close`] waits for that.
struct Deliveries {
    deliveries: mpsc::Receiver<Result<Delivery, Error>>,
    commands: mpsc::UnboundedSender<Command>,
    closing: TaskTracker,
}

impl Stream for Deliveries {
    type Item = Result<Delivery, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.deliveries.poll_recv(cx)
    }
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        // A consumer that has already ended hands the token straight back.
        let _ = self
            .commands
            .send(Command::StreamDropped(self.closing.token()));
    }
}

enum Event {
    Command(Command),
    StreamClosed,
    Timer,
    Received(Result<Option<Box<ServiceBusReceivedMessage>>, azure_core::Error>),
    /// Nothing came within the receive wait.
    Idle,
}

struct Consumer {
    shared: Arc<Shared>,
    client: Option<Client>,
    receiver: Option<ServiceBusReceiver>,
    source: Source,
    prefetch: usize,
    commands_tx: mpsc::UnboundedSender<Command>,
    commands: mpsc::UnboundedReceiver<Command>,
    deliveries: Option<mpsc::Sender<Result<Delivery, Error>>>,
    locked: HashMap<u64, Locked>,
    next_id: u64,
    /// How many messages may still come on credit granted by a receive call that was given up
    /// (its credit may still be open) or ended by draining its credit (messages sent in answer
    /// wait in the client for the next receive, which returns them first).
    credit_outstanding: u32,
    /// The last receive found messages waiting: receive the next ones in a batch.
    backlog: bool,
    /// Set when a receive ended by draining the link's credit: how long the next single receive
    /// waits before it is given up and its credit granted again. It starts at
    /// [`receive_batch_wait`](crate::ServiceBusOptions::receive_batch_wait) and doubles with every
    /// receive that comes up empty, until it would reach the receive wait (see
    /// [`Consumer::receive_batch`]).
    wait_after_drain: Option<Duration>,
    /// Held from the moment the delivery stream is dropped until the consumer is gone.
    closing: Option<TaskTrackerToken>,
}

async fn stream_closed(deliveries: &Option<mpsc::Sender<Result<Delivery, Error>>>) {
    match deliveries {
        Some(tx) => tx.closed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Consumer {
    fn handed_out(&self) -> usize {
        self.locked
            .values()
            .filter(|l| l.abandon_at.is_none())
            .count()
    }

    async fn run(mut self) {
        debug!(source = %self.source, "consumer started");
        loop {
            if self.deliveries.is_none() && self.handed_out() == 0 {
                break;
            }
            if self.backlog && self.deliveries.is_some() && self.handed_out() < self.prefetch {
                self.receive_batch().await;
                continue;
            }
            let can_receive = self.deliveries.is_some() && self.handed_out() < self.prefetch;
            let next_timer = self.locked.values().filter_map(Locked::next_timer).min();
            let wait = self
                .wait_after_drain
                .unwrap_or(self.shared.options.receive_wait);
            let client_wait = self
                .shared
                .options
                .try_timeout
                .saturating_sub(CLIENT_WAIT_MARGIN);
            let Some(receiver) = self.receiver.as_mut() else {
                break;
            };
            let asked = AtomicBool::new(false);
            let receive = async {
                asked.store(true, Ordering::Relaxed);
                // Given up by us before the client's own wait ends: when that ends, the client
                // drains the link's credit, and a link drained this way was seen to deliver
                // nothing more (against the test broker). The credit stays open instead.
                tokio::time::timeout(
                    wait,
                    receiver.receive_message_with_max_wait_time(Some(client_wait)),
                )
                .await
            };
            let event = tokio::select! {
                biased;
                Some(command) = self.commands.recv() => Event::Command(command),
                () = stream_closed(&self.deliveries) => Event::StreamClosed,
                () = sleep_until(next_timer) => Event::Timer,
                received = receive, if can_receive => match received {
                    Ok(received) => Event::Received(received.map(|m| m.map(Box::new))),
                    Err(_) => Event::Idle,
                }
            };
            // A receive that was started but did not finish may have left its credit open; a
            // finished one used its credit up (or drained it when nothing came).
            if matches!(event, Event::Received(_)) {
                self.credit_outstanding = 0;
            } else if asked.load(Ordering::Relaxed) {
                self.credit_outstanding = 1;
            }
            match &event {
                Event::Idle => {
                    self.wait_after_drain = self.wait_after_drain.and_then(|wait| {
                        Some(wait * 2).filter(|&next| next < self.shared.options.receive_wait)
                    })
                }
                // The client's own wait ended: it drained the credit.
                Event::Received(Ok(None)) => {
                    self.wait_after_drain = Some(self.shared.options.receive_batch_wait);
                }
                Event::Received(_) => self.wait_after_drain = None,
                _ => {}
            }
            match &event {
                Event::Received(Ok(Some(_))) => self.backlog = true,
                Event::Received(_) | Event::Idle => self.backlog = false,
                _ => {}
            }
            match event {
                Event::Command(command) => self.on_command(command).await,
                Event::StreamClosed => {
                    debug!(source = %self.source, "delivery stream closed");
                    self.deliveries = None;
                }
                Event::Timer => self.on_timer().await,
                Event::Received(Ok(Some(message))) => self.on_message(*message),
                Event::Received(Ok(None)) | Event::Idle => {}
                Event::Received(Err(e)) => {
                    let error = self.shared.client_error(
                        e,
                        &format!("receiving from `{}`", self.source),
                        Some(("queue", self.source.endpoint_name())),
                    );
                    self.receive_failed(error);
                }
            }
        }
        self.close().await;
    }

    fn receive_failed(&mut self, error: Error) {
        warn!(source = %self.source, error = %error, "receiving failed; closing this consumer");
        self.backlog = false;
        if let Some(tx) = self.deliveries.take() {
            // The stream reports the error, then ends, and `Reopening` opens a new receiver;
            // this task stays until the deliveries out are settled.
            let _ = tx.try_send(Err(error));
        }
    }

    /// Receives as many messages as the worker can take now, in one call that is never given
    /// up half-way (the client keeps a batch's messages inside the call until it returns: given
    /// up, they would stay locked, unseen, until their locks ran out). The call ends once the
    /// batch is full or after [`receive_batch_wait`]; settlements and renewals wait for it, so
    /// those already asked for are carried out first. Every message it returns is handed out, or
    /// given back when the stream has closed meanwhile.
    ///
    /// A short batch ends with the client draining the credit without waiting for the broker's
    /// answer. Credit granted before that answer arrives is counted by the broker from a stale
    /// delivery count, as nothing, while the client believes it granted some: the link would
    /// stay silent for a whole receive wait. How long the answer takes is a round trip to the
    /// namespace, which the consumer does not know. So the single receives that follow a drain
    /// are given up and their credit granted again after a wait that starts at
    /// [`receive_batch_wait`] and doubles each time nothing came: a message sent after a drain
    /// waits at most about twice the round trip, and an idle link is asked again only a few
    /// times (about a dozen flows until the wait reaches the receive wait).
    ///
    /// [`receive_batch_wait`]: crate::ServiceBusOptions::receive_batch_wait
    async fn receive_batch(&mut self) {
        // Let the worker settle what it holds, then carry that out: it frees slots to fill.
        tokio::task::yield_now().await;
        while let Ok(command) = self.commands.try_recv() {
            self.on_command(command).await;
        }
        if self
            .deliveries
            .as_ref()
            .is_some_and(mpsc::Sender::is_closed)
        {
            debug!(source = %self.source, "delivery stream closed");
            self.deliveries = None;
        }
        if self
            .locked
            .values()
            .filter_map(Locked::next_timer)
            .min()
            .is_some_and(|at| at <= Instant::now())
        {
            self.on_timer().await;
        }
        let free = self.prefetch.saturating_sub(self.handed_out());
        if self.deliveries.is_none() || free == 0 {
            return;
        }
        let ask = u32::try_from(free).unwrap_or(u32::MAX);
        let Some(receiver) = self.receiver.as_mut() else {
            return;
        };
        let received = self
            .shared
            .bounded(
                "receiving a batch",
                receiver.receive_messages_with_max_wait_time(
                    ask,
                    Some(self.shared.options.receive_batch_wait),
                ),
            )
            .await;
        match received {
            Ok(Ok(messages)) => {
                // A full batch: more may be waiting. A short one ended by draining the credit.
                let full = messages.len() >= free;
                self.backlog = full;
                self.wait_after_drain = (!full).then_some(self.shared.options.receive_batch_wait);
                self.credit_outstanding = ask.saturating_sub(messages.len() as u32);
                for message in messages {
                    self.on_message(message);
                }
            }
            Ok(Err(e)) => {
                self.credit_outstanding = ask;
                let error = self.shared.client_error(
                    e,
                    &format!("receiving from `{}`", self.source),
                    Some(("queue", self.source.endpoint_name())),
                );
                self.receive_failed(error);
            }
            Err(timeout) => {
                self.credit_outstanding = ask;
                self.receive_failed(timeout);
            }
        }
    }

    fn on_message(&mut self, message: ServiceBusReceivedMessage) {
        let Some(locked) = Locked::new(message, &self.shared.clock) else {
            // Held in the client past its lock: the broker has made it available again.
            debug!(source = %self.source, "skipped a message whose lock had already run out");
            return;
        };
        let received = incoming::from_service_bus(&locked.message, self.source.is_dead_letters());
        let copy_id = ids::copy_id(
            locked.message.sequence_number(),
            received.message.id().as_str(),
        );
        let id = self.next_id;
        self.next_id += 1;
        self.locked.insert(id, locked);
        let settler = Settler::new(
            id,
            self.commands_tx.clone(),
            Arc::clone(&self.shared),
            self.source.clone(),
            copy_id,
        );
        let delivery = Delivery::new(received.message, self.source.clone(), settler)
            .with_problem(received.problem);
        let sent = match &self.deliveries {
            Some(tx) => tx.try_send(Ok(delivery)).map_err(|e| match e {
                mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d) => d,
            }),
            None => Err(Ok(delivery)),
        };
        // Never full (at most `prefetch` are out); closed means nobody will take it. Dropping
        // it gives it back through its settler.
        drop(sent);
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Settle { id, action, reply } => {
                let result = self.settle(id, action).await;
                let _ = reply.send(result);
            }
            Command::StreamDropped(token) => self.closing = Some(token),
            Command::Dropped { id } => {
                if self.locked.contains_key(&id) {
                    debug!(source = %self.source, "a delivery was dropped unsettled; abandoning it");
                    if let Err(e) = self.settle_now(id, Final::Abandon).await {
                        warn!(source = %self.source, error = %e, "could not abandon a dropped delivery; its lock will run out");
                    }
                }
            }
        }
    }

    async fn settle(&mut self, id: u64, action: Action) -> Result<(), Error> {
        match action {
            Action::Now(settlement) => self.settle_now(id, settlement).await,
            Action::AbandonAt(at, properties) => {
                let Some(locked) = self.locked.get_mut(&id) else {
                    return Err(unknown_delivery());
                };
                if locked.lock_lost() {
                    self.locked.remove(&id);
                    return Err(lock_lost(&self.source));
                }
                locked.abandon_at = Some((at, properties));
                Ok(())
            }
        }
    }

    async fn settle_now(&mut self, id: u64, settlement: Final) -> Result<(), Error> {
        let Some(locked) = self.locked.remove(&id) else {
            return Err(unknown_delivery());
        };
        let Some(receiver) = self.receiver.as_mut() else {
            return Err(Error::Closed);
        };
        locked
            .settle(settlement, receiver, &self.shared, &self.source)
            .await
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        let due_abandons: Vec<u64> = self
            .locked
            .iter()
            .filter(|(_, l)| l.abandon_at.as_ref().is_some_and(|(at, _)| *at <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due_abandons {
            self.abandon_held(id).await;
        }
        let due_renewals: Vec<u64> = self
            .locked
            .iter()
            .filter(|(_, l)| l.renew_at.is_some_and(|at| at <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due_renewals {
            self.renew(id).await;
        }
    }

    async fn renew(&mut self, id: u64) {
        if let (Some(locked), Some(receiver)) = (self.locked.get_mut(&id), self.receiver.as_mut()) {
            locked.renew(receiver, &self.shared, &self.source).await;
        }
    }

    /// Abandons a dead letter whose retry is due, with its new framework state.
    async fn abandon_held(&mut self, id: u64) {
        if let (Some(locked), Some(receiver)) = (self.locked.remove(&id), self.receiver.as_mut()) {
            locked
                .abandon_held(receiver, &self.shared, &self.source)
                .await;
        }
    }

    async fn close(mut self) {
        // Dead letters waiting for their retry are given back now, with their new state; a
        // consumer started later finds them early and parks them again.
        let held: Vec<u64> = self.locked.keys().copied().collect();
        for id in held {
            self.abandon_held(id).await;
        }
        let Some(mut receiver) = self.receiver.take() else {
            return;
        };
        if self.credit_outstanding > 0 {
            // Messages sent on credit still open, or in answer to a drain, would stay locked in
            // a receiver that is going away until their locks run out: take them (one receive
            // for as many as may have come, which ends by draining the credit when fewer come)
            // and give them back. Only once: each receive grants credit again, and the messages
            // just given back would be sent straight back.
            if let Ok(Ok(messages)) = self
                .shared
                .bounded(
                    "draining a receiver",
                    receiver.receive_messages_with_max_wait_time(
                        self.credit_outstanding,
                        Some(DRAIN_WAIT),
                    ),
                )
                .await
            {
                for message in &messages {
                    let _ = self
                        .shared
                        .bounded("abandoning", receiver.abandon_message(message, None))
                        .await;
                }
            }
        }
        if let Err(e) = self
            .shared
            .bounded("closing a receiver", receiver.dispose())
            .await
            .and_then(|r| r.map_err(|e| self.shared.client_error(e, "closing a receiver", None)))
        {
            info!(source = %self.source, error = %e, "could not close the receiver cleanly");
        }
        if let Some(client) = self.client.take() {
            self.shared.dispose_client(client).await;
        }
        debug!(source = %self.source, "consumer closed");
    }
}

fn unknown_delivery() -> Error {
    Error::other(
        "the delivery is no longer held by its consumer (its lock ran out, or it was \
                  settled)"
            .to_owned(),
    )
}
