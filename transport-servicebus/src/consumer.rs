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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use azservicebus::primitives::service_bus_received_message::ServiceBusReceivedMessage;
use azservicebus::receiver::DeadLetterOptions;
use azservicebus::{ServiceBusReceiver, ServiceBusReceiverOptions, SubQueue};
use fe2o3_amqp_types::primitives::OrderedMap;
use futures::StreamExt;
use redeliver_core::clock::until;
use redeliver_core::{
    Clock, ConsumeOptions, Delivery, DeliveryStream, Error, Message, Settle, Source, Stored,
};
use serde_amqp::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::convert::ids::copy_id;
use crate::convert::incoming::from_service_bus;
use crate::convert::outgoing::framework_properties;
use crate::convert::time::to_utc;
use crate::shared::{Client, Shared};

/// How long closing waits for a drained credit to be answered.
const DRAIN_WAIT: Duration = Duration::from_millis(50);
/// How much shorter than the try time-out the client's own receive wait is, so that its
/// try time-out never ends a receive first.
const CLIENT_WAIT_MARGIN: Duration = Duration::from_millis(500);

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
    let prefetch = options.prefetch.max(1);
    let (deliveries_tx, mut deliveries_rx) = mpsc::channel(prefetch);
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
        after_drain: false,
    };
    tokio::spawn(consumer.run());
    let stream = futures::stream::poll_fn(move |cx| deliveries_rx.poll_recv(cx));
    Ok(Box::pin(stream))
}

/// A delivery this consumer holds the lock of.
struct Locked {
    message: ServiceBusReceivedMessage,
    /// When the lock runs out, on the local clock.
    expires: Instant,
    /// When to renew next; `None` once renewing failed (the broker will deliver it again).
    renew_at: Option<Instant>,
    /// A dead letter kept locked until its retry is due, then abandoned with these
    /// properties; it no longer counts as handed out.
    abandon_at: Option<(Instant, OrderedMap<String, Value>)>,
}

impl Locked {
    fn new(message: ServiceBusReceivedMessage, clock: &Clock) -> Option<Self> {
        let remaining = message
            .locked_until()
            .map(|at| until(clock.now(), to_utc(at)))
            .unwrap_or_default();
        if remaining.is_zero() {
            return None;
        }
        let now = Instant::now();
        Some(Locked {
            message,
            expires: now + remaining,
            renew_at: Some(now + remaining / 2),
            abandon_at: None,
        })
    }

    fn next_timer(&self) -> Option<Instant> {
        let abandon = self.abandon_at.as_ref().map(|(at, _)| *at);
        match (self.renew_at, abandon) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn lock_lost(&self) -> bool {
        Instant::now() >= self.expires
    }
}

/// What a delivery asks the consumer to do.
enum Action {
    /// Settle now.
    Now(Final),
    /// Keep the lock until `at`, then abandon with these properties.
    AbandonAt(Instant, OrderedMap<String, Value>),
}

/// A settlement carried out on the receiver.
enum Final {
    Complete,
    Abandon,
    DeadLetter(DeadLetterOptions),
}

enum Command {
    Settle {
        id: u64,
        action: Action,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// The delivery was dropped (or its settlement abandoned) without settling: give it back.
    Dropped { id: u64 },
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
    /// The last batch ended by draining its credit: give the next single receive up early and
    /// grant its credit again (see [`Consumer::receive_batch`]).
    after_drain: bool,
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
            let wait = if self.after_drain {
                self.shared.options.receive_batch_wait
            } else {
                self.shared.options.receive_wait
            };
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
            if matches!(event, Event::Received(_) | Event::Idle) {
                self.after_drain = false;
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
    /// delivery count and can come to nothing (seen against the test broker: the link then
    /// stayed silent for a whole receive wait). So the single receive that follows is given up
    /// after [`receive_batch_wait`] and its credit granted again.
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
                self.after_drain = !full;
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
        let received = from_service_bus(&locked.message, self.source.is_dead_letters());
        let copy_id = copy_id(
            locked.message.sequence_number(),
            received.message.id().as_str(),
        );
        let id = self.next_id;
        self.next_id += 1;
        self.locked.insert(id, locked);
        let settler = Settler {
            id,
            commands: Some(self.commands_tx.clone()),
            shared: Arc::clone(&self.shared),
            source: self.source.clone(),
            copy_id,
        };
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
        let lost = locked.lock_lost();
        let message = &locked.message;
        let (what, result) = match settlement {
            Final::Complete => (
                "completing",
                self.shared
                    .bounded("completing a delivery", receiver.complete_message(message))
                    .await,
            ),
            Final::Abandon => (
                "abandoning",
                self.shared
                    .bounded(
                        "abandoning a delivery",
                        receiver.abandon_message(message, None),
                    )
                    .await,
            ),
            Final::DeadLetter(options) => (
                "dead-lettering",
                self.shared
                    .bounded(
                        "dead-lettering a delivery",
                        receiver.dead_letter_message(message, options),
                    )
                    .await,
            ),
        };
        match result {
            Ok(Ok(())) if lost => Err(lock_lost(&self.source)),
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.shared.client_error(
                e,
                &format!("{what} a delivery from `{}`", self.source),
                None,
            )),
            Err(timeout) => Err(timeout),
        }
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
        let (Some(locked), Some(receiver)) = (self.locked.get_mut(&id), self.receiver.as_mut())
        else {
            return;
        };
        let renewed = self
            .shared
            .bounded(
                "renewing a lock",
                receiver.renew_message_lock(&mut locked.message),
            )
            .await;
        let remaining = locked
            .message
            .locked_until()
            .map(|at| until(self.shared.clock.now(), to_utc(at)))
            .unwrap_or_default();
        match renewed {
            Ok(Ok(())) if !remaining.is_zero() => {
                let now = Instant::now();
                locked.expires = now + remaining;
                locked.renew_at = Some(now + remaining / 2);
                debug!(source = %self.source, ?remaining, "lock renewed");
            }
            outcome => {
                let error = match outcome {
                    Ok(Ok(())) => "the renewed lock had already run out".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                warn!(
                    source = %self.source,
                    message_id = ?locked.message.message_id(),
                    error,
                    "could not renew a lock; the broker will deliver the message again when it runs out"
                );
                locked.renew_at = None;
            }
        }
    }

    /// Abandons a dead letter whose retry is due, with its new framework state.
    async fn abandon_held(&mut self, id: u64) {
        let (Some(locked), Some(receiver)) = (self.locked.remove(&id), self.receiver.as_mut())
        else {
            return;
        };
        let properties = locked.abandon_at.map(|(_, p)| p);
        let result = self
            .shared
            .bounded(
                "abandoning a dead letter",
                receiver.abandon_message(&locked.message, properties),
            )
            .await;
        if !matches!(result, Ok(Ok(()))) {
            warn!(source = %self.source, "could not abandon a dead letter whose retry is due; its lock will run out");
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
    Error::Other {
        message: "the delivery is no longer held by its consumer (its lock ran out, or it was \
                  settled)"
            .to_owned(),
        source: None,
    }
}

fn lock_lost(source: &Source) -> Error {
    Error::Other {
        message: format!(
            "the lock of a delivery from `{source}` ran out before it was settled; the broker \
             delivers the message again"
        ),
        source: None,
    }
}

/// Settles one delivery through its consumer. Dropped unsettled (or with its settlement
/// abandoned half-way), it asks the consumer to abandon the delivery.
struct Settler {
    id: u64,
    commands: Option<mpsc::UnboundedSender<Command>>,
    shared: Arc<Shared>,
    source: Source,
    /// The native id of the copy a retry or park of this delivery sends.
    copy_id: String,
}

impl Drop for Settler {
    fn drop(&mut self) {
        if let Some(commands) = self.commands.take() {
            let _ = commands.send(Command::Dropped { id: self.id });
        }
    }
}

impl Settler {
    /// Asks the consumer to carry out `action`; the delivery is settled by it, whatever the
    /// answer (a second command is refused).
    async fn command(&mut self, action: Action) -> Result<(), Error> {
        let commands = self.commands.take().ok_or(Error::Closed)?;
        let (reply, answer) = oneshot::channel();
        commands
            .send(Command::Settle {
                id: self.id,
                action,
                reply,
            })
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }
}

#[async_trait]
impl Settle for Settler {
    async fn remove(&mut self) -> Result<(), Error> {
        self.command(Action::Now(Final::Complete)).await
    }

    async fn give_back(&mut self) -> Result<(), Error> {
        self.command(Action::Now(Final::Abandon)).await
    }

    async fn store_copy(&mut self, next: &Message) -> Result<Stored, Error> {
        if self.source.is_dead_letters() {
            // A dead-letter sub-queue cannot be sent to: keep this dead letter locked until
            // its not-before, then abandon it with its new state.
            let at = due_instant(next, &self.shared.clock);
            self.command(Action::AbandonAt(at, framework_properties(next)))
                .await?;
            return Ok(Stored::Moved);
        }
        let queue = self.source.endpoint_name();
        self.shared
            .send_entity(queue, "queue", next, Some(&self.copy_id))
            .await?;
        Ok(Stored::Copy)
    }

    async fn store_dead_letter(&mut self, dead: &Message) -> Result<Stored, Error> {
        if self.source.is_dead_letters() {
            return Err(Error::invalid_message(format!(
                "message {} is already a dead letter and cannot be dead-lettered again",
                dead.id(),
            )));
        }
        let info = dead.dead_letter();
        let options = DeadLetterOptions {
            dead_letter_reason: info.map(|i| i.reason.clone()),
            dead_letter_error_description: info.and_then(|i| i.description.clone()),
            properties_to_modify: Some(framework_properties(dead)),
        };
        self.command(Action::Now(Final::DeadLetter(options)))
            .await?;
        Ok(Stored::Moved)
    }
}

/// The local instant of `message`'s not-before (now if it has none).
fn due_instant(message: &Message, clock: &Clock) -> Instant {
    let wait = message
        .not_before()
        .map(|at| until(clock.now(), at))
        .unwrap_or_default();
    Instant::now() + wait
}
