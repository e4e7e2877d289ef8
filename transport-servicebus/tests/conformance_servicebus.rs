//! The conformance suite on the Service Bus transport, against a test broker per scenario,
//! over TCP through the real `azservicebus` client.

mod support;

#[path = "support/factory.rs"]
mod factory;

use factory::ServiceBus;

redeliver_conformance::conformance_tests!(ServiceBus::default(), #[tokio::test]);
redeliver_conformance::dead_letter_ops_tests!(ServiceBus::default(), #[tokio::test]);
