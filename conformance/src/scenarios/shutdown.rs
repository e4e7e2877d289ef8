//! Shutdown: nothing in flight is lost.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redeliver_core::{Context, Outcome, Topology};

use crate::Factory;
use crate::probe::Calls;

use super::setup::{Order, Setup, assert_stats, consumer, host, order, stop, unique};

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
