//! Throttle-aware pausing: a `Retry-After` from a downstream pauses the consumer (or the key).

use std::time::Duration;

use crate::Error;

/// Pausing on a downstream's `Retry-After`. See the [module docs](super).
///
/// ```
/// use std::time::Duration;
/// use redeliver_core::host::resilience::Throttle;
///
/// // Pause for as long as the downstream asks, but never more than 2 minutes at a time.
/// let throttle = Throttle::with_max_pause(Duration::from_secs(120))?;
/// assert_eq!(throttle.max_pause(), Duration::from_secs(120));
/// # Ok::<(), redeliver_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttle {
    max_pause: Duration,
}

impl Throttle {
    /// Pauses of at most `max_pause` (more than zero): a longer `Retry-After` pauses for
    /// `max_pause`, after which the next call asks the downstream again. The throttled message
    /// itself is still retried not before its `Retry-After`.
    pub fn with_max_pause(max_pause: Duration) -> Result<Self, Error> {
        if max_pause.is_zero() {
            return Err(Error::config(
                "max_pause",
                "must be longer than zero (a pause of nothing does not pause)",
            ));
        }
        Ok(Throttle { max_pause })
    }

    /// The longest pause.
    pub fn max_pause(&self) -> Duration {
        self.max_pause
    }
}

/// Pauses of at most 5 minutes.
impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            max_pause: Duration::from_secs(300),
        }
    }
}
