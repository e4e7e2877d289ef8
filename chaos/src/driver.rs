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
use redeliver_rabbitmq::RabbitMqTransport;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::Job;
use crate::ledger::{Reading, now_ms};
use crate::plan::{Fate, Mix, SLOW_BASE};
use crate::worker::{WorkerArgs, options};

const WORKERS: usize = 3;
const ENDPOINT: &str = "work";
/// 3 levels: delays up to 7 s, enough for the 1-4 s not-befores and back-offs.
const LEVELS: u8 = 3;
/// The driver's publish time-out, which the outage probe checks.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Slow handlers in flight on one worker when it is told to shut down.
const SLOW_IN_FLIGHT: u64 = 100;

/// What one run does.
pub(crate) struct Settings {
    name: &'static str,
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
                name: if soak {
                    "chaos --soak"
                } else if short {
                    "chaos --short"
                } else {
                    "chaos"
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
}

struct Run {
    settings: Settings,
    dir: PathBuf,
    prefix: String,
    worker_url: String,
    processes: Mutex<Vec<Process>>,
    accepted: Mutex<BTreeSet<u64>>,
    unconfirmed: Mutex<BTreeSet<u64>>,
    sent: AtomicU64,
    publishing: AtomicBool,
    events: Mutex<Vec<String>>,
}

impl Run {
    fn event(&self, what: String) {
        println!("  {what}");
        self.events.lock().unwrap().push(what);
    }

    async fn spawn(&self, name: &str) -> Result<Process, String> {
        let args = WorkerArgs {
            name: name.to_owned(),
            url: self.worker_url.clone(),
            prefix: self.prefix.clone(),
            endpoint: ENDPOINT.to_owned(),
            levels: LEVELS,
            ledger: self.dir.join(format!("{name}.ledger")),
            mix: self.settings.mix,
            concurrency: self.settings.concurrency,
            slow: Duration::from_secs(30),
            shutdown: Duration::from_secs(1),
        };
        let stderr = std::fs::File::create(self.dir.join(format!("{name}.stderr")))
            .map_err(|e| e.to_string())?;
        let mut child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .arg("worker")
            .args(args.to_args())
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
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Process {
            name: name.to_owned(),
            child,
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
    let nodes = nodes();
    let (worker_proxies, driver_proxies) = if settings.cuts {
        let mut w = Vec::new();
        let mut d = Vec::new();
        for node in &nodes {
            w.push(Proxy::start(*node).await.map_err(|e| e.to_string())?);
            d.push(Proxy::start(*node).await.map_err(|e| e.to_string())?);
        }
        (w, d)
    } else {
        (Vec::new(), Vec::new())
    };
    let addrs = |proxies: &[Proxy]| -> Vec<SocketAddr> {
        if proxies.is_empty() {
            nodes.clone()
        } else {
            proxies.iter().map(Proxy::addr).collect()
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
    let run = Arc::new(Run {
        worker_url: url_of(&addrs(&worker_proxies)),
        settings,
        dir: dir.clone(),
        prefix: prefix.clone(),
        processes: Mutex::default(),
        accepted: Mutex::default(),
        unconfirmed: Mutex::default(),
        sent: AtomicU64::new(0),
        publishing: AtomicBool::new(true),
        events: Mutex::default(),
    });
    let transport = RabbitMqTransport::connect(
        options(
            &url_of(&addrs(&driver_proxies)),
            &prefix,
            LEVELS,
            "chaos driver",
        )
        .with_operation_timeout(PUBLISH_TIMEOUT),
    )
    .await
    .map_err(|e| format!("connecting the driver: {e}"))?;
    let shared: Arc<dyn Transport> = Arc::new(transport.clone());
    shared
        .declare(&Topology::new().endpoint(ENDPOINT))
        .await
        .map_err(|e| format!("declaring: {e}"))?;
    let dead: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
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

    // Drain: until every accepted message is accounted for, or nothing moved for 60 s.
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
        } else if last.1.elapsed() > Duration::from_secs(60) {
            // A quorum queue's at-least-once dead-letter outbox is retried only every
            // `dead_letter_worker_publisher_confirm_timeout` (180 s by default on 3.10): while
            // the broker holds messages there, they are late, not lost; wait for them, boundedly.
            let outbox: u64 = held(&run.prefix)
                .await
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
            if last.1.elapsed() < Duration::from_secs(61) {
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
    let held = held(&prefix).await;

    let mut processes = std::mem::take(&mut *run.processes.lock().unwrap());
    for process in &mut processes {
        terminate(process).await;
    }
    drain.shutdown().await;
    drop(worker_proxies);
    transport.close().await;

    report(
        &run,
        &reading,
        &dead.lock().unwrap(),
        &held,
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
    // The node every process connected to first (the first in the list) stops, then starts.
    at(&run, 45).await;
    let begin = now_ms();
    cluster(&["stop-node", "1"]).await?;
    let down = now_ms();
    run.event(format!(
        "node 1 stopped at {} sent (stopping took {} ms)",
        run.sent.load(Ordering::SeqCst),
        down - begin
    ));
    let resumed = async {
        loop {
            if let Some(first) = Reading::of(&run.dir)
                .completed_at
                .iter()
                .filter(|t| **t > down)
                .min()
            {
                return *first;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    match tokio::time::timeout(Duration::from_secs(60), resumed).await {
        Ok(first) => run.event(format!(
            "time to resume: first completion {} ms after node 1 was down ({} ms after the stop began)",
            first - down,
            first - begin
        )),
        Err(_) => run.event("no completion within 60 s of stopping node 1".to_owned()),
    }
    tokio::time::sleep(
        run.settings
            .node_down
            .saturating_sub(Duration::from_millis(now_ms() - down)),
    )
    .await;
    cluster(&["start-node", "1"]).await?;
    run.event("node 1 started again".to_owned());
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
        let ok = matches!(result, Err(Error::Timeout { .. }))
            && took >= PUBLISH_TIMEOUT
            && took < PUBLISH_TIMEOUT + Duration::from_secs(2);
        run.event(format!(
            "publish during an outage: {} after {took:?} ({})",
            match &result {
                Ok(()) => "accepted".to_owned(),
                Err(e) => format!("{e}"),
            },
            if ok {
                "the 5 s time-out, as configured"
            } else {
                "NOT the configured 5 s time-out"
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

/// Sends slow messages until one worker has `SLOW_IN_FLIGHT` of them in flight, then shuts it
/// down: they must be abandoned and handled elsewhere.
async fn slow_shutdown(run: &Run, transport: &dyn Transport) -> Result<(), String> {
    for n in SLOW_BASE..SLOW_BASE + SLOW_IN_FLIGHT * WORKERS as u64 {
        send(run, transport, n).await;
    }
    let mut process = run.processes.lock().unwrap().remove(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let in_flight = loop {
        let in_flight = Reading::of(&run.dir).slow_in_flight(&process.name);
        if in_flight >= SLOW_IN_FLIGHT || Instant::now() > deadline {
            break in_flight;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let asked = Instant::now();
    let status = terminate(&mut process).await;
    run.event(format!(
        "shutdown of {} with {in_flight} slow handlers in flight: exited {status:?} after {:?} \
         (1 s shutdown time-out; the abandoned messages go to the other workers)",
        process.name,
        asked.elapsed()
    ));
    Ok(())
}

/// How many messages the broker still holds in each queue of the run (those holding any):
/// `messages` as `rabbitmqctl list_queues` counts them, which includes what a quorum queue
/// keeps in its at-least-once dead-letter outbox (neither ready nor unacknowledged, so a
/// passive declaration does not see it). Values: (messages, ready, unacknowledged).
async fn held(prefix: &str) -> BTreeMap<String, (u64, u64, u64)> {
    let mut held = BTreeMap::new();
    let output = Command::new(cluster_script())
        .args(["queues", prefix])
        .output()
        .await;
    let Ok(output) = output else {
        held.insert("(could not ask the broker)".to_owned(), (u64::MAX, 0, 0));
        return held;
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
    held
}

fn report(
    run: &Run,
    reading: &Reading,
    dead: &BTreeMap<u64, u32>,
    held: &BTreeMap<String, (u64, u64, u64)>,
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
    let duplicates: u32 = reading.completions.values().map(|c| c - 1).sum::<u32>()
        + dead.values().map(|c| c - 1).sum::<u32>();
    let expected_dead = accepted
        .iter()
        .filter(|n| run.settings.mix.fate(**n) == Fate::Permanent)
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
        "  dead-lettered   {dead_lettered} (expected {expected_dead}: the permanent failures)"
    );
    println!("  lost            {}", lost.len());
    println!("  duplicates      {duplicates}");
    println!("  wrong fate      {}", wrong.len());
    println!("  published in {publish_time:?}; all accounted for after {drained_after:?}");
    if held.is_empty() {
        println!("  broker holds    nothing in the run's queues");
    } else {
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
    }
    if !lost.is_empty() {
        let shown: Vec<_> = lost.iter().take(20).collect();
        println!("  lost messages (first 20): {shown:?}");
        if !held.is_empty() {
            println!(
                "  NOT PROVEN: {} accepted messages never came out; the broker still holds the \
                 messages above (not lost on the broker, but not delivered in time)",
                lost.len()
            );
        }
    }
    if lost.is_empty() && wrong.is_empty() && dead_lettered == expected_dead {
        println!("PASS: every accepted message was completed or dead-lettered as planned");
        Ok(())
    } else {
        Err(format!(
            "FAIL: {} lost, {} with the wrong fate, {dead_lettered} dead letters of {expected_dead} expected",
            lost.len(),
            wrong.len()
        ))
    }
}
