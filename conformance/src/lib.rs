//! The conformance suite of redeliver: scenarios every transport must pass, written once against
//! `dyn Transport` and run for each transport, so that "the same handlers run anywhere" is
//! checked rather than hoped for.
//!
//! On every transport the suite requires the same handler call counts, attempt numbers, final
//! dispositions (completed, dead-lettered with reason, discarded) and dead-letter metadata; only
//! delivery times may differ, and never earlier than the not-before.
//!
//! # Running it for a transport
//! Implement [`Factory`] and expand [`conformance_tests!`] in an integration test; each scenario
//! becomes a test of its own:
//!
//! ```no_run
//! use std::{sync::Arc, time::Duration};
//! use redeliver_core::{Error, Topology, Transport};
//! use redeliver_conformance::{Factory, Timing};
//!
//! struct MyFactory;
//!
//! #[async_trait::async_trait]
//! impl Factory for MyFactory {
//!     async fn create(&self, topology: &Topology) -> Result<Arc<dyn Transport>, Error> {
//!         todo!("connect to the broker, declare `topology`, return the transport")
//!     }
//!
//!     fn timing(&self) -> Timing {
//!         Timing::new(Duration::from_secs(1), Duration::from_secs(30))
//!     }
//! }
//!
//! redeliver_conformance::conformance_tests!(MyFactory, #[tokio::test]);
//! # fn main() {}
//! ```
//!
//! Scenarios use endpoint names with a random suffix, so they can run in parallel on a shared
//! broker; [`Factory::remove`] cleans up after each.

mod probe;
pub mod proxy;
pub mod resilience;
pub mod scenarios;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redeliver_core::{Error, Topology, Transport};

pub use probe::{Call, Calls, DeadLetterProbe};

/// Makes the transport under test.
#[async_trait]
pub trait Factory: Send + Sync {
    /// Whether the transport's broker can be reached. When it returns `false` every scenario
    /// returns at once without asserting anything: the factory must say so loudly itself, and
    /// should panic instead when the environment requires brokers (in CI). Default: `true`.
    async fn available(&self) -> bool {
        true
    }

    /// A transport on which `topology` exists (declared by this call if need be).
    async fn create(&self, topology: &Topology) -> Result<Arc<dyn Transport>, Error>;

    /// Removes what [`create`](Factory::create) made for `topology`, on a shared broker.
    /// Default: nothing to remove.
    async fn remove(&self, _topology: &Topology) -> Result<(), Error> {
        Ok(())
    }

    /// The transport's timing; see [`Timing`].
    fn timing(&self) -> Timing;
}

/// How the suite paces a transport.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct Timing {
    /// The retry delay scenarios use (1 s on RabbitMQ, whose delays are whole seconds).
    pub unit: Duration,
    /// How long to wait for something that must happen before failing the scenario.
    pub patience: Duration,
}

impl Timing {
    /// A timing with the given delay unit and patience.
    pub fn new(unit: Duration, patience: Duration) -> Self {
        Timing { unit, patience }
    }
}

/// Expands to one test per scenario in [`scenarios`], each running it against `factory`.
/// The attributes after the factory (such as `#[tokio::test]`) are put on every test.
///
/// Every step of a scenario that waits on the transport is bounded by the factory's
/// [`Timing::patience`], and a whole scenario by [`scenario_limit`]: a transport that hangs
/// fails the test with a message naming what did not finish, instead of stalling the run.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr $(, #[$attr:meta])* $(,)?) => {
        $crate::conformance_tests!(@each [$(#[$attr])*] $factory;
            success,
            retry_until_max_attempts,
            permanent_failure,
            discard,
            retry_after_floor,
            not_before_never_violated,
            long_delay_does_not_hold_up_short,
            dropped_delivery_comes_back,
            invalid_payload,
            panic_is_retried,
            topic_fan_out_isolation,
            graceful_shutdown_without_loss,
            dead_letter_handler_once_per_dead_letter,
            request_reply_round_trip,
            request_reply_timeout_and_retry,
            request_reply_unusable_replies,
            outage_then_recovery,
            retry_after_pauses_the_consumer,
            a_throttled_key_is_put_off
        );
    };
    (@each [$(#[$attr:meta])*] $factory:expr;) => {};
    (@each [$(#[$attr:meta])*] $factory:expr; $scenario:ident $(, $rest:ident)*) => {
        $(#[$attr])*
        async fn $scenario() {
            let factory = $factory;
            $crate::run_bounded(
                stringify!($scenario),
                $crate::scenario_limit(&factory),
                $crate::scenarios::$scenario(&factory),
            )
            .await;
        }
        $crate::conformance_tests!(@each [$(#[$attr])*] $factory; $($rest),*);
    };
}

/// Expands to one test per telemetry scenario in [`scenarios::telemetry`], like
/// [`conformance_tests!`]. Put it into a test binary of its own (the scenarios install global
/// OpenTelemetry providers), built with the transport's `opentelemetry` feature.
#[cfg(feature = "opentelemetry")]
#[macro_export]
macro_rules! telemetry_tests {
    ($factory:expr $(, #[$attr:meta])* $(,)?) => {
        $(#[$attr])*
        async fn trace_context_crosses_the_broker() {
            let factory = $factory;
            $crate::run_bounded(
                "trace_context_crosses_the_broker",
                $crate::scenario_limit(&factory),
                $crate::scenarios::telemetry::trace_context_crosses_the_broker(&factory),
            )
            .await;
        }
    };
}

/// Expands to one test per dead-letter operation scenario
/// ([`scenarios::dead_letters_listed_and_grouped_in_place`] and the replay and purge ones), for
/// transports that implement [`Transport::peek_dead_letters`] and
/// [`Transport::count_dead_letters`]; the same form as [`conformance_tests!`].
#[macro_export]
macro_rules! dead_letter_ops_tests {
    ($factory:expr $(, #[$attr:meta])* $(,)?) => {
        $crate::conformance_tests!(@each [$(#[$attr])*] $factory;
            dead_letters_listed_and_grouped_in_place,
            dead_letter_replay_moves_exactly_the_selection,
            dead_letter_purge_removes_exactly_the_selection,
            dead_letter_replay_interrupted_loses_nothing
        );
    };
}

/// The longest a whole scenario may run on `factory`'s transport: ten times its
/// [`Timing::patience`], and at least five minutes.
pub fn scenario_limit(factory: &dyn Factory) -> Duration {
    (factory.timing().patience * 10).max(Duration::from_secs(300))
}

/// Runs the scenario `name` (used by [`conformance_tests!`]).
///
/// # Panics
/// If it takes longer than `limit`.
#[doc(hidden)]
pub async fn run_bounded(
    name: &str,
    limit: Duration,
    scenario: impl std::future::Future<Output = ()>,
) {
    probe::expect_within(limit, &format!("scenario `{name}` finish"), scenario).await;
}
