//! The telemetry scenarios on the Service Bus transport (`opentelemetry` feature), against a test broker per scenario,
//! over TCP through the real `azservicebus` client.

mod support;

#[path = "support/factory.rs"]
mod factory;

use factory::ServiceBus;

redeliver_conformance::telemetry_tests!(ServiceBus::default(), #[tokio::test]);
