//! The conformance suite on the in-memory transport, with tokio's clock paused.

#[path = "support/memory_factory.rs"]
mod memory_factory;

use memory_factory::Memory;

redeliver_conformance::conformance_tests!(Memory, #[tokio::test(start_paused = true)]);
redeliver_conformance::dead_letter_ops_tests!(Memory, #[tokio::test(start_paused = true)]);
