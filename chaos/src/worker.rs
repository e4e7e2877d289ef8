//! `worker` mode: one worker process on the endpoint, recording completions in its ledger,
//! until SIGTERM (a graceful shutdown) or SIGKILL.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redeliver_core::{Context, Outcome, Worker};
use tokio::signal::unix::{SignalKind, signal};

use crate::Job;
use crate::backend::{Connection, Kind, URL_VARIABLE, connect};
use crate::ledger::Ledger;
use crate::plan::{Fate, Mix, retry_policy};

/// Settings passed by the driver on the command line.
/// The broker's address is not among them: it is passed in the environment variable
/// [`URL_VARIABLE`], since it may hold a key.
pub(crate) struct WorkerArgs {
    pub(crate) name: String,
    pub(crate) transport: Kind,
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
            ("--transport", self.transport.to_arg().to_owned()),
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
            transport: Kind::from_arg(&get("transport")?)?,
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

/// How long a worker's publish (a retry's copy) may take: the default 30 s, so that it rides
/// out a quorum queue's leader election (seconds). On Service Bus, one try of a send.
pub(crate) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
/// On Service Bus, one try of any client call: after a cut or a restart of the broker a call
/// on the dead connection fails only when its try runs out.
pub(crate) const SERVICE_BUS_TRY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn run(args: WorkerArgs) -> Result<(), String> {
    let ledger = Arc::new(
        Ledger::open(&args.ledger).map_err(|e| format!("{}: {e}", args.ledger.display()))?,
    );
    let url = std::env::var(URL_VARIABLE).map_err(|_| format!("worker: {URL_VARIABLE} not set"))?;
    let transport = connect(&Connection {
        kind: args.transport,
        url: &url,
        prefix: &args.prefix,
        levels: args.levels,
        name: &format!("chaos {}", args.name),
        publish_timeout: match args.transport {
            Kind::RabbitMq => PUBLISH_TIMEOUT,
            Kind::ServiceBus => SERVICE_BUS_TRY_TIMEOUT,
        },
    })
    .await?;
    let shared = transport.shared();
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
