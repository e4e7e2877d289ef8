//! Failover between the nodes a URL lists: two proxies in front of the test broker stand for two
//! nodes, so that "the node went away" is exact and repeatable. (The chaos suite's cluster mode,
//! `chaos/ci.sh`, stops a real node of a 3-node cluster.)

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redeliver_core::{
    Backoff, BackoffPolicy, Context, Message, Outcome, Topology, Transport, Worker,
};
use serde::{Deserialize, Serialize};

use common::{Fixture, Proxy, amqp_url, eventually, test_options};

#[derive(Serialize, Deserialize)]
struct Job {
    n: u32,
}

/// The URL of the test broker through each proxy, as one node list.
fn cluster_url(nodes: &[&Proxy]) -> String {
    let uri: lapin::uri::AMQPUri = amqp_url().parse().expect("AMQP_URL parses");
    let vhost = uri.vhost.replace('/', "%2f");
    let hosts: Vec<String> = nodes.iter().map(|node| node.addr.to_string()).collect();
    format!(
        "amqp://{}:{}@{}/{vhost}",
        uri.authority.userinfo.username,
        uri.authority.userinfo.password,
        hosts.join(",")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transport_moves_to_the_next_node_and_resumes_there() {
    if !common::broker_available().await {
        return;
    }
    let first = Proxy::start().await;
    let second = Proxy::start().await;
    let fx = Fixture::with_options(test_options(cluster_url(&[&first, &second]))).await;
    fx.declare(&Topology::new().endpoint("failover")).await;
    let transport = fx.transport();
    // Attempts per job: job 2 fails once, so its retry goes through the delay cascade on
    // whichever node the transport is on by then.
    let calls: Arc<Mutex<BTreeMap<u32, u32>>> = Arc::default();
    let worker = Worker::builder(Arc::clone(&transport), "failover")
        .concurrency(2)
        .retry_policy(
            BackoffPolicy::builder()
                .max_attempts(3)
                .backoff(Backoff::fixed(Duration::from_secs(1)))
                .build()
                .unwrap(),
        )
        .start({
            let calls = Arc::clone(&calls);
            move |job: Job, ctx: Context| {
                let calls = Arc::clone(&calls);
                async move {
                    *calls.lock().unwrap().entry(job.n).or_default() += 1;
                    if job.n == 2 && ctx.attempt() == 1 {
                        Outcome::retry("fails once")
                    } else {
                        Outcome::success()
                    }
                }
            }
        })
        .await
        .unwrap();
    transport
        .send("failover", Message::json(&Job { n: 1 }).unwrap())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "job 1 handled", || {
        calls.lock().unwrap().get(&1) == Some(&1)
    })
    .await;
    // Every connection went to the first node in the list.
    let on_first = first.accepted();
    assert!(
        on_first >= 2,
        "the shared and the consumer's connection: {on_first}"
    );
    assert_eq!(second.accepted(), 0);

    // The first node goes away for good.
    first.set_accepting(false);
    first.cut();
    let mut sent = None;
    for _ in 0..50 {
        match transport
            .send("failover", Message::json(&Job { n: 2 }).unwrap())
            .await
        {
            Ok(()) => {
                sent = Some(());
                break;
            }
            // Only until the transport has noticed and moved.
            Err(e) => assert!(e.is_transient(), "{e:?}"),
        }
    }
    sent.expect("sending works on the second node");
    eventually(
        Duration::from_secs(30),
        "job 2 handled twice on the second node (a retry after 1 s)",
        || calls.lock().unwrap().get(&2) == Some(&2),
    )
    .await;
    assert_eq!(
        first.accepted(),
        on_first,
        "nothing went back to the lost node"
    );
    assert!(second.accepted() >= 2, "{}", second.accepted());
    let stats = worker.shutdown().await;
    assert_eq!(*calls.lock().unwrap(), BTreeMap::from([(1, 1), (2, 2)]));
    eprintln!("after the failover: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_skips_a_node_that_does_not_answer() {
    if !common::broker_available().await {
        return;
    }
    let down = Proxy::start().await;
    down.set_accepting(false);
    let up = Proxy::start().await;
    let fx = Fixture::with_options(
        test_options(cluster_url(&[&down, &up]))
            .with_connect_attempts(1, Duration::from_millis(100)),
    )
    .await;
    fx.declare(&Topology::new().endpoint("skip")).await;
    fx.transport
        .send("skip", Message::new("x"))
        .await
        .expect("sent through the node that answers");
    assert_eq!(down.accepted(), 0);
    assert_eq!(up.accepted(), 1, "one connection, on the second node");
}
