//! What the tests of the `redeliver` binary share: a worker that dead-letters what was never
//! replayed, and running the binary against a transport URL.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redeliver_core::{Context, Message, Outcome, Transport, Worker};
use serde_json::Value;
use tokio::process::Command;
use tokio::sync::watch;

pub const PATIENCE: Duration = Duration::from_secs(30);

/// Replayed messages handled: (id, attempt), and how many so far.
#[derive(Clone)]
pub struct Handled {
    pub calls: Arc<Mutex<Vec<(String, u32)>>>,
    pub count: Arc<watch::Sender<usize>>,
}

impl Handled {
    pub fn new() -> Self {
        Handled {
            calls: Arc::default(),
            count: Arc::new(watch::Sender::new(0)),
        }
    }

    pub async fn wait_for(&self, n: usize) {
        let mut rx = self.count.subscribe();
        tokio::time::timeout(PATIENCE, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} replayed messages were not handled in time"))
            .expect("the sender lives");
    }

    pub fn ids(&self) -> BTreeSet<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// A worker on `endpoint`: dead-letters messages never replayed (reason `authentication`),
/// completes replayed ones, recording them; `calls` counts every handler call.
pub async fn worker(
    transport: &Arc<dyn Transport>,
    endpoint: &str,
    handled: &Handled,
    calls: &Arc<watch::Sender<usize>>,
) -> Worker {
    let (handled, calls) = (handled.clone(), Arc::clone(calls));
    Worker::builder(Arc::clone(transport), endpoint)
        .concurrency(4)
        .start(move |_: Value, ctx: Context| {
            let (handled, calls) = (handled.clone(), Arc::clone(&calls));
            async move {
                calls.send_modify(|c| *c += 1);
                let message = ctx.message();
                if message.replay_count() == 0 {
                    return Outcome::dead_letter("authentication");
                }
                handled
                    .calls
                    .lock()
                    .unwrap()
                    .push((message.id().to_string(), message.attempt()));
                handled.count.send_modify(|c| *c += 1);
                Outcome::success()
            }
        })
        .await
        .expect("the worker starts")
}

/// Sends `n` messages to `endpoint` and waits until a worker has dead-lettered them all.
pub async fn dead_letters(transport: &Arc<dyn Transport>, endpoint: &str, n: usize) -> Vec<String> {
    let calls = Arc::new(watch::Sender::new(0));
    let w = worker(transport, endpoint, &Handled::new(), &calls).await;
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{endpoint}-{i}");
        let message = Message::json(&serde_json::json!({ "n": i }))
            .unwrap()
            .with_id(id.as_str())
            .with_message_type("webhook");
        transport.send(endpoint, message).await.expect("sent");
        ids.push(id);
    }
    let mut rx = calls.subscribe();
    tokio::time::timeout(PATIENCE, rx.wait_for(|c| *c >= n))
        .await
        .expect("the messages were handled in time")
        .unwrap();
    let stats = w.shutdown().await;
    assert_eq!(stats.dead_lettered, n as u64, "{stats:?}");
    ids
}

pub fn redeliver(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_redeliver"));
    command
        .args(args)
        .env("REDELIVER_URL", url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `redeliver args`, expecting exit code `code`; its standard output as JSON when it is.
pub async fn run(url: &str, args: &[&str], code: i32) -> Value {
    let output = tokio::time::timeout(PATIENCE, redeliver(url, args).output())
        .await
        .unwrap_or_else(|_| panic!("redeliver {args:?} did not finish within {PATIENCE:?}"))
        .expect("redeliver runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(code),
        "redeliver {args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or(Value::Null)
}

/// Dead letters made by a worker on `endpoint` are listed, grouped and shown by the command
/// run with `url`, replayed by id and by fingerprint, and then each handled once at attempt 1.
pub async fn listed_grouped_replayed_and_handled(
    url: &str,
    transport: &Arc<dyn Transport>,
    endpoint: &str,
) {
    let ids = dead_letters(transport, endpoint, 4).await;

    let listed = run(url, &["--json", "dead-letters", "list", endpoint], 0).await;
    let listed: Vec<&str> = listed["dead_letters"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ids, "all four, oldest first");

    let groups = run(url, &["--json", "dead-letters", "group", endpoint], 0).await;
    let groups = groups["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0]["count"], 4);
    assert_eq!(groups[0]["fingerprint"]["reason"], "authentication");
    assert_eq!(groups[0]["fingerprint"]["message_type"], "webhook");

    // Everything without --yes is refused, with its own exit code, and moves nothing.
    run(url, &["dead-letters", "replay", endpoint], 3).await;
    let shown = run(
        url,
        &["--json", "dead-letters", "show", endpoint, &ids[2]],
        0,
    )
    .await;
    assert_eq!(shown["reason"], "authentication");
    assert_eq!(shown["body"], r#"{"n":2}"#);
    run(url, &["dead-letters", "show", endpoint, "no-such-id"], 4).await;

    let report = run(
        url,
        &[
            "--json",
            "dead-letters",
            "replay",
            endpoint,
            "--id",
            &ids[1],
        ],
        0,
    )
    .await;
    assert_eq!(
        (report["selected"].as_u64(), report["done"].as_u64()),
        (Some(1), Some(1))
    );
    let fingerprint = groups[0]["id"].as_str().unwrap();
    let report = run(
        url,
        &[
            "--json",
            "dead-letters",
            "replay",
            endpoint,
            "--fingerprint",
            fingerprint,
        ],
        0,
    )
    .await;
    assert_eq!(report["done"].as_u64(), Some(3));

    let handled = Handled::new();
    let calls = Arc::new(watch::Sender::new(0));
    let w = worker(transport, endpoint, &handled, &calls).await;
    handled.wait_for(4).await;
    w.shutdown().await;
    let mut all = handled.calls.lock().unwrap().clone();
    all.sort();
    let expected: Vec<(String, u32)> = ids.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(all, expected, "each replayed once, at attempt 1");
    assert_eq!(transport.count_dead_letters(endpoint).await.unwrap(), 0);
}
