//! What a handler may return besides an [`Outcome`]: a `Result` whose error says what happens
//! to the message, so that `?` works in handlers.
//!
//! | handler returns | the message is |
//! |---|---|
//! | [`Outcome`] | settled as the outcome says |
//! | `Ok(())` | completed |
//! | `Ok(outcome)` (from `Result<Outcome, E>`) | settled as `outcome` says |
//! | `Err(e)` | what [`Classify::classify`] of `e` says; by default **retried**, with `e`'s message as the reason |
//!
//! [`Failure`] is the error type to use with `?`: any `std::error::Error` converts into it as a
//! retry, and its constructors say otherwise ([`Failure::dead_letter`],
//! [`Failure::retry_after`], [`Failure::discard`]). An application's own error type implements
//! [`Classify`] to decide per variant.

use std::fmt;

use crate::error::{BoxError, Error};
use crate::outcome::{Outcome, RetryAfter};

/// Turns what a handler returned into an [`Outcome`].
pub trait IntoOutcome {
    /// The outcome.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl<E: Classify> IntoOutcome for Result<(), E> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(()) => Outcome::Success,
            Err(e) => e.classify(),
        }
    }
}

impl<E: Classify> IntoOutcome for Result<Outcome, E> {
    fn into_outcome(self) -> Outcome {
        self.unwrap_or_else(|e| e.classify())
    }
}

/// An error that knows what should happen to the message it failed on. The default: try again
/// later, with the error's message as the reason (an error nobody classified may well be
/// transient).
///
/// ```
/// use redeliver_core::{Classify, Outcome};
///
/// #[derive(Debug, thiserror::Error)]
/// enum ChargeError {
///     #[error("the card was declined")]
///     Declined,
///     #[error("the payment service is unavailable")]
///     Unavailable,
/// }
///
/// impl Classify for ChargeError {
///     fn classify(&self) -> Outcome {
///         match self {
///             ChargeError::Declined => Outcome::dead_letter("card declined"),
///             ChargeError::Unavailable => Outcome::retry(self.to_string()),
///         }
///     }
/// }
/// ```
pub trait Classify: fmt::Display {
    /// What happens to the message.
    fn classify(&self) -> Outcome {
        Outcome::retry(self.to_string())
    }
}

/// Transient errors (a lost connection, a time-out) are retried; the others (a missing
/// endpoint, refused access, an invalid message) will not go away by themselves and are
/// retried too, so that fixing the configuration brings the message through; dead-letter them
/// explicitly with [`Failure::dead_letter`] where that is wrong.
impl Classify for Error {}
impl Classify for BoxError {}
impl Classify for std::io::Error {}
impl Classify for String {}
impl Classify for &'static str {}
impl Classify for serde_json::Error {}

/// The error type for `?` in handlers: any error converts into a retry; the constructors build
/// the other outcomes.
///
/// ```
/// use redeliver_core::{Context, Failure, ResultExt};
///
/// async fn handle(line: String, _: Context) -> Result<(), Failure> {
///     let n: u32 = line.parse().or_dead_letter("not a number")?;
///     if n > 100 {
///         return Err(Failure::discard("out of range, ignored"));
///     }
///     Ok(())
/// }
/// # fn assert_handler<H: redeliver_core::Handler<String>>(_: H) {}
/// # assert_handler(handle);
/// ```
pub struct Failure {
    outcome: Outcome,
    source: Option<BoxError>,
}

impl Failure {
    /// Retry later, with `reason`.
    pub fn retry(reason: impl Into<String>) -> Self {
        Failure::from(Outcome::retry(reason))
    }

    /// Retry later, not before `retry_after`.
    pub fn retry_after(reason: impl Into<String>, retry_after: RetryAfter) -> Self {
        Failure::from(Outcome::retry_after(reason, retry_after))
    }

    /// Dead-letter now, with `reason`.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Failure::from(Outcome::dead_letter(reason))
    }

    /// Dead-letter now, with `reason` and `description`.
    pub fn dead_letter_with(reason: impl Into<String>, description: impl Into<String>) -> Self {
        Failure::from(Outcome::dead_letter_with(reason, description))
    }

    /// Drop the message on purpose, logging `reason`.
    pub fn discard(reason: impl Into<String>) -> Self {
        Failure::from(Outcome::discard(reason))
    }

    /// What happens to the message.
    pub fn outcome(&self) -> &Outcome {
        &self.outcome
    }
}

impl From<Outcome> for Failure {
    fn from(outcome: Outcome) -> Self {
        Failure {
            outcome,
            source: None,
        }
    }
}

/// Any error: a retry whose reason is the error's message, the error kept as the source.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure {
            outcome: Outcome::retry(error.to_string()),
            source: Some(Box::new(error)),
        }
    }
}

impl Classify for Failure {
    fn classify(&self) -> Outcome {
        self.outcome.clone()
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Success => f.write_str("success"),
            Outcome::Retry { reason, .. }
            | Outcome::DeadLetter { reason, .. }
            | Outcome::Discard { reason } => f.write_str(reason),
        }
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failure")
            .field("outcome", &self.outcome)
            .field("source", &self.source)
            .finish()
    }
}

/// Says what an error of a `Result` means for the message, for `?` in handlers.
pub trait ResultExt<T> {
    /// An error dead-letters the message with `reason` (the error becomes the description).
    fn or_dead_letter(self, reason: &str) -> Result<T, Failure>;
    /// An error discards the message with `reason`.
    fn or_discard(self, reason: &str) -> Result<T, Failure>;
    /// An error retries the message, not before `retry_after`.
    fn or_retry_after(self, retry_after: RetryAfter) -> Result<T, Failure>;
}

impl<T, E: fmt::Display> ResultExt<T> for Result<T, E> {
    fn or_dead_letter(self, reason: &str) -> Result<T, Failure> {
        self.map_err(|e| Failure::dead_letter_with(reason, e.to_string()))
    }

    fn or_discard(self, reason: &str) -> Result<T, Failure> {
        self.map_err(|e| Failure::discard(format!("{reason}: {e}")))
    }

    fn or_retry_after(self, retry_after: RetryAfter) -> Result<T, Failure> {
        self.map_err(|e| Failure::retry_after(e.to_string(), retry_after))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(text: &str) -> Result<u32, Failure> {
        Ok(text.parse::<u32>()?)
    }

    #[test]
    fn results_become_outcomes() {
        assert_eq!(Ok::<(), Failure>(()).into_outcome(), Outcome::Success);
        assert_eq!(
            Ok::<Outcome, Failure>(Outcome::discard("x")).into_outcome(),
            Outcome::discard("x")
        );
        assert_eq!(
            Err::<(), _>("timeout").into_outcome(),
            Outcome::retry("timeout")
        );
    }

    #[test]
    fn any_error_is_a_retry_with_its_message() {
        let outcome = parse("x").map(|_| ()).into_outcome();
        assert_eq!(outcome, Outcome::retry("invalid digit found in string"));
    }

    #[test]
    fn failures_say_what_happens() {
        assert_eq!(
            Err::<(), _>(Failure::dead_letter_with("auth", "HTTP 401")).into_outcome(),
            Outcome::dead_letter_with("auth", "HTTP 401")
        );
        let after = RetryAfter::Delay(Duration::from_secs(30));
        assert_eq!(
            "x".parse::<u32>()
                .or_retry_after(after)
                .map(|_| ())
                .into_outcome(),
            Outcome::retry_after("invalid digit found in string", after)
        );
        assert_eq!(
            "x".parse::<u32>()
                .or_dead_letter("not a number")
                .map(|_| ())
                .into_outcome(),
            Outcome::dead_letter_with("not a number", "invalid digit found in string")
        );
    }

    #[test]
    fn own_errors_classify_themselves() {
        struct Declined;
        impl fmt::Display for Declined {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("declined")
            }
        }
        impl Classify for Declined {
            fn classify(&self) -> Outcome {
                Outcome::dead_letter("card declined")
            }
        }
        assert_eq!(
            Err::<(), _>(Declined).into_outcome(),
            Outcome::dead_letter("card declined")
        );
    }
}
