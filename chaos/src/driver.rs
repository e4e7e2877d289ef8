//! `cluster` and `chaos` modes: start the worker processes, publish, inject the faults, wait for
//! every accepted message to be completed or dead-lettered, and account for each one.
//!
//! Accounting: every message has its own number. "Accepted" means the publish was confirmed.
//! Completions come from the workers' ledgers (written before the acknowledgement), dead
//! letters from draining the dead-letter queue. "Lost" is accepted but neither completed nor
//! dead-lettered once nothing moves any more; whatever the broker still holds in any of the
//! run's queues at that point is reported by queue, so a run never claims "nothing lost" that
//! it did not prove.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redeliver_conformance::proxy::Proxy;
use redeliver_core::{Context, Error, Message, Outcome, Source, Topology, Transport, Worker};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::Job;
use crate::backend::{self, Connection, Kind, TestBroker, URL_VARIABLE};
use crate::ledger::{Reading, now_ms};
use crate::plan::{Fate, Mix, SLOW_BASE};
use crate::worker::WorkerArgs;

const WORKERS: usize = 3;
const ENDPOINT: &str = "work";
/// 3 levels: delays up to 7 s, enough for the 1-4 s not-befores and back-offs.
const LEVELS: u8 = 3;
/// The driver's publish time-out, which the outage probe checks.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Slow handlers in flight on one worker when it is told to shut down.
const SLOW_IN_FLIGHT: u64 = 100;

/// The Service Bus queue's lock duration: a message whose worker was killed comes back after
/// it. Locks are renewed while a handler runs. (With 10 s, deliveries were settled after their
/// lock had run out by the thousand and the run stopped making progress: see RESULTS.md.)
const SERVICE_BUS_LOCK: Duration = Duration::from_secs(30);
/// The Service Bus queue's maximum delivery count: deliveries that end without a settlement
/// (a cut, a kill, a restart) count towards it, the framework's retries do not. High, so that
/// the faults never dead-letter a healthy message (that would be a wrong fate, not a loss).
const SERVICE_BUS_MAX_DELIVERY: u32 = 1000;

/// What one run does.
pub(crate) struct Settings {
    name: &'static str,
    kind: Kind,
    messages: u64,
    mix: Mix,
    concurrency: usize,
    /// Cut every connection through the proxies every 2-3 s while publishing.
    cuts: bool,
    /// `kill -9` one worker process (and start another) a quarter of the way in.
    kill: bool,
    /// Refuse the driver's connections for longer than the publish time-out.
    publish_outage: bool,
    /// Shut a worker down with `SLOW_IN_FLIGHT` slow handlers in flight.
    slow_shutdown: bool,
    /// Messages published per second (paced, so that the faults fall mid-run).
    rate: u64,
    /// How long the stopped node stays down.
    node_down: Duration,
}

impl Settings {
    pub(crate) fn new(mode: &str, args: &HashMap<String, String>) -> Result<Settings, String> {
        let soak = args.contains_key("soak");
        let short = args.contains_key("short");
        let mut settings = match mode {
            "cluster" => Settings {
                name: "cluster",
                kind: Kind::RabbitMq,
                messages: 20_000,
                mix: Mix::from_arg("200,20,0,100")?,
                concurrency: 32,
                cuts: false,
                kill: false,
                publish_outage: false,
                slow_shutdown: false,
                rate: 250,
                node_down: Duration::from_secs(10),
            },
            _ => Settings {
                name: match (mode, soak, short) {
                    ("servicebus", true, _) => "servicebus --soak",
                    ("servicebus", _, true) => "servicebus --short",
                    ("servicebus", _, _) => "servicebus",
                    (_, true, _) => "chaos --soak",
                    (_, _, true) => "chaos --short",
                    _ => "chaos",
                },
                kind: if mode == "servicebus" {
                    Kind::ServiceBus
                } else {
                    Kind::RabbitMq
                },
                messages: if soak {
                    100_000
                } else if short {
                    3_000
                } else {
                    20_000
                },
                mix: Mix::from_arg("300,50,10,100")?,
                concurrency: 100,
                cuts: true,
                kill: true,
                publish_outage: true,
                slow_shutdown: true,
                rate: if soak { 400 } else { 100 },
                node_down: Duration::from_secs(5),
            },
        };
        if let Some(n) = args.get("messages") {
            settings.messages = n.parse().map_err(|_| format!("--messages `{n}`"))?;
        }
        Ok(settings)
    }
}

fn nodes() -> Vec<SocketAddr> {
    let list = std::env::var("RDLV_CLUSTER_NODES")
        .unwrap_or_else(|_| "127.0.0.1:5801,127.0.0.1:5802,127.0.0.1:5803".to_owned());
    list.split(',')
        .map(|a| a.trim().parse().expect("RDLV_CLUSTER_NODES: ip:port,..."))
        .collect()
}

fn url_of(addrs: &[SocketAddr]) -> String {
    let hosts: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    format!("amqp://guest:guest@{}/%2f", hosts.join(","))
}

fn cluster_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster.sh")
}

async fn cluster(args: &[&str]) -> Result<(), String> {
    let status = Command::new(cluster_script())
        .args(args)
        .stdout(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("cluster.sh {args:?}: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("cluster.sh {args:?} failed: {status}"))
}

/// One worker process.
struct Process {
    name: String,
    child: Child,
    /// What it printed on standard output after `ready` (its shutdown statistics).
    output: Arc<Mutex<Vec<String>>>,
    /// Reads that output; ends at the end of the pipe.
    reader: tokio::task::JoinHandle<()>,
}

/// What the shutdown probe saw: the worker it stopped and the slow messages in its handlers
/// when it was told to stop.
struct ShutdownProbe {
    worker: String,
    in_flight: BTreeSet<u64>,
}

/// What the broker held when the Service Bus test broker was restarted (its messages are in
/// memory only, so the restart loses them): messages accepted before it was back and not yet
/// completed or dead-lettered when it stopped.
struct RestartLoss {
    at_risk: BTreeSet<u64>,
}

struct Run {
    settings: Settings,
    /// The Service Bus test broker process, in a Service Bus run.
    broker: tokio::sync::Mutex<Option<TestBroker>>,
    restart_loss: Mutex<Option<RestartLoss>>,
    dead: Arc<Mutex<BTreeMap<u64, u32>>>,
    /// The Service Bus test broker's own connection string (not through a proxy).
    sb_connection: Option<String>,
    dir: PathBuf,
    prefix: String,
    worker_url: String,
    processes: Mutex<Vec<Process>>,
    accepted: Mutex<BTreeSet<u64>>,
    unconfirmed: Mutex<BTreeSet<u64>>,
    sent: AtomicU64,
    publishing: AtomicBool,
    events: Mutex<Vec<String>>,
    shutdown_probe: Mutex<Option<ShutdownProbe>>,
}

impl Run {
    fn event(&self, what: String) {
        println!("  {what}");
        self.events.lock().unwrap().push(what);
    }

    /// Starts worker `name`; a worker whose start failed (a cut while it connected or began
    /// consuming makes `Worker::start` fail, and the process exit) is started again, as a
    /// supervisor would, up to 5 times, each noted as an event.
    async fn spawn(&self, name: &str) -> Result<Process, String> {
        let mut attempt = 1;
        loop {
            match self.spawn_once(name).await {
                Ok(process) => return Ok(process),
                Err(e) if attempt < 5 => {
                    let why = std::fs::read_to_string(self.dir.join(format!("{name}.stderr")))
                        .ok()
                        .and_then(|t| t.lines().last().map(str::to_owned))
                        .unwrap_or(e);
                    self.event(format!(
                        "worker {name} did not start ({why}); starting it again"
                    ));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn spawn_once(&self, name: &str) -> Result<Process, String> {
        let args = WorkerArgs {
            name: name.to_owned(),
            transport: self.settings.kind,
            prefix: self.prefix.clone(),
            endpoint: ENDPOINT.to_owned(),
            levels: LEVELS,
            ledger: self.dir.join(format!("{name}.ledger")),
            mix: self.settings.mix,
            concurrency: self.settings.concurrency,
            slow: Duration::from_secs(30),
            shutdown: Duration::from_secs(1),
        };
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.stderr")))
            .map_err(|e| e.to_string())?;
        let mut child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .arg("worker")
            .args(args.to_args())
            .env(URL_VARIABLE, &self.worker_url)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting worker {name}: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        if !matches!(ready, Ok(Ok(Some(ref l))) if l == "ready") {
            return Err(format!("worker {name} did not start: {ready:?}"));
        }
        // Keep reading so the worker never blocks on a full pipe.
        let output: Arc<Mutex<Vec<String>>> = Arc::default();
        let reader = tokio::spawn({
            let output = Arc::clone(&output);
            async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    output.lock().unwrap().push(line);
                }
            }
        });
        Ok(Process {
            name: name.to_owned(),
            child,
            output,
            reader,
        })
    }
}

async fn terminate(process: &mut Process) -> Option<std::process::ExitStatus> {
    let pid = process.child.id()?;
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    tokio::time::timeout(Duration::from_secs(30), process.child.wait())
        .await
        .ok()
        .and_then(Result::ok)
}

pub(crate) async fn run(settings: Settings) -> Result<(), String> {
    let id = format!("{:08x}", fastrand::u32(..));
    let dir = std::env::temp_dir().join(format!("rdlv-chaos-{id}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // The upstream addresses (RabbitMQ's nodes, or the Service Bus test broker), and the
    // proxies the workers and the driver connect through when connections are cut.
    let (broker, upstreams, sb_connection) = match settings.kind {
        Kind::RabbitMq => (None, nodes(), None),
        Kind::ServiceBus => {
            let (broker, connection) =
                TestBroker::start(&dir, ENDPOINT, SERVICE_BUS_LOCK, SERVICE_BUS_MAX_DELIVERY)
                    .await?;
            let address = broker.address;
            (Some(broker), vec![address], Some(connection))
        }
    };
    let (worker_proxies, driver_proxies) = if settings.cuts {
        let mut w = Vec::new();
        let mut d = Vec::new();
        for upstream in &upstreams {
            match settings.kind {
                Kind::RabbitMq => {
                    w.push(Proxy::start(*upstream).await.map_err(|e| e.to_string())?);
                    d.push(Proxy::start(*upstream).await.map_err(|e| e.to_string())?);
                }
                Kind::ServiceBus => {
                    w.push(backend::service_bus_proxy(*upstream).await?);
                    d.push(backend::service_bus_proxy(*upstream).await?);
                }
            }
        }
        (w, d)
    } else {
        (Vec::new(), Vec::new())
    };
    let url = |proxies: &[Proxy]| -> String {
        let addrs: Vec<SocketAddr> = if proxies.is_empty() {
            upstreams.clone()
        } else {
            proxies.iter().map(Proxy::addr).collect()
        };
        match &sb_connection {
            None => url_of(&addrs),
            Some(connection) => backend::with_host(connection, &addrs[0].ip().to_string()),
        }
    };
    let prefix = format!("rdlv-chaos-{id}.");
    println!(
        "{}: {} messages, mix {:?}, {WORKERS} workers x {} handlers, run dir {}",
        settings.name,
        settings.messages,
        settings.mix,
        settings.concurrency,
        dir.display()
    );
    let dead: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let run = Arc::new(Run {
        worker_url: url(&worker_proxies),
        settings,
        broker: tokio::sync::Mutex::new(broker),
        restart_loss: Mutex::default(),
        dead: Arc::clone(&dead),
        sb_connection: sb_connection.clone(),
        dir: dir.clone(),
        prefix: prefix.clone(),
        processes: Mutex::default(),
        accepted: Mutex::default(),
        unconfirmed: Mutex::default(),
        sent: AtomicU64::new(0),
        publishing: AtomicBool::new(true),
        events: Mutex::default(),
        shutdown_probe: Mutex::default(),
    });
    let transport = backend::connect(&Connection {
        kind: run.settings.kind,
        url: &url(&driver_proxies),
        prefix: &prefix,
        levels: LEVELS,
        name: "chaos driver",
        publish_timeout: PUBLISH_TIMEOUT,
    })
    .await
    .map_err(|e| format!("connecting the driver: {e}"))?;
    let shared = transport.shared();
    shared
        .declare(&Topology::new().endpoint(ENDPOINT))
        .await
        .map_err(|e| format!("declaring: {e}"))?;
    let drain = Worker::builder(Arc::clone(&shared), Source::dead_letters(ENDPOINT))
        .concurrency(50)
        .start({
            let dead = Arc::clone(&dead);
            move |job: Job, _ctx: Context| {
                let dead = Arc::clone(&dead);
                async move {
                    *dead.lock().unwrap().entry(job.n).or_default() += 1;
                    Outcome::success()
                }
            }
        })
        .await
        .map_err(|e| e.to_string())?;
    for i in 1..=WORKERS {
        let process = run.spawn(&format!("w{i}")).await?;
        run.processes.lock().unwrap().push(process);
    }
    let started = Instant::now();

    // Publishing, 16 at a time.
    let next = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..16 {
        let run = Arc::clone(&run);
        let next = Arc::clone(&next);
        let shared = Arc::clone(&shared);
        senders.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= run.settings.messages {
                    return;
                }
                let due = Duration::from_millis(n * 1000 / run.settings.rate);
                tokio::time::sleep_until((started + due).into()).await;
                send(&run, &*shared, n).await;
            }
        }));
    }
    let faults = tokio::spawn(faults(
        Arc::clone(&run),
        Arc::clone(&shared),
        worker_proxies,
        driver_proxies,
    ));
    for sender in senders {
        let _ = sender.await;
    }
    let publish_time = started.elapsed();
    run.publishing.store(false, Ordering::SeqCst);
    let (worker_proxies, _driver_proxies) = faults.await.map_err(|e| e.to_string())??;

    if run.settings.slow_shutdown {
        slow_shutdown(&run, &*shared).await?;
    }

    // Drain: until every accepted message is accounted for, or nothing moved for 60 s (on
    // Service Bus 60 s more than a lock lasts: messages locked by a killed worker, or by a
    // connection that was cut, come back only when their lock runs out).
    let patience = match run.settings.kind {
        Kind::RabbitMq => Duration::from_secs(60),
        Kind::ServiceBus => Duration::from_secs(60) + SERVICE_BUS_LOCK,
    };
    let mut last = (usize::MAX, Instant::now());
    let reading = loop {
        let reading = Reading::of(&dir);
        let accepted = run.accepted.lock().unwrap().clone();
        let dead_now = dead.lock().unwrap().clone();
        let open = accepted
            .iter()
            .filter(|n| !reading.completions.contains_key(n) && !dead_now.contains_key(n))
            .count();
        if open == 0 {
            break reading;
        }
        if open != last.0 {
            last = (open, Instant::now());
        } else if last.1.elapsed() > patience {
            // A quorum queue's at-least-once dead-letter outbox is retried only every
            // `dead_letter_worker_publisher_confirm_timeout` (180 s by default on 3.10): while
            // the broker holds messages there, they are late, not lost; wait for them, boundedly.
            let outbox: u64 = held(&run)
                .await
                .unwrap_or_default()
                .values()
                .map(|(all, ready, unacked)| all.saturating_sub(ready + unacked))
                .sum();
            if outbox == 0 || last.1.elapsed() > Duration::from_secs(300) {
                run.event(format!(
                    "{open} accepted messages still open after {:?} without progress",
                    last.1.elapsed()
                ));
                break reading;
            }
            if last.1.elapsed() < patience + Duration::from_secs(1) {
                run.event(format!(
                    "{open} accepted messages open, {outbox} in delay levels' dead-letter \
                     outboxes: waiting for the broker's next forwarding attempt"
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let drained_after = started.elapsed();
    // What the broker still holds, queue by queue.
    let held = held(&run).await;
    let sb_held = match &run.sb_connection {
        Some(connection) => Some(backend::service_bus_held(connection, ENDPOINT).await),
        None => None,
    };

    let mut processes = std::mem::take(&mut *run.processes.lock().unwrap());
    for process in &mut processes {
        terminate(process).await;
    }
    drain.shutdown().await;
    drop(worker_proxies);
    transport.close().await;
    if let Some(broker) = run.broker.lock().await.as_mut() {
        broker.stop().await?;
    }

    report(
        &run,
        &reading,
        &dead.lock().unwrap(),
        held.as_ref(),
        sb_held,
        publish_time,
        drained_after,
    )
}

async fn send(run: &Run, transport: &dyn Transport, n: u64) {
    let mut message = Message::json(&Job { n })
        .expect("a job serialises")
        .with_id(format!("m{n}"));
    if let Some(delay) = run.settings.mix.delay(n) {
        message = message.with_not_before(
            chrono::Utc::now() + chrono::TimeDelta::from_std(delay).expect("short"),
        );
    }
    match transport.send(ENDPOINT, message).await {
        Ok(()) => {
            run.accepted.lock().unwrap().insert(n);
        }
        Err(_) => {
            run.unconfirmed.lock().unwrap().insert(n);
        }
    }
    run.sent.fetch_add(1, Ordering::SeqCst);
}

/// Waits until `share` (per cent) of the messages were sent.
async fn at(run: &Run, share: u64) {
    let goal = run.settings.messages * share / 100;
    while run.sent.load(Ordering::SeqCst) < goal {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

type Proxies = (Vec<Proxy>, Vec<Proxy>);

async fn faults(
    run: Arc<Run>,
    transport: Arc<dyn Transport>,
    worker_proxies: Vec<Proxy>,
    driver_proxies: Vec<Proxy>,
) -> Result<Proxies, String> {
    let proxies = Arc::new((worker_proxies, driver_proxies));
    let cutter = run.settings.cuts.then(|| {
        let run = Arc::clone(&run);
        let proxies = Arc::clone(&proxies);
        tokio::spawn(async move {
            let mut cuts = 0u32;
            while run.publishing.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(2_000 + fastrand::u64(..1_000))).await;
                for proxy in proxies.0.iter().chain(&proxies.1) {
                    proxy.cut();
                }
                cuts += 1;
            }
            cuts
        })
    });
    if run.settings.kill {
        at(&run, 25).await;
        let mut victim = run.processes.lock().unwrap().remove(1);
        victim.child.start_kill().map_err(|e| e.to_string())?;
        let _ = victim.child.wait().await;
        run.event(format!(
            "kill -9 of worker {} at {} sent",
            victim.name,
            run.sent.load(Ordering::SeqCst)
        ));
        let replacement = run.spawn("w2-restarted").await?;
        run.processes.lock().unwrap().push(replacement);
    }
    at(&run, 45).await;
    restart_broker(&run).await?;
    if run.settings.publish_outage {
        at(&run, 75).await;
        for proxy in &proxies.1 {
            proxy.set_accepting(false);
            proxy.cut();
        }
        let probe = Instant::now();
        let result = transport.send(ENDPOINT, Message::new("probe")).await;
        let took = probe.elapsed();
        for proxy in &proxies.1 {
            proxy.set_accepting(true);
        }
        let ok = match run.settings.kind {
            Kind::RabbitMq => {
                matches!(result, Err(Error::Timeout { .. }))
                    && took >= PUBLISH_TIMEOUT
                    && took < PUBLISH_TIMEOUT + Duration::from_secs(2)
            }
            // Tried `send_attempts` (3) times, each try bounded by the try time-out; a
            // connection refused fails a try at once.
            Kind::ServiceBus => {
                result.is_err() && took < PUBLISH_TIMEOUT * 3 + Duration::from_secs(5)
            }
        };
        run.event(format!(
            "publish during an outage: {} after {took:?} ({})",
            match &result {
                Ok(()) => "accepted".to_owned(),
                Err(e) => format!("{e}"),
            },
            match (run.settings.kind, ok) {
                (Kind::RabbitMq, true) => "the 5 s time-out, as configured",
                (Kind::RabbitMq, false) => "NOT the configured 5 s time-out",
                (Kind::ServiceBus, true) => "an error within 3 tries of at most 5 s, as configured",
                (Kind::ServiceBus, false) => "NOT an error within 3 tries of at most 5 s",
            }
        ));
        if !ok {
            return Err("the publish time-out probe failed".to_owned());
        }
    }
    if let Some(cutter) = cutter {
        let cuts = cutter.await.map_err(|e| e.to_string())?;
        run.event(format!("{cuts} cuts of every connection, every 2-3 s"));
    }
    Ok(Arc::try_unwrap(proxies).unwrap_or_else(|_| unreachable!("the cutter has ended")))
}

/// The first completion in any ledger after `after` (unix ms), waiting for it up to 60 s.
async fn first_completion_after(run: &Run, after: u64) -> Option<u64> {
    let first = async {
        loop {
            if let Some(first) = Reading::of(&run.dir)
                .completed_at
                .iter()
                .filter(|t| **t > after)
                .min()
            {
                return *first;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), first)
        .await
        .ok()
}

/// The broker restart: RabbitMQ's node 1 (the first every process connected to) stops, then
/// starts; the Service Bus test broker's process ends and starts again, empty.
async fn restart_broker(run: &Run) -> Result<(), String> {
    match run.settings.kind {
        Kind::RabbitMq => {
            let begin = now_ms();
            cluster(&["stop-node", "1"]).await?;
            let down = now_ms();
            run.event(format!(
                "node 1 stopped at {} sent (stopping took {} ms)",
                run.sent.load(Ordering::SeqCst),
                down - begin
            ));
            match first_completion_after(run, down).await {
                Some(first) => run.event(format!(
                    "time to resume: first completion {} ms after node 1 was down ({} ms after \
                     the stop began)",
                    first - down,
                    first - begin
                )),
                None => run.event("no completion within 60 s of stopping node 1".to_owned()),
            }
            // The planned time down: the fault's length, not a wait for anything.
            tokio::time::sleep(
                run.settings
                    .node_down
                    .saturating_sub(Duration::from_millis(now_ms() - down)),
            )
            .await;
            cluster(&["start-node", "1"]).await?;
            run.event("node 1 started again".to_owned());
        }
        Kind::ServiceBus => {
            let mut guard = run.broker.lock().await;
            let broker = guard.as_mut().ok_or("no test broker process")?;
            let begin = now_ms();
            broker.stop().await?;
            let down = now_ms();
            // Done before the broker stopped: safe from the restart.
            let reading = Reading::of(&run.dir);
            let dead = run.dead.lock().unwrap().clone();
            run.event(format!(
                "test broker stopped (SIGTERM) at {} sent (stopping took {} ms); it keeps \
                 messages in memory only, so the restart loses what it held",
                run.sent.load(Ordering::SeqCst),
                down - begin
            ));
            tokio::time::sleep(
                run.settings
                    .node_down
                    .saturating_sub(Duration::from_millis(now_ms() - down)),
            )
            .await;
            // Accepted by now means accepted by the broker that stopped.
            let at_risk: BTreeSet<u64> = run
                .accepted
                .lock()
                .unwrap()
                .iter()
                .copied()
                .filter(|n| !reading.completions.contains_key(n) && !dead.contains_key(n))
                .collect();
            broker.start_again().await?;
            let up = now_ms();
            drop(guard);
            run.event(format!(
                "test broker started again, empty, after {} ms down; {} accepted messages were \
                 neither completed nor dead-lettered when it stopped",
                up - down,
                at_risk.len()
            ));
            *run.restart_loss.lock().unwrap() = Some(RestartLoss { at_risk });
            match first_completion_after(run, up).await {
                Some(first) => run.event(format!(
                    "time to resume: first completion {} ms after the test broker was back",
                    first - up
                )),
                None => run.event("no completion within 60 s of the restart".to_owned()),
            }
        }
    }
    Ok(())
}

/// Sends `SLOW_IN_FLIGHT` slow messages per worker, waits until the ledger of one worker
/// shows `SLOW_IN_FLIGHT` of them started there and not completed (every handler of that
/// worker busy with one), then shuts that worker down: it must exit within its 1 s shutdown
/// time-out plus a margin, and the messages it gave back must be completed by the others
/// (checked in the report).
async fn slow_shutdown(run: &Run, transport: &dyn Transport) -> Result<(), String> {
    for n in SLOW_BASE..SLOW_BASE + SLOW_IN_FLIGHT * WORKERS as u64 {
        send(run, transport, n).await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut process, in_flight, counts) = loop {
        let reading = Reading::of(&run.dir);
        let open = |name: &str| reading.slow_open.get(name).cloned().unwrap_or_default();
        {
            let mut processes = run.processes.lock().unwrap();
            let counts: Vec<String> = processes
                .iter()
                .map(|p| format!("{} {}", p.name, open(&p.name).len()))
                .collect();
            if let Some(i) = processes
                .iter()
                .position(|p| open(&p.name).len() as u64 >= SLOW_IN_FLIGHT)
            {
                let process = processes.remove(i);
                let in_flight = open(&process.name);
                break (process, in_flight, counts);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "shutdown probe: no worker had {SLOW_IN_FLIGHT} slow handlers in flight \
                     within 120 s (in flight per worker: {})",
                    counts.join(", ")
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let asked = Instant::now();
    let status = terminate(&mut process).await;
    let took = asked.elapsed();
    // The worker prints its statistics before it exits: read its output to the end.
    let _ = tokio::time::timeout(Duration::from_secs(5), &mut process.reader).await;
    let stats = process
        .output
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.starts_with("stats "))
        .cloned()
        .unwrap_or_else(|| "no statistics printed".to_owned());
    run.event(format!(
        "shutdown of {} with {} slow handlers in flight (per worker: {}): exited {} after \
         {took:?} (1 s shutdown time-out), worker {stats}",
        process.name,
        in_flight.len(),
        counts.join(", "),
        status.map_or_else(|| "not at all within 30 s".to_owned(), |s| s.to_string()),
    ));
    let exited_cleanly = status.is_some_and(|s| s.success());
    let in_time = took < Duration::from_secs(5);
    *run.shutdown_probe.lock().unwrap() = Some(ShutdownProbe {
        worker: process.name.clone(),
        in_flight,
    });
    if !exited_cleanly || !in_time {
        return Err(format!(
            "shutdown probe: {} exited {status:?} after {took:?}, expected exit 0 within 5 s",
            process.name
        ));
    }
    Ok(())
}

/// How many messages the broker still holds in each queue of the run (those holding any):
/// `messages` as `rabbitmqctl list_queues` counts them, which includes what a quorum queue
/// keeps in its at-least-once dead-letter outbox (neither ready nor unacknowledged, so a
/// passive declaration does not see it). Values: (messages, ready, unacknowledged). `None`
/// for the Service Bus test broker, which runs in a process of its own and answers no such
/// question.
async fn held(run: &Run) -> Option<BTreeMap<String, (u64, u64, u64)>> {
    if run.settings.kind == Kind::ServiceBus {
        return None;
    }
    let prefix = run.prefix.as_str();
    let mut held = BTreeMap::new();
    let output = Command::new(cluster_script())
        .args(["queues", prefix])
        .output()
        .await;
    let Ok(output) = output else {
        held.insert("(could not ask the broker)".to_owned(), (u64::MAX, 0, 0));
        return Some(held);
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [name, all, ready, unacked] = words[..] {
            let n = |w: &str| w.parse::<u64>().unwrap_or(u64::MAX);
            if n(all) > 0 {
                held.insert(name.to_owned(), (n(all), n(ready), n(unacked)));
            }
        }
    }
    Some(held)
}

fn report(
    run: &Run,
    reading: &Reading,
    dead: &BTreeMap<u64, u32>,
    held: Option<&BTreeMap<String, (u64, u64, u64)>>,
    sb_held: Option<Result<BTreeMap<u64, String>, String>>,
    publish_time: Duration,
    drained_after: Duration,
) -> Result<(), String> {
    let accepted = run.accepted.lock().unwrap();
    let unconfirmed = run.unconfirmed.lock().unwrap();
    let sent = accepted.len() + unconfirmed.len();
    let completed = accepted
        .iter()
        .filter(|n| reading.completions.contains_key(n))
        .count();
    let dead_lettered = accepted.iter().filter(|n| dead.contains_key(n)).count();
    let lost: Vec<u64> = accepted
        .iter()
        .copied()
        .filter(|n| !reading.completions.contains_key(n) && !dead.contains_key(n))
        .collect();
    // A Service Bus run's broker restart loses what the broker held: those are counted apart.
    let restart_loss = run.restart_loss.lock().unwrap();
    let (lost_to_restart, lost): (Vec<u64>, Vec<u64>) = lost
        .into_iter()
        .partition(|n| restart_loss.as_ref().is_some_and(|r| r.at_risk.contains(n)));
    let duplicates: u32 = reading.completions.values().map(|c| c - 1).sum::<u32>()
        + dead.values().map(|c| c - 1).sum::<u32>();
    let expected_dead = accepted
        .iter()
        .filter(|n| run.settings.mix.fate(**n) == Fate::Permanent)
        .filter(|n| !lost_to_restart.contains(n))
        .count();
    let wrong: Vec<u64> = accepted
        .iter()
        .copied()
        .filter(|n| {
            let permanent = run.settings.mix.fate(*n) == Fate::Permanent;
            (permanent && reading.completions.contains_key(n))
                || (!permanent && dead.contains_key(n))
        })
        .collect();
    let unconfirmed_arrived = unconfirmed
        .iter()
        .filter(|n| reading.completions.contains_key(n) || dead.contains_key(n))
        .count();
    println!("{} results:", run.settings.name);
    println!("  sent            {sent}");
    println!(
        "  accepted        {} (publish confirmed; {} not confirmed, of which {unconfirmed_arrived} arrived anyway)",
        accepted.len(),
        unconfirmed.len()
    );
    println!("  completed       {completed}");
    println!(
        "  dead-lettered   {dead_lettered} (expected {expected_dead}: the permanent failures{})",
        if restart_loss.is_some() {
            ", less those lost to the restart"
        } else {
            ""
        }
    );
    match &*restart_loss {
        None => println!("  lost            {}", lost.len()),
        Some(r) => {
            println!("  lost            {} by redeliver", lost.len());
            println!(
                "  lost to restart {} by the test broker's restart (it keeps no state; it held \
                 {} accepted messages not yet completed or dead-lettered when it stopped)",
                lost_to_restart.len(),
                r.at_risk.len()
            );
        }
    }
    println!("  duplicates      {duplicates}");
    println!("  wrong fate      {}", wrong.len());
    println!("  published in {publish_time:?}; all accounted for after {drained_after:?}");
    let held_any = held.is_some_and(|h| !h.is_empty());
    if let Some(held) = held.filter(|h| !h.is_empty()) {
        println!("  broker holds    (queue: messages, ready, unacknowledged)");
        for (queue, (all, ready, unacked)) in held {
            let outbox = all.saturating_sub(ready + unacked);
            println!(
                "    {queue}: {all}, {ready}, {unacked}{}",
                if outbox > 0 {
                    format!(" -> {outbox} in the dead-letter outbox, expired but never forwarded")
                } else {
                    String::new()
                }
            );
        }
    } else if held.is_some() {
        println!("  broker holds    nothing in the run's queues");
    } else {
        match &sb_held {
            Some(Ok(sb)) => {
                let mut states: BTreeMap<&str, usize> = BTreeMap::new();
                for state in sb.values() {
                    *states.entry(state.as_str()).or_default() += 1;
                }
                println!(
                    "  broker holds    {} messages in `{ENDPOINT}` (peeked, by state: {states:?})",
                    sb.len()
                );
                let late = lost.iter().filter(|n| sb.contains_key(n)).count();
                let restart_late = lost_to_restart
                    .iter()
                    .filter(|n| sb.contains_key(n))
                    .count();
                if restart_late > 0 {
                    println!(
                        "  of the {} lost to the restart, {restart_late} are in the broker after \
                         all (late)",
                        lost_to_restart.len()
                    );
                }
                if !lost.is_empty() {
                    println!(
                        "  of the {} lost by redeliver, {late} are still in the broker (late, \
                         not delivered in time) and {} are not in it",
                        lost.len(),
                        lost.len() - late
                    );
                }
            }
            Some(Err(e)) => println!("  broker holds    unknown ({e})"),
            None => println!("  broker holds    unknown"),
        }
    }
    if !lost.is_empty() {
        let shown: Vec<_> = lost.iter().take(20).collect();
        println!("  lost messages (first 20): {shown:?}");
        if held_any {
            println!(
                "  NOT PROVEN: {} accepted messages never came out; the broker still holds the \
                 messages above (not lost on the broker, but not delivered in time)",
                lost.len()
            );
        }
    }
    let mut probe_ok = true;
    if let Some(probe) = &*run.shutdown_probe.lock().unwrap() {
        let elsewhere = probe
            .in_flight
            .iter()
            .filter(|n| {
                reading
                    .slow_completed_in
                    .get(n)
                    .is_some_and(|files| files.iter().any(|f| *f != probe.worker))
            })
            .count();
        let missing = probe.in_flight.len() - elsewhere;
        println!(
            "  shutdown probe  {} in flight in {} at SIGTERM; {elsewhere} of them completed by \
             other workers, {missing} not",
            probe.in_flight.len(),
            probe.worker
        );
        probe_ok = missing == 0 && probe.in_flight.len() as u64 == SLOW_IN_FLIGHT;
    }
    if lost.is_empty() && wrong.is_empty() && dead_lettered == expected_dead && probe_ok {
        println!("PASS: every accepted message was completed or dead-lettered as planned");
        Ok(())
    } else {
        Err(format!(
            "FAIL: {} lost, {} with the wrong fate, {dead_lettered} dead letters of {expected_dead} \
             expected{}",
            lost.len(),
            wrong.len(),
            if probe_ok {
                ""
            } else {
                "; the shutdown probe's messages were not all completed by other workers"
            }
        ))
    }
}
