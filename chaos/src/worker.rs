//! `worker` mode: one worker process on the endpoint, recording completions in its ledger,
//! until SIGTERM (a graceful shutdown) or SIGKILL.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redeliver_core::{Context, Outcome, Transport, Worker};
use redeliver_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use tokio::signal::unix::{SignalKind, signal};

use crate::Job;
use crate::ledger::Ledger;
use crate::plan::{Fate, Mix, retry_policy};

/// Settings passed by the driver on the command line.
pub(crate) struct WorkerArgs {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) prefix: String,
    pub(crate) endpoint: String,
    pub(crate) levels: u8,
    pub(crate) ledger: PathBuf,
    pub(crate) mix: Mix,
    pub(crate) concurrency: usize,
    pub(crate) slow: Duration,
    pub(crate) shutdown: Duration,
}

impl WorkerArgs {
    pub(crate) fn to_args(&self) -> Vec<String> {
        [
            ("--name", self.name.clone()),
            ("--url", self.url.clone()),
            ("--prefix", self.prefix.clone()),
            ("--endpoint", self.endpoint.clone()),
            ("--levels", self.levels.to_string()),
            ("--ledger", self.ledger.display().to_string()),
            ("--mix", self.mix.to_arg()),
            ("--concurrency", self.concurrency.to_string()),
            ("--slow-ms", self.slow.as_millis().to_string()),
            ("--shutdown-ms", self.shutdown.as_millis().to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect()
    }

    pub(crate) fn from_args(args: &HashMap<String, String>) -> Result<WorkerArgs, String> {
        let get = |key: &str| {
            args.get(key)
                .cloned()
                .ok_or_else(|| format!("worker: `--{key}` missing"))
        };
        let number = |key: &str| -> Result<u64, String> {
            get(key)?
                .parse()
                .map_err(|_| format!("worker: `--{key}` is not a number"))
        };
        Ok(WorkerArgs {
            name: get("name")?,
            url: get("url")?,
            prefix: get("prefix")?,
            endpoint: get("endpoint")?,
            levels: u8::try_from(number("levels")?).map_err(|_| "worker: `--levels`")?,
            ledger: get("ledger")?.into(),
            mix: Mix::from_arg(&get("mix")?)?,
            concurrency: usize::try_from(number("concurrency")?).unwrap_or(1),
            slow: Duration::from_millis(number("slow-ms")?),
            shutdown: Duration::from_millis(number("shutdown-ms")?),
        })
    }
}

pub(crate) fn options(url: &str, prefix: &str, levels: u8, name: &str) -> RabbitMqOptions {
    RabbitMqOptions::new(url)
        .with_prefix(prefix)
        .with_delay_levels(levels)
        .with_connection_name(name)
        .with_connect_attempts(10, Duration::from_secs(1))
        .with_connect_timeout(Duration::from_secs(20))
        .with_reconnect_delay(Duration::from_millis(200), Duration::from_secs(2))
        // The default 30 s: a publish rides out a quorum queue's leader election (seconds).
        .with_operation_timeout(Duration::from_secs(30))
}

pub(crate) async fn run(args: WorkerArgs) -> Result<(), String> {
    let ledger = Arc::new(
        Ledger::open(&args.ledger).map_err(|e| format!("{}: {e}", args.ledger.display()))?,
    );
    let transport = RabbitMqTransport::connect(options(
        &args.url,
        &args.prefix,
        args.levels,
        &format!("chaos {}", args.name),
    ))
    .await
    .map_err(|e| e.to_string())?;
    let shared: Arc<dyn Transport> = Arc::new(transport.clone());
    let mix = args.mix;
    let slow = args.slow;
    let worker = Worker::builder(shared, args.endpoint.as_str())
        .concurrency(args.concurrency)
        .retry_policy(retry_policy())
        .shutdown_timeout(args.shutdown)
        .start(move |job: Job, ctx: Context| {
            let ledger = Arc::clone(&ledger);
            async move {
                let attempt = ctx.attempt();
                match mix.fate(job.n) {
                    Fate::Permanent => return Outcome::dead_letter("chaos: a permanent failure"),
                    Fate::Transient(times) if attempt <= times => {
                        return Outcome::retry("chaos: a transient failure");
                    }
                    Fate::Panic if attempt == 1 => panic!("chaos: a planned panic"),
                    Fate::Slow => {
                        ledger.started_slow(job.n);
                        tokio::time::sleep(slow).await;
                    }
                    Fate::Succeed | Fate::Transient(_) | Fate::Panic => {}
                }
                ledger.completed(job.n, attempt);
                Outcome::success()
            }
        })
        .await
        .map_err(|e| e.to_string())?;
    // The driver waits for this line before it counts the worker as consuming.
    println!("ready");
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    terminate.recv().await;
    let stats = worker.shutdown().await;
    eprintln!("{}: shut down: {stats:?}", args.name);
    println!(
        "stats abandoned={} completed={}",
        stats.abandoned, stats.completed
    );
    transport.close().await;
    Ok(())
}
