//! Dead-letter operations ([`DeadLetters`]): list, group, replay and purge, and a replay
//! stopped half-way.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use redeliver_core::dead_letters::{Progress, ReplayOptions, Selection};
use redeliver_core::{DeadLetters, Host, Message, MessageId, Outcome, Topology};
use tokio::sync::Notify;

use crate::probe::expect_within;

use super::setup::{Setup, fixed, order, stop, unique, worker};

/// The header telling the scenarios' handler which reason to dead-letter a message with.
const FAIL_WITH: &str = "fail-with";

/// Handler calls of replayed messages: (id, attempt, replay count).
type Replayed = Arc<Mutex<Vec<(String, u32, u32)>>>;

/// A message with id `id` of type `kind` that the scenarios' handler dead-letters with
/// `reason` until it is replayed.
fn failing(id: &str, kind: &str, reason: &str) -> Message {
    order(0)
        .with_id(id)
        .with_message_type(kind)
        .with_header(FAIL_WITH, reason)
}

/// A worker on `endpoint` that dead-letters every message not yet replayed (with its
/// `fail-with` reason) and completes replayed ones, recording them in `replayed`.
async fn start(setup: &Setup<'_>, endpoint: &str, replayed: &Replayed) -> Host {
    let replayed = Arc::clone(replayed);
    worker(setup, endpoint, fixed(setup.timing, 1), move |_, ctx| {
        let message = ctx.message();
        if message.replay_count() == 0 {
            let reason = ctx.headers().get(FAIL_WITH).unwrap_or("no reason");
            return Outcome::dead_letter(reason);
        }
        replayed.lock().unwrap_or_else(|p| p.into_inner()).push((
            message.id().to_string(),
            message.attempt(),
            message.replay_count(),
        ));
        Outcome::success()
    })
    .await
}

/// Sends `messages` to `endpoint` and waits until the worker has dead-lettered them all.
async fn dead_letter_all(setup: &Setup<'_>, endpoint: &str, messages: Vec<Message>) {
    let replayed = Replayed::default();
    let w = start(setup, endpoint, &replayed).await;
    let n = messages.len();
    for message in messages {
        setup.send(endpoint, message).await;
    }
    setup.calls.wait_for(n, setup.timing.patience).await;
    let stats = stop(w, setup.timing).await;
    assert_eq!(stats.dead_lettered, n as u64, "{stats:?}");
}

fn ids(messages: &[Message]) -> Vec<String> {
    messages.iter().map(|m| m.id().to_string()).collect()
}

async fn list(setup: &Setup<'_>, dead: &DeadLetters) -> Vec<Message> {
    expect_within(
        setup.timing.patience,
        "the dead letters be listed (Transport::peek_dead_letters)",
        dead.list(usize::MAX),
    )
    .await
    .expect("the dead letters can be listed")
}

fn quiet(_: Progress) {}

/// Listing and grouping dead letters leaves every one in place and in order, and the groups
/// count them by reason and message type.
pub async fn dead_letters_listed_and_grouped_in_place(factory: &dyn crate::Factory) {
    let endpoint = unique("dlq-list");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let sent: Vec<String> = (1..=5).map(|i| format!("{endpoint}-{i}")).collect();
    let messages = sent
        .iter()
        .enumerate()
        .map(|(i, id)| match i {
            0 | 2 | 4 => failing(id, "order-placed", "authentication"),
            1 => failing(id, "order-placed", "invalid address"),
            _ => failing(id, "invoice", "authentication"),
        })
        .collect();
    dead_letter_all(&setup, &endpoint, messages).await;

    let dead = DeadLetters::new(Arc::clone(&setup.transport), &endpoint);
    let first = list(&setup, &dead).await;
    assert_eq!(ids(&first), sent, "oldest first");
    let second = list(&setup, &dead).await;
    assert_eq!(ids(&second), sent, "listing again finds the same, in order");
    assert_eq!(dead.count().await.expect("a count"), 5);
    let one = &first[1];
    assert_eq!(one.dead_letter().unwrap().reason, "invalid address");
    assert_eq!(one.attempt(), 1);
    assert!(
        one.last_failed_at().is_some(),
        "the failure time is recorded"
    );
    let shown = dead
        .show(one.id())
        .await
        .expect("a show")
        .expect("the dead letter is found");
    assert_eq!(shown.id(), one.id());

    let groups = dead.group().await.expect("the dead letters can be grouped");
    let counts: Vec<(String, Option<String>, u64)> = groups
        .iter()
        .map(|g| {
            (
                g.fingerprint.reason.clone(),
                g.fingerprint.message_type.clone(),
                g.count,
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("authentication".into(), Some("order-placed".into()), 3),
            ("authentication".into(), Some("invoice".into()), 1),
            ("invalid address".into(), Some("order-placed".into()), 1),
        ]
    );
    assert!(groups[0].first_failed_at <= groups[0].last_failed_at);
    assert_eq!(
        ids(&list(&setup, &dead).await),
        sent,
        "grouping leaves them in place"
    );
    setup.finish().await;
}

/// A replay of a selection moves exactly that selection back to the endpoint, where each is
/// handled at attempt 1 with its original id and a replay count of 1; the others stay, in
/// order.
pub async fn dead_letter_replay_moves_exactly_the_selection(factory: &dyn crate::Factory) {
    let endpoint = unique("dlq-replay");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let sent: Vec<String> = (1..=4).map(|i| format!("{endpoint}-{i}")).collect();
    let messages = sent
        .iter()
        .map(|id| failing(id, "order-placed", "timeout"))
        .collect();
    dead_letter_all(&setup, &endpoint, messages).await;

    let dead = DeadLetters::new(Arc::clone(&setup.transport), &endpoint);
    let selection = Selection::all().ids([sent[1].as_str(), sent[3].as_str()]);
    let dry = dead
        .replay(
            &selection,
            &ReplayOptions::default().with_dry_run(true),
            &mut quiet,
        )
        .await
        .expect("a dry run");
    assert_eq!((dry.selected, dry.done), (2, 0));
    assert_eq!(
        ids(&list(&setup, &dead).await),
        sent,
        "a dry run moves nothing"
    );

    let mut reported = Vec::new();
    let report = dead
        .replay(&selection, &ReplayOptions::default(), &mut |p| {
            reported.push(p.done)
        })
        .await
        .expect("the replay");
    assert_eq!((report.seen, report.selected, report.done), (4, 2, 2));
    assert_eq!(reported, [1, 2]);
    assert_eq!(
        ids(&list(&setup, &dead).await),
        [sent[0].clone(), sent[2].clone()],
        "the others stay, in order"
    );

    let replayed = Replayed::default();
    let w = start(&setup, &endpoint, &replayed).await;
    setup.calls.wait_for(4 + 2, setup.timing.patience).await;
    let stats = stop(w, setup.timing).await;
    assert_eq!(stats.completed, 2, "{stats:?}");
    let mut handled = replayed.lock().unwrap().clone();
    handled.sort();
    assert_eq!(
        handled,
        [(sent[1].clone(), 1, 1), (sent[3].clone(), 1, 1)],
        "(id, attempt, replay count)"
    );
    assert_eq!(dead.count().await.expect("a count"), 2);
    setup.finish().await;
}

/// A purge removes exactly the selection (here a fingerprint), after a dry run that removes
/// nothing.
pub async fn dead_letter_purge_removes_exactly_the_selection(factory: &dyn crate::Factory) {
    let endpoint = unique("dlq-purge");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let sent: Vec<String> = (1..=4).map(|i| format!("{endpoint}-{i}")).collect();
    let messages = sent
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let reason = if i % 2 == 0 { "gone" } else { "timeout" };
            failing(id, "order-placed", reason)
        })
        .collect();
    dead_letter_all(&setup, &endpoint, messages).await;

    let dead = DeadLetters::new(Arc::clone(&setup.transport), &endpoint);
    let groups = dead.group().await.expect("groups");
    let gone = groups
        .iter()
        .find(|g| g.fingerprint.reason == "gone")
        .expect("the `gone` group");
    let selection = Selection::all().fingerprint(gone.id.clone());
    let dry = dead
        .purge(&selection, true, &mut quiet)
        .await
        .expect("a dry run");
    assert_eq!(dry.ids, [sent[0].clone(), sent[2].clone()]);
    assert_eq!(dead.count().await.expect("a count"), 4);
    let report = dead
        .purge(&selection, false, &mut quiet)
        .await
        .expect("the purge");
    assert_eq!((report.selected, report.done), (2, 2));
    assert_eq!(
        ids(&list(&setup, &dead).await),
        [sent[1].clone(), sent[3].clone()]
    );
    setup.finish().await;
}

/// A replay stopped half-way (its future dropped, as when the process is killed) loses nothing:
/// every dead letter is either still a dead letter or back on the endpoint, and a second replay
/// brings back the rest.
pub async fn dead_letter_replay_interrupted_loses_nothing(factory: &dyn crate::Factory) {
    let endpoint = unique("dlq-interrupted");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&endpoint)).await else {
        return;
    };
    let sent: Vec<String> = (1..=6).map(|i| format!("{endpoint}-{i}")).collect();
    let messages = sent
        .iter()
        .map(|id| failing(id, "order-placed", "timeout"))
        .collect();
    dead_letter_all(&setup, &endpoint, messages).await;

    let dead = DeadLetters::new(Arc::clone(&setup.transport), &endpoint);
    let halfway = Arc::new(Notify::new());
    let stopped = {
        let signal = Arc::clone(&halfway);
        let mut progress = move |p: Progress| {
            if p.done == 3 {
                signal.notify_one();
            }
        };
        // The pause between moves that a rate limit makes is where the stop lands: after the
        // third move and before the fourth is sent.
        let options = ReplayOptions::default().with_rate_limit(10.0);
        let all = Selection::all();
        let replay = dead.replay(&all, &options, &mut progress);
        tokio::select! {
            biased;
            () = halfway.notified() => true,
            finished = replay => {
                finished.expect("the replay");
                false
            }
        }
    };
    assert!(stopped, "the replay was stopped half-way");
    let left: BTreeSet<MessageId> = list(&setup, &dead)
        .await
        .iter()
        .map(|m| m.id().clone())
        .collect();
    assert_eq!(left.len(), 3, "three moved before the stop: {left:?}");

    let report = dead
        .replay(&Selection::all(), &ReplayOptions::default(), &mut quiet)
        .await
        .expect("the second replay");
    assert_eq!(report.done, left.len() as u64);
    let replayed = Replayed::default();
    let w = start(&setup, &endpoint, &replayed).await;
    setup.calls.wait_for(6 + 6, setup.timing.patience).await;
    stop(w, setup.timing).await;
    let handled: BTreeSet<String> = replayed
        .lock()
        .unwrap()
        .iter()
        .map(|(id, attempt, _)| {
            assert_eq!(*attempt, 1);
            id.clone()
        })
        .collect();
    assert_eq!(
        handled,
        sent.iter().cloned().collect::<BTreeSet<_>>(),
        "every message is handled"
    );
    assert_eq!(dead.count().await.expect("a count"), 0);
    setup.finish().await;
}
