//! Dead-letter operations: list, show, group, replay and purge an endpoint's dead letters, the
//! same way on every transport.
//!
//! [`DeadLetters`] works on one endpoint through its `Arc<dyn Transport>`, with the transport
//! author's primitives only: [`Transport::peek_dead_letters`] and
//! [`Transport::count_dead_letters`] to look, and deliveries taken with
//! [`Transport::take_dead_letters`] (by default a consumer of
//! [`Source::DeadLetters`](crate::Source::DeadLetters)), settled by [`Delivery::move_to`],
//! [`Delivery::complete`] and [`Delivery::pass_over`], to change anything.
//!
//! # Guarantees
//! - **Looking changes nothing.** [`list`](DeadLetters::list), [`show`](DeadLetters::show),
//!   [`group`](DeadLetters::group) and every dry run leave each dead letter in place and in
//!   order. What a look costs depends on the broker: a peek on Service Bus and in memory; on
//!   RabbitMQ, which cannot peek a queue, a browse that takes each message and stores a
//!   confirmed copy of it at the end of the queue before removing it, once round the queue —
//!   one publish and one ack per dead letter, bounded by the count when the browse started.
//!   See the RabbitMQ crate's documentation.
//! - **At-least-once move.** A replayed dead letter is sent to its endpoint (or another) and
//!   the broker has confirmed the copy **before** the dead letter is removed. A crash, a lost
//!   connection or a replay stopped in between leaves both: the message is handled twice (its
//!   id is kept, so an idempotent handler notices), never lost. A dead letter whose copy could
//!   not be sent stays where it was.
//! - **Exactly the selection.** A replay or purge first takes a snapshot (a peek), selects from
//!   it, and then moves or removes only messages whose id was selected, as many as were
//!   selected; the others are passed over in place. A replay or purge of everything
//!   ([`Selection::all`], not a dry run) counts the dead letters instead of peeking at them
//!   and moves or removes that many, oldest first. Dead letters that arrive during the
//!   operation are not touched.
//! - **Replayed messages start again.** The copy has attempt 1 (or its attempt, with
//!   [`ReplayOptions::keep_attempt`]), no dead-letter reason, its original id, and records
//!   [`replay_count`](Message::replay_count) + 1 and [`replayed_at`](Message::replayed_at). Its
//!   failure times are kept, so a message that fails again shows when it first failed.
//!
//! Dead letters that a consumer of [`Source::DeadLetters`](crate::Source::DeadLetters) holds at the time are not seen by a
//! snapshot; run replays and purges while no worker consumes the same dead letters.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;

use crate::message::{FrameworkState, MESSAGE_TYPE, Message, MessageId};
use crate::transport::{Delivery, PassedOver, Transport};
use crate::{Error, clock::to_chrono};

/// How many dead letters a replay or purge of everything lets the transport take ahead of
/// the one it moves (a prefetch, on brokers that push).
const AHEAD: usize = 64;

/// The longest a replay or purge waits for the next dead letter of its snapshot before it gives
/// up (the snapshot's messages are gone: another consumer took them).
const NEXT_DEAD_LETTER: Duration = Duration::from_secs(30);

/// What a group of dead letters failed with: the dead-letter reason, the
/// [`MESSAGE_TYPE`] header and the endpoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Fingerprint {
    /// The dead-letter reason (`authentication`, `invalid payload`), empty if there is none.
    pub reason: String,
    /// The message type, if the message has one.
    pub message_type: Option<String>,
    /// The endpoint whose dead letter it is.
    pub endpoint: String,
}

impl Fingerprint {
    /// The fingerprint of `message`, a dead letter of `endpoint`.
    pub fn of(message: &Message, endpoint: &str) -> Self {
        Fingerprint {
            reason: message
                .dead_letter()
                .map(|d| d.reason.clone())
                .unwrap_or_default(),
            message_type: message.headers().get(MESSAGE_TYPE).map(str::to_owned),
            endpoint: endpoint.to_owned(),
        }
    }

    /// A short stable name of the fingerprint (16 hexadecimal digits, FNV-1a of its parts), to
    /// select it by ([`Selection::fingerprint`]) without writing the reason out.
    pub fn id(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let parts = [
            self.reason.as_str(),
            self.message_type.as_deref().unwrap_or(""),
            self.endpoint.as_str(),
        ];
        for part in parts {
            // A separator no text contains, so that ("ab", "c") and ("a", "bc") differ.
            for byte in part.bytes().chain([0xff]) {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        format!("{hash:016x}")
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` on {} ({})",
            self.reason,
            self.endpoint,
            self.message_type.as_deref().unwrap_or("no message type")
        )
    }
}

/// Dead letters with the same [`Fingerprint`]: how many, and when they failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Group {
    /// What they failed with.
    pub fingerprint: Fingerprint,
    /// [`Fingerprint::id`], for selecting the group.
    pub id: String,
    /// How many dead letters.
    pub count: u64,
    /// The earliest failure among them, if any recorded one.
    pub first_failed_at: Option<DateTime<Utc>>,
    /// The latest failure among them, if any recorded one.
    pub last_failed_at: Option<DateTime<Utc>>,
}

/// Which dead letters a replay or purge applies to. Every filter set must hold (they are
/// combined with *and*); with none set, all of them ([`Selection::all`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    ids: Option<Vec<MessageId>>,
    fingerprint: Option<String>,
    older_than: Option<Duration>,
}

impl Selection {
    /// Every dead letter.
    pub fn all() -> Self {
        Selection::default()
    }

    /// Only the dead letters with one of these ids.
    #[must_use]
    pub fn ids(mut self, ids: impl IntoIterator<Item = impl Into<MessageId>>) -> Self {
        self.ids = Some(ids.into_iter().map(Into::into).collect());
        self
    }

    /// Only the dead letters of the group whose [`Fingerprint::id`] is `id`.
    #[must_use]
    pub fn fingerprint(mut self, id: impl Into<String>) -> Self {
        self.fingerprint = Some(id.into());
        self
    }

    /// Only the dead letters whose last failure is at least `age` old (by the transport's
    /// clock). Dead letters without a recorded failure time are never selected by age.
    #[must_use]
    pub fn older_than(mut self, age: Duration) -> Self {
        self.older_than = Some(age);
        self
    }

    /// Whether this selects everything (no filter set).
    pub fn is_all(&self) -> bool {
        self == &Selection::all()
    }

    /// Whether `message`, a dead letter of `endpoint`, is selected at `now`.
    pub fn matches(&self, message: &Message, endpoint: &str, now: DateTime<Utc>) -> bool {
        if let Some(ids) = &self.ids
            && !ids.contains(message.id())
        {
            return false;
        }
        if let Some(id) = &self.fingerprint
            && Fingerprint::of(message, endpoint).id() != *id
        {
            return false;
        }
        if let Some(age) = self.older_than {
            match message.last_failed_at() {
                Some(at) if now.signed_duration_since(at) >= to_chrono(age) => {}
                _ => return false,
            }
        }
        true
    }
}

/// How a [`replay`](DeadLetters::replay) sends dead letters back.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ReplayOptions {
    /// The endpoint to send them to; `None`: the endpoint whose dead letters they are.
    pub to: Option<String>,
    /// Keep each message's attempt instead of starting again at 1.
    pub keep_attempt: bool,
    /// At most this many messages per second; `None`: as fast as the broker confirms.
    pub rate_limit: Option<f64>,
    /// Only report what would be replayed; move nothing.
    pub dry_run: bool,
}

impl ReplayOptions {
    /// Sends to `endpoint` instead of the dead letters' own endpoint.
    #[must_use]
    pub fn with_target(mut self, endpoint: impl Into<String>) -> Self {
        self.to = Some(endpoint.into());
        self
    }

    /// Keeps each message's attempt.
    #[must_use]
    pub fn with_keep_attempt(mut self, keep: bool) -> Self {
        self.keep_attempt = keep;
        self
    }

    /// At most `per_second` messages per second (must be positive and finite).
    #[must_use]
    pub fn with_rate_limit(mut self, per_second: f64) -> Self {
        self.rate_limit = Some(per_second);
        self
    }

    /// Only reports what would be replayed.
    #[must_use]
    pub fn with_dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    fn interval(&self) -> Result<Option<Duration>, Error> {
        match self.rate_limit {
            None => Ok(None),
            Some(rate) if rate.is_finite() && rate > 0.0 => {
                Ok(Some(Duration::from_secs_f64(1.0 / rate)))
            }
            Some(rate) => Err(Error::config(
                "rate_limit",
                format!("must be a positive number of messages per second, got {rate}"),
            )),
        }
    }
}

/// How far a replay or purge has got, reported after each message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Messages moved or removed so far.
    pub done: u64,
    /// Messages selected.
    pub total: u64,
}

/// What a replay or purge did (or, on a dry run, would do).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Report {
    /// Dead letters in the snapshot.
    pub seen: u64,
    /// Dead letters selected.
    pub selected: u64,
    /// Dead letters moved (replay) or removed (purge); 0 on a dry run.
    pub done: u64,
    /// Whether it was a dry run.
    pub dry_run: bool,
    /// The ids of the selected dead letters, in snapshot order.
    pub ids: Vec<String>,
}

/// The dead letters of one endpoint; see the [module documentation](self).
#[derive(Clone, Debug)]
pub struct DeadLetters {
    transport: Arc<dyn Transport>,
    endpoint: String,
}

/// Deliveries held unsettled during a pass, given back in reverse when dropped, so that a
/// transport that puts a given-back message first in line keeps the original order.
struct Held(Vec<Delivery>);

impl Drop for Held {
    fn drop(&mut self) {
        while let Some(delivery) = self.0.pop() {
            drop(delivery);
        }
    }
}

/// What a pass does with a selected dead letter.
enum Action<'a> {
    Replay(&'a ReplayOptions, Option<Duration>),
    Purge,
}

impl DeadLetters {
    /// The dead letters of `endpoint` on `transport`.
    pub fn new(transport: Arc<dyn Transport>, endpoint: impl Into<String>) -> Self {
        DeadLetters {
            transport,
            endpoint: endpoint.into(),
        }
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// How many dead letters are waiting.
    pub async fn count(&self) -> Result<u64, Error> {
        self.transport.count_dead_letters(&self.endpoint).await
    }

    /// Up to `max` dead letters, oldest first, left in place.
    pub async fn list(&self, max: usize) -> Result<Vec<Message>, Error> {
        self.transport.peek_dead_letters(&self.endpoint, max).await
    }

    /// The dead letter with id `id`, if there is one (the first, if several share it).
    pub async fn show(&self, id: &MessageId) -> Result<Option<Message>, Error> {
        Ok(self
            .list(usize::MAX)
            .await?
            .into_iter()
            .find(|m| m.id() == id))
    }

    /// The dead letters grouped by [`Fingerprint`], largest group first (then by
    /// fingerprint).
    pub async fn group(&self) -> Result<Vec<Group>, Error> {
        let mut groups: BTreeMap<Fingerprint, Group> = BTreeMap::new();
        for message in self.list(usize::MAX).await? {
            let fingerprint = Fingerprint::of(&message, &self.endpoint);
            let group = groups.entry(fingerprint.clone()).or_insert_with(|| Group {
                id: fingerprint.id(),
                fingerprint,
                count: 0,
                first_failed_at: None,
                last_failed_at: None,
            });
            group.count += 1;
            let first = message.first_failed_at().or(message.last_failed_at());
            group.first_failed_at = earliest(group.first_failed_at, first);
            group.last_failed_at = group.last_failed_at.max(message.last_failed_at());
        }
        let mut groups: Vec<Group> = groups.into_values().collect();
        groups.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| a.fingerprint.cmp(&b.fingerprint))
        });
        Ok(groups)
    }

    /// Sends the selected dead letters back to their endpoint (or
    /// [`ReplayOptions::to`]), each copy confirmed before its dead letter is removed;
    /// `progress` is called after each one. See the [module documentation](self).
    pub async fn replay(
        &self,
        selection: &Selection,
        options: &ReplayOptions,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<Report, Error> {
        let interval = options.interval()?;
        self.pass(
            selection,
            options.dry_run,
            Action::Replay(options, interval),
            progress,
        )
        .await
    }

    /// Removes the selected dead letters (with `dry_run`, only reports which); `progress` is
    /// called after each one.
    pub async fn purge(
        &self,
        selection: &Selection,
        dry_run: bool,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<Report, Error> {
        self.pass(selection, dry_run, Action::Purge, progress).await
    }

    /// The copy of `dead` that a replay sends.
    fn replayed(&self, dead: &Message, options: &ReplayOptions) -> Message {
        let attempt = if options.keep_attempt {
            dead.attempt()
        } else {
            1
        };
        Message::clone(dead)
            .with_dead_letter(None)
            .with_attempt(attempt)
            .with_replay(
                dead.replay_count().saturating_add(1),
                Some(self.transport.clock().now()),
            )
    }

    /// What a pass goes through: how many dead letters, how many of each selected id (`None`:
    /// every one), and the report so far. A pass that acts on everything only counts, where
    /// the transport can, rather than look at each message first; otherwise the snapshot is
    /// a [`list`](Self::list).
    async fn snapshot(
        &self,
        selection: &Selection,
        dry_run: bool,
    ) -> Result<(usize, Option<BTreeMap<MessageId, u64>>, Report), Error> {
        let mut report = Report {
            seen: 0,
            selected: 0,
            done: 0,
            dry_run,
            ids: Vec::new(),
        };
        if selection.is_all() && !dry_run {
            match self.transport.count_dead_letters(&self.endpoint).await {
                Ok(count) => {
                    report.seen = count;
                    report.selected = count;
                    let total = usize::try_from(count).unwrap_or(usize::MAX);
                    return Ok((total, None, report));
                }
                Err(Error::Unsupported { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let snapshot = self.list(usize::MAX).await?;
        let now = self.transport.clock().now();
        let mut wanted: BTreeMap<MessageId, u64> = BTreeMap::new();
        for message in &snapshot {
            if selection.matches(message, &self.endpoint, now) {
                *wanted.entry(message.id().clone()).or_default() += 1;
                report.ids.push(message.id().to_string());
            }
        }
        report.seen = snapshot.len() as u64;
        report.selected = report.ids.len() as u64;
        Ok((snapshot.len(), Some(wanted), report))
    }

    async fn pass(
        &self,
        selection: &Selection,
        dry_run: bool,
        action: Action<'_>,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<Report, Error> {
        let (total, mut wanted, mut report) = self.snapshot(selection, dry_run).await?;
        if dry_run || report.selected == 0 {
            return Ok(report);
        }

        // Deliveries passed over may be held until the end: room for all of them. A pass over
        // everything passes nothing over, and lets the transport take a few ahead.
        let held = if wanted.is_some() {
            total
        } else {
            total.min(AHEAD)
        };
        let mut stream = self
            .transport
            .take_dead_letters(&self.endpoint, held)
            .await?;
        let mut held = Held(Vec::new());
        let mut copied_back = false;
        let mut seen = 0usize;
        let mut next_slot = tokio::time::Instant::now();
        // Once every selected message is done, a transport that holds can stop; one that
        // copies back goes round the whole snapshot, which puts the queue back in its order.
        while seen < total && (report.done < report.selected || copied_back) {
            // The rate limit waits before the next dead letter is taken, so that a replay
            // stopped while it waits holds nothing.
            if let (Action::Replay(_, Some(interval)), true) = (&action, report.done > 0) {
                tokio::time::sleep_until(next_slot).await;
                next_slot = tokio::time::Instant::now() + *interval;
            }
            let delivery = match tokio::time::timeout(NEXT_DEAD_LETTER, stream.next()).await {
                Ok(Some(Ok(delivery))) => delivery,
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => return Err(Error::Closed),
                Err(_) => {
                    return Err(Error::timeout(
                        format!(
                            "waiting for the next dead letter of `{}` ({} of {} seen; another \
                             consumer may have taken the others)",
                            self.endpoint, seen, total
                        ),
                        NEXT_DEAD_LETTER,
                    ));
                }
            };
            seen += 1;
            let id = delivery.message().id();
            let selected = match wanted.as_mut() {
                None => {
                    report.ids.push(id.to_string());
                    true
                }
                Some(wanted) => match wanted.get_mut(id) {
                    Some(left) if *left > 0 => {
                        *left -= 1;
                        true
                    }
                    _ => false,
                },
            };
            if !selected {
                match delivery.pass_over().await? {
                    PassedOver::Held(delivery) => held.0.push(delivery),
                    PassedOver::CopiedBack => copied_back = true,
                }
                continue;
            }
            match &action {
                Action::Replay(options, interval) => {
                    if let Some(interval) = interval {
                        next_slot = tokio::time::Instant::now() + *interval;
                    }
                    let target = options.to.as_deref().unwrap_or(&self.endpoint);
                    let copy = self.replayed(delivery.message(), options);
                    delivery.move_to(&*self.transport, target, copy).await?;
                }
                Action::Purge => {
                    delivery.complete().await?;
                }
            }
            report.done += 1;
            progress(Progress {
                done: report.done,
                total: report.selected,
            });
        }
        drop(held);
        Ok(report)
    }
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::DeadLetterInfo;

    fn dead(id: &str, reason: &str, kind: &str) -> Message {
        Message::new("x")
            .with_id(id)
            .with_message_type(kind)
            .with_dead_letter(Some(DeadLetterInfo {
                reason: reason.into(),
                description: None,
            }))
    }

    #[test]
    fn fingerprints_tell_their_parts_apart() {
        let a = Fingerprint::of(&dead("1", "ab", "c"), "e");
        let b = Fingerprint::of(&dead("2", "a", "bc"), "e");
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id(), Fingerprint::of(&dead("3", "ab", "c"), "e").id());
        assert_eq!(a.id().len(), 16);
    }

    #[test]
    fn selections_combine_their_filters() {
        let now = Utc::now();
        let old = dead("1", "timeout", "order")
            .with_failure_times(None, Some(now - chrono::TimeDelta::hours(2)));
        let fingerprint = Fingerprint::of(&old, "orders").id();
        assert!(Selection::all().matches(&old, "orders", now));
        assert!(Selection::all().is_all());
        let by_age = Selection::all().older_than(Duration::from_secs(3600));
        assert!(by_age.matches(&old, "orders", now));
        assert!(!by_age.matches(&dead("2", "timeout", "order"), "orders", now));
        let both = by_age.fingerprint(fingerprint).ids(["1"]);
        assert!(both.matches(&old, "orders", now));
        assert!(!both.matches(&old, "other", now), "another endpoint");
        assert!(!Selection::all().ids(["9"]).matches(&old, "orders", now));
    }

    #[test]
    fn a_rate_limit_must_be_positive() {
        let e = ReplayOptions::default()
            .with_rate_limit(0.0)
            .interval()
            .unwrap_err();
        assert!(e.to_string().contains("rate_limit"), "{e}");
        assert_eq!(
            ReplayOptions::default()
                .with_rate_limit(4.0)
                .interval()
                .unwrap(),
            Some(Duration::from_millis(250))
        );
    }
}
