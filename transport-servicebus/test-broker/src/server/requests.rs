//! Request/response links: management and `$cbs` requests are answered once each, in order,
//! on the reply link their `reply-to` names.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::types::messaging::Body;
use serde_amqp::Value;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::management::{handle_cbs, handle_management};
use crate::shared::Shared;
use crate::state::Msg;

/// How long a request waits for its reply link to be attached.
const REPLY_LINK_WAIT: Duration = Duration::from_secs(10);

/// Reply links of one connection, by their target address (the requests' `reply-to`).
#[derive(Debug, Default)]
pub(super) struct ReplyLinks {
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

/// Receives management or `$cbs` requests and queues one reply per request, in order.
///
/// A request without `reply-to` is answered on the reply link whose target is the node's
/// address (`node_address`, the request link's target), as Service Bus does: the Python and
/// .NET SDKs send `put-token` that way, with a reply link that targets `$cbs`.
pub(super) async fn request_link(
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
pub(super) async fn reply_link(mut sender: Sender, replies: Arc<ReplyLinks>, keys: Vec<String>) {
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
