//! A session: its links are accepted or refused by their route, and each accepted link gets a
//! task of its own.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SupportedReceiverSettleModes,
};
use fe2o3_amqp::types::definitions::{Error as AmqpErrorFrame, ReceiverSettleMode, Role};
use fe2o3_amqp::types::messaging::{Source, Target, TargetArchetype};
use tokio::task::JoinSet;

use crate::shared::Shared;
use crate::socket::Tap;

use super::egress::egress_link;
use super::ingress::ingress_link;
use super::requests::{ReplyLinks, reply_link, request_link};
use super::route::{Route, route};

/// How long the broker waits for the peer's detach when it refuses a link.
const DETACH_WAIT: Duration = Duration::from_secs(5);

pub(super) async fn handle_session(
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
