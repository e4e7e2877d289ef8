//! Browsing an endpoint's dead letters without taking them: Service Bus peek, on
//! `<queue>/$DeadLetterQueue`. A peek locks nothing and moves nothing, so a browse leaves every
//! dead letter where it was; dead letters locked by a consumer at the time are still shown.

use std::sync::Arc;

use azservicebus::{ServiceBusReceiverOptions, SubQueue};
use redeliver_core::{Error, Message};

use crate::convert::incoming::from_amqp;
use crate::shared::Shared;

/// How many messages one peek asks for.
const PAGE: usize = 250;

/// Up to `max` dead letters of `endpoint`, oldest first (all of them with `None`).
pub(crate) async fn dead_letters(
    shared: &Arc<Shared>,
    endpoint: &str,
    max: Option<usize>,
) -> Result<Vec<Message>, Error> {
    let mut client = shared.new_client().await?;
    let options = ServiceBusReceiverOptions {
        prefetch_count: 0,
        sub_queue: SubQueue::DeadLetter,
        ..ServiceBusReceiverOptions::default()
    };
    let operation = format!("attaching a receiver to the dead letters of `{endpoint}`");
    let attached = shared
        .bounded(
            &operation,
            client.create_receiver_for_queue(endpoint.to_owned(), options),
        )
        .await
        .and_then(|r| r.map_err(|e| shared.client_error(e, &operation, Some(("queue", endpoint)))));
    let mut receiver = match attached {
        Ok(receiver) => receiver,
        Err(e) => {
            shared.dispose_client(client).await;
            return Err(e);
        }
    };
    let mut found = Vec::new();
    let mut from = None;
    let operation = format!("peeking at the dead letters of `{endpoint}`");
    let result = loop {
        let want = max.map_or(PAGE, |max| (max - found.len()).min(PAGE));
        if want == 0 {
            break Ok(());
        }
        let page = shared
            .bounded(
                &operation,
                receiver.peek_messages(u32::try_from(want).unwrap_or(u32::MAX), from),
            )
            .await
            .and_then(|r| {
                r.map_err(|e| shared.client_error(e, &operation, Some(("queue", endpoint))))
            });
        let page = match page {
            Ok(page) => page,
            Err(e) => break Err(e),
        };
        let Some(last) = page.last() else {
            break Ok(());
        };
        from = Some(last.sequence_number() + 1);
        found.extend(
            page.iter()
                .map(|m| from_amqp(m.raw_amqp_message(), m.sequence_number(), true).message),
        );
    };
    let _ = shared
        .bounded("closing a receiver", receiver.dispose())
        .await;
    shared.dispose_client(client).await;
    result.map(|()| found)
}
