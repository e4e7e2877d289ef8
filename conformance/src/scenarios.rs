//! The scenarios. Each takes a [`Factory`], makes a transport with uniquely named endpoints,
//! runs workers on it, asserts, and cleans up. A failed assertion panics with what differed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::TimeDelta;
use redeliver_core::{
    Backoff, BackoffPolicy, Consumer, ConsumerSettings, Context, Host, Jitter, Message, Outcome,
    RetryAfter, Source, Topology, Transport, WorkerStats,
};
use serde::{Deserialize, Serialize};

use redeliver_core::request_reply::{RequestOptions, Requester, StatusEnvelope, reply_to};

use crate::probe::{Calls, DeadLetterProbe, expect_within};
use crate::{Factory, Timing};

/// The payload every scenario sends.
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u32,
}

fn order(id: u32) -> Message {
    Message::json(&Order { id }).expect("an order serializes")
}

/// A name no other scenario or run uses (`<base>-<random>`).
fn unique(base: &str) -> String {
    let suffix: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(8)
        .collect::<String>()
        .to_lowercase();
    format!("conformance-{base}-{suffix}")
}

/// A retry policy with `max_attempts` and a fixed delay of `timing.unit`, without jitter.
fn fixed(timing: Timing, max_attempts: u32) -> BackoffPolicy {
    BackoffPolicy::builder()
        .max_attempts(max_attempts)
        .backoff(Backoff::fixed(timing.unit))
        .jitter(Jitter::None)
        .build()
        .expect("a valid policy")
}

/// One scenario's transport and topology, removed again by [`Setup::finish`].
struct Setup<'f> {
    factory: &'f dyn Factory,
    topology: Topology,
    transport: Arc<dyn Transport>,
    timing: Timing,
    calls: Calls,
}

impl<'f> Setup<'f> {
    /// `None` when the factory's broker is unavailable (the factory has said so).
    async fn new(factory: &'f dyn Factory, topology: Topology) -> Option<Self> {
        let timing = factory.timing();
        let available = expect_within(
            timing.patience,
            "the factory tell whether the broker is available (Factory::available)",
            factory.available(),
        )
        .await;
        if !available {
            return None;
        }
        let transport = expect_within(
            timing.patience,
            "the factory make a transport (Factory::create)",
            factory.create(&topology),
        )
        .await
        .expect("the factory makes a transport");
        let calls = Calls::new(transport.clock());
        Some(Setup {
            factory,
            topology,
            timing,
            calls,
            transport,
        })
    }

    async fn send(&self, endpoint: &str, message: Message) {
        expect_within(
            self.timing.patience,
            "the transport accept a message (Transport::send)",
            self.transport.send(endpoint, message),
        )
        .await
        .expect("the transport accepts the message");
    }

    async fn finish(self) {
        // Generous: removing is not under test, it only must not hang.
        let removed = expect_within(
            self.timing.patience * 3,
            "the factory remove the scenario's topology (Factory::remove)",
            self.factory.remove(&self.topology),
        )
        .await;
        if let Err(e) = removed {
            eprintln!("conformance: could not remove the scenario's topology: {e}");
        }
    }
}

/// The consumer of `source`, for a host.
fn consumer(source: impl Into<Source>) -> ConsumerSettings {
    match source.into() {
        Source::Endpoint(endpoint) => Consumer::endpoint(endpoint),
        Source::DeadLetters(endpoint) => Consumer::dead_letters(endpoint),
    }
}

/// Starts a host with `consumer`, the scenarios' shutdown timeout, and nothing else: every
/// scenario runs through the application host.
async fn host(setup: &Setup<'_>, consumer: Consumer) -> Host {
    let started = Host::builder(Arc::clone(&setup.transport))
        .shutdown_timeout(setup.timing.unit)
        .consumer(consumer)
        .start();
    expect_within(
        setup.timing.patience,
        "the host start (HostBuilder::start)",
        started,
    )
    .await
    .expect("the host starts")
}

/// Starts a consumer of `source` whose handler records the call and answers with `decide`.
async fn worker(
    setup: &Setup<'_>,
    source: impl Into<Source>,
    policy: BackoffPolicy,
    decide: impl Fn(&Order, &Context) -> Outcome + Send + Sync + 'static,
) -> Host {
    let calls = setup.calls.clone();
    let consumer =
        consumer(source)
            .retry_policy(policy)
            .handler(move |order: Order, ctx: Context| {
                calls.record(&ctx);
                let outcome = decide(&order, &ctx);
                async move { outcome }
            });
    host(setup, consumer).await
}

/// Shuts `host` down (see [`Host::shutdown`]), failing the scenario if that takes longer than
/// the shutdown timeout (`timing.unit`) plus the patience; the statistics of its one consumer.
async fn stop(host: Host, timing: Timing) -> WorkerStats {
    let stopped = expect_within(
        timing.unit + timing.patience,
        "the host shut down (Host::shutdown)",
        host.shutdown(),
    )
    .await;
    stopped.into_iter().next().expect("one consumer").1
}

fn assert_stats(
    stats: WorkerStats,
    completed: u64,
    retried: u64,
    dead_lettered: u64,
    discarded: u64,
) {
    assert_eq!(
        (
            stats.completed,
            stats.retried,
            stats.dead_lettered,
            stats.discarded
        ),
        (completed, retried, dead_lettered, discarded),
        "(completed, retried, dead-lettered, discarded) in {stats:?}"
    );
}

/// A handler that succeeds is called once, with attempt 1; the message is completed.
pub async fn success(factory: &dyn Factory) {
    let endpoint = unique("success");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let w = worker(&setup, endpoint.as_str(), fixed(setup.timing, 3), |_, _| {
        Outcome::success()
    })
    .await;

    setup.send(&endpoint, order(1)).await;
    setup.calls.wait_for(1, setup.timing.patience).await;

    assert_stats(stop(w, setup.timing).await, 1, 0, 0, 0);
    assert_eq!(setup.calls.attempts(), [1]);
    setup.finish().await;
}

/// A handler that always fails with max attempts 3 is called exactly 3 times (attempts 1, 2, 3,
/// at least the policy's delay apart, with the same message id), then the message is
/// dead-lettered with the last failure's reason and attempt 3.
pub async fn retry_until_max_attempts(factory: &dyn Factory) {
    let endpoint = unique("retry");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let mut dead = DeadLetterProbe::start(&setup.transport, &endpoint).await;
    let w = worker(
        &setup,
        endpoint.as_str(),
        fixed(setup.timing, 3),
        |_, ctx| Outcome::retry(format!("failure on attempt {}", ctx.attempt())),
    )
    .await;

    let message = order(1);
    let id = message.id().to_string();
    setup.send(&endpoint, message).await;
    let dead = dead.wait_for(1, setup.timing.patience).await;

    assert_stats(stop(w, setup.timing).await, 0, 2, 1, 0);
    assert_eq!(setup.calls.attempts(), [1, 2, 3]);
    assert!(
        setup.calls.all().iter().all(|c| c.message_id == id),
        "the id survives retries"
    );
    for gap in setup.calls.gaps() {
        assert!(
            gap >= setup.timing.unit,
            "retried after {gap:?}, before the policy's delay"
        );
    }
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id().as_str(), id);
    assert_eq!(dead[0].attempt(), 3);
    let info = dead[0]
        .dead_letter()
        .expect("a dead letter carries its reason");
    assert_eq!(info.reason, "failure on attempt 3");
    setup.finish().await;
}

/// A permanent failure is dead-lettered at once with its reason and description.
pub async fn permanent_failure(factory: &dyn Factory) {
    let endpoint = unique("permanent");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let mut dead = DeadLetterProbe::start(&setup.transport, &endpoint).await;
    let w = worker(&setup, endpoint.as_str(), fixed(setup.timing, 5), |_, _| {
        Outcome::dead_letter_with("authentication", "HTTP 401")
    })
    .await;

    setup.send(&endpoint, order(1)).await;
    let dead = dead.wait_for(1, setup.timing.patience).await;

    assert_stats(stop(w, setup.timing).await, 0, 0, 1, 0);
    assert_eq!(setup.calls.attempts(), [1]);
    let info = dead[0]
        .dead_letter()
        .expect("a dead letter carries its reason");
    assert_eq!(
        (info.reason.as_str(), info.description.as_deref()),
        ("authentication", Some("HTTP 401"))
    );
    assert_eq!(dead[0].attempt(), 1);
    setup.finish().await;
}

/// A discarded message is completed without retries or a dead letter.
pub async fn discard(factory: &dyn Factory) {
    let endpoint = unique("discard");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let w = worker(&setup, endpoint.as_str(), fixed(setup.timing, 5), |_, _| {
        Outcome::discard("unknown organization")
    })
    .await;

    setup.send(&endpoint, order(1)).await;
    setup.calls.wait_for(1, setup.timing.patience).await;

    assert_stats(stop(w, setup.timing).await, 0, 0, 0, 1);
    assert_eq!(setup.calls.attempts(), [1]);
    setup.finish().await;
}

/// A Retry-After of three delay units, with a policy delay of one unit: the next call comes no
/// earlier than three units later.
pub async fn retry_after_floor(factory: &dyn Factory) {
    let endpoint = unique("retry-after");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let floor = setup.timing.unit * 3;
    let w = worker(
        &setup,
        endpoint.as_str(),
        fixed(setup.timing, 3),
        move |_, ctx| match ctx.attempt() {
            1 => Outcome::retry_after("rate-limited", RetryAfter::Delay(floor)),
            _ => Outcome::success(),
        },
    )
    .await;

    setup.send(&endpoint, order(1)).await;
    setup.calls.wait_for(2, setup.timing.patience + floor).await;

    assert_stats(stop(w, setup.timing).await, 1, 1, 0, 0);
    let gap = setup.calls.gaps()[0];
    assert!(
        gap >= floor,
        "the second call came {gap:?} after the first, before the Retry-After"
    );
    setup.finish().await;
}

/// A message sent not before an instant two delay units ahead is not handled before it.
pub async fn not_before_never_violated(factory: &dyn Factory) {
    let endpoint = unique("not-before");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let w = worker(&setup, endpoint.as_str(), fixed(setup.timing, 3), |_, _| {
        Outcome::success()
    })
    .await;

    let wait = setup.timing.unit * 2;
    let not_before =
        setup.transport.clock().now() + TimeDelta::from_std(wait).expect("a short delay");
    setup
        .send(&endpoint, order(1).with_not_before(not_before))
        .await;
    setup.calls.wait_for(1, setup.timing.patience + wait).await;

    assert_stats(stop(w, setup.timing).await, 1, 0, 0, 0);
    let call = &setup.calls.all()[0];
    assert!(
        call.at >= not_before,
        "handled at {} before {not_before}",
        call.at
    );
    assert_eq!(
        call.attempt, 1,
        "waiting for the not-before is not an attempt"
    );
    setup.finish().await;
}

/// A payload that cannot be decoded never reaches the handler and is dead-lettered with reason
/// `invalid payload`, once, without retries; the worker goes on with the next message.
pub async fn invalid_payload(factory: &dyn Factory) {
    let endpoint = unique("invalid");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let mut dead = DeadLetterProbe::start(&setup.transport, &endpoint).await;
    let w = worker(&setup, endpoint.as_str(), fixed(setup.timing, 3), |_, _| {
        Outcome::success()
    })
    .await;

    let invalid = Message::new("{not json").with_content_type("application/json");
    let invalid_id = invalid.id().to_string();
    setup.send(&endpoint, invalid).await;
    setup.send(&endpoint, order(2)).await;
    let dead = dead.wait_for(1, setup.timing.patience).await;
    setup.calls.wait_for(1, setup.timing.patience).await;

    assert_stats(stop(w, setup.timing).await, 1, 0, 1, 0);
    assert_eq!(
        setup.calls.count(),
        1,
        "only the valid message reached the handler"
    );
    assert_eq!(dead[0].id().as_str(), invalid_id);
    assert_eq!(
        dead[0].dead_letter().map(|d| d.reason.as_str()),
        Some("invalid payload")
    );
    assert_eq!(dead[0].attempt(), 1);
    assert_eq!(
        dead[0].body().as_ref(),
        b"{not json",
        "the body is kept as sent"
    );
    setup.finish().await;
}

/// A handler that panics is retried; the message is then handled and the worker survives.
pub async fn panic_is_retried(factory: &dyn Factory) {
    let endpoint = unique("panic");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let w = worker(
        &setup,
        endpoint.as_str(),
        fixed(setup.timing, 3),
        |_, ctx| {
            assert!(
                ctx.attempt() > 1,
                "a bug in the handler (this panic is part of the test)"
            );
            Outcome::success()
        },
    )
    .await;

    setup.send(&endpoint, order(1)).await;
    setup.calls.wait_for(2, setup.timing.patience).await;

    assert_stats(stop(w, setup.timing).await, 1, 1, 0, 0);
    assert_eq!(setup.calls.attempts(), [1, 2]);
    setup.finish().await;
}

/// A topic with two subscribed endpoints: one fails once and retries; the other handles its
/// copy once and never sees that retry.
pub async fn topic_fan_out_isolation(factory: &dyn Factory) {
    let (topic, billing, shipping) = (unique("events"), unique("billing"), unique("shipping"));
    let topology = Topology::new()
        .subscribe(&topic, &billing)
        .subscribe(&topic, &shipping);
    let Some(setup) = Setup::new(factory, topology).await else {
        return;
    };
    let b = worker(
        &setup,
        billing.as_str(),
        fixed(setup.timing, 3),
        |_, ctx| match ctx.attempt() {
            1 => Outcome::retry("billing is down"),
            _ => Outcome::success(),
        },
    )
    .await;
    let s = worker(&setup, shipping.as_str(), fixed(setup.timing, 3), |_, _| {
        Outcome::success()
    })
    .await;

    setup
        .transport
        .publish(&topic, order(1))
        .await
        .expect("the transport accepts the message");
    setup.calls.wait_for(3, setup.timing.patience).await;
    // A marker sent to shipping after billing's retry was handled: shipping's queue is in order,
    // so a stray copy of the retry would be handled before the marker.
    let marker = order(0).with_id("marker");
    setup.send(&shipping, marker).await;
    setup.calls.wait_for(4, setup.timing.patience).await;

    assert_stats(stop(b, setup.timing).await, 1, 1, 0, 0);
    assert_stats(stop(s, setup.timing).await, 2, 0, 0, 0);
    assert_eq!(setup.calls.attempts_on(&billing), [1, 2]);
    assert_eq!(
        setup.calls.attempts_on(&shipping),
        [1, 1],
        "shipping never saw billing's retry"
    );
    setup.finish().await;
}

/// Shutdown with handlers in flight abandons them; after a restart every message is handled,
/// none lost, and abandoning did not count an attempt.
pub async fn graceful_shutdown_without_loss(factory: &dyn Factory) {
    let endpoint = unique("shutdown");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let stuck = Arc::new(AtomicBool::new(true));
    let first = {
        let (calls, stuck) = (setup.calls.clone(), Arc::clone(&stuck));
        let consumer =
            consumer(endpoint.as_str())
                .concurrency(3)
                .handler(move |_: Order, ctx: Context| {
                    calls.record(&ctx);
                    let stuck = stuck.load(Ordering::SeqCst);
                    async move {
                        if stuck {
                            std::future::pending::<()>().await;
                        }
                        Outcome::success()
                    }
                });
        host(&setup, consumer).await
    };
    let mut ids = BTreeSet::new();
    for id in 0..5 {
        let message = order(id);
        ids.insert(message.id().to_string());
        setup.send(&endpoint, message).await;
    }
    setup.calls.wait_for(3, setup.timing.patience).await;

    let stopped = stop(first, setup.timing).await;
    assert_eq!(
        (stopped.abandoned, stopped.completed),
        (3, 0),
        "{stopped:?}"
    );
    stuck.store(false, Ordering::SeqCst);
    let again = Calls::new(setup.transport.clock());
    let second = {
        let again = again.clone();
        let consumer =
            consumer(endpoint.as_str())
                .concurrency(3)
                .handler(move |_: Order, ctx: Context| {
                    again.record(&ctx);
                    async { Outcome::success() }
                });
        host(&setup, consumer).await
    };
    again.wait_for(5, setup.timing.patience).await;

    assert_stats(stop(second, setup.timing).await, 5, 0, 0, 0);
    let handled: BTreeSet<String> = again.all().into_iter().map(|c| c.message_id).collect();
    assert_eq!(handled, ids, "every message handled after the restart");
    assert_eq!(
        again.attempts(),
        [1; 5],
        "abandoning does not count an attempt"
    );
    setup.finish().await;
}

/// A handler attached to an endpoint's dead letters is called once per dead letter, with the
/// dead-letter reason, and completing it removes the dead letter.
pub async fn dead_letter_handler_once_per_dead_letter(factory: &dyn Factory) {
    let endpoint = unique("dead-letter-handler");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let w = worker(
        &setup,
        endpoint.as_str(),
        fixed(setup.timing, 3),
        |_, ctx| match ctx.dead_letter() {
            None => Outcome::dead_letter_with("corrupt", "page 3 unreadable"),
            Some(info) if info.reason == "corrupt" => Outcome::success(),
            Some(other) => panic!("unexpected dead letter {other:?}"),
        },
    )
    .await;
    let listener = worker(
        &setup,
        Source::dead_letters(&endpoint),
        fixed(setup.timing, 3),
        |_, ctx| {
            assert_eq!(
                ctx.dead_letter().map(|d| d.reason.as_str()),
                Some("corrupt")
            );
            Outcome::success()
        },
    )
    .await;

    setup.send(&endpoint, order(1)).await;
    setup.send(&endpoint, order(2)).await;
    setup.calls.wait_for(4, setup.timing.patience).await;

    assert_stats(stop(w, setup.timing).await, 0, 0, 2, 0);
    assert_stats(stop(listener, setup.timing).await, 2, 0, 0, 0);
    let on_dead_letters = setup
        .calls
        .all()
        .into_iter()
        .filter(|c| c.endpoint == endpoint)
        .count();
    assert_eq!(
        on_dead_letters, 4,
        "two handler calls and two dead-letter handler calls"
    );
    setup.finish().await;
}

/// Starts a responder on `endpoint` that answers each request with `answer` (or not at all),
/// sending the reply from the handler's context.
async fn responder(
    setup: &Setup<'_>,
    endpoint: &str,
    answer: impl Fn(&Context) -> Option<StatusEnvelope<Quote>> + Send + Sync + 'static,
) -> Host {
    let calls = setup.calls.clone();
    let consumer = consumer(endpoint).handler(move |_: Order, ctx: Context| {
        calls.record(&ctx);
        let reply = answer(&ctx).map(|envelope| reply_to(&ctx, &envelope).expect("a reply"));
        async move {
            match reply {
                Some((endpoint, message)) => ctx.send(&endpoint, message).await.into(),
                None => Outcome::success(),
            }
        }
    });
    host(setup, consumer).await
}

/// What the responders answer with.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Quote {
    price: u32,
}

/// A request gets its reply, with the status envelope and the response's fields; the responder
/// saw the reply-to and a correlation id.
pub async fn request_reply_round_trip(factory: &dyn Factory) {
    let (service, replies) = (unique("quotes"), unique("replies"));
    let Some(setup) = Setup::new(
        factory,
        Topology::new().endpoint(&service).endpoint(&replies),
    )
    .await
    else {
        return;
    };
    let r = responder(&setup, &service, |_| {
        Some(StatusEnvelope::new(200, "OK", Quote { price: 42 }))
    })
    .await;
    let options = RequestOptions::default()
        .with_timeout(setup.timing.patience)
        .with_app_id("conformance");
    let requester = Requester::start(Arc::clone(&setup.transport), &replies, options)
        .await
        .expect("the requester starts");

    let reply: StatusEnvelope<Quote> = requester
        .request(&service, &Order { id: 1 })
        .await
        .expect("a reply");

    assert!(reply.is_success());
    assert_eq!(
        (reply.status_message.as_str(), reply.body),
        ("OK", Quote { price: 42 })
    );
    requester.shutdown().await;
    assert_stats(stop(r, setup.timing).await, 1, 0, 0, 0);
    setup.finish().await;
}

/// A request without a reply in time is tried again with a new correlation id; the reply to
/// the second try is returned; after the last try the result is a time-out.
pub async fn request_reply_timeout_and_retry(factory: &dyn Factory) {
    let (service, replies) = (unique("slow-quotes"), unique("replies"));
    let Some(setup) = Setup::new(
        factory,
        Topology::new().endpoint(&service).endpoint(&replies),
    )
    .await
    else {
        return;
    };
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let correlation_ids = Arc::clone(&seen);
    let r = responder(&setup, &service, move |ctx| {
        let mut seen = correlation_ids.lock().unwrap_or_else(|p| p.into_inner());
        seen.push(ctx.correlation_id().map(str::to_owned));
        // Silent on the first try of each request, answers the second.
        (seen.len() % 2 == 0).then(|| StatusEnvelope::new(200, "OK", Quote { price: 7 }))
    })
    .await;
    let options = RequestOptions::default()
        .with_timeout(setup.timing.unit * 3)
        .with_attempts(2);
    let requester = Requester::start(Arc::clone(&setup.transport), &replies, options.clone())
        .await
        .expect("the requester starts");

    let reply: StatusEnvelope<Quote> = requester
        .request(&service, &Order { id: 1 })
        .await
        .expect("a reply to the second try");
    assert_eq!(reply.body, Quote { price: 7 });
    let ids = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(ids.len(), 2);
    assert!(
        ids.iter().all(Option::is_some),
        "every try carries a correlation id"
    );
    assert_ne!(ids[0], ids[1], "each try has its own correlation id");

    requester.shutdown().await;
    let one_try = RequestOptions::default()
        .with_timeout(setup.timing.unit)
        .with_attempts(1);
    let requester = Requester::start(Arc::clone(&setup.transport), &replies, one_try)
        .await
        .expect("the requester starts");
    let silent = requester
        .request::<_, Quote>(&service, &Order { id: 2 })
        .await;
    assert!(
        matches!(silent, Err(redeliver_core::Error::Timeout { .. })),
        "{silent:?}"
    );
    requester.shutdown().await;
    stop(r, setup.timing).await;
    setup.finish().await;
}

/// Replies the requester cannot use are dead-lettered with a reason: without a correlation id
/// at once, invalid JSON at once, an unknown correlation id after a few tries.
pub async fn request_reply_unusable_replies(factory: &dyn Factory) {
    let replies = unique("replies");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&replies)).await else {
        return;
    };
    let mut dead = DeadLetterProbe::start(&setup.transport, &replies).await;
    let options = RequestOptions::default().with_unknown_replies(2, setup.timing.unit);
    let requester = Requester::start(Arc::clone(&setup.transport), &replies, options)
        .await
        .expect("the requester starts");
    let envelope = StatusEnvelope::new(200, "OK", Quote { price: 1 });

    setup
        .send(&replies, Message::json(&envelope).expect("json"))
        .await;
    setup
        .send(
            &replies,
            Message::new("{oops")
                .with_correlation_id("c-1")
                .with_content_type("application/json"),
        )
        .await;
    setup
        .send(
            &replies,
            Message::json(&envelope)
                .expect("json")
                .with_correlation_id("nobody-asked"),
        )
        .await;
    let dead = dead.wait_for(3, setup.timing.patience).await;

    let mut reasons: Vec<(String, u32)> = dead
        .iter()
        .map(|m| {
            (
                m.dead_letter()
                    .map(|d| d.reason.clone())
                    .unwrap_or_default(),
                m.attempt(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("invalid payload".to_owned(), 1),
            ("missing correlation id".to_owned(), 1),
            ("unknown correlation id".to_owned(), 2),
        ]
    );
    requester.shutdown().await;
    setup.finish().await;
}
