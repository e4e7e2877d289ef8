//! The telemetry scenarios on the in-memory transport (`opentelemetry` feature), tokio's clock
//! paused.

#[path = "support/memory_factory.rs"]
mod memory_factory;

use memory_factory::Memory;

redeliver_conformance::telemetry_tests!(Memory, #[tokio::test(start_paused = true)]);
