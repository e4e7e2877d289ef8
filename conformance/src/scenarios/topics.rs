//! Topics: every subscriber gets its own copy and retries it on its own.

use redeliver_core::{Outcome, Topology};

use crate::Factory;

use super::setup::{Setup, assert_stats, fixed, order, stop, unique, worker};

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
