//! The real `redeliver` binary against the Service Bus test broker: dead letters made by a
//! worker are listed, grouped, replayed and handled.

mod support;

use std::sync::Arc;
use std::time::Duration;

use redeliver_core::Transport;
use redeliver_servicebus::{ServiceBusOptions, ServiceBusTransport};
use redeliver_servicebus_testbroker::{BrokerOptions, QueueOptions, start};

// A current-thread runtime, as in the transport's own tests: on a multi-threaded one the
// client can lose the outcome of a transfer that a broker on loopback answers within
// microseconds (see the Service Bus transport's crate docs).
#[tokio::test(flavor = "current_thread")]
async fn dead_letters_are_listed_grouped_replayed_and_handled() {
    let broker = start(BrokerOptions::default())
        .await
        .expect("the test broker starts");
    let endpoint = "cli";
    broker
        .create_queue(endpoint, QueueOptions::default())
        .expect("queue created");
    let url = broker.connection_string();
    let servicebus = ServiceBusTransport::connect(
        url.as_str(),
        ServiceBusOptions::default().with_receive_wait(Duration::from_secs(5)),
    )
    .await
    .expect("the transport connects");
    let transport: Arc<dyn Transport> = Arc::new(servicebus.clone());

    support::listed_grouped_replayed_and_handled(&url, &transport, endpoint).await;
    drop(transport);
    servicebus.close().await;
}
