//! Request/reply over the transport.

use std::sync::Arc;

use redeliver_core::request_reply::{RequestOptions, Requester, StatusEnvelope, reply_to};
use redeliver_core::{Context, Host, Message, Outcome, Topology};
use serde::{Deserialize, Serialize};

use crate::Factory;
use crate::probe::DeadLetterProbe;

use super::setup::{Order, Setup, assert_stats, consumer, host, stop, unique};

/// Starts a responder on `endpoint` that answers each request with `answer` (or not at all),
/// sending the reply from the handler's context.
async fn responder(
    setup: &Setup<'_>,
    endpoint: &str,
    answer: impl Fn(&Context) -> Option<StatusEnvelope<Quote>> + Send + Sync + 'static,
) -> Host {
    let calls = setup.calls.clone();
    let consumer = consumer(endpoint).handler(move |_: Order, ctx: Context| {
        calls.record(&ctx);
        let reply = answer(&ctx).map(|envelope| reply_to(&ctx, &envelope).expect("a reply"));
        async move {
            match reply {
                Some((endpoint, message)) => ctx.send(&endpoint, message).await.into(),
                None => Outcome::success(),
            }
        }
    });
    host(setup, consumer).await
}

/// What the responders answer with.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Quote {
    price: u32,
}

/// A request gets its reply, with the status envelope and the response's fields; the responder
/// saw the reply-to and a correlation id.
pub async fn request_reply_round_trip(factory: &dyn Factory) {
    let (service, replies) = (unique("quotes"), unique("replies"));
    let Some(setup) = Setup::new(
        factory,
        Topology::new().endpoint(&service).endpoint(&replies),
    )
    .await
    else {
        return;
    };
    let r = responder(&setup, &service, |_| {
        Some(StatusEnvelope::new(200, "OK", Quote { price: 42 }))
    })
    .await;
    let options = RequestOptions::default()
        .with_timeout(setup.timing.patience)
        .with_app_id("conformance");
    let requester = Requester::start(Arc::clone(&setup.transport), &replies, options)
        .await
        .expect("the requester starts");

    let reply: StatusEnvelope<Quote> = requester
        .request(&service, &Order { id: 1 })
        .await
        .expect("a reply");

    assert!(reply.is_success());
    assert_eq!(
        (reply.status_message.as_str(), reply.body),
        ("OK", Quote { price: 42 })
    );
    requester.shutdown().await;
    assert_stats(stop(r, setup.timing).await, 1, 0, 0, 0);
    setup.finish().await;
}

/// A request without a reply in time is tried again with a new correlation id; the reply to
/// the second try is returned; after the last try the result is a time-out.
pub async fn request_reply_timeout_and_retry(factory: &dyn Factory) {
    let (service, replies) = (unique("slow-quotes"), unique("replies"));
    let Some(setup) = Setup::new(
        factory,
        Topology::new().endpoint(&service).endpoint(&replies),
    )
    .await
    else {
        return;
    };
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let correlation_ids = Arc::clone(&seen);
    let r = responder(&setup, &service, move |ctx| {
        let mut seen = correlation_ids.lock().unwrap_or_else(|p| p.into_inner());
        seen.push(ctx.correlation_id().map(str::to_owned));
        // Silent on the first try of each request, answers the second.
        (seen.len() % 2 == 0).then(|| StatusEnvelope::new(200, "OK", Quote { price: 7 }))
    })
    .await;
    let options = RequestOptions::default()
        .with_timeout(setup.timing.unit * 3)
        .with_attempts(2);
    let requester = Requester::start(Arc::clone(&setup.transport), &replies, options.clone())
        .await
        .expect("the requester starts");

    let reply: StatusEnvelope<Quote> = requester
        .request(&service, &Order { id: 1 })
        .await
        .expect("a reply to the second try");
    assert_eq!(reply.body, Quote { price: 7 });
    let ids = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(ids.len(), 2);
    assert!(
        ids.iter().all(Option::is_some),
        "every try carries a correlation id"
    );
    assert_ne!(ids[0], ids[1], "each try has its own correlation id");

    requester.shutdown().await;
    let one_try = RequestOptions::default()
        .with_timeout(setup.timing.unit)
        .with_attempts(1);
    let requester = Requester::start(Arc::clone(&setup.transport), &replies, one_try)
        .await
        .expect("the requester starts");
    let silent = requester
        .request::<_, Quote>(&service, &Order { id: 2 })
        .await;
    assert!(
        matches!(silent, Err(redeliver_core::Error::Timeout { .. })),
        "{silent:?}"
    );
    requester.shutdown().await;
    stop(r, setup.timing).await;
    setup.finish().await;
}

/// Replies the requester cannot use are dead-lettered with a reason: without a correlation id
/// at once, invalid JSON at once, an unknown correlation id after a few tries.
pub async fn request_reply_unusable_replies(factory: &dyn Factory) {
    let replies = unique("replies");
    let Some(setup) = Setup::new(factory, Topology::new().endpoint(&replies)).await else {
        return;
    };
    let mut dead = DeadLetterProbe::start(&setup.transport, &replies).await;
    let options = RequestOptions::default().with_unknown_replies(2, setup.timing.unit);
    let requester = Requester::start(Arc::clone(&setup.transport), &replies, options)
        .await
        .expect("the requester starts");
    let envelope = StatusEnvelope::new(200, "OK", Quote { price: 1 });

    setup
        .send(&replies, Message::json(&envelope).expect("json"))
        .await;
    setup
        .send(
            &replies,
            Message::new("{oops")
                .with_correlation_id("c-1")
                .with_content_type("application/json"),
        )
        .await;
    setup
        .send(
            &replies,
            Message::json(&envelope)
                .expect("json")
                .with_correlation_id("nobody-asked"),
        )
        .await;
    let dead = dead.wait_for(3, setup.timing.patience).await;

    let mut reasons: Vec<(String, u32)> = dead
        .iter()
        .map(|m| {
            (
                m.dead_letter()
                    .map(|d| d.reason.clone())
                    .unwrap_or_default(),
                m.attempt(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("invalid payload".to_owned(), 1),
            ("missing correlation id".to_owned(), 1),
            ("unknown correlation id".to_owned(), 2),
        ]
    );
    requester.shutdown().await;
    setup.finish().await;
}
