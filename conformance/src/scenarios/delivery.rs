//! Deliveries: not-before, head of line, and deliveries given back.

use chrono::TimeDelta;
use futures::StreamExt;
use redeliver_core::{ConsumeOptions, Outcome, Source, Topology};

use crate::Factory;
use crate::probe::expect_within;

use super::setup::{Setup, assert_stats, fixed, order, stop, unique, worker};

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

/// A message due in one delay unit, sent after one due in twenty, is handled first, long before
/// the other is due: a long delay never holds up a shorter one behind it.
pub async fn long_delay_does_not_hold_up_short(factory: &dyn Factory) {
    let endpoint = unique("head-of-line");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let w = worker(&setup, endpoint.as_str(), fixed(setup.timing, 3), |_, _| {
        Outcome::success()
    })
    .await;

    let unit = TimeDelta::from_std(setup.timing.unit).expect("a short unit");
    let now = setup.transport.clock().now();
    setup
        .send(&endpoint, order(1).with_not_before(now + unit * 20))
        .await;
    let short = order(2).with_not_before(now + unit);
    let short_id = short.id().to_string();
    setup.send(&endpoint, short).await;
    // Well before the long one is due.
    setup.calls.wait_for(1, setup.timing.unit * 10).await;

    let calls = setup.calls.all();
    assert_eq!(calls[0].message_id, short_id, "the short delay comes first");
    assert!(calls[0].at < now + unit * 20);
    assert_stats(stop(w, setup.timing).await, 1, 0, 0, 0);
    setup.finish().await;
}

/// A delivery dropped without being settled comes back, the same message at the same attempt.
pub async fn dropped_delivery_comes_back(factory: &dyn Factory) {
    let endpoint = unique("dropped");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let message = order(1);
    let id = message.id().clone();
    setup.send(&endpoint, message).await;
    let mut stream = expect_within(
        setup.timing.patience,
        "the transport start a consumer (Transport::consume)",
        setup
            .transport
            .consume(&Source::endpoint(&endpoint), ConsumeOptions::default()),
    )
    .await
    .expect("the transport consumes");
    let mut next = async || {
        expect_within(setup.timing.patience, "a delivery", stream.next())
            .await
            .expect("the stream goes on")
            .expect("a delivery")
    };
    let first = next().await;
    assert_eq!(first.message().id(), &id);
    drop(first);
    let again = next().await;
    assert_eq!(again.message().id(), &id, "the dropped delivery comes back");
    assert_eq!(again.message().attempt(), 1, "dropping is not an attempt");
    expect_within(setup.timing.patience, "a completion", again.complete())
        .await
        .expect("completed");
    drop(stream);
    setup.finish().await;
}
