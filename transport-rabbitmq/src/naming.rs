//! Names of queues and exchanges, and the routing of the binary delay cascade.
//!
//! Pure functions, so that the cascade's arithmetic is tested without a broker.

use std::time::Duration;

use redeliver_core::{Error, Source};

use crate::options::{DelayMode, RabbitMqOptions};

/// The longest routing key RabbitMQ accepts, in bytes.
const MAX_ROUTING_KEY: usize = 255;

/// Appended to an endpoint's name to name its quarantine queue.
pub(crate) const QUARANTINE_SUFFIX: &str = ".quarantine";

/// Where a delayed message is headed once its delay is over.
///
/// In the routing key the destination follows the bits after a marker word (`q` for a queue),
/// which keeps room for other kinds of destination without ambiguity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Destination<'a> {
    /// A queue, by its full name.
    Queue(&'a str),
}

impl Destination<'_> {
    fn marker(&self) -> &'static str {
        match self {
            Destination::Queue(_) => "q",
        }
    }

    fn name(&self) -> &str {
        match self {
            Destination::Queue(name) => name,
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Destination::Queue(name) => format!("queue `{name}`"),
        }
    }
}

/// Where to publish a message so that it is delivered after a delay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
}

/// The names this transport uses, derived from the options.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    prefix: String,
    dead_letter_suffix: String,
    delays: DelayMode,
}

impl Names {
    pub(crate) fn new(options: &RabbitMqOptions) -> Self {
        Names {
            prefix: options.prefix.clone(),
            dead_letter_suffix: options.dead_letter_suffix.clone(),
            delays: options.delays.clone(),
        }
    }

    /// The queue of `endpoint`: `{prefix}{endpoint}`.
    pub(crate) fn endpoint_queue(&self, endpoint: &str) -> String {
        format!("{}{endpoint}", self.prefix)
    }

    /// The dead-letter queue of `endpoint`: `{prefix}{endpoint}{dead_letter_suffix}`.
    pub(crate) fn dead_letter_queue(&self, endpoint: &str) -> String {
        format!("{}{endpoint}{}", self.prefix, self.dead_letter_suffix)
    }

    /// The quarantine queue of `endpoint`: `{prefix}{endpoint}.quarantine`, where the broker
    /// dead-letters what the dead-letter queue's readers could not settle.
    pub(crate) fn quarantine_queue(&self, endpoint: &str) -> String {
        format!("{}{endpoint}{QUARANTINE_SUFFIX}", self.prefix)
    }

    /// The queue a source is consumed from.
    pub(crate) fn source_queue(&self, source: &Source) -> String {
        match source {
            Source::Endpoint(endpoint) => self.endpoint_queue(endpoint),
            Source::DeadLetters(endpoint) => self.dead_letter_queue(endpoint),
        }
    }

    /// The fanout exchange of `topic`: `{prefix}{topic}`.
    pub(crate) fn topic_exchange(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    /// The fixed-TTL retry queue of `queue`, in that mode.
    pub(crate) fn retry_queue(&self, queue: &str) -> Option<String> {
        match &self.delays {
            DelayMode::FixedTtlRetryQueue { suffix, .. } => Some(format!("{queue}{suffix}")),
            DelayMode::Cascade { .. } => None,
        }
    }

    /// How many levels the cascade has, in that mode.
    pub(crate) fn levels(&self) -> Option<u8> {
        match self.delays {
            DelayMode::Cascade { levels } => Some(levels),
            DelayMode::FixedTtlRetryQueue { .. } => None,
        }
    }

    fn delay_base(&self, levels: u8) -> String {
        // The level count is part of the names: cascades of different sizes must never share
        // exchanges, since their routing keys have different lengths.
        format!("{}redeliver.delay.n{levels}", self.prefix)
    }

    /// The exchange and queue of level `level` (waiting 2^level s).
    pub(crate) fn level(&self, levels: u8, level: u8) -> String {
        format!("{}.l{level:02}", self.delay_base(levels))
    }

    /// The exchange the last level dead-letters into, bound to every destination.
    pub(crate) fn delivery_exchange(&self, levels: u8) -> String {
        format!("{}.deliver", self.delay_base(levels))
    }

    /// The alternate exchange of the delivery exchange and its queue, where messages whose
    /// destination no longer exists end up instead of blocking the last level.
    pub(crate) fn unroutable(&self) -> String {
        format!("{}redeliver.delay.unroutable", self.prefix)
    }

    /// Where level `level` dead-letters to and forwards keys whose bit `level` is 0.
    pub(crate) fn below(&self, levels: u8, level: u8) -> String {
        if level == 0 {
            self.delivery_exchange(levels)
        } else {
            self.level(levels, level - 1)
        }
    }
}

/// The binding pattern matching bit `level` = `bit` in a key of `levels` bits, whatever follows.
pub(crate) fn level_pattern(levels: u8, level: u8, bit: bool) -> String {
    let mut words: Vec<&str> = vec!["*"; usize::from(levels)];
    words[usize::from(levels - 1 - level)] = if bit { "1" } else { "0" };
    words.push("#");
    words.join(".")
}

/// The binding pattern of the delivery exchange for `destination`: any bits, then exactly the
/// destination. Single-word wildcards, not `#`, so that `a.b` never matches destination `b`.
pub(crate) fn destination_pattern(levels: u8, destination: Destination<'_>) -> String {
    let mut pattern = "*.".repeat(usize::from(levels));
    pattern.push_str(destination.marker());
    pattern.push('.');
    pattern.push_str(destination.name());
    pattern
}

/// Checks that `destination` can be routed through a cascade of `levels` levels.
pub(crate) fn check_destination(levels: u8, destination: Destination<'_>) -> Result<(), Error> {
    let name = destination.name();
    let fixed = 2 * usize::from(levels) + destination.marker().len() + 1;
    if fixed + name.len() > MAX_ROUTING_KEY {
        return Err(Error::invalid_message(format!(
            "the {} has a name of {} bytes; with {levels} delay levels names may have at most {} \
             bytes, since a routing key has at most {MAX_ROUTING_KEY}",
            destination.describe(),
            name.len(),
            MAX_ROUTING_KEY - fixed
        )));
    }
    if name.is_empty() || name.contains(['*', '#']) || name.split('.').any(str::is_empty) {
        return Err(Error::invalid_message(format!(
            "the {} cannot be reached through the delay cascade: names must be non-empty, \
             without `*`, `#` or empty dot-separated words",
            destination.describe()
        )));
    }
    Ok(())
}

/// Who schedules a delayed message, which decides how its delay is rounded to the cascade's
/// whole seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheduler {
    /// An application's send.
    Send,
    /// The worker's retry or park copy of a delivery.
    Worker,
}

/// The whole seconds a message waits in the cascade for `delay`: rounded **down**, so that it
/// comes out less than a second before its not-before and the worker waits out the rest aside
/// (holding only the unacknowledged delivery), instead of up to a second late. A send due in
/// less than a second is published straight to its queue.
///
/// A copy from the worker due in less than a second waits one second instead: the worker parks
/// a delivery that is early by less than a second only when it has no room to wait for it, and
/// publishing it straight back would hand it over again at once, round and round.
pub(crate) fn cascade_seconds(delay: Duration, scheduler: Scheduler) -> u64 {
    let seconds = delay.as_secs();
    if seconds == 0 && !delay.is_zero() && scheduler == Scheduler::Worker {
        1
    } else {
        seconds
    }
}

/// Where to publish a message that must wait `seconds` (> 0, < 2^levels) before reaching
/// `destination`: the exchange of the highest set bit, with the bits (most significant first)
/// and the destination in the routing key.
pub(crate) fn cascade_route(
    names: &Names,
    levels: u8,
    seconds: u64,
    destination: Destination<'_>,
) -> Route {
    debug_assert!(seconds > 0 && seconds < (1 << levels));
    let mut key = String::with_capacity(2 * usize::from(levels) + 2 + destination.name().len());
    for level in (0..levels).rev() {
        key.push(if seconds >> level & 1 == 1 { '1' } else { '0' });
        key.push('.');
    }
    key.push_str(destination.marker());
    key.push('.');
    key.push_str(destination.name());
    let highest = u8::try_from(63 - seconds.leading_zeros()).expect("below 64");
    Route {
        exchange: names.level(levels, highest),
        routing_key: key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names::new(&RabbitMqOptions::default().with_prefix("t."))
    }

    /// Matches a topic pattern the way RabbitMQ does (`*` one word, `#` zero or more).
    fn matches(pattern: &str, key: &str) -> bool {
        fn go(p: &[&str], k: &[&str]) -> bool {
            match (p.first(), k.first()) {
                (None, None) => true,
                (Some(&"#"), _) => go(&p[1..], k) || (!k.is_empty() && go(p, &k[1..])),
                (Some(&"*"), Some(_)) => go(&p[1..], &k[1..]),
                (Some(w), Some(x)) if w == x => go(&p[1..], &k[1..]),
                _ => false,
            }
        }
        let p: Vec<&str> = pattern.split('.').collect();
        let k: Vec<&str> = key.split('.').collect();
        go(&p, &k)
    }

    /// Follows a message through the cascade as the broker would: returns the levels whose
    /// queue it waits in, and whether it reaches the destination's binding.
    fn simulate(levels: u8, route: &Route, destination: Destination<'_>) -> (Vec<u8>, bool) {
        let names = names();
        let mut waited = Vec::new();
        let mut exchange = route.exchange.clone();
        loop {
            if exchange == names.delivery_exchange(levels) {
                let reached = matches(
                    &destination_pattern(levels, destination),
                    &route.routing_key,
                );
                return (waited, reached);
            }
            let level = (0..levels)
                .find(|l| names.level(levels, *l) == exchange)
                .expect("a level exchange");
            if matches(&level_pattern(levels, level, true), &route.routing_key) {
                waited.push(level);
            } else {
                assert!(matches(
                    &level_pattern(levels, level, false),
                    &route.routing_key
                ));
            }
            // Waiting in the queue or skipping it, the message moves on to the level below.
            exchange = names.below(levels, level);
        }
    }

    #[test]
    fn delays_round_down_to_whole_seconds_but_worker_copies_wait_at_least_one() {
        let ms = Duration::from_millis;
        for scheduler in [Scheduler::Send, Scheduler::Worker] {
            assert_eq!(cascade_seconds(Duration::ZERO, scheduler), 0);
            assert_eq!(cascade_seconds(ms(1000), scheduler), 1);
            assert_eq!(cascade_seconds(ms(1999), scheduler), 1);
            assert_eq!(cascade_seconds(ms(2000), scheduler), 2);
            assert_eq!(cascade_seconds(Duration::from_secs(90), scheduler), 90);
        }
        assert_eq!(cascade_seconds(ms(1), Scheduler::Send), 0);
        assert_eq!(cascade_seconds(ms(999), Scheduler::Send), 0);
        assert_eq!(cascade_seconds(ms(1), Scheduler::Worker), 1);
        assert_eq!(cascade_seconds(ms(999), Scheduler::Worker), 1);
    }

    #[test]
    fn every_delay_waits_exactly_its_seconds_and_reaches_its_destination() {
        let levels = 6;
        for seconds in 1..(1u64 << levels) {
            let dest = Destination::Queue("t.orders");
            let route = cascade_route(&names(), levels, seconds, dest);
            let (waited, reached) = simulate(levels, &route, dest);
            let total: u64 = waited.iter().map(|l| 1u64 << l).sum();
            assert_eq!(total, seconds, "{route:?}");
            assert!(reached, "{route:?}");
        }
    }

    #[test]
    fn routing_keys_carry_the_bits_most_significant_first() {
        let route = cascade_route(&names(), 4, 5, Destination::Queue("t.a"));
        assert_eq!(route.routing_key, "0.1.0.1.q.t.a");
        assert_eq!(route.exchange, "t.redeliver.delay.n4.l02");
        let route = cascade_route(&names(), 4, 1, Destination::Queue("t.b"));
        assert_eq!(route.routing_key, "0.0.0.1.q.t.b");
        assert_eq!(route.exchange, "t.redeliver.delay.n4.l00");
    }

    #[test]
    fn a_destination_never_receives_another_ones_messages() {
        let levels = 3;
        let key = cascade_route(&names(), levels, 1, Destination::Queue("a.b")).routing_key;
        assert!(matches(
            &destination_pattern(levels, Destination::Queue("a.b")),
            &key
        ));
        assert!(!matches(
            &destination_pattern(levels, Destination::Queue("b")),
            &key
        ));
    }

    #[test]
    fn names_follow_the_documented_scheme() {
        let n = names();
        assert_eq!(n.endpoint_queue("orders"), "t.orders");
        assert_eq!(n.dead_letter_queue("orders"), "t.orders.dead-letters");
        assert_eq!(n.topic_exchange("events"), "t.events");
        assert_eq!(n.delivery_exchange(28), "t.redeliver.delay.n28.deliver");
        assert_eq!(n.unroutable(), "t.redeliver.delay.unroutable");
        let fixed = Names::new(
            &RabbitMqOptions::default()
                .with_fixed_ttl_retry_queue("-retry", Duration::from_secs(30)),
        );
        assert_eq!(
            fixed.retry_queue("webhook").as_deref(),
            Some("webhook-retry")
        );
    }

    #[test]
    fn destinations_that_cannot_be_routed_are_refused() {
        assert!(check_destination(28, Destination::Queue("orders")).is_ok());
        let long = "x".repeat(200);
        let e = check_destination(28, Destination::Queue(&long)).unwrap_err();
        assert!(e.to_string().contains("at most 197 bytes"), "{e}");
        assert!(check_destination(28, Destination::Queue("a..b")).is_err());
        assert!(check_destination(28, Destination::Queue("a*")).is_err());
    }
}
