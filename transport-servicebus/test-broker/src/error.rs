//! The crate's error type.

use std::net::SocketAddr;

/// Errors of the test broker's Rust API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No loopback address with port 5672 free could be bound.
    ///
    /// `azservicebus` always dials port 5672, so the broker needs an address on which 5672 is free.
    #[error(
        "no loopback address with port 5672 is free (tried {tried}; last error: {source}). \
         azservicebus always dials port 5672: stop whatever listens on 5672 on every loopback \
         address (for example a RabbitMQ bound to 0.0.0.0), run the tests in a private network \
         namespace (`unshare -rn sh -c 'ip link set lo up; cargo test ...'`), or pass an \
         explicit address with BrokerOptions::with_address"
    )]
    NoFreeAddress {
        /// The addresses that were tried, as text (`127.0.0.2..127.0.0.x`).
        tried: String,
        /// The error of the last bind attempt.
        #[source]
        source: std::io::Error,
    },

    /// Binding the explicitly requested address failed.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The requested address.
        address: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },

    /// An entity with that name already exists.
    #[error("entity `{0}` already exists")]
    EntityExists(String),

    /// No entity with that name or path exists.
    #[error("entity `{0}` does not exist")]
    EntityNotFound(String),

    /// An entity name or an option is not valid; the message names the field and the rule.
    #[error("invalid configuration: {0}")]
    InvalidConfiguration(String),
}

impl Error {
    /// Whether the error says that a named entity does not exist.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::EntityNotFound(_))
    }
}
