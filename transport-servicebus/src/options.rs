//! Options of the Service Bus transport.

use std::time::Duration;

use redeliver_core::Error;

/// How the transport connects and how hard it tries, with defaults that suit a production
/// namespace. Build one with [`ServiceBusOptions::default`] and the `with_*` methods; the
/// values are checked by [`ServiceBusTransport::connect`](crate::ServiceBusTransport::connect),
/// which names the offending field.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServiceBusOptions {
    /// Connect over plain AMQP (no TLS), for emulators and test brokers only. Default `false`;
    /// a connection string with `UseDevelopmentEmulator=true` is always plain AMQP.
    pub unsecured: bool,
    /// How long making a connection (TCP, AMQP open, authentication) may take before it fails
    /// with [`Error::Timeout`] naming the host and port. Default 10 s; more than zero and at most
    /// 5 minutes. The client's own bound on connecting is [`try_timeout`](Self::try_timeout):
    /// the shorter of the two applies.
    pub connect_timeout: Duration,
    /// How long one operation on the wire (attach, send, settle, renew) may take before it
    /// counts as failed. Default 30 s. At least 1 s: the client rejects shorter values.
    pub try_timeout: Duration,
    /// How many times a send (or the copy of a retry) is tried in all, when it fails with a
    /// transient error (a lost connection, a time-out). Default 3; 1 means no retry. A send the
    /// broker *rejects* is never retried.
    pub send_attempts: u32,
    /// The pause before the second send attempt; it doubles for each further one. Default
    /// 200 ms.
    pub send_backoff: Duration,
    /// How long a consumer waits for a message in one receive call before it asks again.
    /// Default 10 s; must be at least 1 s shorter than [`try_timeout`](Self::try_timeout).
    pub receive_wait: Duration,
    /// How many sender links the transport may open to one queue or topic, so that as many
    /// sends to it are in flight at once (each link carries one send at a time: the client's
    /// send takes the link until the broker answers). Links are opened only when that many
    /// sends overlap. Default 8; from 1 (sends to an entity go one at a time) to 64.
    pub senders_per_entity: usize,
    /// How long a consumer that has just received messages waits for a batch of more to fill
    /// the deliveries its worker can take, before taking what came. Settlements wait meanwhile,
    /// and a message that came first waits with the batch, so keep it short: about a round trip
    /// to the namespace: a longer wait adds to the lateness of scheduled messages without
    /// raising throughput. Default 5 ms; more than zero and at most 500 ms (so that it always ends before the client's try time-out).
    pub receive_batch_wait: Duration,
}

impl Default for ServiceBusOptions {
    fn default() -> Self {
        ServiceBusOptions {
            unsecured: false,
            connect_timeout: Duration::from_secs(10),
            try_timeout: Duration::from_secs(30),
            send_attempts: 3,
            send_backoff: Duration::from_millis(200),
            receive_wait: Duration::from_secs(10),
            senders_per_entity: 8,
            receive_batch_wait: Duration::from_millis(5),
        }
    }
}

impl ServiceBusOptions {
    /// Connects over plain AMQP, without TLS: for the Service Bus emulator and test brokers,
    /// never for a real namespace.
    #[must_use]
    pub fn with_unsecured(mut self, unsecured: bool) -> Self {
        self.unsecured = unsecured;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`try_timeout`](Self::try_timeout).
    #[must_use]
    pub fn with_try_timeout(mut self, timeout: Duration) -> Self {
        self.try_timeout = timeout;
        self
    }

    /// Sets [`send_attempts`](Self::send_attempts).
    #[must_use]
    pub fn with_send_attempts(mut self, attempts: u32) -> Self {
        self.send_attempts = attempts;
        self
    }

    /// Sets [`send_backoff`](Self::send_backoff).
    #[must_use]
    pub fn with_send_backoff(mut self, backoff: Duration) -> Self {
        self.send_backoff = backoff;
        self
    }

    /// Sets [`receive_wait`](Self::receive_wait).
    #[must_use]
    pub fn with_receive_wait(mut self, wait: Duration) -> Self {
        self.receive_wait = wait;
        self
    }

    /// Sets [`senders_per_entity`](Self::senders_per_entity).
    #[must_use]
    pub fn with_senders_per_entity(mut self, senders: usize) -> Self {
        self.senders_per_entity = senders;
        self
    }

    /// Sets [`receive_batch_wait`](Self::receive_batch_wait).
    #[must_use]
    pub fn with_receive_batch_wait(mut self, wait: Duration) -> Self {
        self.receive_batch_wait = wait;
        self
    }

    /// Checks the options, naming the first field that is out of range.
    pub fn validate(&self) -> Result<(), Error> {
        if self.try_timeout < Duration::from_secs(1) {
            return Err(Error::config(
                "try_timeout",
                format!("must be at least 1 s, got {:?}", self.try_timeout),
            ));
        }
        if self.connect_timeout.is_zero() || self.connect_timeout > Duration::from_secs(300) {
            return Err(Error::config(
                "connect_timeout",
                format!(
                    "must be more than zero and at most 5 minutes, got {:?}",
                    self.connect_timeout
                ),
            ));
        }
        if self.send_attempts == 0 {
            return Err(Error::config(
                "send_attempts",
                "must be at least 1 (it counts the first attempt), got 0",
            ));
        }
        if self.send_backoff > Duration::from_secs(60) {
            return Err(Error::config(
                "send_backoff",
                format!("must be at most 60 s, got {:?}", self.send_backoff),
            ));
        }
        if self.receive_wait.is_zero()
            || self.receive_wait + Duration::from_secs(1) > self.try_timeout
        {
            return Err(Error::config(
                "receive_wait",
                format!(
                    "must be more than zero and at least 1 s shorter than try_timeout ({:?}), \
                     got {:?}",
                    self.try_timeout, self.receive_wait
                ),
            ));
        }
        if !(1..=64).contains(&self.senders_per_entity) {
            return Err(Error::config(
                "senders_per_entity",
                format!("must be from 1 to 64, got {}", self.senders_per_entity),
            ));
        }
        if self.receive_batch_wait.is_zero() || self.receive_batch_wait > Duration::from_millis(500)
        {
            return Err(Error::config(
                "receive_batch_wait",
                format!(
                    "must be more than zero and at most 500 ms, got {:?}",
                    self.receive_batch_wait
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ServiceBusOptions::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let field = |options: ServiceBusOptions| match options.validate() {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a configuration error, got {other:?}"),
        };
        let base = ServiceBusOptions::default();
        assert_eq!(
            field(base.clone().with_try_timeout(Duration::from_millis(10))),
            "try_timeout"
        );
        assert_eq!(
            field(base.clone().with_connect_timeout(Duration::ZERO)),
            "connect_timeout"
        );
        assert_eq!(
            field(base.clone().with_connect_timeout(Duration::from_secs(301))),
            "connect_timeout"
        );
        assert_eq!(field(base.clone().with_send_attempts(0)), "send_attempts");
        assert_eq!(
            field(base.clone().with_send_backoff(Duration::from_secs(61))),
            "send_backoff"
        );
        assert_eq!(
            field(base.clone().with_receive_wait(Duration::from_secs(30))),
            "receive_wait"
        );
        assert_eq!(
            field(base.clone().with_receive_wait(Duration::ZERO)),
            "receive_wait"
        );
        assert_eq!(
            field(base.clone().with_senders_per_entity(0)),
            "senders_per_entity"
        );
        assert_eq!(
            field(base.clone().with_senders_per_entity(65)),
            "senders_per_entity"
        );
        assert_eq!(
            field(base.clone().with_receive_batch_wait(Duration::ZERO)),
            "receive_batch_wait"
        );
        assert_eq!(
            field(base.with_receive_batch_wait(Duration::from_secs(1))),
            "receive_batch_wait"
        );
    }
}
