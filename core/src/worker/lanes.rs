//! The lanes: a fixed set of tasks, one per handler slot, taking deliveries from one intake, and
//! sending deliveries that came early by less than the transport's precision to the
//! [waiting room](super::waiting_room).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use tokio::sync::{Mutex as AsyncMutex, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::admission::{Admission, Verdict};
use super::decide::Disposition;
use super::handling::{Shared, panic_text};
use super::signal::Signal;
use super::stats::bump;
use crate::handler::Handler;
use crate::payload::Payload;
use crate::transport::{ConsumeOptions, Delivery, DeliveryStream};

/// Where the lanes take deliveries from, one lane at a time.
pub(super) struct Intake {
    /// `None` once the worker stops taking.
    stream: Option<DeliveryStream>,
    /// Deliveries back from the waiting room, taken before the stream's.
    ready: mpsc::UnboundedReceiver<Delivery>,
    options: ConsumeOptions,
    backoff: Duration,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How many lanes a worker runs (its concurrency), and what admits their deliveries.
pub(super) struct Capacity {
    pub(super) lanes: usize,
    pub(super) admission: Option<Arc<dyn Admission>>,
}

/// Runs `capacity.lanes` lanes, each taking one delivery at a time and handling it, until `cancel`;
/// then stops taking, lets handlers in flight finish until the deadline, and abandons the rest.
///
/// A lane per handler slot, rather than a task per delivery: a lane takes only when its
/// handler is done, so nothing waits unhandled in the worker, and the hot path spawns nothing.
pub(super) async fn run<T, S, H>(
    shared: Arc<Shared<T, S, H>>,
    stream: DeliveryStream,
    ready: mpsc::UnboundedReceiver<Delivery>,
    options: ConsumeOptions,
    capacity: Capacity,
    shutdown_timeout: Duration,
    cancel: CancellationToken,
) where
    T: Payload,
    S: Send + Sync + 'static,
    H: Handler<T, S>,
{
    let stop_taking = Arc::new(Signal::default());
    let hard_stop = Arc::new(Signal::default());
    let intake = Arc::new(AsyncMutex::new(Intake {
        stream: Some(stream),
        ready,
        options,
        backoff: FIRST_BACKOFF,
    }));
    let mut lanes = JoinSet::new();
    for _ in 0..capacity.lanes {
        lanes.spawn(lane(
            Arc::clone(&shared),
            Arc::clone(&intake),
            Arc::clone(&stop_taking),
            Arc::clone(&hard_stop),
            capacity.admission.clone(),
        ));
    }

    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            // Lanes end only once taking stops: this would be a bug in the worker.
            Some(done) = lanes.join_next() => report_lane_end(done),
        }
    }

    // Stop taking deliveries, then let handlers in flight finish until the deadline. What waits
    // for its not-before has not started: give it back at once.
    stop_taking.fire();
    let mut back = {
        let mut intake = intake.lock().await;
        intake.stream = None;
        intake.ready.close();
        let mut back = Vec::new();
        while let Ok(delivery) = intake.ready.try_recv() {
            back.push(delivery);
        }
        back
    };
    for delivery in back.drain(..) {
        shared.waiting.leave();
        shared
            .settle(delivery, Disposition::Abandon, &shared.telemetry.detached())
            .await;
    }
    shared.waiting.tasks.close();
    let deadline = tokio::time::sleep(shutdown_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            done = lanes.join_next() => match done {
                Some(done) => report_lane_end(done),
                None => break,
            },
            _ = &mut deadline, if !hard_stop.is_set() => {
                warn!(source = %shared.source, "shutdown timeout reached; abandoning handlers in flight");
                hard_stop.fire();
            }
        }
    }
    shared.waiting.tasks.wait().await;
}

/// One handler slot: takes a delivery, handles and settles it, and again, until taking stops.
///
/// Lanes take turns at the intake. A lane keeps its turn while its deliveries are handled
/// without waiting (their handler is done at its first poll), so a stream of quick handlers costs
/// no hand-over between tasks; it gives the turn up as soon as a handler waits (another lane
/// takes meanwhile, so `concurrency` handlers can be waiting at once), and before handling when
/// its handlers take long without waiting (so such handlers run in parallel on several threads
/// rather than one after another).
///
/// With an [`Admission`], a lane takes from the transport only while the admission has room,
/// and hands a delivery to the handler only with a place, kept until the delivery is settled.
/// It never waits for room while it has the intake: a lane holding a delivery for a place
/// gives the intake up, so the others can take and settle meanwhile.
async fn lane<T, S, H>(
    shared: Arc<Shared<T, S, H>>,
    intake: Arc<AsyncMutex<Intake>>,
    stop_taking: Arc<Signal>,
    hard_stop: Arc<Signal>,
    admission: Option<Arc<dyn Admission>>,
) where
    T: Payload,
    S: Send + Sync + 'static,
    H: Handler<T, S>,
{
    /// A handling that takes longer than this without waiting is worth handing the intake over
    /// for (a hand-over costs around a microsecond).
    const LONG_HANDLING: Duration = Duration::from_micros(20);
    /// How often the duration of a handling is sampled (reading the clock costs too).
    const SAMPLE_EVERY: u32 = 8;

    let mut turn = None;
    let mut long_handlings = false;
    let mut handled_count: u32 = 0;
    'lane: loop {
        if let Some(admission) = &admission
            && !admission.has_room()
        {
            turn = None;
            if !room(&**admission, &stop_taking).await {
                break;
            }
        }
        let intake_turn = match turn.as_mut() {
            Some(held) => held,
            None => turn.insert(intake.lock().await),
        };
        let Some((delivery, fresh)) = shared.take(intake_turn, &stop_taking).await else {
            break;
        };
        let mut place = None;
        if let Some(admission) = &admission {
            // Room may have gone while the lane waited for a delivery.
            loop {
                match admission.check(delivery.message()) {
                    Verdict::Handle => {
                        place = Some(Place(Arc::clone(admission)));
                        break;
                    }
                    Verdict::Park(not_before) => {
                        debug!(message_id = %delivery.message().id(), %not_before, "put off by the admission; parked");
                        shared
                            .put_off(delivery, fresh, Disposition::Park(not_before))
                            .await;
                        continue 'lane;
                    }
                    Verdict::Wait => {
                        turn = None;
                        // An admission that has room but no place must not starve the runtime.
                        tokio::task::coop::consume_budget().await;
                        if !room(&**admission, &stop_taking).await {
                            shared.put_off(delivery, fresh, Disposition::Abandon).await;
                            continue 'lane;
                        }
                    }
                }
            }
        }
        if long_handlings {
            turn = None;
        }
        let sampled = handled_count
            .is_multiple_of(SAMPLE_EVERY)
            .then(Instant::now);
        handled_count = handled_count.wrapping_add(1);
        // Handler panics are caught around the handler; a panic here is a bug in the worker or
        // the transport. The delivery was dropped, so the transport delivers it again; keep the
        // lane, so the worker keeps its concurrency.
        let handling = AssertUnwindSafe(shared.process(delivery, fresh, &hard_stop)).catch_unwind();
        tokio::pin!(handling);
        let handled = match futures::poll!(handling.as_mut()) {
            Poll::Ready(handled) => {
                if let Some(started) = sampled {
                    long_handlings = started.elapsed() > LONG_HANDLING;
                }
                handled
            }
            Poll::Pending => {
                turn = None;
                handling.await
            }
        };
        drop(place);
        match handled {
            Ok(Some((delivery, not_before))) => {
                let room = Arc::clone(&shared);
                let stop = Arc::clone(&stop_taking);
                shared
                    .waiting
                    .tasks
                    .spawn(async move { room.wait_aside(delivery, not_before, &stop).await });
            }
            Ok(None) => {}
            Err(panic) => {
                error!(panic = %panic_text(&*panic), "handling a delivery panicked outside the handler");
            }
        }
        // Nothing above has to wait while deliveries are ready and handlers quick: give the
        // runtime its turn now and then, as any tokio primitive would.
        tokio::task::coop::consume_budget().await;
    }
}

/// A place taken from an [`Admission`] ([`Verdict::Handle`]), given back when dropped.
struct Place(Arc<dyn Admission>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Waits until the admission has room, returning `false` if stopped meanwhile.
async fn room(admission: &dyn Admission, stop: &Signal) -> bool {
    tokio::select! {
        _ = admission.room() => true,
        _ = stop.wait() => false,
    }
}

/// Sleeps for `backoff` (doubling it up to `max`), returning `false` if stopped meanwhile.
async fn pause(stop: &Signal, backoff: &mut Duration, max: Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(max);
    tokio::select! {
        _ = stop.wait() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

fn report_lane_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        error!(error = %e, "a worker lane failed");
    }
}

impl<T, S, H> Shared<T, S, H>
where
    T: Payload,
    S: Send + Sync + 'static,
    H: Handler<T, S>,
{
    /// The next delivery from the intake (the caller's turn), and whether it is fresh from the
    /// transport (rather than back from the waiting room), or `None` once taking stops.
    /// Re-opens the consumer if the transport closed it, backing off after errors.
    async fn take(&self, intake: &mut Intake, stop: &Signal) -> Option<(Delivery, bool)> {
        let waits = self.waiting.capacity > 0;
        loop {
            if stop.is_set() {
                return None;
            }
            if self.control.is_paused() {
                // Paused: take nothing; what the transport prefetched stays with it.
                tokio::select! {
                    _ = self.control.resumed() => continue,
                    _ = stop.wait() => return None,
                }
            }
            let stream = intake.stream.as_mut()?;
            // Polled first, so that a ready delivery costs no registration with `stop`.
            let next = tokio::select! {
                biased;
                Some(back) = intake.ready.recv(), if waits => {
                    self.waiting.leave();
                    return Some((back, false));
                }
                next = stream.next() => next,
                _ = stop.wait() => return None,
            };
            match next {
                Some(Ok(delivery)) => {
                    intake.backoff = FIRST_BACKOFF;
                    self.control.set_consuming(true);
                    return Some((delivery, true));
                }
                Some(Err(e)) => {
                    self.control.set_consuming(false);
                    self.telemetry.reconnected();
                    warn!(source = %self.source, error = %e, "the transport reported a consumer error");
                    if !pause(stop, &mut intake.backoff, MAX_BACKOFF).await {
                        return None;
                    }
                }
                None => {
                    // The transport closed the consumer (for example after losing its
                    // connection): open a new one, backing off, until it works or the worker is
                    // shut down.
                    warn!(source = %self.source, "the consumer was closed by the transport; consuming again");
                    intake.stream = None;
                    self.control.set_consuming(false);
                    self.telemetry.reconnected();
                    while intake.stream.is_none() {
                        if !pause(stop, &mut intake.backoff, MAX_BACKOFF).await {
                            return None;
                        }
                        let options = intake.options.clone();
                        match self.transport.consume(&self.source, options).await {
                            Ok(s) => {
                                intake.stream = Some(s);
                                self.control.set_consuming(true);
                            }
                            Err(e) => {
                                error!(source = %self.source, error = %e, "could not consume again")
                            }
                        }
                    }
                }
            }
        }
    }

    /// Settles a delivery the admission put off, without handling it.
    async fn put_off(&self, delivery: Delivery, fresh: bool, disposition: Disposition) {
        // Received all the same.
        if fresh {
            bump(&self.stats.received);
            self.telemetry.received();
        }
        self.settle(delivery, disposition, &self.telemetry.detached())
            .await;
    }

    /// Waits for `not_before` holding only the delivery, then hands it back to the lanes; gives
    /// it back to the transport if the worker stops taking meanwhile.
    async fn wait_aside(&self, delivery: Delivery, not_before: DateTime<Utc>, stop: &Signal) {
        tokio::select! {
            _ = self.clock.sleep_until(not_before) => {
                if let Err(e) = delivery.check_held() {
                    // Its channel or lock went away while it waited: the broker delivers the
                    // message again, and handling this copy too would handle it twice.
                    debug!(source = %self.source, error = %e, "a delivery waiting for its not-before can no longer be settled; dropping it");
                    self.waiting.leave();
                    return;
                }
                let Err(mpsc::error::SendError(delivery)) = self.waiting.ready.send(delivery) else {
                    return;
                };
                self.waiting.leave();
                self.settle(delivery, Disposition::Abandon, &self.telemetry.detached())
                    .await;
            }
            _ = stop.wait() => {
                self.waiting.leave();
                self.settle(delivery, Disposition::Abandon, &self.telemetry.detached())
                    .await;
            }
        }
    }
}
