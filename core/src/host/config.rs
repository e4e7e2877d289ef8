//! Consumer settings and retry policies as data: deserialized with serde from a configuration
//! file or the environment, validated with errors that name the field's whole path
//! (`consumers.webhook.retry.backoff.max`). Durations are written as `"1s"`, `"250ms"`,
//! `"5m"`.
//!
//! ```toml
//! max_concurrency = 32
//! shutdown_timeout = "20s"
//!
//! [consumers.webhook]
//! concurrency = 4
//! timeout = "30s"
//! retry = { max_attempts = 3, jitter = "equal", backoff = { kind = "exponential", initial = "1s", max = "5m" } }
//!
//! [consumers."webhook.dead-letters"]
//! retry = { max_attempts = 1000, backoff = { kind = "fixed", delay = "1m" } }
//! ```
//!
//! A consumer is named by its endpoint (`webhook`), or `<endpoint>.dead-letters` for a consumer
//! of dead letters; [`HostBuilder::configure`](super::HostBuilder::configure) applies each
//! entry to the consumer of that name.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::Error;
use crate::retry::{Backoff, BackoffPolicy, Jitter};
use crate::worker::InvalidPayload;

/// A host's settings: its consumers' by name, and those of the whole host.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HostConfig {
    /// Each consumer's settings, by consumer name.
    #[serde(default)]
    pub consumers: BTreeMap<String, ConsumerConfig>,
    /// At most this many handler calls at once across the host.
    pub max_concurrency: Option<usize>,
    /// How long a shutdown lets handlers in flight finish.
    #[serde(default, with = "humantime_serde")]
    pub shutdown_timeout: Option<Duration>,
}

/// One consumer's settings; what is absent keeps the value given in code.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// How many handler calls at once.
    pub concurrency: Option<usize>,
    /// The handler time-out.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// The retry policy.
    pub retry: Option<RetryConfig>,
    /// What to do with a body that cannot be decoded: `dead-letter` or `discard`.
    pub invalid_payload: Option<InvalidPayload>,
    /// Retry budget, circuit breaker, throttle and ramp-up (see
    /// [`resilience`](super::resilience)).
    pub resilience: Option<super::resilience::ResilienceConfig>,
}

/// A [`BackoffPolicy`] as data.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Total handler calls, the first included. Default 5.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// How the delay grows. Default: exponential from 1 s doubling up to 5 minutes.
    #[serde(default)]
    pub backoff: BackoffConfig,
    /// Randomness added to delays. Default `equal`.
    #[serde(default = "default_jitter")]
    pub jitter: Jitter,
    /// A cap on every delay.
    #[serde(default, with = "humantime_serde")]
    pub max_delay: Option<Duration>,
}

fn default_max_attempts() -> u32 {
    5
}

fn default_jitter() -> Jitter {
    Jitter::Equal
}

/// A [`Backoff`] as data: `kind` is `fixed`, `linear`, `exponential`, `list` or `immediate`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum BackoffConfig {
    /// The same delay every time.
    Fixed {
        /// The delay.
        #[serde(with = "humantime_serde")]
        delay: Duration,
    },
    /// `initial`, then `increment` more for each attempt.
    Linear {
        /// The first delay.
        #[serde(with = "humantime_serde")]
        initial: Duration,
        /// Added per attempt.
        #[serde(with = "humantime_serde")]
        increment: Duration,
    },
    /// `initial` times `factor` (default 2) per attempt, up to `max`.
    Exponential {
        /// The first delay.
        #[serde(with = "humantime_serde")]
        initial: Duration,
        /// The cap.
        #[serde(with = "humantime_serde")]
        max: Duration,
        /// The growth factor.
        #[serde(default = "default_factor")]
        factor: f64,
    },
    /// These delays in order; the last repeats.
    List {
        /// The delays.
        delays: Vec<humantime_serde::Serde<Duration>>,
    },
    /// No delay, on purpose.
    Immediate,
}

fn default_factor() -> f64 {
    2.0
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig::Exponential {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            factor: 2.0,
        }
    }
}

impl From<&BackoffConfig> for Backoff {
    fn from(config: &BackoffConfig) -> Self {
        match config {
            BackoffConfig::Fixed { delay } => Backoff::fixed(*delay),
            BackoffConfig::Linear { initial, increment } => Backoff::linear(*initial, *increment),
            BackoffConfig::Exponential {
                initial,
                max,
                factor,
            } => Backoff::exponential_with_factor(*initial, *factor, *max),
            BackoffConfig::List { delays } => Backoff::list(delays.iter().map(|d| **d)),
            BackoffConfig::Immediate => Backoff::immediate(),
        }
    }
}

impl RetryConfig {
    /// The policy, or an [`Error::Config`] naming the field (`backoff.max`) that is out of
    /// range.
    pub fn build(&self) -> Result<BackoffPolicy, Error> {
        let mut builder = BackoffPolicy::builder()
            .max_attempts(self.max_attempts)
            .backoff(Backoff::from(&self.backoff))
            .jitter(self.jitter);
        if let Some(max) = self.max_delay {
            builder = builder.max_delay(max);
        }
        builder.build()
    }
}

/// `error` with its field named under `path` (`consumers.webhook.retry`).
pub(crate) fn under(path: &str, error: Error) -> Error {
    match error {
        Error::Config { field, reason } => Error::Config {
            field: format!("{path}.{field}"),
            reason,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::RetryPolicy;

    fn retry(json: &str) -> RetryConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_policy_is_built_from_data() {
        let config = retry(
            r#"{ "max_attempts": 3, "jitter": "none",
                 "backoff": { "kind": "list", "delays": ["2s", "1m 30s"] } }"#,
        );
        let policy = config.build().unwrap();
        assert_eq!(policy.max_attempts(), 3);
        assert_eq!(
            policy.backoff(),
            &Backoff::list([Duration::from_secs(2), Duration::from_secs(90)])
        );
        let defaults = retry("{}").build().unwrap();
        assert_eq!(defaults, BackoffPolicy::default());
    }

    #[test]
    fn an_impossible_policy_names_its_field() {
        let config =
            retry(r#"{ "backoff": { "kind": "exponential", "initial": "10s", "max": "1s" } }"#);
        let e = under("consumers.webhook.retry", config.build().unwrap_err());
        match e {
            Error::Config { field, .. } => assert_eq!(field, "consumers.webhook.retry.backoff.max"),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused() {
        let e = serde_json::from_str::<RetryConfig>(r#"{ "max_atempts": 3 }"#).unwrap_err();
        assert!(e.to_string().contains("max_atempts"), "{e}");
        let e = serde_json::from_str::<RetryConfig>(r#"{ "backoff": { "kind": "random" } }"#)
            .unwrap_err();
        assert!(e.to_string().contains("random"), "{e}");
    }
}
