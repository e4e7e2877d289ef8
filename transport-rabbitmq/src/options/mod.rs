//! Configuration of a [`RabbitMqTransport`](crate::RabbitMqTransport): the options, their
//! defaults, the `with_*` methods that set them and the accessors that read them back.

mod modes;
mod url;
mod validate;

use std::time::Duration;

use lapin::uri::AMQPUri;
use redeliver_core::Error;
use redeliver_core::secret::SecretUrl;

use self::modes::DeliveryLimit;
pub use self::modes::{
    DEFAULT_DELIVERY_LIMIT, DelayMode, MAX_DELAY_LEVELS, QueueType, TopologyMode,
};
pub(crate) use self::url::node_address;

/// The URL used when none is given: the local broker's default virtual host.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The largest message RabbitMQ accepts unless configured otherwise (`max_message_size`,
/// 128 MiB); see [`with_max_message_size`](RabbitMqOptions::with_max_message_size).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 128 * 1024 * 1024;

/// Options of a [`RabbitMqTransport`](crate::RabbitMqTransport), built with the `with_*` methods
/// and checked by [`validate`](RabbitMqOptions::validate) when the transport connects.
///
/// ```
/// use std::time::Duration;
/// use redeliver_rabbitmq::RabbitMqOptions;
///
/// let options = RabbitMqOptions::new("amqp://guest:guest@localhost:5672/%2f")
///     .with_prefix("billing.")
///     .with_delay_levels(20)
///     .with_prefetch_limit(500)
///     .with_connect_attempts(10, Duration::from_secs(3));
/// assert!(options.validate().is_ok());
/// ```
#[derive(Clone, Debug)]
pub struct RabbitMqOptions {
    /// Shown redacted by `Debug`.
    pub(crate) url: SecretUrl,
    pub(crate) prefix: String,
    pub(crate) dead_letter_suffix: String,
    pub(crate) topology: TopologyMode,
    pub(crate) delays: DelayMode,
    pub(crate) queue_type: QueueType,
    pub(crate) delivery_limit: DeliveryLimit,
    pub(crate) connect_attempts: u32,
    pub(crate) connect_retry_delay: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_message_size: usize,
    pub(crate) reconnect_delay: Duration,
    pub(crate) reconnect_max_delay: Duration,
    pub(crate) operation_timeout: Duration,
    pub(crate) prefetch_limit: u16,
    pub(crate) connection_name: Option<String>,
    pub(crate) ca_certificates: Option<String>,
}

impl Default for RabbitMqOptions {
    fn default() -> Self {
        RabbitMqOptions {
            url: SecretUrl::new(DEFAULT_URL),
            prefix: String::new(),
            dead_letter_suffix: ".dead-letters".to_owned(),
            topology: TopologyMode::default(),
            delays: DelayMode::default(),
            queue_type: QueueType::default(),
            delivery_limit: DeliveryLimit::Default,
            connect_attempts: 5,
            connect_retry_delay: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(10),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            reconnect_delay: Duration::from_secs(1),
            reconnect_max_delay: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(30),
            prefetch_limit: 1000,
            connection_name: None,
            ca_certificates: None,
        }
    }
}

impl RabbitMqOptions {
    /// Default options for the broker at `url` (`amqp://` or `amqps://`, virtual host
    /// percent-encoded: `%2f` is `/`).
    pub fn new(url: impl Into<String>) -> Self {
        RabbitMqOptions::default().with_url(url)
    }

    /// Sets the broker URL. For a cluster, list its nodes' addresses separated by commas:
    /// `amqp://user:password@node1:5672,node2:5672,node3:5672/%2f`. The transport connects to
    /// the first that answers and, when the connection is lost, tries the next node first
    /// (going round the list), declares the topology again there and resumes its consumers.
    #[must_use]
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = SecretUrl::new(url);
        self
    }

    /// Prepends `prefix` to the name of every queue and exchange this transport uses, the
    /// delay infrastructure included. Default: none, so endpoint `orders` is queue `orders`.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Appended to an endpoint's queue name to name its dead-letter queue. Default
    /// `.dead-letters`.
    #[must_use]
    pub fn with_dead_letter_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.dead_letter_suffix = suffix.into();
        self
    }

    /// Declare the topology (default) or only check it.
    #[must_use]
    pub fn with_topology_mode(mut self, mode: TopologyMode) -> Self {
        self.topology = mode;
        self
    }

    /// Only check the topology, never create it; see [`TopologyMode::CheckOnly`].
    #[must_use]
    pub fn check_topology_only(self) -> Self {
        self.with_topology_mode(TopologyMode::CheckOnly)
    }

    /// Uses the binary delay cascade with `levels` levels (longest delay 2^levels - 1 s).
    /// Default [`MAX_DELAY_LEVELS`].
    #[must_use]
    pub fn with_delay_levels(mut self, levels: u8) -> Self {
        self.delays = DelayMode::Cascade { levels };
        self
    }

    /// Uses an existing fixed-TTL retry queue per queue instead of the cascade; see
    /// [`DelayMode::FixedTtlRetryQueue`].
    #[must_use]
    pub fn with_fixed_ttl_retry_queue(mut self, suffix: impl Into<String>, ttl: Duration) -> Self {
        self.delays = DelayMode::FixedTtlRetryQueue {
            suffix: suffix.into(),
            ttl,
        };
        self
    }

    /// The queue type of endpoint and dead-letter queues. Default [`QueueType::Quorum`].
    #[must_use]
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Sets the quorum-queue `x-delivery-limit` of endpoint queues and their dead-letter queues:
    /// a message that came back unsettled more than `limit` times (so was handed out
    /// `limit + 1` times) is dead-lettered by the broker — from an endpoint queue into its
    /// dead-letter queue, from a dead-letter queue into the endpoint's quarantine queue. It is
    /// the back-stop for a message that never gets settled: one that crashes the process, or one
    /// the client cannot even read (see the [crate documentation](crate#poison-messages)).
    ///
    /// Every unsettled return counts: a crash, a lost connection, a delivery abandoned at
    /// shutdown. Retries and parking do not, since each is a new message whose count starts at
    /// zero: the limit bounds the returns of one attempt, not the attempts (that is the retry
    /// policy's `max_attempts`). Quorum queues only. Default [`DEFAULT_DELIVERY_LIMIT`] on quorum
    /// queues; classic queues have none.
    #[must_use]
    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = DeliveryLimit::Limit(limit);
        self
    }

    /// No `x-delivery-limit` on endpoint and dead-letter queues: a message that can never be
    /// settled (one the client cannot read) is then delivered again for ever.
    #[must_use]
    pub fn without_delivery_limit(mut self) -> Self {
        self.delivery_limit = DeliveryLimit::Off;
        self
    }

    /// The delivery limit of endpoint and dead-letter queues, if any.
    pub fn delivery_limit(&self) -> Option<u32> {
        match (self.delivery_limit, self.queue_type) {
            (DeliveryLimit::Limit(limit), _) => Some(limit),
            (DeliveryLimit::Default, QueueType::Quorum) => Some(DEFAULT_DELIVERY_LIMIT),
            (DeliveryLimit::Default, QueueType::Classic) | (DeliveryLimit::Off, _) => None,
        }
    }

    /// Whether the delivery limit is the default one (not configured).
    pub(crate) fn delivery_limit_is_default(&self) -> bool {
        self.delivery_limit == DeliveryLimit::Default
    }

    /// The largest message, body and properties together, the broker accepts: RabbitMQ's
    /// `max_message_size`, 128 MiB ([`DEFAULT_MAX_MESSAGE_SIZE`]) unless the broker is configured
    /// otherwise (it is a broker setting AMQP 0-9-1 cannot ask for, so set it here when the
    /// broker's differs). A send, retry or dead-letter copy that would not fit fails with
    /// [`Error::InvalidMessage`] before anything is published.
    #[must_use]
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// How long [`connect`](crate::RabbitMqTransport::connect) may take in all, its
    /// [attempts](RabbitMqOptions::with_connect_attempts) and the pauses between them included,
    /// and how long each attempt to reconnect may take. A broker that accepts the TCP connection
    /// but never answers fails the start-up after this with [`Error::Timeout`] naming the URL
    /// (password hidden) and the bound. Default 10 s.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How often to try the first connection, and how long to wait between tries, before
    /// [`connect`](crate::RabbitMqTransport::connect) fails. Default 5 tries, 2 s apart.
    #[must_use]
    pub fn with_connect_attempts(mut self, attempts: u32, delay: Duration) -> Self {
        self.connect_attempts = attempts;
        self.connect_retry_delay = delay;
        self
    }

    /// The back-off between reconnection attempts after a lost connection: `initial`, doubling
    /// up to `max`. Default 1 s to 30 s. Reconnection goes on until the transport is closed.
    #[must_use]
    pub fn with_reconnect_delay(mut self, initial: Duration, max: Duration) -> Self {
        self.reconnect_delay = initial;
        self.reconnect_max_delay = max;
        self
    }

    /// How long a send, publish or settlement may take, waiting for a lost connection to come
    /// back included, before it fails with [`Error::Timeout`]. It also bounds every other round
    /// trip to the broker (declaring the topology, opening a consumer, acknowledging, giving back
    /// a dropped delivery, and [closing](crate::RabbitMqTransport::close), which then gives up
    /// on the connection), so that a connection that is gone but not yet noticed never blocks a
    /// caller. Default 30 s.
    #[must_use]
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// The largest prefetch (`basic.qos`) a consumer may ask for; the worker's concurrency above
    /// it is capped. Default 1000, at most 65535.
    #[must_use]
    pub fn with_prefetch_limit(mut self, limit: u16) -> Self {
        self.prefetch_limit = limit;
        self
    }

    /// Trusts the CA certificates in `pem` (one or more PEM `CERTIFICATE` blocks) for
    /// `amqps://` connections, on top of the system's root certificates: for a broker whose
    /// certificate is signed by a private CA, or is self-signed. Calling it again replaces them.
    ///
    /// TLS is rustls, with the system's roots read from their usual files (the `ca-certificates`
    /// package on Debian): building needs no OpenSSL.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), redeliver_core::Error> {
    /// use redeliver_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
    ///
    /// let ca = std::fs::read_to_string("/etc/rabbitmq/ca.pem").expect("the CA certificate");
    /// let options = RabbitMqOptions::new("amqps://app:secret@rabbit.internal:5671/%2f")
    ///     .with_ca_certificate(ca);
    /// let transport = RabbitMqTransport::connect(options).await?;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn with_ca_certificate(mut self, pem: impl Into<String>) -> Self {
        self.ca_certificates = Some(pem.into());
        self
    }

    /// The connection name shown by the broker's management tools.
    #[must_use]
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// The prefix of every queue and exchange name.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How messages are held until their not-before.
    pub fn delay_mode(&self) -> &DelayMode {
        &self.delays
    }

    /// Whether the topology is declared or only checked.
    pub fn topology_mode(&self) -> TopologyMode {
        self.topology
    }

    /// The broker URL, with any password replaced by `***`, for messages and logs.
    pub fn redacted_url(&self) -> String {
        self.url.redacted()
    }

    /// The broker URL; `Debug` and `Display` show it redacted.
    pub fn url(&self) -> &SecretUrl {
        &self.url
    }

    /// The longest delay the configured [`DelayMode`] can hold a message for, if limited.
    pub fn max_delay(&self) -> Option<Duration> {
        match &self.delays {
            DelayMode::Cascade { levels } => Some(Duration::from_secs((1u64 << levels) - 1)),
            DelayMode::FixedTtlRetryQueue { .. } => None,
        }
    }

    /// Every node the URL names, in order (one unless it is a cluster's list).
    pub(crate) fn parsed_nodes(&self) -> Result<Vec<AMQPUri>, Error> {
        url::parse(&self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delivery_limit_defaults_on_quorum_queues_only() {
        assert_eq!(
            RabbitMqOptions::default().delivery_limit(),
            Some(DEFAULT_DELIVERY_LIMIT)
        );
        let classic = RabbitMqOptions::default().with_queue_type(QueueType::Classic);
        assert_eq!(classic.delivery_limit(), None);
        classic.validate().unwrap();
        assert_eq!(
            RabbitMqOptions::default()
                .without_delivery_limit()
                .delivery_limit(),
            None
        );
        assert_eq!(
            RabbitMqOptions::default()
                .with_delivery_limit(3)
                .delivery_limit(),
            Some(3)
        );
    }
}
