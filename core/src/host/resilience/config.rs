//! A consumer's [`Resilience`] as data, under `[consumers.<name>.resilience]`; see the
//! [module docs](super) for an example.

use std::time::Duration;

use serde::Deserialize;

use super::{CircuitBreaker, FailureRate, OverBudget, RampUp, Resilience, RetryBudget, Throttle};
use crate::Error;
use crate::host::config::under;

/// A consumer's resilience: each table present turns its mechanism on (replacing what code
/// set for it); what a table leaves out has its default.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ResilienceConfig {
    /// Budgets and pauses per value of this header.
    pub key_header: Option<String>,
    /// The retry budget.
    pub retry_budget: Option<RetryBudgetConfig>,
    /// The circuit breaker.
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// Pausing on a `Retry-After`.
    pub throttle: Option<ThrottleConfig>,
    /// Ramp-up after the circuit closes or a pause ends.
    pub ramp_up: Option<RampUpConfig>,
}

/// A [`RetryBudget`] as data.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryBudgetConfig {
    /// Retries per first attempt. Default 0.2.
    pub ratio: Option<f64>,
    /// Retries allowed in any window. Default 10.
    pub min_retries: Option<u32>,
    /// The sliding window. Default `"1m"`.
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
    /// `delay` (default) or `dead-letter`.
    pub over_budget: Option<OverBudget>,
}

/// A [`CircuitBreaker`] as data.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CircuitBreakerConfig {
    /// Transient failures in a row that open the circuit. Default 5, unless only
    /// `failure_rate` is given.
    pub consecutive_failures: Option<u32>,
    /// A failure rate that opens the circuit.
    pub failure_rate: Option<FailureRateConfig>,
    /// How long the circuit stays open before a probe. Default `"30s"`.
    #[serde(default, with = "humantime_serde")]
    pub cool_down: Option<Duration>,
}

/// A [`FailureRate`] as data.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FailureRateConfig {
    /// The share of failed calls, above 0 and at most 1.
    pub rate: f64,
    /// The fewest calls in the window for the rate to count. Default 20.
    pub min_calls: Option<u32>,
    /// The window. Default `"1m"`.
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
}

/// A [`Throttle`] as data.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ThrottleConfig {
    /// The longest pause. Default `"5m"`.
    #[serde(default, with = "humantime_serde")]
    pub max_pause: Option<Duration>,
}

/// A [`RampUp`] as data.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RampUpConfig {
    /// Calls at once when the circuit closes. Default 1.
    pub initial: Option<usize>,
    /// Calls added at each step. Default 1.
    pub step: Option<usize>,
    /// The time between steps. Default `"1s"`.
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    /// The factor a throttle multiplies the concurrency by. Default 0.5.
    pub decrease: Option<f64>,
}

impl ResilienceConfig {
    /// `resilience` with what this configuration turns on, or an [`Error::Config`] naming the
    /// field (`retry_budget.ratio`) out of range.
    pub fn apply(&self, mut resilience: Resilience) -> Result<Resilience, Error> {
        if let Some(header) = &self.key_header {
            if header.is_empty() {
                return Err(Error::config("key_header", "must name a header, got \"\""));
            }
            resilience = resilience.keyed_by_header(header.clone());
        }
        if let Some(budget) = &self.retry_budget {
            let built = budget.build().map_err(|e| under("retry_budget", e))?;
            resilience = resilience.retry_budget(built);
        }
        if let Some(breaker) = &self.circuit_breaker {
            let built = breaker.build().map_err(|e| under("circuit_breaker", e))?;
            resilience = resilience.circuit_breaker(built);
        }
        if let Some(throttle) = &self.throttle {
            let built = throttle.build().map_err(|e| under("throttle", e))?;
            resilience = resilience.throttle(built);
        }
        if let Some(ramp) = &self.ramp_up {
            let built = ramp.build().map_err(|e| under("ramp_up", e))?;
            resilience = resilience.ramp_up(built);
        }
        Ok(resilience)
    }

    /// What this configuration alone turns on.
    pub fn build(&self) -> Result<Resilience, Error> {
        self.apply(Resilience::new())
    }
}

impl RetryBudgetConfig {
    /// The budget, or an [`Error::Config`] naming the field.
    pub fn build(&self) -> Result<RetryBudget, Error> {
        let mut builder = RetryBudget::builder();
        if let Some(ratio) = self.ratio {
            builder = builder.ratio(ratio);
        }
        if let Some(min_retries) = self.min_retries {
            builder = builder.min_retries(min_retries);
        }
        if let Some(window) = self.window {
            builder = builder.window(window);
        }
        if let Some(over_budget) = self.over_budget {
            builder = builder.over_budget(over_budget);
        }
        builder.build()
    }
}

impl CircuitBreakerConfig {
    /// The breaker, or an [`Error::Config`] naming the field.
    pub fn build(&self) -> Result<CircuitBreaker, Error> {
        let mut builder = CircuitBreaker::builder();
        if let Some(failures) = self.consecutive_failures {
            builder = builder.consecutive_failures(failures);
        }
        if let Some(rate) = &self.failure_rate {
            let built = FailureRate::new(
                rate.rate,
                rate.min_calls.unwrap_or(20),
                rate.window.unwrap_or(Duration::from_secs(60)),
            )
            .map_err(|e| under("failure_rate", e))?;
            builder = builder.failure_rate(built);
        }
        if let Some(cool_down) = self.cool_down {
            builder = builder.cool_down(cool_down);
        }
        builder.build()
    }
}

impl ThrottleConfig {
    /// The throttle, or an [`Error::Config`] naming the field.
    pub fn build(&self) -> Result<Throttle, Error> {
        match self.max_pause {
            Some(max_pause) => Throttle::with_max_pause(max_pause),
            None => Ok(Throttle::default()),
        }
    }
}

impl RampUpConfig {
    /// The ramp, or an [`Error::Config`] naming the field.
    pub fn build(&self) -> Result<RampUp, Error> {
        let mut builder = RampUp::builder();
        if let Some(initial) = self.initial {
            builder = builder.initial(initial);
        }
        if let Some(step) = self.step {
            builder = builder.step(step);
        }
        if let Some(every) = self.every {
            builder = builder.every(every);
        }
        if let Some(decrease) = self.decrease {
            builder = builder.decrease(decrease);
        }
        builder.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    fn config(json: &str) -> ResilienceConfig {
        serde_json::from_str(json).unwrap()
    }

    fn field(e: Error) -> String {
        match e {
            Error::Config { field, .. } => field,
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn each_table_turns_its_mechanism_on_with_defaults() {
        let r = config(
            r#"{ "retry_budget": {}, "circuit_breaker": {}, "throttle": {}, "ramp_up": {} }"#,
        )
        .build()
        .unwrap();
        assert_eq!(r.retry_budget, Some(RetryBudget::default()));
        assert_eq!(r.circuit_breaker, Some(CircuitBreaker::default()));
        assert_eq!(r.throttle, Some(Throttle::default()));
        assert_eq!(r.ramp_up, Some(RampUp::default()));
        assert!(r.key.is_none());
        let none = config("{}").build().unwrap();
        assert!(none.retry_budget.is_none() && none.circuit_breaker.is_none());
    }

    #[test]
    fn values_are_read_with_their_units() {
        let r = config(
            r#"{ "key_header": "tenant",
                 "retry_budget": { "ratio": 0.1, "min_retries": 3, "window": "30s", "over_budget": "dead-letter" },
                 "circuit_breaker": { "failure_rate": { "rate": 0.5, "min_calls": 10 }, "cool_down": "1m" },
                 "throttle": { "max_pause": "2m" },
                 "ramp_up": { "initial": 2, "step": 3, "every": "500ms", "decrease": 0.25 } }"#,
        )
        .build()
        .unwrap();
        let budget = r.retry_budget.unwrap();
        assert_eq!(
            (budget.ratio(), budget.min_retries(), budget.window()),
            (0.1, 3, Duration::from_secs(30))
        );
        assert_eq!(budget.over_budget(), OverBudget::DeadLetter);
        let breaker = r.circuit_breaker.unwrap();
        assert_eq!(breaker.consecutive_failures(), None, "the rate alone");
        assert_eq!(
            breaker.failure_rate(),
            Some(FailureRate::new(0.5, 10, Duration::from_secs(60)).unwrap())
        );
        assert_eq!(breaker.cool_down(), Duration::from_secs(60));
        assert_eq!(r.throttle.unwrap().max_pause(), Duration::from_secs(120));
        let ramp = r.ramp_up.unwrap();
        assert_eq!(
            (ramp.initial(), ramp.step(), ramp.every(), ramp.decrease()),
            (2, 3, Duration::from_millis(500), 0.25)
        );
        let key = r.key.unwrap();
        let message = Message::new("x").with_header("tenant", "acme");
        assert_eq!((key.0)(&message), Some("acme".to_owned()));
    }

    #[test]
    fn wrong_values_name_their_path() {
        let e = config(r#"{ "retry_budget": { "ratio": -1 } }"#)
            .build()
            .unwrap_err();
        assert_eq!(field(e), "retry_budget.ratio");
        let e = config(r#"{ "circuit_breaker": { "failure_rate": { "rate": 2 } } }"#)
            .build()
            .unwrap_err();
        assert_eq!(field(e), "circuit_breaker.failure_rate.rate");
        let e = config(r#"{ "circuit_breaker": { "cool_down": "0s" } }"#)
            .build()
            .unwrap_err();
        assert_eq!(field(e), "circuit_breaker.cool_down");
        let e = config(r#"{ "throttle": { "max_pause": "0s" } }"#)
            .build()
            .unwrap_err();
        assert_eq!(field(e), "throttle.max_pause");
        let e = config(r#"{ "ramp_up": { "decrease": 1.5 } }"#)
            .build()
            .unwrap_err();
        assert_eq!(field(e), "ramp_up.decrease");
        let e = config(r#"{ "key_header": "" }"#).build().unwrap_err();
        assert_eq!(field(e), "key_header");
        let e =
            serde_json::from_str::<ResilienceConfig>(r#"{ "circuit_braker": {} }"#).unwrap_err();
        assert!(e.to_string().contains("circuit_braker"), "{e}");
        let e = serde_json::from_str::<ResilienceConfig>(
            r#"{ "retry_budget": { "over_budget": "drop" } }"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("drop"), "{e}");
    }
}
