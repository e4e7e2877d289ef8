//! A retry storm, with and without the host's resilience: 10,000 messages on the in-memory
//! transport, a downstream failing for ten minutes (each call taking 100 ms) and then
//! recovering, concurrency 10, a fixed 10 s retry delay and 5 attempts. The runs are in
//! virtual time (tokio's paused clock), so the outage costs seconds, not minutes, and the
//! figures are exact: the same on every machine and every run.
//!
//! With resilience: a retry budget (0.1 per first attempt, at least 5 a minute), a circuit
//! breaker (5 consecutive failures, 30 s cool-down) and ramp-up (one more call a second).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redeliver::host::resilience::{CircuitBreaker, RampUp, Resilience, RetryBudget};
use redeliver::memory::MemoryTransport;
use redeliver::{
    Backoff, BackoffPolicy, Consumer, Context, Host, Jitter, Message, Outcome, Transport,
    outcome_for_status,
};

use crate::Scale;
use crate::report::Report;

const GROUP: &str = "resilience";

/// What one run of the outage did.
struct Storm {
    /// Downstream calls that started during the outage.
    calls_during: u64,
    dead_lettered: u64,
    completed: u64,
    /// When every message was settled (completed or dead-lettered), in virtual time.
    settled_at: Duration,
    /// How long the run took on the machine's clock.
    wall: Duration,
}

pub(crate) fn run(scale: &Scale, report: &mut Report) {
    let (messages, outage) = if scale.smoke {
        (1_000, Duration::from_secs(60))
    } else {
        (10_000, Duration::from_secs(600))
    };
    let with = storm(messages, outage, true);
    let without = storm(messages, outage, false);
    let minutes = outage.as_secs_f64() / 60.0;
    let per_second = |s: &Storm| s.calls_during as f64 / outage.as_secs_f64();
    report.compare(
        GROUP,
        format!("downstream calls/s, {minutes:.0}-min outage (raw: without resilience)"),
        per_second(&with),
        per_second(&without),
        "call/s",
    );
    report.compare(
        GROUP,
        "  the same per minute",
        per_second(&with) * 60.0,
        per_second(&without) * 60.0,
        "/min",
    );
    report.add(
        GROUP,
        format!("  calls during the outage, {messages} msgs, with resilience"),
        with.calls_during as f64,
        "calls",
    );
    report.add(
        GROUP,
        "  calls during the outage, without",
        without.calls_during as f64,
        "calls",
    );
    report.add(
        GROUP,
        "  fewer calls with resilience (without / with)",
        without.calls_during as f64 / with.calls_during.max(1) as f64,
        "x",
    );
    for (name, s) in [("with", &with), ("without", &without)] {
        report.add(
            GROUP,
            format!("  {name}: messages completed"),
            s.completed as f64,
            "msgs",
        );
        report.add(
            GROUP,
            format!("  {name}: messages dead-lettered"),
            s.dead_lettered as f64,
            "msgs",
        );
        report.add(
            GROUP,
            format!("  {name}: every message settled at, virtual time"),
            s.settled_at.as_secs_f64(),
            "s",
        );
        report.add(
            GROUP,
            format!("  {name}: run time on this machine"),
            s.wall.as_secs_f64() * 1000.0,
            "ms",
        );
    }
}

/// Runs the outage on a runtime of its own whose clock is paused.
fn storm(messages: u32, outage: Duration, resilient: bool) -> Storm {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    let wall = Instant::now();
    let mut storm = runtime.block_on(outage_run(messages, outage, resilient));
    storm.wall = wall.elapsed();
    storm
}

async fn outage_run(messages: u32, outage: Duration, resilient: bool) -> Storm {
    let memory = MemoryTransport::new();
    let transport: Arc<dyn Transport> = Arc::new(memory.clone());
    for i in 0..messages {
        transport
            .send("orders", Message::json(&i).expect("a number serializes"))
            .await
            .expect("memory sends do not fail");
    }
    let origin = tokio::time::Instant::now();
    let calls_during = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&calls_during);
    let policy = BackoffPolicy::builder()
        .max_attempts(5)
        .backoff(Backoff::fixed(Duration::from_secs(10)))
        .jitter(Jitter::None)
        .build()
        .expect("a valid policy");
    let mut consumer = Consumer::endpoint("orders")
        .concurrency(10)
        .retry_policy(policy);
    if resilient {
        consumer = consumer.resilience(resilience());
    }
    let consumer = consumer.handler(move |_: u32, _: Context| {
        let counted = Arc::clone(&counted);
        async move {
            let down = origin.elapsed() < outage;
            if down {
                counted.fetch_add(1, Ordering::Relaxed);
            }
            // The downstream's latency.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if down {
                outcome_for_status(503, None)
            } else {
                Outcome::success()
            }
        }
    });
    let host = Host::builder(transport)
        .consumer(consumer)
        .start()
        .await
        .expect("the host starts");
    // A virtual day: a run that never settles fails instead of hanging.
    tokio::time::timeout(Duration::from_secs(24 * 3600), memory.wait_until_idle())
        .await
        .expect("every message settled within a virtual day");
    let settled_at = origin.elapsed();
    let stats = host.shutdown().await[0].1;
    Storm {
        calls_during: calls_during.load(Ordering::Relaxed),
        dead_lettered: stats.dead_lettered,
        completed: stats.completed,
        settled_at,
        wall: Duration::ZERO,
    }
}

fn resilience() -> Resilience {
    Resilience::new()
        .retry_budget(
            RetryBudget::builder()
                .ratio(0.1)
                .min_retries(5)
                .window(Duration::from_secs(60))
                .build()
                .expect("a valid budget"),
        )
        .circuit_breaker(
            CircuitBreaker::builder()
                .consecutive_failures(5)
                .cool_down(Duration::from_secs(30))
                .build()
                .expect("a valid breaker"),
        )
        .ramp_up(RampUp::default())
}
