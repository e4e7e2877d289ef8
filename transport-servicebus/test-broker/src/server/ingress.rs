//! Links on which clients send to a queue or topic: batches split into their messages, and a
//! refused send rejected with the error Service Bus gives.

use std::sync::Arc;

use fe2o3_amqp::link::Receiver;
use fe2o3_amqp::types::definitions::{AmqpError, Error as AmqpErrorFrame, LinkError};
use fe2o3_amqp::types::messaging::message::__private::Deserializable;
use fe2o3_amqp::types::messaging::{Body, Data};
use serde_amqp::Value;
use tokio::time::Instant;

use crate::shared::Shared;
use crate::state::{Msg, Refusal, now_ms};

/// Message format of a Service Bus batch: each data section is one whole message.
const BATCH_FORMAT: u32 = 0x8001_3700;

/// Accepts messages sent to a queue or topic; a refused send is rejected with an AMQP error.
pub(super) async fn ingress_link(mut receiver: Receiver, shared: Arc<Shared>, entity: String) {
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
