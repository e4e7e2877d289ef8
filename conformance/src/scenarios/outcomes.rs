//! Handler outcomes: success, retries up to the limit, permanent failures, discards, `Retry-After`, invalid payloads and panics.

use redeliver_core::{Message, Outcome, RetryAfter, Topology};

use crate::Factory;
use crate::probe::DeadLetterProbe;

use super::setup::{Setup, assert_stats, fixed, order, stop, unique, worker};

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
/// at least the policy's delay apart, with the same message id, the sender's headers and
/// nothing else, and the previous attempt's reason), then the message is dead-lettered with the
/// last failure's reason and attempt 3.
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

    let message = order(1).with_header("tenant", "acme");
    let id = message.id().to_string();
    setup.send(&endpoint, message).await;
    let dead = dead.wait_for(1, setup.timing.patience).await;

    assert_stats(stop(w, setup.timing).await, 0, 2, 1, 0);
    assert_eq!(setup.calls.attempts(), [1, 2, 3]);
    assert!(
        setup.calls.all().iter().all(|c| c.message_id == id),
        "the id survives retries"
    );
    for call in setup.calls.all() {
        assert_eq!(
            call.headers,
            [("tenant".to_owned(), "acme".to_owned())],
            "attempt {}: the sender's headers only",
            call.attempt
        );
        let previous =
            (call.attempt > 1).then(|| format!("failure on attempt {}", call.attempt - 1));
        assert_eq!(call.last_failure, previous, "attempt {}", call.attempt);
    }
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
