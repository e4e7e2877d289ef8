//! Which entity an attach asks for, checked against the broker's entities: the `$cbs` node, a
//! management node, a queue or topic to send to, a store to receive from, or a refusal.

use fe2o3_amqp::types::definitions::{AmqpError, Role};
use fe2o3_amqp::types::messaging::TargetArchetype;
use fe2o3_amqp::types::performatives::Attach;

use crate::address::{Node, node};
use crate::shared::Shared;
use crate::state::ReceiveMode;

/// What an attach asks for, once checked against the broker's entities.
pub(super) enum Route {
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

pub(super) fn route(attach: &Attach, shared: &Shared) -> Route {
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
