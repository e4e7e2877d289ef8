//! Resilience against retry storms on the in-memory transport, with tokio's clock paused: exact
//! figures for a ten-minute outage behind a circuit breaker and a retry budget, for a
//! `Retry-After` pausing a consumer and a key, and for what is never lost.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use redeliver::host::HostConfig;
use redeliver::host::resilience::{
    CircuitBreaker, CircuitState, OverBudget, RampUp, Resilience, RetryBudget, Throttle,
};
use redeliver::memory::MemoryTransport;
use redeliver::{
    Backoff, BackoffPolicy, Consumer, Context, Error, Host, Jitter, Message, Outcome, Transport,
    reasons,
};
use redeliver_conformance::resilience::{Answer, Downstream, DownstreamCall};
use support::{secs, within};

const MS: Duration = Duration::from_millis(1);

fn setup() -> (MemoryTransport, Arc<dyn Transport>) {
    let memory = MemoryTransport::new();
    (memory.clone(), Arc::new(memory))
}

fn fixed(delay: Duration, max_attempts: u32) -> BackoffPolicy {
    BackoffPolicy::builder()
        .max_attempts(max_attempts)
        .backoff(Backoff::fixed(delay))
        .jitter(Jitter::None)
        .build()
        .unwrap()
}

async fn send_numbers(transport: &Arc<dyn Transport>, endpoint: &str, n: u32) {
    for i in 0..n {
        transport
            .send(endpoint, Message::json(&i).unwrap())
            .await
            .unwrap();
    }
}

/// A consumer of `endpoint` whose handler calls `downstream`.
fn calling(
    endpoint: &str,
    downstream: &Downstream,
    concurrency: usize,
    policy: BackoffPolicy,
    resilience: Resilience,
) -> Consumer {
    let downstream = downstream.clone();
    Consumer::endpoint(endpoint)
        .concurrency(concurrency)
        .retry_policy(policy)
        .resilience(resilience)
        .handler(move |_: u32, ctx: Context| {
            let downstream = downstream.clone();
            async move { downstream.call(&ctx).await }
        })
}

/// The most calls under way at the start of a call, for each second from `from`, over `seconds`.
fn most_in_flight_per_second(calls: &[DownstreamCall], from: Duration, seconds: u32) -> Vec<usize> {
    (0..seconds)
        .map(|s| {
            let (start, end) = (from + secs(u64::from(s)), from + secs(u64::from(s) + 1));
            calls
                .iter()
                .filter(|c| c.started >= start && c.started < end)
                .map(|c| c.in_flight)
                .max()
                .unwrap_or(0)
        })
        .collect()
}

/// The acceptance scenario: 10,000 messages, a downstream failing for 10 minutes and then
/// recovering, concurrency 10, each call taking 100 ms.
///
/// - t = 0: 10 calls. At 0.1 s they fail one after the other: the lanes of the first 4 failures
///   take the next message at once (4 failures in a row do not open the circuit), the 5th
///   failure opens it until 30.1 s, and the other 5 lanes take nothing. The 4 calls started at
///   0.1 s fail at 0.2 s: 14 calls before the circuit opened.
/// - The budget: 5 + 0.1 x 14 first attempts = 6 retries; the 8 other failures of the first
///   0.2 s are delayed: by one window (60 s) for the first 6 over budget, two for the next 2.
/// - Every 30.1 s one probe (k x 30.1 s): 19 fail while the downstream is down (the first
///   one's retry is over budget too, the 9th, delayed two windows; then the window holds at
///   most 2 probes), the 20th, at 602.0 s, succeeds and closes the circuit at 602.1 s.
/// - Then concurrency ramps up by one a second, from 1 to 10, and every message completes.
#[tokio::test(start_paused = true)]
async fn a_ten_minute_outage_costs_probes_only_and_loses_nothing() {
    const MESSAGES: u32 = 10_000;
    let (memory, transport) = setup();
    send_numbers(&transport, "orders", MESSAGES).await;
    let downstream = Downstream::new(100 * MS).failing_for(secs(600));
    let resilience = Resilience::new()
        .retry_budget(
            RetryBudget::builder()
                .ratio(0.1)
                .min_retries(5)
                .window(secs(60))
                .over_budget(OverBudget::Delay)
                .build()
                .unwrap(),
        )
        .circuit_breaker(
            CircuitBreaker::builder()
                .consecutive_failures(5)
                .cool_down(secs(30))
                .build()
                .unwrap(),
        )
        .ramp_up(
            RampUp::builder()
                .initial(1)
                .step(1)
                .every(secs(1))
                .build()
                .unwrap(),
        );
    let host = Host::builder(transport.clone())
        .consumer(calling(
            "orders",
            &downstream,
            10,
            fixed(secs(10), 5),
            resilience,
        ))
        .start()
        .await
        .unwrap();
    let monitor = host.resilience("orders").unwrap();
    downstream.watch(monitor.clone());

    // Right after the first failures: open, nothing allowed, the budget spent.
    within(
        "the circuit to open",
        memory.wait_until(|_| monitor.snapshot().stats.circuit_opened == 1),
    )
    .await;
    let open = monitor.snapshot();
    assert_eq!(
        open.circuit,
        Some(CircuitState::Open {
            remaining: secs(30)
        })
    );
    assert_eq!((open.allowed_concurrency, open.budget_left), (0, Some(0)));

    within("idle", memory.wait_until_idle()).await;
    let stats = host.shutdown().await[0].1;
    let after = monitor.snapshot();
    let calls = downstream.calls();

    // Nothing lost, nothing dead-lettered, every message completed after the recovery.
    assert_eq!(stats.completed, u64::from(MESSAGES));
    assert_eq!((stats.dead_lettered, stats.retried), (0, 33));
    assert_eq!(stats.handled, u64::from(MESSAGES) + 33);
    assert!(memory.dead_letters("orders").is_empty());
    assert_eq!(downstream.successes(), MESSAGES as usize);
    assert!(
        calls
            .iter()
            .filter(|c| c.answer == Answer::Ok)
            .all(|c| c.started >= secs(600)),
        "no success before the recovery"
    );

    // During the outage: 14 calls before the circuit opened, then the probes only, one at a
    // time.
    let during: Vec<&DownstreamCall> = calls.iter().filter(|c| c.started < secs(600)).collect();
    assert_eq!(during.len(), 33);
    assert!(during.iter().all(|c| c.answer == Answer::Unavailable));
    let before_opening: Vec<Duration> = during[..14].iter().map(|c| c.started).collect();
    assert_eq!(
        before_opening,
        [[Duration::ZERO; 10].as_slice(), &[100 * MS; 4]].concat()
    );
    assert!(
        during[..14]
            .iter()
            .all(|c| c.circuit == Some(CircuitState::Closed))
    );
    let probes: Vec<Duration> = calls
        .iter()
        .filter(|c| c.circuit == Some(CircuitState::HalfOpen))
        .map(|c| c.started)
        .collect();
    let expected: Vec<Duration> = (1..=20).map(|k| 30_100 * MS * k).collect();
    assert_eq!(probes, expected, "one probe per cool-down, at k x 30.1 s");
    assert!(
        calls
            .iter()
            .all(|c| !matches!(c.circuit, Some(CircuitState::Open { .. }))),
        "no handler call while open"
    );
    assert!(
        calls
            .iter()
            .filter(|c| c.circuit == Some(CircuitState::HalfOpen))
            .all(|c| c.in_flight == 1),
        "a probe runs alone"
    );
    assert_eq!((after.stats.probes, after.stats.circuit_opened), (20, 20));

    // The budget: 24 retries within it, after the policy's 10 s; 9 over it, delayed by one
    // window (60 s) or two.
    assert_eq!(
        (
            after.stats.retries_within_budget,
            after.stats.retries_delayed_over_budget,
            after.stats.retries_dead_lettered_over_budget
        ),
        (24, 9, 0)
    );
    let mut delays: Vec<Duration> = calls
        .iter()
        .filter(|c| c.attempt == 2)
        .filter_map(|c| c.last_delay)
        .collect();
    delays.sort();
    assert_eq!(
        delays,
        [[secs(10); 24].as_slice(), &[secs(60); 6], &[secs(120); 3]].concat()
    );

    // After the probe closed the circuit at 602.1 s: one more call at once every second.
    let closed_at = 602_100 * MS;
    assert_eq!(
        most_in_flight_per_second(&calls, closed_at, 11),
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10]
    );
    assert_eq!(after.circuit, Some(CircuitState::Closed));
    assert_eq!(after.allowed_concurrency, 10);
}

/// The same outage without resilience, for comparison: 100 calls a second (10 every 100 ms)
/// until every message has failed its 5 attempts, at 500 s: all 10,000 dead-lettered.
#[tokio::test(start_paused = true)]
async fn without_resilience_the_outage_is_a_retry_storm() {
    const MESSAGES: u32 = 10_000;
    let (memory, transport) = setup();
    send_numbers(&transport, "orders", MESSAGES).await;
    let downstream = Downstream::new(100 * MS).failing_for(secs(600));
    let policy = fixed(secs(10), 5);
    let called = downstream.clone();
    let host = Host::builder(transport.clone())
        .consumer(
            Consumer::endpoint("orders")
                .concurrency(10)
                .retry_policy(policy)
                .handler(move |_: u32, ctx: Context| {
                    let downstream = called.clone();
                    async move { downstream.call(&ctx).await }
                }),
        )
        .start()
        .await
        .unwrap();
    within("idle", memory.wait_until_idle()).await;
    let stats = host.shutdown().await[0].1;
    let calls = downstream.calls();
    assert_eq!(calls.len(), 50_000);
    assert!(calls.iter().all(|c| c.answer == Answer::Unavailable));
    assert_eq!(
        calls.last().unwrap().started,
        499_900 * MS,
        "10 calls every 100 ms"
    );
    assert_eq!((stats.completed, stats.dead_lettered), (0, 10_000));
    assert_eq!(memory.dead_letters("orders").len(), 10_000);
}

/// A 429 with `Retry-After: 30`, answered in 50 ms while the other calls take 100 ms: the
/// consumer takes nothing for exactly 30 s, then resumes at half its concurrency and ramps up.
#[tokio::test(start_paused = true)]
async fn a_retry_after_of_30_s_pauses_the_consumer_for_exactly_30_s() {
    const MESSAGES: u32 = 100;
    let (memory, transport) = setup();
    send_numbers(&transport, "webhooks", MESSAGES).await;
    let downstream = Downstream::new(100 * MS).throttling_once(None, 30, 50 * MS);
    let resilience = Resilience::new()
        .throttle(Throttle::default())
        .ramp_up(RampUp::default());
    let host = Host::builder(transport.clone())
        .consumer(calling(
            "webhooks",
            &downstream,
            4,
            fixed(secs(1), 5),
            resilience,
        ))
        .start()
        .await
        .unwrap();
    let monitor = host.resilience("webhooks").unwrap();

    within(
        "the pause",
        memory.wait_until(|_| monitor.snapshot().throttled_for.is_some()),
    )
    .await;
    let paused = monitor.snapshot();
    assert_eq!(paused.throttled_for, Some(secs(30)));
    assert_eq!(paused.allowed_concurrency, 0);
    assert_eq!(paused.stats.throttle_pauses, 1);
    assert_eq!(
        host.health()[0].resilience.unwrap().throttled_for,
        Some(secs(30))
    );

    within("idle", memory.wait_until_idle()).await;
    let stats = host.shutdown().await[0].1;
    let calls = downstream.calls();

    let starts: Vec<Duration> = calls.iter().map(|c| c.started).take(5).collect();
    assert_eq!(
        starts,
        [
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
            30_050 * MS
        ],
        "4 calls at once, then nothing until 30 s after the 429 (at 50 ms)"
    );
    assert!(
        !calls
            .iter()
            .any(|c| c.started > Duration::ZERO && c.started < 30_050 * MS),
        "no call during the pause"
    );
    let throttled: Vec<&DownstreamCall> = calls
        .iter()
        .filter(|c| c.answer == Answer::Throttled(30))
        .collect();
    assert_eq!(throttled.len(), 1);
    assert_eq!(throttled[0].ended, 50 * MS);
    // Half of 4 after the pause, then one more a second.
    assert_eq!(most_in_flight_per_second(&calls, 30_050 * MS, 3), [2, 3, 4]);
    let retried: Vec<&DownstreamCall> = calls.iter().filter(|c| c.attempt == 2).collect();
    assert_eq!(retried.len(), 1);
    assert!(
        retried[0].started >= 30_050 * MS,
        "the 429'd message not before its Retry-After"
    );
    assert_eq!(
        (stats.completed, stats.retried, stats.dead_lettered),
        (100, 1, 0)
    );
    assert_eq!(calls.len(), 101);
}

/// Keys `a` and `b` alternate; the first call for `a` is answered 429 with `Retry-After: 30`:
/// the 19 other deliveries of `a` are parked until then, not called, while `b` goes on.
#[tokio::test(start_paused = true)]
async fn a_throttled_key_is_put_off_while_the_others_go_on() {
    let (memory, transport) = setup();
    for i in 0..40u32 {
        let key = if i % 2 == 0 { "a" } else { "b" };
        transport
            .send(
                "webhooks",
                Message::json(&i).unwrap().with_header("downstream", key),
            )
            .await
            .unwrap();
    }
    let downstream = Downstream::new(100 * MS)
        .keyed_by_header("downstream")
        .throttling_once(Some("a"), 30, 50 * MS);
    let resilience = Resilience::new()
        .throttle(Throttle::default())
        .keyed_by_header("downstream");
    let host = Host::builder(transport.clone())
        .consumer(calling(
            "webhooks",
            &downstream,
            2,
            fixed(secs(1), 5),
            resilience,
        ))
        .start()
        .await
        .unwrap();
    let monitor = host.resilience("webhooks").unwrap();
    within("idle", memory.wait_until_idle()).await;
    let stats = host.shutdown().await[0].1;
    let after = monitor.snapshot();
    let calls = downstream.calls();

    let of = |key: &str| -> Vec<Duration> {
        calls
            .iter()
            .filter(|c| c.key.as_deref() == Some(key))
            .map(|c| c.started)
            .collect()
    };
    let a = of("a");
    assert_eq!(a.len(), 21, "20 messages, one retried");
    assert_eq!(a[0], Duration::ZERO);
    assert!(a[1..].iter().all(|t| *t >= 30_050 * MS), "{a:?}");
    let b = of("b");
    assert_eq!(b.len(), 20);
    assert!(b.iter().all(|t| *t < secs(2)), "b went on: {b:?}");
    assert_eq!((after.stats.parked, after.stats.throttle_pauses), (19, 1));
    assert_eq!(stats.parked, 19, "parked without counting an attempt");
    assert!(
        calls
            .iter()
            .filter(|c| c.key.as_deref() == Some("a"))
            .all(|c| c.attempt <= 2)
    );
    assert_eq!((stats.completed, stats.dead_lettered), (40, 0));
    assert_eq!(after.throttled_keys, 0, "the pause is over");
}

/// Over budget with `dead-letter`: with a floor of 3 retries a minute and no share of first
/// attempts, 10 always-failing messages make 3 retries; the other 7 messages, then the 3
/// retried ones, are dead-lettered with the budget's reason.
#[tokio::test(start_paused = true)]
async fn retries_over_budget_are_dead_lettered_when_so_configured() {
    let (memory, transport) = setup();
    send_numbers(&transport, "orders", 10).await;
    let calls = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&calls);
    let budget = RetryBudget::builder()
        .ratio(0.0)
        .min_retries(3)
        .window(secs(60))
        .over_budget(OverBudget::DeadLetter)
        .build()
        .unwrap();
    let host = Host::builder(transport.clone())
        .consumer(
            Consumer::endpoint("orders")
                .retry_policy(fixed(secs(1), 5))
                .resilience(Resilience::new().retry_budget(budget))
                .handler(move |_: u32, _: Context| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async { Outcome::retry("downstream unavailable") }
                }),
        )
        .start()
        .await
        .unwrap();
    let monitor = host.resilience("orders").unwrap();
    within("idle", memory.wait_until_idle()).await;
    let stats = host.shutdown().await[0].1;
    let after = monitor.snapshot();

    assert_eq!(calls.load(Ordering::SeqCst), 13);
    let dead = memory.dead_letters("orders");
    let mut attempts: Vec<u32> = dead.iter().map(Message::attempt).collect();
    attempts.sort();
    assert_eq!(attempts, [1, 1, 1, 1, 1, 1, 1, 2, 2, 2]);
    assert!(dead.iter().all(|m| {
        let info = m.dead_letter().unwrap();
        info.reason == reasons::RETRY_BUDGET_EXHAUSTED
            && info
                .description
                .as_deref()
                .is_some_and(|d| d.contains("downstream unavailable"))
    }));
    assert_eq!(
        (
            after.stats.retries_within_budget,
            after.stats.retries_dead_lettered_over_budget
        ),
        (3, 10)
    );
    assert_eq!((stats.retried, stats.dead_lettered), (3, 10));
    assert_eq!(after.budget_left, Some(0));
}

/// A delivery taken just before the circuit opened is held by the worker, not handled and not
/// counted as an attempt; after the cool-down it is the probe, although another lane has been
/// waiting for a delivery all along. At shutdown, a held delivery is given back.
#[tokio::test(start_paused = true)]
async fn a_delivery_taken_as_the_circuit_opens_waits_for_the_probe_or_goes_back() {
    for shut_down_while_held in [false, true] {
        let (memory, transport) = setup();
        let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&attempts);
        let breaker = CircuitBreaker::builder()
            .consecutive_failures(1)
            .cool_down(secs(30))
            .build()
            .unwrap();
        let host = Host::builder(transport.clone())
            .consumer(
                Consumer::endpoint("orders")
                    .concurrency(3)
                    .retry_policy(fixed(secs(60), 5))
                    .resilience(Resilience::new().circuit_breaker(breaker))
                    .handler(move |n: u32, ctx: Context| {
                        seen.lock().unwrap().push((n, ctx.attempt()));
                        async move {
                            if n == 1 {
                                // Long enough for the other lanes to wait for a delivery.
                                tokio::time::sleep(secs(1)).await;
                                Outcome::retry("downstream unavailable")
                            } else {
                                Outcome::success()
                            }
                        }
                    }),
            )
            .start()
            .await
            .unwrap();
        let monitor = host.resilience("orders").unwrap();
        // One lane takes message 1; another waits for a delivery, the third for its turn.
        transport
            .send("orders", Message::json(&1).unwrap())
            .await
            .unwrap();
        within(
            "the circuit to open",
            memory.wait_until(|_| monitor.snapshot().stats.circuit_opened == 1),
        )
        .await;
        transport
            .send("orders", Message::json(&2).unwrap())
            .await
            .unwrap();
        within(
            "message 2 to be taken",
            memory.wait_until(|m| m.in_flight("orders") == 1),
        )
        .await;
        tokio::task::yield_now().await;
        assert_eq!(*attempts.lock().unwrap(), [(1, 1)], "held, not handled");
        assert!(memory.pending("orders").is_empty());

        if shut_down_while_held {
            let stats = host.shutdown().await[0].1;
            // Given back once, or twice: the lane still waiting for a delivery as the worker
            // stops may take it again, and give it back again.
            assert!((1..=2).contains(&stats.abandoned), "{stats:?}");
            let pending = memory.pending("orders");
            assert_eq!(pending.len(), 1, "given back");
            assert_eq!(pending[0].attempt(), 1, "no attempt counted");
            assert_eq!(memory.scheduled("orders").len(), 1, "message 1's retry");
            assert!(memory.dead_letters("orders").is_empty());
        } else {
            let started = tokio::time::Instant::now();
            within(
                "the probe",
                memory.wait_until(|m| m.in_flight("orders") == 0 && m.pending("orders").is_empty()),
            )
            .await;
            assert_eq!(
                started.elapsed(),
                secs(30),
                "handled at the end of the cool-down"
            );
            assert_eq!(*attempts.lock().unwrap(), [(1, 1), (2, 1)]);
            let after = monitor.snapshot();
            assert_eq!(after.stats.probes, 1);
            assert_eq!(after.circuit, Some(CircuitState::Closed));
            host.shutdown().await;
        }
    }
}

/// The mechanisms come from a configuration file, and a wrong value names its path.
#[tokio::test(start_paused = true)]
async fn resilience_comes_from_the_configuration_file() {
    let config: HostConfig = toml::from_str(
        r#"
        [consumers.orders.resilience]
        retry_budget = { ratio = 0.1, min_retries = 7, window = "1m" }
        circuit_breaker = { consecutive_failures = 3, cool_down = "10s" }
        throttle = {}
        ramp_up = { every = "2s" }
        "#,
    )
    .unwrap();
    let (_, transport) = setup();
    let host = Host::builder(transport.clone())
        .consumer(
            Consumer::endpoint("orders")
                .concurrency(4)
                .handler(|_: u32, _: Context| async { Outcome::success() }),
        )
        .configure(&config)
        .unwrap()
        .start()
        .await
        .unwrap();
    let health = host.health();
    let snapshot = health[0].resilience.expect("configured");
    assert_eq!(snapshot.circuit, Some(CircuitState::Closed));
    assert_eq!(snapshot.budget_left, Some(7));
    assert_eq!(snapshot.allowed_concurrency, 4);
    host.shutdown().await;

    let wrong: HostConfig = toml::from_str(
        r#"
        [consumers.orders.resilience]
        circuit_breaker = { failure_rate = { rate = 1.5 } }
        "#,
    )
    .unwrap();
    let e = Host::builder(transport)
        .consumer(
            Consumer::endpoint("orders").handler(|_: u32, _: Context| async { Outcome::success() }),
        )
        .configure(&wrong)
        .unwrap_err();
    match e {
        Error::Config { field, .. } => assert_eq!(
            field,
            "consumers.orders.resilience.circuit_breaker.failure_rate.rate"
        ),
        other => panic!("unexpected {other}"),
    }
}
