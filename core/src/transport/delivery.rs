//! Deliveries and how they are settled: the one path from the worker's decision to the broker.
//!
//! A transport hands out [`Delivery`] values and implements a handful of steps for each one
//! ([`Settle`]): remove it, give it back, store a copy of it. The order of those steps is
//! decided here, once for every transport, so that settling is at-least-once everywhere:
//!
//! | settlement | steps |
//! |---|---|
//! | [`complete`](Delivery::complete) | remove |
//! | [`abandon`](Delivery::abandon) | give back |
//! | [`retry`](Delivery::retry), [`park`](Delivery::park) | store the copy, then remove the original |
//! | [`dead_letter`](Delivery::dead_letter) | store the dead letter, then remove the original |
//! | [`move_to`](Delivery::move_to) | send the copy to another endpoint, then remove the original |
//! | [`pass_over`](Delivery::pass_over) | keep holding it, or store a copy in its place and remove the original |
//!
//! - A copy is stored, and the broker has confirmed it, **before** the original is removed. A
//!   failure in between leaves both: the message is delivered twice, never lost.
//! - If storing fails, the original is given back and the error returned: the broker delivers
//!   the message again at the same attempt.
//! - If the broker refuses the *copy* of a retry or park for what it is
//!   ([`Error::is_message_refused`]: too large, unroutable), storing it again would fail the
//!   same way for ever; the original is dead-lettered instead with reason
//!   [`COPY_REFUSED`](crate::reasons::COPY_REFUSED), and the settlement answers
//!   [`Settled::DeadLettered`].
//! - A delivery that can no longer be settled ([`Settle::check_held`]: its channel closed, its
//!   lock ran out) stores nothing: the broker delivers the original again anyway, and a copy
//!   would only add a duplicate.
//! - A delivery dropped unsettled is given back by its transport (see [`Settle`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tracing::warn;

use super::Source;
use crate::message::{DeadLetterInfo, FrameworkState, Message};
use crate::{Error, reasons, wire};

/// What a transport did when asked to store a message ([`Settle::store_copy`],
/// [`Settle::store_dead_letter`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stored {
    /// A copy is stored and confirmed; the delivered original is still in place, and is
    /// removed next.
    Copy,
    /// The transport moved the delivered original itself, with the new state (a broker's own
    /// dead-lettering, or a lock held until the not-before and then released): nothing is left
    /// to remove.
    Moved,
}

/// What a settlement did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settled {
    /// What was asked.
    AsAsked,
    /// The message was dead-lettered instead, with this reason: the copy a retry or park would
    /// have stored was refused for what it is
    /// ([`COPY_REFUSED`](crate::reasons::COPY_REFUSED)), so storing it again would fail the
    /// same way.
    DeadLettered {
        /// The dead-letter reason.
        reason: String,
    },
}

/// The steps a transport carries out to settle one delivery. Implemented by transports, not
/// applications; [`Delivery`] decides their order (see the [module docs](self)).
///
/// Each delivery gets its own value, used for that delivery only, and dropped once it is
/// settled. Dropped after neither [`remove`](Settle::remove), [`give_back`](Settle::give_back)
/// nor a [`Stored::Moved`], it must give the message back (at once, or when its channel or lock
/// goes away).
#[async_trait]
pub trait Settle: Send + 'static {
    /// Fails if the delivery can no longer be settled (its channel closed, its lock ran out),
    /// saying that the broker delivers the message again. By default it can.
    fn check_held(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Removes the delivered message from its source: it is done.
    async fn remove(&mut self) -> Result<(), Error>;

    /// Gives the delivered message back, unchanged, for immediate redelivery.
    async fn give_back(&mut self) -> Result<(), Error>;

    /// Stores `next` — the delivered message with a new attempt, not-before or failure, same
    /// id — on the delivery's source, not to be delivered before its
    /// [`not_before`](Message::not_before). Returns once the broker has taken it. An error for
    /// which [`Error::is_message_refused`] holds says that storing it would always fail.
    async fn store_copy(&mut self, next: &Message) -> Result<Stored, Error>;

    /// Stores `dead` — the delivered message with its [`DeadLetterInfo`] — among the dead
    /// letters of its endpoint. Returns once the broker has taken it.
    async fn store_dead_letter(&mut self, dead: &Message) -> Result<Stored, Error>;

    /// Steps over the delivered message in a pass through its source that leaves it where it
    /// is (browsing dead letters, replaying a selection of them). `None`, the default: nothing
    /// to do, the caller holds the delivery unsettled until the pass ends and then drops it,
    /// which gives it back in place. A transport on which holding or giving back costs the
    /// message something (RabbitMQ's quorum queues count every give-back toward the delivery
    /// limit) stores the same message again at the end of its source instead, confirmed,
    /// and answers [`Stored::Copy`]; the original is then removed.
    async fn pass_over(&mut self, _message: &Message) -> Result<Option<Stored>, Error> {
        Ok(None)
    }
}

/// What [`Delivery::pass_over`] did.
#[derive(Debug)]
#[non_exhaustive]
pub enum PassedOver {
    /// The delivery is still held: drop it once the pass is over, and it is given back in
    /// place. Dropping deliveries in the reverse of the order they came keeps that order.
    Held(Delivery),
    /// A copy was stored at the end of the source and the original removed.
    CopiedBack,
}

/// A message handed to a consumer, to be settled exactly once.
///
/// Dropping a delivery without settling it gives the message back to the transport, which
/// delivers it again (immediately in memory; on brokers when the channel or lock goes away).
pub struct Delivery {
    message: Arc<Message>,
    source: Arc<Source>,
    problem: Option<String>,
    settler: Box<dyn Settle>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("source", &self.source)
            .field("problem", &self.problem)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// A delivery of `message` from `source`, settled through `settler`. A transport that hands
    /// out many deliveries from one source can pass the same `Arc<Source>` to each.
    pub fn new(
        message: impl Into<Arc<Message>>,
        source: impl Into<Arc<Source>>,
        settler: impl Settle,
    ) -> Self {
        Delivery {
            message: message.into(),
            source: source.into(),
            problem: None,
            settler: Box::new(settler),
        }
    }

    /// Marks the delivery as malformed (for example, unreadable framework headers; see
    /// [`wire::decode_headers`]). The worker dead-letters it with
    /// reason [`MALFORMED_HEADERS`](crate::reasons::MALFORMED_HEADERS) and this description
    /// instead of calling the handler.
    #[must_use]
    pub fn with_problem(mut self, problem: Option<String>) -> Self {
        self.problem = problem;
        self
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The message, shared (the worker hands it to the handler's [`Context`](crate::Context)
    /// without copying it).
    pub fn shared_message(&self) -> &Arc<Message> {
        &self.message
    }

    /// Where it was consumed from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// What is wrong with the delivery, if the transport found it malformed.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// Fails if the delivery can no longer be settled (its channel closed, its lock ran out):
    /// the broker then delivers the message again.
    pub fn check_held(&self) -> Result<(), Error> {
        self.settler.check_held()
    }

    /// Removes the message: it was handled.
    pub async fn complete(mut self) -> Result<Settled, Error> {
        self.settler.check_held()?;
        self.settler.remove().await?;
        Ok(Settled::AsAsked)
    }

    /// Schedules the next attempt (attempt + 1) not before `not_before`, recording `reason` (cut
    /// to [`wire::MAX_REASON_BYTES`]) and the chosen `delay`, then removes this delivery.
    pub async fn retry(
        self,
        not_before: DateTime<Utc>,
        reason: impl Into<String>,
        delay: Duration,
    ) -> Result<Settled, Error> {
        let reason = wire::truncate(reason.into(), wire::MAX_REASON_BYTES);
        let next = self.message.next_attempt(not_before, reason, delay);
        self.replace(next).await
    }

    /// Puts a message that arrived before its not-before back, unchanged but for the
    /// not-before, without counting an attempt.
    pub async fn park(self, not_before: DateTime<Utc>) -> Result<Settled, Error> {
        let parked = Message::clone(&self.message).with_not_before(not_before);
        self.replace(parked).await
    }

    /// Moves the message to its endpoint's dead letters, recording `reason` and `description`
    /// (cut to [`wire::MAX_REASON_BYTES`] and [`wire::MAX_DESCRIPTION_BYTES`]) and the system
    /// clock's now as the failure time; see [`dead_letter_at`](Delivery::dead_letter_at).
    pub async fn dead_letter(
        self,
        reason: impl Into<String>,
        description: Option<String>,
    ) -> Result<Settled, Error> {
        self.dead_letter_at(reason, description, Utc::now()).await
    }

    /// Moves the message to its endpoint's dead letters like
    /// [`dead_letter`](Delivery::dead_letter), recording `failed_at` as its last failure time
    /// (and first, if it had not failed before). The worker passes its transport's clock.
    pub async fn dead_letter_at(
        mut self,
        reason: impl Into<String>,
        description: Option<String>,
        failed_at: DateTime<Utc>,
    ) -> Result<Settled, Error> {
        let mut dead = Message::clone(&self.message).with_dead_letter(Some(DeadLetterInfo {
            reason: wire::truncate(reason.into(), wire::MAX_REASON_BYTES),
            description: description.map(|d| wire::truncate(d, wire::MAX_DESCRIPTION_BYTES)),
        }));
        dead.record_failure(failed_at);
        self.settler.check_held()?;
        self.move_to_dead_letters(&dead).await?;
        Ok(Settled::AsAsked)
    }

    /// Sends `message` (usually a changed copy of this delivery's message) to `endpoint` through
    /// `via`, then removes the delivered original: an at-least-once move. The copy is
    /// confirmed by the broker ([`Transport::send`](crate::Transport::send) returns once it
    /// is) before the original is removed, so a failure in between leaves both, never
    /// neither. If sending fails, the original is given back and the error returned.
    pub async fn move_to(
        mut self,
        via: &dyn crate::Transport,
        endpoint: &str,
        message: Message,
    ) -> Result<Settled, Error> {
        self.settler.check_held()?;
        match via.send(endpoint, message).await {
            Ok(()) => {
                self.settler.remove().await?;
                Ok(Settled::AsAsked)
            }
            Err(e) => Err(self.give_back_after(e).await),
        }
    }

    /// Steps over the message in a pass through its source that must leave it in place: see
    /// [`Settle::pass_over`]. Either the delivery comes back to be held until the pass ends,
    /// or a confirmed copy took its place at the end of the source.
    pub async fn pass_over(mut self) -> Result<PassedOver, Error> {
        self.settler.check_held()?;
        match self.settler.pass_over(&self.message).await {
            Ok(None) => Ok(PassedOver::Held(self)),
            Ok(Some(stored)) => {
                self.finish(stored).await?;
                Ok(PassedOver::CopiedBack)
            }
            Err(e) => Err(self.give_back_after(e).await),
        }
    }

    /// Gives the message back for immediate redelivery, attempt unchanged.
    pub async fn abandon(mut self) -> Result<Settled, Error> {
        self.settler.check_held()?;
        self.settler.give_back().await?;
        Ok(Settled::AsAsked)
    }

    /// Stores `next` in place of the delivered message: the copy first, then the original
    /// removed.
    async fn replace(mut self, next: Message) -> Result<Settled, Error> {
        self.settler.check_held()?;
        match self.settler.store_copy(&next).await {
            Ok(stored) => {
                self.finish(stored).await?;
                Ok(Settled::AsAsked)
            }
            Err(refused) if refused.is_message_refused() => {
                let dead = self.copy_refused(&next, &refused);
                self.move_to_dead_letters(&dead).await?;
                Ok(Settled::DeadLettered {
                    reason: reasons::COPY_REFUSED.to_owned(),
                })
            }
            Err(e) => Err(self.give_back_after(e).await),
        }
    }

    /// The dead letter of a delivery whose copy `next` the broker refused: the message as
    /// delivered (attempt unchanged), with the failure that led to the copy.
    fn copy_refused(&self, next: &Message, error: &Error) -> Message {
        let what = if next.attempt() > self.message.attempt() {
            "retry"
        } else {
            "park"
        };
        warn!(
            source = %self.source,
            message_id = %self.message.id(),
            error = %error,
            "the broker refused the copy of a {what}; dead-lettering the message with reason \
             `{}`",
            reasons::COPY_REFUSED
        );
        let description = wire::truncate(
            format!(
                "the broker refused the copy that would have carried out the {what} (attempt \
                 {next}): {error}; dead-lettered instead of being delivered again at the same \
                 attempt",
                next = next.attempt()
            ),
            wire::MAX_DESCRIPTION_BYTES,
        );
        Message::clone(&self.message)
            .with_last_failure(next.last_failure().map(str::to_owned), next.last_delay())
            .with_dead_letter(Some(DeadLetterInfo {
                reason: reasons::COPY_REFUSED.to_owned(),
                description: Some(description),
            }))
    }

    async fn move_to_dead_letters(&mut self, dead: &Message) -> Result<(), Error> {
        match self.settler.store_dead_letter(dead).await {
            Ok(stored) => self.finish(stored).await,
            Err(e) => Err(self.give_back_after(e).await),
        }
    }

    async fn finish(&mut self, stored: Stored) -> Result<(), Error> {
        match stored {
            Stored::Copy => self.settler.remove().await,
            Stored::Moved => Ok(()),
        }
    }

    /// Gives the original back after storing its copy failed with `error`, and returns `error`.
    async fn give_back_after(&mut self, error: Error) -> Error {
        if let Err(back) = self.settler.give_back().await {
            warn!(
                source = %self.source,
                message_id = %self.message.id(),
                error = %back,
                "could not give back a delivery whose copy could not be stored; the broker \
                 delivers it again when its channel or lock goes away"
            );
        }
        error
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;

    /// A step a [`Recorder`] was asked to carry out.
    #[derive(Debug, PartialEq)]
    enum Step {
        Remove,
        GiveBack,
        StoreCopy(Message),
        StoreDeadLetter(Message),
    }

    /// Records the steps, answering each from a script (`Ok(Stored::Copy)`/`Ok(())` when the
    /// script is empty).
    struct Recorder {
        steps: Arc<Mutex<Vec<Step>>>,
        answers: VecDeque<Result<Stored, Error>>,
        held: bool,
    }

    impl Recorder {
        fn answer(&mut self) -> Result<Stored, Error> {
            self.answers.pop_front().unwrap_or(Ok(Stored::Copy))
        }

        fn record(&self, step: Step) {
            self.steps.lock().unwrap().push(step);
        }
    }

    #[async_trait]
    impl Settle for Recorder {
        fn check_held(&self) -> Result<(), Error> {
            if self.held {
                Ok(())
            } else {
                Err(Error::connection("the channel closed", "closed"))
            }
        }

        async fn remove(&mut self) -> Result<(), Error> {
            self.record(Step::Remove);
            self.answer().map(drop)
        }

        async fn give_back(&mut self) -> Result<(), Error> {
            self.record(Step::GiveBack);
            self.answer().map(drop)
        }

        async fn store_copy(&mut self, next: &Message) -> Result<Stored, Error> {
            self.record(Step::StoreCopy(next.clone()));
            self.answer()
        }

        async fn store_dead_letter(&mut self, dead: &Message) -> Result<Stored, Error> {
            self.record(Step::StoreDeadLetter(dead.clone()));
            self.answer()
        }
    }

    fn delivery(answers: Vec<Result<Stored, Error>>) -> (Delivery, Arc<Mutex<Vec<Step>>>) {
        delivery_held(answers, true)
    }

    fn delivery_held(
        answers: Vec<Result<Stored, Error>>,
        held: bool,
    ) -> (Delivery, Arc<Mutex<Vec<Step>>>) {
        let steps = Arc::new(Mutex::new(Vec::new()));
        let recorder = Recorder {
            steps: Arc::clone(&steps),
            answers: answers.into(),
            held,
        };
        let message = Message::new("body").with_id("m-1").with_attempt(2);
        (
            Delivery::new(message, Source::endpoint("orders"), recorder),
            steps,
        )
    }

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-02T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn taken(steps: &Arc<Mutex<Vec<Step>>>) -> Vec<Step> {
        std::mem::take(&mut *steps.lock().unwrap())
    }

    #[tokio::test]
    async fn a_retry_stores_the_copy_before_it_removes_the_original() {
        let (d, steps) = delivery(vec![]);
        let settled = d.retry(at(), "timeout", Duration::from_secs(5)).await;
        assert_eq!(settled.unwrap(), Settled::AsAsked);
        let next = Message::new("body")
            .with_id("m-1")
            .with_attempt(2)
            .next_attempt(at(), "timeout".into(), Duration::from_secs(5));
        assert_eq!(next.attempt(), 3);
        assert_eq!(taken(&steps), [Step::StoreCopy(next), Step::Remove]);
    }

    #[tokio::test]
    async fn a_copy_the_transport_moved_itself_is_not_removed_again() {
        let (d, steps) = delivery(vec![Ok(Stored::Moved)]);
        d.park(at()).await.unwrap();
        let parked = Message::new("body")
            .with_id("m-1")
            .with_attempt(2)
            .with_not_before(at());
        assert_eq!(taken(&steps), [Step::StoreCopy(parked)]);
    }

    #[tokio::test]
    async fn a_copy_that_cannot_be_stored_gives_the_original_back() {
        let (d, steps) = delivery(vec![Err(Error::connection("gone", "gone"))]);
        let e = d.park(at()).await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        let steps = taken(&steps);
        assert!(matches!(steps[0], Step::StoreCopy(_)), "{steps:?}");
        assert_eq!(steps[1..], [Step::GiveBack]);
    }

    #[tokio::test]
    async fn a_refused_copy_dead_letters_the_original_at_its_attempt() {
        let refused = Error::invalid_message("larger than the broker takes");
        let (d, steps) = delivery(vec![Err(refused)]);
        let settled = d
            .retry(at(), "timeout", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            settled,
            Settled::DeadLettered {
                reason: reasons::COPY_REFUSED.to_owned()
            }
        );
        let steps = taken(&steps);
        assert_eq!(steps.len(), 3, "{steps:?}");
        assert_eq!(steps[2], Step::Remove);
        let Step::StoreDeadLetter(dead) = &steps[1] else {
            panic!("{steps:?}");
        };
        assert_eq!(dead.attempt(), 2);
        assert_eq!(dead.not_before(), None);
        assert_eq!(dead.last_failure(), Some("timeout"));
        assert_eq!(dead.last_delay(), Some(Duration::from_secs(5)));
        let info = dead.dead_letter().unwrap();
        assert_eq!(info.reason, reasons::COPY_REFUSED);
        let description = info.description.as_deref().unwrap();
        assert!(
            description.contains("retry (attempt 3)") && description.contains("larger than"),
            "{description}"
        );
    }

    #[tokio::test]
    async fn a_dead_letter_that_cannot_be_stored_gives_the_original_back() {
        let (d, steps) = delivery(vec![Err(Error::connection("gone", "gone"))]);
        d.dead_letter("declined", None).await.unwrap_err();
        let steps = taken(&steps);
        let Step::StoreDeadLetter(dead) = &steps[0] else {
            panic!("{steps:?}");
        };
        assert_eq!(dead.dead_letter().unwrap().reason, "declined");
        assert_eq!(steps[1..], [Step::GiveBack]);
    }

    #[tokio::test]
    async fn a_delivery_no_longer_held_stores_nothing() {
        let (d, steps) = delivery_held(vec![], false);
        let e = d.retry(at(), "timeout", Duration::ZERO).await.unwrap_err();
        assert!(e.to_string().contains("channel closed"), "{e}");
        assert_eq!(taken(&steps), []);
    }

    #[tokio::test]
    async fn complete_removes_and_abandon_gives_back() {
        let (d, steps) = delivery(vec![]);
        d.complete().await.unwrap();
        assert_eq!(taken(&steps), [Step::Remove]);
        let (d, steps) = delivery(vec![]);
        d.abandon().await.unwrap();
        assert_eq!(taken(&steps), [Step::GiveBack]);
    }

    #[tokio::test]
    async fn reasons_and_descriptions_are_cut_to_their_limits() {
        let (d, steps) = delivery(vec![]);
        d.dead_letter("r".repeat(5000), Some("d".repeat(9000)))
            .await
            .unwrap();
        let steps = taken(&steps);
        let Step::StoreDeadLetter(dead) = &steps[0] else {
            panic!("{steps:?}");
        };
        let info = dead.dead_letter().unwrap();
        assert!(info.reason.len() <= wire::MAX_REASON_BYTES);
        assert!(info.description.as_ref().unwrap().len() <= wire::MAX_DESCRIPTION_BYTES);
    }
}
