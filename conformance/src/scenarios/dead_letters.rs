//! Dead-letter handlers.

use redeliver_core::{Outcome, Source, Topology};

use crate::Factory;

use super::setup::{Setup, assert_stats, fixed, order, stop, unique, worker};

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
