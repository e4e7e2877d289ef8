//! The conformance suite on RabbitMQ: the same scenarios, the same assertions as in memory.
//! Each scenario gets its own transport with a unique prefix, removed afterwards.

mod common;

#[path = "common/factory.rs"]
mod factory;

use factory::RabbitMq;

redeliver_conformance::conformance_tests!(RabbitMq::default(), #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
redeliver_conformance::dead_letter_ops_tests!(RabbitMq::default(), #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
