//! `redeliver-bench`: figures for redeliver next to the raw clients, measured in the same run.
//!
//! ```text
//! cargo run --release -p redeliver-bench                    # full run (minutes), prints a table
//! cargo run --release -p redeliver-bench -- --json out.json # also writes the figures as JSON
//! cargo run -p redeliver-bench -- --smoke                   # seconds: checks that it works (CI)
//! cargo run --release -p redeliver-bench -- --only rabbitmq # only the groups named
//! cargo run --release -p redeliver-bench -- --only telemetry # the opentelemetry feature's cost
//! ```
//!
//! Every figure is the median of several runs; a comparison is a ratio of two figures measured
//! in this run, on this machine.

mod arrivals;
mod memory;
mod rabbitmq;
mod replay;
mod report;
mod resilience;
mod servicebus;
mod support;
mod telemetry;

use std::time::Duration;

use peak_alloc::PeakAlloc;

use crate::report::Report;

#[global_allocator]
static ALLOCATOR: PeakAlloc = PeakAlloc;

/// The groups of figures, in the order they run.
const GROUPS: [&str; 6] = [
    "memory",
    "rabbitmq",
    "replay",
    "servicebus",
    "resilience",
    "telemetry",
];

/// How big a run is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scale {
    /// A smoke run: only checks that every measurement works.
    pub(crate) smoke: bool,
    /// Runs per figure (the median is reported).
    pub(crate) runs: usize,
    /// Messages per throughput run.
    pub(crate) messages: usize,
    /// Scheduled messages in the delay precision run, and the longest delay.
    pub(crate) scheduled: usize,
    pub(crate) longest_delay: Duration,
    /// Messages held by the footprint runs.
    pub(crate) held: usize,
    pub(crate) in_flight: usize,
}

impl Scale {
    fn full() -> Self {
        Scale {
            smoke: false,
            runs: 5,
            messages: 200_000,
            scheduled: 5_000,
            longest_delay: Duration::from_secs(10),
            held: 100_000,
            in_flight: 1_000,
        }
    }

    fn smoke() -> Self {
        Scale {
            smoke: true,
            runs: 1,
            messages: 2_000,
            scheduled: 200,
            longest_delay: Duration::from_millis(500),
            held: 1_000,
            in_flight: 100,
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut scale = Scale::full();
    let mut json = None;
    let mut only: Option<Vec<String>> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => scale = Scale::smoke(),
            "--json" => json = Some(args.next().unwrap_or_else(|| usage("--json needs a path"))),
            "--runs" => {
                scale.runs = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage("--runs needs a whole number above 0"))
            }
            "--only" => {
                let groups = args
                    .next()
                    .unwrap_or_else(|| usage("--only needs groups, such as memory,rabbitmq"));
                let groups: Vec<String> = groups.split(',').map(str::to_owned).collect();
                if let Some(unknown) = groups.iter().find(|g| !GROUPS.contains(&g.as_str())) {
                    usage(&format!(
                        "unknown group `{unknown}`; the groups are {}",
                        GROUPS.join(", ")
                    ));
                }
                only = Some(groups);
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument `{other}`")),
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // Recording only in the telemetry group, which switches it on and off itself.
    redeliver::telemetry::set_enabled(false);
    let mut report = Report::new(&scale);
    let wanted = |group: &str| only.as_ref().is_none_or(|o| o.iter().any(|g| g == group));
    if wanted("memory") {
        runtime.block_on(memory::run(&scale, &mut report));
    }
    if wanted("rabbitmq") {
        runtime.block_on(rabbitmq::run(&scale, &mut report));
    }
    if wanted("replay") {
        runtime.block_on(replay::run(&scale, &mut report));
    }
    if wanted("servicebus") {
        // On runtimes of its own (see the module).
        servicebus::run(&scale, &mut report);
    }
    if wanted("resilience") {
        // In virtual time, on a runtime of its own (see the module).
        resilience::run(&scale, &mut report);
    }
    if wanted("telemetry") {
        runtime.block_on(telemetry::run(&scale, &mut report));
    }
    report.print();
    if let Some(path) = json {
        report.write_json(&path);
        println!("\nfigures written to {path}");
    }
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("redeliver-bench: {problem}");
    }
    eprintln!("usage: redeliver-bench [--smoke] [--runs N] [--only GROUP,...] [--json PATH]");
    std::process::exit(2);
}

/// The median of `runs` measurements of `measure`.
pub(crate) async fn median<F, Fut>(runs: usize, mut measure: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let mut values = Vec::with_capacity(runs);
    for _ in 0..runs {
        values.push(measure().await);
    }
    support::median_of(values)
}

/// Bytes allocated at the peak since the last reset, above what was allocated at the reset.
pub(crate) fn peak_since_reset(baseline: usize) -> usize {
    ALLOCATOR.peak_usage().saturating_sub(baseline)
}

/// Resets the peak and returns the current allocation, to pass to [`peak_since_reset`].
pub(crate) fn reset_peak() -> usize {
    ALLOCATOR.reset_peak_usage();
    ALLOCATOR.current_usage()
}
