//! Options of the broker and of its entities.

use std::net::SocketAddr;
use std::time::Duration;

/// Options for [`start`](crate::start).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct BrokerOptions {
    /// Listen on exactly this address instead of searching `127.0.0.2:5672` upward.
    ///
    /// `azservicebus` ignores the port of the connection string and always dials 5672, so an
    /// address with another port is only useful for clients that honour ports (for example
    /// `fe2o3-amqp` used directly).
    pub address: Option<SocketAddr>,
    /// How long every frame to a client takes to arrive, as over the network to a real
    /// namespace (a round trip is this plus the client's own way, which is immediate). Zero,
    /// the default, writes at once. Clients then see the broker's answers as late as a
    /// distant broker's: for example, credit a client grants before the answer to its drain
    /// has arrived is counted from a stale delivery count.
    pub latency: Duration,
}

impl BrokerOptions {
    /// Listens on `address` instead of picking a free loopback address.
    #[must_use]
    pub fn with_address(mut self, address: SocketAddr) -> Self {
        self.address = Some(address);
        self
    }

    /// Sets [`latency`](Self::latency).
    #[must_use]
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }
}

/// Default lock duration of Service Bus entities: one minute.
pub const DEFAULT_LOCK_DURATION: Duration = Duration::from_secs(60);
/// Default maximum delivery count of Service Bus entities.
pub const DEFAULT_MAX_DELIVERY_COUNT: u32 = 10;
/// The largest message a standard-tier Service Bus entity accepts: 256 KiB, header sections
/// and body together.
pub const STANDARD_MAX_MESSAGE_SIZE: usize = 256 * 1024;
/// The largest header sections (header, message annotations, properties and application
/// properties together) a Service Bus entity accepts: 64 KiB.
pub const STANDARD_MAX_HEADER_SIZE: usize = 64 * 1024;

/// Options of a queue, with Service Bus defaults (lock duration 60 s, max delivery count 10,
/// the standard tier's size limits: 256 KiB per message, 64 KiB of header sections).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QueueOptions {
    /// How long a peek-lock delivery stays locked before it becomes available again.
    pub lock_duration: Duration,
    /// After this many deliveries an abandoned or expired message is dead-lettered with reason
    /// `MaxDeliveryCountExceeded`. At least 1.
    pub max_delivery_count: u32,
    /// Sends of messages whose encoded size exceeds this many bytes are rejected with
    /// `amqp:link:message-size-exceeded`. Default [`STANDARD_MAX_MESSAGE_SIZE`].
    pub max_message_size: Option<usize>,
    /// Sends of messages whose header sections (header, message annotations, properties and
    /// application properties), encoded, exceed this many bytes are rejected with
    /// `amqp:internal-error`, as Service Bus was reported to. Default
    /// [`STANDARD_MAX_HEADER_SIZE`].
    pub max_header_size: Option<usize>,
    /// Duplicate detection: a message whose `message-id` was already sent to the entity within
    /// this window is accepted and dropped, as Service Bus does. `None` (the default) disables
    /// it.
    pub duplicate_detection_window: Option<Duration>,
    /// Time to live of messages without a shorter `ttl` header. `None`: unlimited.
    pub default_message_time_to_live: Option<Duration>,
    /// Expired messages go to the dead-letter sub-queue (reason `TTLExpiredException`)
    /// instead of being dropped.
    pub dead_lettering_on_message_expiration: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            lock_duration: DEFAULT_LOCK_DURATION,
            max_delivery_count: DEFAULT_MAX_DELIVERY_COUNT,
            max_message_size: Some(STANDARD_MAX_MESSAGE_SIZE),
            max_header_size: Some(STANDARD_MAX_HEADER_SIZE),
            duplicate_detection_window: None,
            default_message_time_to_live: None,
            dead_lettering_on_message_expiration: false,
        }
    }
}

impl QueueOptions {
    /// Sets the lock duration.
    #[must_use]
    pub fn with_lock_duration(mut self, lock_duration: Duration) -> Self {
        self.lock_duration = lock_duration;
        self
    }

    /// Sets the maximum delivery count (at least 1).
    #[must_use]
    pub fn with_max_delivery_count(mut self, max_delivery_count: u32) -> Self {
        self.max_delivery_count = max_delivery_count;
        self
    }

    /// Rejects sends of messages larger than `bytes` (encoded size).
    #[must_use]
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = Some(bytes);
        self
    }

    /// Rejects sends of messages whose header sections are larger than `bytes` (encoded size).
    #[must_use]
    pub fn with_max_header_size(mut self, bytes: usize) -> Self {
        self.max_header_size = Some(bytes);
        self
    }

    /// Drops messages whose `message-id` was sent within `window` before.
    #[must_use]
    pub fn with_duplicate_detection(mut self, window: Duration) -> Self {
        self.duplicate_detection_window = Some(window);
        self
    }

    /// Sets the default time to live of messages.
    #[must_use]
    pub fn with_default_message_time_to_live(mut self, ttl: Duration) -> Self {
        self.default_message_time_to_live = Some(ttl);
        self
    }

    /// Dead-letters expired messages instead of dropping them.
    #[must_use]
    pub fn with_dead_lettering_on_message_expiration(mut self, enabled: bool) -> Self {
        self.dead_lettering_on_message_expiration = enabled;
        self
    }
}

/// Options of a topic, with the standard tier's size limits (as for [`QueueOptions`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TopicOptions {
    /// Sends of messages whose encoded size exceeds this many bytes are rejected with
    /// `amqp:link:message-size-exceeded`. Default [`STANDARD_MAX_MESSAGE_SIZE`].
    pub max_message_size: Option<usize>,
    /// The limit of the header sections, as for [`QueueOptions::max_header_size`]. Default
    /// [`STANDARD_MAX_HEADER_SIZE`].
    pub max_header_size: Option<usize>,
    /// Duplicate detection window, as for [`QueueOptions::duplicate_detection_window`].
    pub duplicate_detection_window: Option<Duration>,
}

impl Default for TopicOptions {
    fn default() -> Self {
        Self {
            max_message_size: Some(STANDARD_MAX_MESSAGE_SIZE),
            max_header_size: Some(STANDARD_MAX_HEADER_SIZE),
            duplicate_detection_window: None,
        }
    }
}

impl TopicOptions {
    /// Rejects sends of messages larger than `bytes` (encoded size).
    #[must_use]
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = Some(bytes);
        self
    }

    /// Rejects sends of messages whose header sections are larger than `bytes` (encoded size).
    #[must_use]
    pub fn with_max_header_size(mut self, bytes: usize) -> Self {
        self.max_header_size = Some(bytes);
        self
    }

    /// Drops messages whose `message-id` was sent within `window` before.
    #[must_use]
    pub fn with_duplicate_detection(mut self, window: Duration) -> Self {
        self.duplicate_detection_window = Some(window);
        self
    }
}

/// Options of a subscription, with Service Bus defaults (lock duration 60 s, max delivery
/// count 10, every message matches, no forwarding).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscriptionOptions {
    /// How long a peek-lock delivery stays locked.
    pub lock_duration: Duration,
    /// Maximum delivery count before dead-lettering (at least 1).
    pub max_delivery_count: u32,
    /// Only messages whose `subject` (Service Bus "Label") equals this value reach the
    /// subscription (a correlation filter on the subject). `None` matches every message.
    pub subject_filter: Option<String>,
    /// Matching messages are forwarded into this queue instead of being kept in the
    /// subscription (Service Bus auto-forwarding). The queue must exist.
    pub forward_to: Option<String>,
    /// Time to live of messages without a shorter `ttl` header. `None`: unlimited.
    pub default_message_time_to_live: Option<Duration>,
    /// Expired messages go to the dead-letter sub-queue (reason `TTLExpiredException`)
    /// instead of being dropped.
    pub dead_lettering_on_message_expiration: bool,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        Self {
            lock_duration: DEFAULT_LOCK_DURATION,
            max_delivery_count: DEFAULT_MAX_DELIVERY_COUNT,
            subject_filter: None,
            forward_to: None,
            default_message_time_to_live: None,
            dead_lettering_on_message_expiration: false,
        }
    }
}

impl SubscriptionOptions {
    /// Sets the lock duration.
    #[must_use]
    pub fn with_lock_duration(mut self, lock_duration: Duration) -> Self {
        self.lock_duration = lock_duration;
        self
    }

    /// Sets the maximum delivery count (at least 1).
    #[must_use]
    pub fn with_max_delivery_count(mut self, max_delivery_count: u32) -> Self {
        self.max_delivery_count = max_delivery_count;
        self
    }

    /// Lets only messages with this subject through.
    #[must_use]
    pub fn with_subject_filter(mut self, subject: impl Into<String>) -> Self {
        self.subject_filter = Some(subject.into());
        self
    }

    /// Forwards matching messages into the queue `queue`.
    #[must_use]
    pub fn with_forward_to(mut self, queue: impl Into<String>) -> Self {
        self.forward_to = Some(queue.into());
        self
    }

    /// Sets the default time to live of messages.
    #[must_use]
    pub fn with_default_message_time_to_live(mut self, ttl: Duration) -> Self {
        self.default_message_time_to_live = Some(ttl);
        self
    }

    /// Dead-letters expired messages instead of dropping them.
    #[must_use]
    pub fn with_dead_lettering_on_message_expiration(mut self, enabled: bool) -> Self {
        self.dead_lettering_on_message_expiration = enabled;
        self
    }
}
