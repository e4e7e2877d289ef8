//! AMQP plumbing: connections, sessions and links on top of `fe2o3-amqp`'s acceptor API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SaslAcceptor,
    SessionAcceptor, SupportedReceiverSettleModes, sasl_acceptor::SaslServerFrame,
};
use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::link::{Receiver, SendError, Sender};
use fe2o3_amqp::types::definitions::{
    AmqpError, Error as AmqpErrorFrame, LinkError, ReceiverSettleMode, Role,
};
use fe2o3_amqp::types::messaging::message::__private::Deserializable;
use fe2o3_amqp::types::messaging::{Body, Data, Outcome, Source, Target, TargetArchetype};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{Array, SimpleValue, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use serde_amqp::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::address::{Node, node};
use crate::management::{handle_cbs, handle_management};
use crate::shared::Shared;
use crate::socket::{Applied, ClientStream, Tap};
use crate::state::{LockError, Msg, ReceiveMode, Refusal, Settlement, now_ms};

/// Message format of a Service Bus batch: each data section is one whole message.
const BATCH_FORMAT: u32 = 0x8001_3700;
/// How long a delivery link holds a picked message while it waits for link credit.
const CREDIT_WAIT: Duration = Duration::from_millis(200);
/// How long a request waits for its reply link to be attached.
const REPLY_LINK_WAIT: Duration = Duration::from_secs(10);
/// How long the broker waits for the peer's detach when it refuses a link.
const DETACH_WAIT: Duration = Duration::from_secs(5);

/// Accepts SASL ANONYMOUS and PLAIN with any credentials: the broker is for tests.
#[derive(Debug, Clone, Default)]
struct AnyCredentials;

impl SaslAcceptor for AnyCredentials {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from("ANONYMOUS"), Symbol::from("PLAIN")])
    }

    fn on_init(&mut self, _init: SaslInit) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        })
    }
}

/// Expires locks and releases scheduled messages on time.
pub(crate) async fn run_timers(shared: Arc<Shared>) {
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = {
            let mut state = shared.state();
            let changed = state.process_due(Instant::now(), now_ms());
            let next = state.next_deadline();
            drop(state);
            if changed {
                shared.changed.notify_waiters();
            }
            next
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = &mut notified => {}
                }
            }
            None => notified.await,
        }
    }
}

/// Accepts connections until the task is aborted; dropping it ends every connection task.
pub(crate) async fn run_listener(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    connections.spawn(handle_connection(stream, shared.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Reply links of one connection, by their target address (the requests' `reply-to`).
#[derive(Debug, Default)]
struct ReplyLinks {
    links: Mutex<HashMap<String, mpsc::UnboundedSender<Msg>>>,
    attached: Notify,
}

impl ReplyLinks {
    fn register(&self, address: String, tx: mpsc::UnboundedSender<Msg>) {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(address, tx);
        self.attached.notify_waiters();
    }

    /// Forgets the link of `address` if it is still the one behind `tx`.
    fn remove(&self, address: &str, tx: &mpsc::UnboundedSender<Msg>) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if links
            .get(address)
            .is_some_and(|current| current.same_channel(tx))
        {
            links.remove(address);
        }
    }

    /// Sends `reply` on the link whose target is `address`, waiting a while for it to attach.
    async fn send(&self, address: &str, reply: Msg) {
        let deadline = Instant::now() + REPLY_LINK_WAIT;
        loop {
            let notified = self.attached.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let link = self
                .links
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(address)
                .cloned();
            if let Some(link) = link {
                let _ = link.send(reply);
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!(address, "no reply link attached; dropping management reply");
                return;
            }
        }
    }
}

async fn handle_connection(stream: TcpStream, shared: Arc<Shared>) {
    let acceptor = ConnectionAcceptor::builder()
        .container_id("servicebus-test-broker")
        .sasl_acceptor(AnyCredentials)
        .build();
    let (stream, tap) = ClientStream::new(stream);
    let mut connection = match acceptor.accept(stream).await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%error, "connection not opened");
            return;
        }
    };
    let replies = Arc::new(ReplyLinks::default());
    let mut sessions = JoinSet::new();
    let session_acceptor = SessionAcceptor::new();
    while let Some(incoming) = connection.next_incoming_session().await {
        while sessions.try_join_next().is_some() {}
        match session_acceptor
            .accept_incoming_session(incoming, &mut connection)
            .await
        {
            Ok(session) => {
                sessions.spawn(handle_session(
                    session,
                    shared.clone(),
                    replies.clone(),
                    tap.clone(),
                ));
            }
            Err(error) => {
                tracing::debug!(%error, "session not begun");
                break;
            }
        }
    }
    let _ = connection.close().await;
}

/// What an attach asks for, once checked against the broker's entities.
enum Route {
    /// The `$cbs` node; the request link's target address.
    Cbs(String),
    /// The management node of an entity; the entity and the request link's target address.
    Management(String, String),
    Ingress(String),
    Egress(String, ReceiveMode),
    /// A link that receives replies: the `reply-to` values it answers to (its target address
    /// and its name).
    ReplyLink(Vec<String>),
    /// Refused with this error.
    Refuse(AmqpError, String),
}

fn route(attach: &Attach, shared: &Shared) -> Route {
    let state = shared.state();
    match attach.role {
        // The peer sends: we receive on the target address.
        Role::Sender => {
            let address = match attach.target.as_deref() {
                Some(TargetArchetype::Target(target)) => target.address.clone(),
                _ => None,
            };
            let Some(address) = address else {
                return Route::Refuse(
                    AmqpError::NotFound,
                    "a sending link needs a target address".to_owned(),
                );
            };
            match node(&address) {
                Node::Cbs => Route::Cbs(address),
                Node::Management(entity)
                    if state.is_sendable(&entity) || state.is_receivable(&entity) =>
                {
                    Route::Management(entity, address)
                }
                Node::Entity(entity) if state.is_sendable(&entity) => Route::Ingress(entity),
                _ => Route::Refuse(
                    AmqpError::NotFound,
                    format!("The messaging entity '{address}' could not be found."),
                ),
            }
        }
        // The peer receives: we send from the source address.
        Role::Receiver => {
            let address = attach.source.as_ref().and_then(|s| s.address.clone());
            let Some(address) = address else {
                return Route::Refuse(
                    AmqpError::NotFound,
                    "a receiving link needs a source address".to_owned(),
                );
            };
            // A reply link is found by its target address or by its name: the JavaScript SDK
            // sets `reply-to` to the link's name and leaves the target without an address, and
            // Service Bus answers it there.
            let target_address = match attach.target.as_deref() {
                Some(TargetArchetype::Target(target)) => target.address.clone(),
                _ => None,
            };
            let reply_keys: Vec<String> = target_address
                .into_iter()
                .chain(std::iter::once(attach.name.clone()))
                .collect();
            match node(&address) {
                Node::Cbs => Route::ReplyLink(reply_keys),
                Node::Management(entity)
                    if state.is_sendable(&entity) || state.is_receivable(&entity) =>
                {
                    Route::ReplyLink(reply_keys)
                }
                Node::Entity(entity) if state.is_receivable(&entity) && wants_session(attach) => {
                    Route::Refuse(
                        AmqpError::NotAllowed,
                        format!(
                            "The messaging entity '{address}' does not require sessions: a \
                             session receiver cannot be created on it (the test broker has no \
                             sessions)."
                        ),
                    )
                }
                Node::Entity(entity) if state.is_receivable(&entity) => {
                    let mode = if attach.snd_settle_mode
                        == fe2o3_amqp::types::definitions::SenderSettleMode::Settled
                    {
                        ReceiveMode::ReceiveAndDelete
                    } else {
                        ReceiveMode::PeekLock
                    };
                    Route::Egress(entity, mode)
                }
                _ => Route::Refuse(
                    AmqpError::NotFound,
                    format!("The messaging entity '{address}' could not be found."),
                ),
            }
        }
    }
}

/// Whether a receiving link asks for a session (Service Bus `com.microsoft:session-filter`).
fn wants_session(attach: &Attach) -> bool {
    attach
        .source
        .as_ref()
        .and_then(|source| source.filter.as_ref())
        .is_some_and(|filter| {
            filter
                .keys()
                .any(|key| key.as_str() == "com.microsoft:session-filter")
        })
}

async fn handle_session(
    mut session: ListenerSessionHandle,
    shared: Arc<Shared>,
    replies: Arc<ReplyLinks>,
    tap: Arc<Tap>,
) {
    let acceptor = LinkAcceptor::builder()
        .verify_incoming_source(false)
        .verify_incoming_target(false)
        .build();
    // Links on which the broker receives (sends, requests) settle each transfer at once, in
    // rcv-settle-mode first, whatever mode the client asks for, as Service Bus does: a client
    // that asked for mode second (the Python SDK) waits for a settled disposition, which
    // `fe2o3-amqp`'s receiver in mode second never sends.
    let receiving_acceptor = LinkAcceptor::builder()
        .verify_incoming_source(false)
        .verify_incoming_target(false)
        .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(ReceiverSettleMode::First)
        .build();
    let mut links = JoinSet::new();
    while let Some(mut attach) = session.next_incoming_attach().await {
        while links.try_join_next().is_some() {}
        let route = route(&attach, &shared);
        if let Route::Refuse(..) = route {
            // Answer with a null terminus (the acceptor's dynamic-node hook yields none), then
            // detach with `amqp:not-found`: the peer's attach fails with that error.
            match attach.role {
                Role::Sender => {
                    attach.target = Some(Box::new(TargetArchetype::Target(Target {
                        dynamic: true,
                        ..Target::default()
                    })));
                }
                Role::Receiver => {
                    attach.source = Some(Box::new(Source {
                        dynamic: true,
                        ..Source::default()
                    }));
                }
            }
        }
        let link_acceptor = match attach.role {
            Role::Sender => &receiving_acceptor,
            Role::Receiver => &acceptor,
        };
        let link = match link_acceptor
            .accept_incoming_attach(attach, &mut session)
            .await
        {
            Ok(link) => link,
            Err(error) => {
                tracing::debug!(%error, "link not attached");
                continue;
            }
        };
        let shared = shared.clone();
        let replies = replies.clone();
        match (route, link) {
            (Route::Refuse(condition, description), link) => {
                let error = AmqpErrorFrame::new(condition, description, None);
                links.spawn(async move {
                    // Bounded: a peer that never answers the detach must not keep the task.
                    let _ = match link {
                        LinkEndpoint::Sender(sender) => {
                            tokio::time::timeout(DETACH_WAIT, sender.close_with_error(error))
                                .await
                                .map(drop)
                        }
                        LinkEndpoint::Receiver(receiver) => {
                            tokio::time::timeout(DETACH_WAIT, receiver.close_with_error(error))
                                .await
                                .map(drop)
                        }
                    };
                });
            }
            (Route::Cbs(address), LinkEndpoint::Receiver(receiver)) => {
                links.spawn(request_link(receiver, shared, replies, None, address));
            }
            (Route::Management(entity, address), LinkEndpoint::Receiver(receiver)) => {
                links.spawn(request_link(
                    receiver,
                    shared,
                    replies,
                    Some(entity),
                    address,
                ));
            }
            (Route::Ingress(entity), LinkEndpoint::Receiver(receiver)) => {
                links.spawn(ingress_link(receiver, shared, entity));
            }
            (Route::Egress(store, mode), LinkEndpoint::Sender(sender)) => {
                links.spawn(egress_link(sender, shared, store, mode, tap.clone()));
            }
            (Route::ReplyLink(keys), LinkEndpoint::Sender(sender)) => {
                links.spawn(reply_link(sender, replies, keys));
            }
            (_, _) => tracing::warn!("link role does not match its route"),
        }
    }
    let _ = session.end().await;
}

/// Receives management or `$cbs` requests and queues one reply per request, in order.
///
/// A request without `reply-to` is answered on the reply link whose target is the node's
/// address (`node_address`, the request link's target), as Service Bus does: the Python and
/// .NET SDKs send `put-token` that way, with a reply link that targets `$cbs`.
async fn request_link(
    mut receiver: Receiver,
    shared: Arc<Shared>,
    replies: Arc<ReplyLinks>,
    entity: Option<String>,
    node_address: String,
) {
    loop {
        let delivery = match receiver.recv::<Body<Value>>().await {
            Ok(delivery) => delivery,
            Err(_) => return,
        };
        if receiver.accept(&delivery).await.is_err() {
            return;
        }
        let request = delivery.into_message();
        let reply = match &entity {
            None => handle_cbs(&request),
            Some(entity) => shared.update(|state| handle_management(state, entity, &request)),
        };
        let reply_to = request
            .properties
            .as_ref()
            .and_then(|p| p.reply_to.clone())
            .unwrap_or_else(|| node_address.clone());
        replies.send(&reply_to, reply.into_message(&request)).await;
    }
}

/// Sends the replies to requests whose `reply-to` is one of `keys`.
async fn reply_link(mut sender: Sender, replies: Arc<ReplyLinks>, keys: Vec<String>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    for key in &keys {
        replies.register(key.clone(), tx.clone());
    }
    loop {
        let next = tokio::select! {
            reply = rx.recv() => reply,
            _ = sender.on_detach() => None,
        };
        let Some(reply) = next else { break };
        if sender.send_batchable(reply).await.is_err() {
            break;
        }
    }
    for key in &keys {
        replies.remove(key, &tx);
    }
}

/// Accepts messages sent to a queue or topic; a refused send is rejected with an AMQP error.
async fn ingress_link(mut receiver: Receiver, shared: Arc<Shared>, entity: String) {
    loop {
        let delivery = match receiver.recv::<Body<Value>>().await {
            Ok(delivery) => delivery,
            Err(_) => return,
        };
        let messages = if *delivery.message_format() == Some(BATCH_FORMAT) {
            split_batch(delivery.message())
        } else {
            Some(vec![delivery.message().clone()])
        };
        let result = match messages {
            Some(messages) => {
                shared.update(|state| state.send(&entity, messages, Instant::now(), now_ms()))
            }
            None => Err(Refusal::Rejected("batch could not be decoded".to_owned())),
        };
        let disposition = match result {
            Ok(_) => receiver.accept(&delivery).await,
            Err(refusal) => {
                let error = match refusal {
                    Refusal::NotFound(entity) => AmqpErrorFrame::new(
                        AmqpError::NotFound,
                        format!("The messaging entity '{entity}' could not be found."),
                        None,
                    ),
                    Refusal::TooLarge { size, max } => AmqpErrorFrame::new(
                        LinkError::MessageSizeExceeded,
                        format!("The message of {size} bytes exceeds the limit of {max} bytes."),
                        None,
                    ),
                    // Service Bus does not say "too large" here: it answers as for any
                    // internal failure (reported in Azure/azure-sdk-for-net#15325), an answer
                    // that invites retrying what can never succeed.
                    Refusal::HeadersTooLarge { size, max } => AmqpErrorFrame::new(
                        AmqpError::InternalError,
                        format!(
                            "The service was unable to process the request; please retry the \
                             operation. (header sections of {size} bytes, limit {max} bytes)"
                        ),
                        None,
                    ),
                    Refusal::Rejected(reason) => {
                        AmqpErrorFrame::new(AmqpError::NotAllowed, reason, None)
                    }
                };
                receiver.reject(&delivery, error).await
            }
        };
        if disposition.is_err() {
            return;
        }
    }
}

fn split_batch(envelope: &Msg) -> Option<Vec<Msg>> {
    let Body::Data(sections) = &envelope.body else {
        return None;
    };
    sections
        .iter()
        .map(|Data(bytes)| {
            serde_amqp::from_slice::<Deserializable<Msg>>(bytes.as_ref())
                .ok()
                .map(|d| d.0)
        })
        .collect()
}

enum EgressEvent {
    Changed,
    Detached,
}

/// Delivers messages of a store to a client receiver.
///
/// The acceptor's sender does not expose link credit, so a picked message is held for at
/// most [`CREDIT_WAIT`] while the transfer waits for credit; then it is put back unchanged
/// (no delivery counted) and the link waits for a change or the same time before trying again,
/// which gives other receivers of the store their turn.
async fn egress_link(
    mut sender: Sender,
    shared: Arc<Shared>,
    store: String,
    mode: ReceiveMode,
    tap: Arc<Tap>,
) {
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let picked = shared.state().pick(&store, mode, now_ms());
        let Some(picked) = picked else {
            let event = tokio::select! {
                () = &mut notified => EgressEvent::Changed,
                _ = sender.on_detach() => EgressEvent::Detached,
            };
            match event {
                EgressEvent::Changed => continue,
                EgressEvent::Detached => return,
            }
        };
        let sequence_number = picked.sequence_number;
        let token = picked.lock_token;
        // Puts the message back if this task ends (or is aborted) before the transfer.
        let mut in_flight = InFlight {
            shared: &shared,
            store: &store,
            sequence_number,
            armed: true,
        };
        let sendable = Sendable::builder().message(picked.message).build();
        match tokio::time::timeout(CREDIT_WAIT, sender.send_batchable(sendable)).await {
            Ok(Ok(outcome)) => {
                in_flight.armed = false;
                shared.update(|state| {
                    state.transferred(
                        &store,
                        sequence_number,
                        token,
                        mode,
                        Instant::now(),
                        now_ms(),
                    );
                });
                if mode == ReceiveMode::PeekLock {
                    tokio::spawn(settle_on_outcome(
                        shared.clone(),
                        tap.clone(),
                        token,
                        outcome,
                    ));
                }
            }
            Ok(Err(_)) => return,
            Err(_) => {
                drop(in_flight);
                let notified = shared.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let event = tokio::select! {
                    () = &mut notified => EgressEvent::Changed,
                    () = tokio::time::sleep(CREDIT_WAIT) => EgressEvent::Changed,
                    _ = sender.on_detach() => EgressEvent::Detached,
                };
                if let EgressEvent::Detached = event {
                    return;
                }
            }
        }
    }
}

/// A picked message that has not been transferred yet.
struct InFlight<'a> {
    shared: &'a Shared,
    store: &'a str,
    sequence_number: i64,
    armed: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared
                .update(|state| state.not_transferred(self.store, self.sequence_number));
        }
    }
}

/// Applies the client's disposition of a peek-lock delivery and confirms it to the client.
async fn settle_on_outcome(
    shared: Arc<Shared>,
    tap: Arc<Tap>,
    token: [u8; 16],
    outcome: DeliveryFut<Result<Outcome, SendError>>,
) {
    let settlement = match outcome.await {
        Ok(Outcome::Accepted(_)) => Settlement::Complete,
        Ok(Outcome::Released(_)) => Settlement::Release,
        Ok(Outcome::Modified(modified)) => {
            let properties = modified
                .message_annotations
                .map(|fields| properties_to_modify(fields, &[]))
                .unwrap_or_default();
            if modified.undeliverable_here == Some(true) {
                Settlement::Defer(properties)
            } else {
                Settlement::Abandon(properties)
            }
        }
        Ok(Outcome::Rejected(rejected)) => {
            let error = rejected.error;
            let info = |key: &str| -> Option<String> {
                let info = error.as_ref()?.info.as_ref()?;
                match info.get(&Symbol::from(key))? {
                    Value::String(s) => Some(s.clone()),
                    _ => None,
                }
            };
            let (reason, description) = (
                info(crate::state::DEAD_LETTER_REASON),
                info(crate::state::DEAD_LETTER_DESCRIPTION),
            );
            let is_dead_letter = error.as_ref().is_some_and(|e| {
                matches!(&e.condition, fe2o3_amqp::types::definitions::ErrorCondition::Custom(c)
                    if c.as_str() == "com.microsoft:dead-letter")
            });
            if is_dead_letter {
                // Every other entry of the error's info is a property to modify.
                let skip = [
                    crate::state::DEAD_LETTER_REASON,
                    crate::state::DEAD_LETTER_DESCRIPTION,
                ];
                let properties = error
                    .and_then(|e| e.info)
                    .map(|info| properties_to_modify(*info, &skip))
                    .unwrap_or_default();
                Settlement::DeadLetter {
                    reason,
                    description,
                    properties,
                }
            } else {
                Settlement::DeadLetter {
                    reason: error.as_ref().map(|e| format!("{:?}", e.condition)),
                    description: error.as_ref().and_then(|e| e.description.clone()),
                    properties: Vec::new(),
                }
            }
        }
        // The link or session ended before a disposition: the lock runs out by itself.
        Err(_) => {
            tap.settled(token, Applied::Forget);
            return;
        }
    };
    let applied = match shared.update(|state| state.settle(token, settlement, Instant::now())) {
        Ok(()) => Applied::Yes,
        Err(LockError::Lost) => Applied::LockLost,
        Err(LockError::NotAllowed(description)) => Applied::NotAllowed(description),
    };
    tap.settled(token, applied);
}

/// The application properties a client asked to modify while settling (message annotations of
/// `modified`, info entries of a dead-letter `rejected`), leaving out `skip` and values that are
/// not simple.
fn properties_to_modify(
    fields: impl IntoIterator<Item = (Symbol, Value)>,
    skip: &[&str],
) -> Vec<(String, SimpleValue)> {
    fields
        .into_iter()
        .filter(|(key, _)| !skip.contains(&key.as_str()))
        .filter_map(|(key, value)| {
            SimpleValue::try_from(value)
                .ok()
                .map(|value| (key.0, value))
        })
        .collect()
}
