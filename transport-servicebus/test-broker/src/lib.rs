//! An Azure Service Bus-compatible AMQP 1.0 broker for tests, in process and in pure Rust.
//!
//! It is a product of its own, for anyone whose code talks to Service Bus: it does not depend
//! on redeliver and needs none of it. The name only says where it is developed, next to
//! redeliver's Service Bus transport, which is tested against it.
//!
//! It speaks enough of the Service Bus AMQP dialect for real Service Bus clients to send,
//! receive and settle messages over the wire, without Azure, without Docker and without the
//! official emulator. Two clients are checked against it on every change:
//!
//! - `azservicebus` 0.25.1 (Rust), by this crate's tests;
//! - Microsoft's Python SDK `azure-servicebus` 7.15.0, unpatched, by the compatibility suite
//!   in `compat/python` of the repository (`run.sh` there installs the SDK from PyPI, starts
//!   the `servicebus-test-broker` program and drives it);
//! - Microsoft's JavaScript SDK `@azure/service-bus` 7.9.5, unpatched, by the shorter suite in
//!   `compat/javascript` (installed from npm the same way).
//!
//! The .NET and Java SDKs speak the same protocol with `UseDevelopmentEmulator=true`, but are
//! not tested here.
//!
//! # Testing your own code
//!
//! **From Rust**, add the crate as a dev-dependency, start a broker in the test (on the tokio
//! runtime of the test; do not pause tokio's clock, locks and schedules run on it), create the
//! entities your code expects and hand [`BrokerHandle::connection_string`] to your code:
//!
//! ```no_run
//! # async fn demo() -> Result<(), redeliver_servicebus_testbroker::Error> {
//! use std::time::Duration;
//! use redeliver_servicebus_testbroker::{start, BrokerOptions, QueueOptions};
//!
//! let broker = start(BrokerOptions::default()).await?;
//! broker.create_queue(
//!     "orders",
//!     QueueOptions::default()
//!         .with_lock_duration(Duration::from_secs(2))
//!         .with_max_delivery_count(3),
//! )?;
//! // For azservicebus: `ServiceBusClient::<BasicRetryPolicy>::unsecured()
//! //     .new_from_connection_string(connection_string, options)`.
//! let connection_string = broker.connection_string();
//! # let _ = connection_string;
//! // ... run the code under test, then look inside the broker:
//! assert_eq!(broker.active_message_count("orders")?, 0);
//! assert!(broker.dead_letters("orders")?.is_empty());
//! # Ok(()) }
//! ```
//!
//! Each broker is independent: a test isolates itself by starting its own broker (each gets its
//! own loopback address) or by using unique entity names. The broker stops when its handle is
//! dropped or [`BrokerHandle::shutdown`] is called; [`BrokerHandle::wait_until`] waits for a
//! condition on its state (a settlement, a dead letter) without sleeping.
//!
//! **From any other language**, install and run the program, which creates the entities given
//! on its command line, prints the connection string on standard output once it listens, and
//! runs until it is interrupted (Ctrl-C / `SIGINT`; `SIGTERM` ends it too):
//!
//! ```text
//! $ cargo install redeliver-servicebus-testbroker
//! $ servicebus-test-broker --queue orders,lock=2,max-delivery=3 \
//!       --topic events --subscription events/audit,subject=created
//! Endpoint=sb://127.0.0.2/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true
//! ```
//!
//! Read the first line of its output and give it to the client, for example in Python
//! `ServiceBusClient.from_connection_string(connection_string)`. `UseDevelopmentEmulator=true`
//! makes Microsoft's SDKs use plain AMQP (no TLS) on port 5672 of the endpoint's host.
//! `servicebus-test-broker --help` lists the entity options (lock duration, maximum delivery
//! count, size limits, duplicate detection, time to live, subject filters, forwarding).
//!
//! # What is emulated
//!
//! - SASL ANONYMOUS and PLAIN (any credentials), CBS `put-token` on `$cbs` (every token is
//!   accepted with status 202 in `status-code` / `status-description`; the reply goes to the
//!   link whose target address or name is the request's `reply-to`, or without one to the link
//!   that targets `$cbs`, as Service Bus does);
//! - queues, topics and subscriptions (with a subject filter and forwarding into a queue),
//!   provisioned through [`BrokerHandle`] or the program's flags, never over AMQP; attaching to
//!   an unknown entity fails with `amqp:not-found`;
//! - peek-lock with lock tokens (the delivery tag, 16 bytes in .NET `Guid` order, and the
//!   `x-opt-lock-token` delivery annotation), lock duration and expiry, `x-opt-locked-until`,
//!   `x-opt-sequence-number`, `x-opt-enqueued-time`, and delivery counts kept by the broker (a
//!   delivery is counted when it is transferred; a first delivery has `delivery-count` 0);
//! - complete (`accepted`), abandon (`modified`), defer (`modified` with
//!   `undeliverable-here`), dead-letter (`rejected` with `com.microsoft:dead-letter`) and
//!   receive-and-delete (pre-settled transfers). In rcv-settle-mode second, every outcome is
//!   confirmed with a settled disposition once applied, or `rejected` with
//!   `com.microsoft:message-lock-lost` when the lock had ended; sends are settled at once;
//! - dead-letter sub-queues `<entity>/$DeadLetterQueue` whose messages carry the application
//!   properties `DeadLetterReason` and `DeadLetterErrorDescription`; a message whose delivery
//!   count reached the entity's maximum is dead-lettered with reason `MaxDeliveryCountExceeded`
//!   when it is abandoned or its lock expires; dead-lettering a message of a dead-letter queue
//!   is refused (`amqp:not-allowed`, the lock is kept);
//! - scheduled messages (`x-opt-scheduled-enqueue-time` on a send, and the management
//!   operations `com.microsoft:schedule-message` / `cancel-scheduled-message`); a scheduled
//!   message is shown by peek and gets a new sequence number when it is enqueued; cancelling
//!   one that was enqueued already fails with 404 (`MessageNotFound`);
//! - the management operations `com.microsoft:renew-lock`, `update-disposition`,
//!   `receive-by-sequence-number` (deferred messages) and `peek-message`, answered exactly
//!   once per request, in order, on the link whose target address (or name) is the request's
//!   `reply-to`; other operations are answered with status 501;
//! - "properties to modify" on abandon and defer, applied to the application properties;
//! - batched sends (message format `0x80013700`); a message sent without `message-id` gets
//!   one (a GUID without dashes), as Service Bus assigns;
//! - duplicate detection (opt-in per entity): a repeated `message-id` inside the window is
//!   accepted and dropped;
//! - message time to live (the `ttl` header and an entity default): expired messages are
//!   dropped, or dead-lettered with reason `TTLExpiredException` when the entity says so;
//! - Service Bus's size limits (standard tier by default, per entity): a message larger than
//!   the entity's `max_message_size` (256 KiB) is rejected with
//!   `amqp:link:message-size-exceeded`; one whose header sections are larger than its
//!   `max_header_size` (64 KiB) is rejected, as Service Bus was reported to do, with
//!   `amqp:internal-error` and "The service was unable to process the request; please retry the
//!   operation";
//! - refused sends, for testing error paths:
//!   [`BrokerHandle::set_reject_sends`] makes every send to an entity fail with
//!   `amqp:not-allowed`.
//!
//! # What is not emulated
//!
//! - **Sessions**: no entity requires sessions, and a session receiver is refused with
//!   `amqp:not-allowed` (the Python suite keeps a session test as an expected failure).
//! - Transactions, SQL and correlation filters other than the subject filter, rules managed at
//!   run time, auto-delete on idle, partitioning, and entity management over AMQP or HTTP
//!   (the Service Bus administration clients cannot create entities here).
//! - Security: no TLS (plain AMQP only), any credentials and any token are accepted.
//! - Persistence: messages live in memory and are gone when the broker stops.
//! - Management operations other than those listed above (status 501).
//!
//! A client must negotiate SASL (as with Service Bus); plain AMQP without a SASL layer is
//! refused. Lock expiry and scheduling run on the tokio clock, timestamps on the wire use the
//! wall clock.
//!
//! # The port 5672 problem
//!
//! `azservicebus` takes only the host from the connection string's `Endpoint` and always dials
//! port **5672**, and Microsoft's SDKs do the same with `UseDevelopmentEmulator=true`. Where
//! another AMQP broker (RabbitMQ) already listens on `127.0.0.1:5672`,
//! [`start`] binds the first free address among `127.0.0.2:5672`, `127.0.0.3:5672`, ... : on
//! Linux the whole `127.0.0.0/8` range reaches the loopback interface, so these work without
//! any setup and each broker of a test run gets its own address. If RabbitMQ listens on
//! `0.0.0.0:5672` (typical on a laptop), every loopback address is taken; [`start`] then fails
//! with [`Error::NoFreeAddress`], whose message says what to do: stop that listener, or run the
//! tests in a private network namespace, for example
//! `unshare -rn sh -c 'ip link set lo up && cargo test'` (the whole suite of this crate passes
//! that way too). macOS only routes `127.0.0.1` by default; add aliases with
//! `ifconfig lo0 alias 127.0.0.2`.
//!
//! # What `azservicebus` 0.25.1 clients must know (observed against this broker)
//!
//! - Close senders and receivers with `dispose().await`. Dropping one sends a detach without
//!   waiting for the answer; the broker's answering detach (AMQP requires one) then reaches a
//!   link the client's `fe2o3-amqp` session no longer reads from, the session ends with
//!   `unattached-handle`, and later calls on that client hang (every link of a client shares
//!   its one session).
//! - Use `max_retries = 0` (and retry in the application): with the client's retries enabled,
//!   a send the broker *rejects* returns `Ok(())`.
//! - An unknown queue, topic or subscription fails `create_sender` / `create_receiver_*` with
//!   `amqp:not-found`.
//! - Settling does not wait for the broker: completing after the lock expired returns `Ok`
//!   and the message is delivered again; watch `locked_until` instead. Use
//!   [`BrokerHandle::wait_until`] in tests to observe settlements.
//! - After the broker stops, client operations fail only when their try timeout runs out.
//! - With `prefetch_count` 0, a receive call that waits in vain drains the link's credit and
//!   returns without waiting for the broker's answer. Credit granted before that answer
//!   arrives carries the delivery count from before the drain and is counted as zero (by
//!   AMQP's rules, as Service Bus counts it), so the next receive call gets nothing until it
//!   grants credit again: give a receive call that follows a drained one a short wait, and
//!   keep granting again until the answer has arrived. On loopback the answer takes
//!   microseconds and the race is rare; [`BrokerOptions::with_latency`] delays every frame to
//!   the client the way a distant namespace does, which makes it certain.
//!
//! # How it is built
//!
//! On `fe2o3-amqp`'s acceptor API. Two things that API cannot do the Service Bus way (a
//! 16-byte delivery tag, and answering an outcome in rcv-settle-mode second with a settled
//! disposition) and one it gets wrong (a client that sends `attach` before the broker answered
//! its `begin` has its connection closed) are corrected on the wire, between the socket and the
//! library; see the `socket` module of the source for how.

mod address;
mod dead_letter;
mod error;
mod management;
mod options;
mod server;
mod shared;
mod socket;
mod state;

/// Entry points for the fuzz targets in the repository's `fuzz/` (compiled only with
/// `--cfg fuzzing`, which `cargo fuzz` sets); not part of the API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    use fe2o3_amqp_types::messaging::{Body, Message};
    use serde_amqp::Value;
    use tokio::time::Instant;

    use crate::options::QueueOptions;
    use crate::state::{State, now_ms};

    type Msg = Message<Body<Value>>;

    /// The broker's replies to requests sent in order to `$cbs` (entity `None`) or to an
    /// entity's `$management` node. Queue `q` holds `messages` (what its limits let in), the
    /// first `locked` of them locked by a peek-lock receive; `requests` is given their lock
    /// tokens.
    pub fn answer(
        messages: Vec<Msg>,
        locked: usize,
        requests: impl FnOnce(&[[u8; 16]]) -> Vec<(Option<String>, Msg)>,
    ) -> Vec<Msg> {
        let mut state = State::default();
        state
            .create_queue("q", &QueueOptions::default())
            .expect("a new queue");
        let now = Instant::now();
        // Refused sends (too large, say) are part of what is fuzzed.
        let _ = state.send("q", messages, now, now_ms());
        let tokens: Vec<[u8; 16]> = (0..locked)
            .map_while(|_| state.lock_next("q", now, now_ms()))
            .map(|picked| picked.lock_token)
            .collect();
        requests(&tokens)
            .into_iter()
            .map(|(entity, request)| {
                let reply = match entity {
                    None => crate::management::handle_cbs(&request),
                    Some(entity) => {
                        crate::management::handle_management(&mut state, &entity, &request)
                    }
                };
                reply.into_message(&request)
            })
            .collect()
    }
}

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use crate::dead_letter::DeadLetter;
pub use crate::error::Error;
pub use crate::options::{
    BrokerOptions, DEFAULT_LOCK_DURATION, DEFAULT_MAX_DELIVERY_COUNT, QueueOptions,
    STANDARD_MAX_HEADER_SIZE, STANDARD_MAX_MESSAGE_SIZE, SubscriptionOptions, TopicOptions,
};
use crate::shared::Shared;

/// The port `azservicebus` always dials.
pub const AMQP_PORT: u16 = 5672;

/// The key name in [`BrokerHandle::connection_string`] (the broker accepts any).
pub const SHARED_ACCESS_KEY_NAME: &str = "RootManageSharedAccessKey";
/// The key in [`BrokerHandle::connection_string`] (the broker accepts any).
pub const SHARED_ACCESS_KEY: &str = "SAS_KEY_VALUE";

/// Starts a broker on the tokio runtime of the caller.
///
/// Without [`BrokerOptions::address`], it listens on the first of `127.0.0.2:5672`,
/// `127.0.0.3:5672`, ... `127.0.0.254:5672` that can be bound (see the crate docs on why port
/// 5672 is required).
///
/// # Errors
///
/// [`Error::NoFreeAddress`] if no loopback address has port 5672 free, [`Error::Bind`] if the
/// explicit address cannot be bound.
pub async fn start(options: BrokerOptions) -> Result<BrokerHandle, Error> {
    let listener = match options.address {
        Some(address) => TcpListener::bind(address)
            .await
            .map_err(|source| Error::Bind { address, source })?,
        None => bind_free_loopback().await?,
    };
    let address = listener.local_addr().map_err(|source| Error::Bind {
        address: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), AMQP_PORT),
        source,
    })?;
    let shared = Arc::new(Shared::default());
    let listener_task = tokio::spawn(server::run_listener(
        listener,
        shared.clone(),
        options.latency,
    ));
    let timer_task = tokio::spawn(server::run_timers(shared.clone()));
    tracing::info!(%address, "Service Bus test broker listening");
    Ok(BrokerHandle {
        address,
        shared,
        tasks: vec![listener_task, timer_task],
    })
}

async fn bind_free_loopback() -> Result<TcpListener, Error> {
    let candidates = (2..=254u8).map(|last_octet| {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet)), AMQP_PORT)
    });
    bind_first_free(candidates, "127.0.0.2:5672 to 127.0.0.254:5672").await
}

/// Binds the first candidate that is not in use; `tried` describes the candidates for the
/// error message.
async fn bind_first_free(
    candidates: impl Iterator<Item = SocketAddr>,
    tried: &str,
) -> Result<TcpListener, Error> {
    let mut last_error = io::Error::new(io::ErrorKind::AddrInUse, "no address tried");
    for address in candidates {
        match TcpListener::bind(address).await {
            Ok(listener) => return Ok(listener),
            Err(error) => {
                let retry = matches!(
                    error.kind(),
                    io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                );
                last_error = error;
                if !retry {
                    break;
                }
            }
        }
    }
    Err(Error::NoFreeAddress {
        tried: tried.to_owned(),
        source: last_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn taken_addresses_are_skipped_and_none_free_is_a_clear_error() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken_address = taken.local_addr().unwrap();

        let error = bind_first_free([taken_address].into_iter(), "the taken one")
            .await
            .unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, Error::NoFreeAddress { .. }));
        assert!(
            message.contains("5672") && message.contains("unshare"),
            "{message}"
        );

        let free = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let listener = bind_first_free([taken_address, free].into_iter(), "two")
            .await
            .expect("the second candidate is free");
        assert_ne!(listener.local_addr().unwrap(), taken_address);
    }
}

/// A running broker. Dropping it (or calling [`BrokerHandle::shutdown`]) stops the broker:
/// the listener closes and every connection is closed.
///
/// Entity names are case-insensitive; a subscription is addressed as
/// `<topic>/Subscriptions/<name>` and a dead-letter sub-queue as `<path>/$DeadLetterQueue`.
#[derive(Debug)]
pub struct BrokerHandle {
    address: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl BrokerHandle {
    /// The address the broker listens on.
    #[must_use]
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A Service Bus connection string for this broker:
    /// `Endpoint=sb://<ip>/;SharedAccessKeyName=...;SharedAccessKey=...;UseDevelopmentEmulator=true`.
    ///
    /// Use it with `azservicebus`'s unsecured (plain AMQP) client. The port is not part of it
    /// because `azservicebus` ignores ports and dials 5672.
    #[must_use]
    pub fn connection_string(&self) -> String {
        format!(
            "Endpoint=sb://{}/;SharedAccessKeyName={SHARED_ACCESS_KEY_NAME};SharedAccessKey={SHARED_ACCESS_KEY};UseDevelopmentEmulator=true",
            self.address.ip()
        )
    }

    /// Creates a queue (and its dead-letter sub-queue).
    ///
    /// # Errors
    ///
    /// [`Error::EntityExists`] if a queue or topic has that name, [`Error::InvalidConfiguration`]
    /// for an invalid name, a zero lock duration or a zero maximum delivery count.
    pub fn create_queue(&self, name: &str, options: QueueOptions) -> Result<(), Error> {
        self.shared
            .update(|state| state.create_queue(name, &options))
    }

    /// Creates a topic. Messages sent to it reach its subscriptions; a topic without
    /// subscriptions drops them (as Service Bus does).
    ///
    /// # Errors
    ///
    /// [`Error::EntityExists`] if a queue or topic has that name, [`Error::InvalidConfiguration`]
    /// for an invalid name.
    pub fn create_topic(&self, name: &str, options: TopicOptions) -> Result<(), Error> {
        self.shared
            .update(|state| state.create_topic(name, &options))
    }

    /// Creates subscription `name` of `topic` (and its dead-letter sub-queue). Only messages sent
    /// after this call reach it.
    ///
    /// # Errors
    ///
    /// [`Error::EntityNotFound`] if the topic does not exist, [`Error::EntityExists`] if the
    /// subscription does, [`Error::InvalidConfiguration`] for an invalid name or option,
    /// including a `forward_to` queue that does not exist.
    pub fn create_subscription(
        &self,
        topic: &str,
        name: &str,
        options: SubscriptionOptions,
    ) -> Result<(), Error> {
        self.shared
            .update(|state| state.create_subscription(topic, name, &options))
    }

    /// While `reason` is `Some`, every send to queue or topic `entity` is rejected with
    /// `amqp:not-allowed` and that description; `None` accepts sends again.
    ///
    /// # Errors
    ///
    /// [`Error::EntityNotFound`] if no queue or topic has that name.
    pub fn set_reject_sends(&self, entity: &str, reason: Option<&str>) -> Result<(), Error> {
        self.shared
            .update(|state| state.set_reject_sends(entity, reason.map(str::to_owned)))
    }

    /// Messages in a queue, subscription or dead-letter sub-queue that are available or
    /// locked (deferred and scheduled messages are not counted).
    ///
    /// # Errors
    ///
    /// [`Error::EntityNotFound`] if there is no such path.
    pub fn active_message_count(&self, path: &str) -> Result<usize, Error> {
        self.shared.state().active_count(path)
    }

    /// Deferred messages of a queue or subscription.
    ///
    /// # Errors
    ///
    /// [`Error::EntityNotFound`] if there is no such path.
    pub fn deferred_message_count(&self, path: &str) -> Result<usize, Error> {
        self.shared.state().deferred_count(path)
    }

    /// Messages sent to a queue or topic that wait for their scheduled enqueue time.
    ///
    /// # Errors
    ///
    /// [`Error::EntityNotFound`] if no queue or topic has that name.
    pub fn scheduled_message_count(&self, entity: &str) -> Result<usize, Error> {
        self.shared.state().scheduled_count(entity)
    }

    /// Messages in the dead-letter sub-queue of a queue or subscription.
    ///
    /// # Errors
    ///
    /// [`Error::EntityNotFound`] if there is no such queue or subscription.
    pub fn dead_letter_message_count(&self, path: &str) -> Result<usize, Error> {
        Ok(self.dead_letters(path)?.len())
    }

    /// The messages in the dead-letter sub-queue of a queue or subscription, oldest first.
    ///
    /// # Errors
    ///
    /// [`Error::EntityNotFound`] if there is no such queue or subscription.
    pub fn dead_letters(&self, path: &str) -> Result<Vec<DeadLetter>, Error> {
        self.shared.state().dead_letters(path)
    }

    /// Waits until `condition` holds, re-checking it after every change of the broker's state
    /// (a send, a transfer, a settlement, a lock expiry, a scheduled message coming due).
    /// Returns whether it held before `timeout` ran out.
    ///
    /// Settlements travel asynchronously (clients do not wait for the broker), so this is how
    /// a test observes their effect without sleeping.
    pub async fn wait_until(
        &self,
        timeout: std::time::Duration,
        mut condition: impl FnMut(&Self) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if condition(self) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return condition(self);
            }
        }
    }

    /// Stops the broker and returns once its listener is closed and every connection task has
    /// ended, so the address can be bound again. Dropping the handle stops the broker too, but
    /// without waiting.
    pub async fn shutdown(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // The only error is the cancellation just requested.
            let _ = task.await;
        }
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
