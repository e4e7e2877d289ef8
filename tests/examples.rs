//! The seed-system examples' behaviour, asserted: each example's `scenario.rs` is compiled into
//! this test and run on the in-memory transport with tokio's clock paused.

#[path = "../examples/common/mod.rs"]
mod common;
#[path = "../examples/dead_letter_listener/scenario.rs"]
mod dead_letter_listener;
#[path = "../examples/event_integrations/scenario.rs"]
mod event_integrations;
#[path = "../examples/request_reply/scenario.rs"]
mod request_reply;
#[path = "../examples/retry_headers/scenario.rs"]
mod retry_headers;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::Timeline;
use redeliver::Transport;
use redeliver::memory::MemoryTransport;

const DELAY: Duration = Duration::from_secs(1);

fn memory() -> (Arc<dyn Transport>, Timeline) {
    let transport = MemoryTransport::new();
    let timeline = Timeline::quiet(transport.clock());
    (Arc::new(transport), timeline)
}

#[tokio::test(start_paused = true)]
async fn retry_headers_retries_as_new_messages_and_never_retries_invalid_requests() {
    let (transport, timeline) = memory();
    let outcomes = retry_headers::run(transport, timeline, DELAY)
        .await
        .unwrap();

    let counts = |id: &str| -> Vec<u32> {
        outcomes
            .calls
            .iter()
            .filter(|(c, _)| c == id)
            .map(|(_, n)| *n)
            .collect()
    };
    assert_eq!(counts("order-1"), [0]);
    assert_eq!(
        counts("order-2"),
        [0, 1, 2],
        "retried with counts 1 and 2, then processed"
    );
    assert_eq!(
        counts("order-3"),
        [0],
        "an invalid request is never retried"
    );
    assert_eq!(
        counts("order-4"),
        [0, 1, 2, 3],
        "retry counts up to the maximum"
    );
    assert_eq!(outcomes.invalid, ["order-3"]);
    assert_eq!(
        outcomes.dead_letters,
        [(
            "order-4".to_owned(),
            3,
            "downstream timeout".to_owned(),
            Some("erp".to_owned())
        )],
        "dead-lettered with its retry count, cause and headers"
    );
}

#[tokio::test(start_paused = true)]
async fn dead_letter_listener_marks_failed_documents_and_drops_invalid_ones() {
    let (transport, timeline) = memory();
    let (outcomes, dropped) = dead_letter_listener::run(transport, timeline, DELAY)
        .await
        .unwrap();

    let documents: Vec<(u32, &str)> = outcomes
        .documents
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    assert_eq!(documents, [(1, "scanned"), (2, "errored")]);
    assert_eq!(
        outcomes.calls,
        BTreeMap::from([(1, 1), (2, dead_letter_listener::MAX_ATTEMPTS), (99, 1)]),
        "the invalid message never reached the handler"
    );
    assert_eq!(outcomes.discarded, 1, "the unknown document");
    assert_eq!(dropped, 2, "the unknown document and the invalid message");
    assert_eq!(
        outcomes.listener_calls, 2,
        "the listener retried while the database was down"
    );
}

#[tokio::test(start_paused = true)]
async fn request_reply_answers_retries_after_a_time_out_and_rejects_stray_replies() {
    let (transport, timeline) = memory();
    let mut outcomes = request_reply::run(transport, timeline, DELAY)
        .await
        .unwrap();

    assert_eq!(outcomes.failures, []);
    outcomes.answers.sort();
    assert_eq!(
        outcomes.answers,
        [
            ("DE".to_owned(), 200, 1900),
            ("SE".to_owned(), 200, 1900),
            ("XX".to_owned(), 422, 0)
        ]
    );
    assert!(
        outcomes.retried_after_time_out,
        "SE was answered on the second try"
    );
    outcomes.dead_replies.sort();
    assert_eq!(
        outcomes.dead_replies,
        ["missing correlation id", "unknown correlation id"]
    );
}

/// Real time: the webhook calls go over TCP to a local HTTP server, and a paused clock would
/// jump ahead while they are in flight.
#[tokio::test]
async fn event_integrations_honour_retry_after_and_dead_letter_by_category() {
    let (transport, timeline) = memory();
    let delay = Duration::from_millis(100);
    let outcomes = event_integrations::run(transport, timeline, delay)
        .await
        .unwrap();

    let calls = |target: &str| -> Vec<(u32, u16)> {
        outcomes.webhook_calls[target]
            .iter()
            .map(|(a, _, s)| (*a, *s))
            .collect()
    };
    assert_eq!(calls("ok"), [(1, 200)]);
    assert_eq!(calls("rate-limited"), [(1, 429), (2, 204)]);
    assert_eq!(
        calls("broken"),
        [(1, 500), (2, 500), (3, 500)],
        "max attempts, then given up"
    );
    assert_eq!(
        calls("revoked"),
        [(1, 401)],
        "authentication failures are not retried"
    );
    let rate_limited = &outcomes.webhook_calls["rate-limited"];
    let waited = rate_limited[1].1 - rate_limited[0].1;
    assert!(
        waited >= 1.0,
        "the Retry-After of 1 s was honoured (waited {waited:.3} s, policy delay 0.1 s)"
    );

    let mut dead = outcomes.dead_letters.clone();
    dead.sort();
    assert_eq!(
        dead,
        [
            ("evt-0001:broken".to_owned(), 3, "transient".to_owned()),
            (
                "evt-0001:revoked".to_owned(),
                1,
                "authentication".to_owned()
            ),
        ],
        "the message id (event id + target) survives retries; the reason is the category"
    );
    assert_eq!(
        outcomes.stored,
        ["evt-0001"],
        "the event store got its own copy once"
    );
}
