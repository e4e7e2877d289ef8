//! What happens to each message: decided by its number alone, so the driver knows which
//! messages must end as dead letters and the workers need no shared state.

use std::time::Duration;

use redeliver_core::{Backoff, BackoffPolicy};

/// Messages numbered from here are the slow ones of the shutdown phase.
pub(crate) const SLOW_BASE: u64 = 1_000_000_000;

/// The handlers' attempts at most: a transient failure fails at most twice, so it always
/// succeeds at the third attempt.
pub(crate) const MAX_ATTEMPTS: u32 = 5;

/// The share of messages, in per mille, that fail transiently, permanently or panic.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mix {
    pub(crate) transient: u64,
    pub(crate) permanent: u64,
    pub(crate) panics: u64,
    /// Sent with a not-before 1 to 4 s ahead.
    pub(crate) delayed: u64,
}

/// What the handler does with message `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Succeeds at the first attempt.
    Succeed,
    /// Asks for a retry this many times (1 or 2), then succeeds.
    Transient(u32),
    /// Dead-letters the message at the first attempt.
    Permanent,
    /// Panics at the first attempt (a retryable failure), then succeeds.
    Panic,
    /// Sleeps for the slow time, then succeeds.
    Slow,
}

impl Mix {
    /// `n`'s fate: a fixed, well-spread function of `n`.
    pub(crate) fn fate(self, n: u64) -> Fate {
        if n >= SLOW_BASE {
            return Fate::Slow;
        }
        let draw = spread(n) % 1000;
        if draw < self.permanent {
            Fate::Permanent
        } else if draw < self.permanent + self.panics {
            Fate::Panic
        } else if draw < self.permanent + self.panics + self.transient {
            Fate::Transient(1 + u32::from(spread(n ^ 0x5555).is_multiple_of(2)))
        } else {
            Fate::Succeed
        }
    }

    /// The not-before delay `n` is sent with, if any.
    pub(crate) fn delay(self, n: u64) -> Option<Duration> {
        (n < SLOW_BASE && spread(n ^ 0xAAAA) % 1000 < self.delayed)
            .then(|| Duration::from_secs(1 + spread(n ^ 0x3333) % 4))
    }

    pub(crate) fn to_arg(self) -> String {
        format!(
            "{},{},{},{}",
            self.transient, self.permanent, self.panics, self.delayed
        )
    }

    pub(crate) fn from_arg(arg: &str) -> Result<Mix, String> {
        let parts: Vec<u64> = arg
            .split(',')
            .map(|p| p.parse().map_err(|_| format!("`{arg}`: numbers expected")))
            .collect::<Result<_, _>>()?;
        let [transient, permanent, panics, delayed] = parts[..] else {
            return Err(format!(
                "`{arg}`: transient,permanent,panics,delayed expected"
            ));
        };
        if transient + permanent + panics > 1000 || delayed > 1000 {
            return Err(format!("`{arg}`: shares are per mille"));
        }
        Ok(Mix {
            transient,
            permanent,
            panics,
            delayed,
        })
    }
}

/// The workers' retry policy: 1 s, 2 s, 4 s (through the broker's delay cascade).
pub(crate) fn retry_policy() -> BackoffPolicy {
    BackoffPolicy::builder()
        .max_attempts(MAX_ATTEMPTS)
        .backoff(Backoff::exponential(
            Duration::from_secs(1),
            Duration::from_secs(4),
        ))
        .build()
        .expect("a valid retry policy")
}

/// SplitMix64's finaliser: neighbouring numbers get unrelated values.
fn spread(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shares_come_out_as_configured() {
        let mix = Mix::from_arg("300,50,10,100").unwrap();
        let fates: Vec<Fate> = (0..100_000).map(|n| mix.fate(n)).collect();
        let count = |f: fn(&Fate) -> bool| fates.iter().filter(|x| f(x)).count();
        let permanent = count(|f| *f == Fate::Permanent);
        let panics = count(|f| *f == Fate::Panic);
        let transient = count(|f| matches!(f, Fate::Transient(_)));
        assert!((4_500..5_500).contains(&permanent), "{permanent}");
        assert!((700..1_300).contains(&panics), "{panics}");
        assert!((29_000..31_000).contains(&transient), "{transient}");
        let delayed = (0..100_000).filter(|n| mix.delay(*n).is_some()).count();
        assert!((9_000..11_000).contains(&delayed), "{delayed}");
        assert_eq!(mix.fate(SLOW_BASE + 3), Fate::Slow);
        assert_eq!(Mix::from_arg(&mix.to_arg()).unwrap().to_arg(), mix.to_arg());
        assert!(Mix::from_arg("900,200,0,0").is_err());
    }
}
