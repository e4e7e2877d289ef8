//! The one error type of redeliver, shared by every transport.

use std::time::Duration;

/// A boxed error kept as the [`source`](std::error::Error::source) of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in redeliver, classified so that callers can decide without
/// matching strings: see [`Error::is_transient`].
///
/// Transports convert their client's errors into this type and keep them as the `source`. The
/// variants can be matched (with `..`) but are built with the constructors ([`Error::timeout`],
/// [`Error::not_found`], ...), so that a field added later breaks no caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is impossible. `field` names it; `reason` says what is allowed.
    #[error("invalid configuration `{field}`: {reason}")]
    #[non_exhaustive]
    Config {
        /// The field, in the dotted form a user wrote it (`backoff.factor`).
        field: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },

    /// An endpoint, topic, queue or exchange does not exist.
    #[error("{what} `{name}` does not exist{hint}", hint = hint_suffix(hint))]
    #[non_exhaustive]
    NotFound {
        /// What kind of entity (`endpoint`, `queue`, `exchange`, `topic`, ...).
        what: &'static str,
        /// Its name.
        name: String,
        /// What to do about it, if the transport knows.
        hint: Option<String>,
    },

    /// The broker could not be reached or the connection was lost.
    #[error("connection to the broker failed: {message}")]
    #[non_exhaustive]
    Connection {
        /// What happened.
        message: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },

    /// The broker refused access: wrong credentials, a user without permission, an unknown
    /// virtual host or namespace. Retrying with the same configuration fails the same way.
    #[error("the broker refused access: {message}")]
    #[non_exhaustive]
    AccessDenied {
        /// What the broker said, and what to check.
        message: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },

    /// The broker refused a message it was given (a negative publisher confirm, a rejected
    /// transfer, a full queue).
    #[error("the broker rejected the message: {message}")]
    #[non_exhaustive]
    Rejected {
        /// What the broker said.
        message: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },

    /// A published message matched no queue, so the broker would have dropped it.
    #[error("the message could not be routed: {message}")]
    #[non_exhaustive]
    Unroutable {
        /// Where it was sent.
        message: String,
    },

    /// An operation did not finish in time.
    #[error("{operation} did not finish within {after:?}")]
    #[non_exhaustive]
    Timeout {
        /// What was being done.
        operation: String,
        /// The bound that was exceeded.
        after: Duration,
    },

    /// A message is not acceptable: its payload cannot be decoded, a header is malformed, it is
    /// too large, or a delay is longer than the transport supports.
    #[error("invalid message: {message}")]
    #[non_exhaustive]
    InvalidMessage {
        /// What is wrong with it.
        message: String,
        /// The decoder's error.
        #[source]
        source: Option<BoxError>,
    },

    /// The transport does not offer this operation (a third-party transport that has not
    /// implemented an optional part of the [`Transport`](crate::Transport) contract, such as
    /// browsing dead letters). Trying again fails the same way.
    #[error("{operation} is not supported by this transport")]
    #[non_exhaustive]
    Unsupported {
        /// What was asked (`browsing dead letters`).
        operation: String,
    },

    /// The transport has been shut down.
    #[error("the transport is closed")]
    Closed,

    /// Anything else a transport reports.
    #[error("{message}")]
    #[non_exhaustive]
    Other {
        /// What happened.
        message: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
}

/// What kind of failure an [`Error`] is, the same on every transport: match on this rather than
/// on messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::Config`]: fix the configuration.
    Config,
    /// [`Error::NotFound`]: declare or create the entity.
    NotFound,
    /// [`Error::AccessDenied`]: fix the credentials or permissions.
    AccessDenied,
    /// [`Error::Connection`]: transient, try again.
    Connection,
    /// [`Error::Rejected`]: the broker refused a message (negative confirm, full queue).
    Rejected,
    /// [`Error::Unroutable`]: no queue takes the message.
    Unroutable,
    /// [`Error::Timeout`]: transient, try again.
    Timeout,
    /// [`Error::InvalidMessage`]: the message itself is wrong or too large.
    InvalidMessage,
    /// [`Error::Unsupported`]: the transport does not offer the operation.
    Unsupported,
    /// [`Error::Closed`]: the transport was shut down.
    Closed,
    /// [`Error::Other`]: anything else; treated as transient.
    Other,
}

impl ErrorKind {
    /// Whether trying again later may succeed; see [`Error::is_transient`].
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Other
        )
    }
}

fn hint_suffix(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!(": {h}")).unwrap_or_default()
}

impl Error {
    /// An [`Error::Config`] naming `field`.
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::NotFound`]: the `what` (`queue`, `topic`, ...) called `name` does not exist.
    /// Add what to do about it with [`with_hint`](Error::with_hint).
    pub fn not_found(what: &'static str, name: impl Into<String>) -> Self {
        Error::NotFound {
            what,
            name: name.into(),
            hint: None,
        }
    }

    /// An [`Error::Connection`] without a source.
    pub fn connection_lost(message: impl Into<String>) -> Self {
        Error::Connection {
            message: message.into(),
            source: None,
        }
    }

    /// An [`Error::Rejected`] without a source.
    pub fn rejected(message: impl Into<String>) -> Self {
        Error::Rejected {
            message: message.into(),
            source: None,
        }
    }

    /// An [`Error::Unroutable`]: `message` says where the message was sent.
    pub fn unroutable(message: impl Into<String>) -> Self {
        Error::Unroutable {
            message: message.into(),
        }
    }

    /// An [`Error::Timeout`]: `operation` did not finish within `after`.
    pub fn timeout(operation: impl Into<String>, after: Duration) -> Self {
        Error::Timeout {
            operation: operation.into(),
            after,
        }
    }

    /// An [`Error::Unsupported`]: the transport does not offer `operation`.
    pub fn unsupported(operation: impl Into<String>) -> Self {
        Error::Unsupported {
            operation: operation.into(),
        }
    }

    /// An [`Error::Other`] without a source.
    pub fn other(message: impl Into<String>) -> Self {
        Error::Other {
            message: message.into(),
            source: None,
        }
    }

    /// This error with `hint` saying what to do, if it is an [`Error::NotFound`]; any other
    /// error unchanged.
    #[must_use]
    pub fn with_hint(self, hint: impl Into<String>) -> Self {
        match self {
            Error::NotFound { what, name, .. } => Error::NotFound {
                what,
                name,
                hint: Some(hint.into()),
            },
            other => other,
        }
    }

    /// This error with `source` as its [`source`](std::error::Error::source), if it is a kind
    /// that keeps one (connection, access denied, rejected, invalid message, other); any other
    /// error unchanged.
    #[must_use]
    pub fn with_source(self, source: impl Into<BoxError>) -> Self {
        let source = Some(source.into());
        match self {
            Error::Connection { message, .. } => Error::Connection { message, source },
            Error::AccessDenied { message, .. } => Error::AccessDenied { message, source },
            Error::Rejected { message, .. } => Error::Rejected { message, source },
            Error::InvalidMessage { message, .. } => Error::InvalidMessage { message, source },
            Error::Other { message, .. } => Error::Other { message, source },
            other => other,
        }
    }

    /// An [`Error::InvalidMessage`] without a source.
    pub fn invalid_message(message: impl Into<String>) -> Self {
        Error::InvalidMessage {
            message: message.into(),
            source: None,
        }
    }

    /// An [`Error::Connection`] with the client's error as its source.
    pub fn connection(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Connection {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// An [`Error::AccessDenied`] with the client's error as its source.
    pub fn access_denied(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::AccessDenied {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// Whether the broker refused this one message for what it is (too large for the broker's
    /// limits, or routable nowhere), so that sending the same message again fails the same way.
    /// A settlement whose copy is refused like this must not be tried again as it is.
    pub fn is_message_refused(&self) -> bool {
        matches!(
            self,
            Error::InvalidMessage { .. } | Error::Unroutable { .. }
        )
    }

    /// This error, saying that it happened to the consumer named `name` (a configuration field
    /// is named under `consumers.<name>`).
    pub(crate) fn in_consumer(self, name: &str) -> Self {
        let prefix = |message: String| format!("consumer `{name}`: {message}");
        match self {
            Error::Config { field, reason } => Error::Config {
                field: format!("consumers.{name}.{field}"),
                reason,
            },
            Error::Connection { message, source: s } => Error::Connection {
                message: prefix(message),
                source: s,
            },
            Error::AccessDenied { message, source: s } => Error::AccessDenied {
                message: prefix(message),
                source: s,
            },
            Error::Other { message, source: s } => Error::Other {
                message: prefix(message),
                source: s,
            },
            Error::Timeout { operation, after } => Error::Timeout {
                operation: prefix(operation),
                after,
            },
            other => other,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config { .. } => ErrorKind::Config,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::AccessDenied { .. } => ErrorKind::AccessDenied,
            Error::Connection { .. } => ErrorKind::Connection,
            Error::Rejected { .. } => ErrorKind::Rejected,
            Error::Unroutable { .. } => ErrorKind::Unroutable,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::InvalidMessage { .. } => ErrorKind::InvalidMessage,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Closed => ErrorKind::Closed,
            Error::Other { .. } => ErrorKind::Other,
        }
    }

    /// Whether trying the same operation again later may succeed (a lost connection, a time-out)
    /// as opposed to an error that will repeat (bad configuration, refused access, a missing
    /// queue, an invalid message).
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_is_wrong() {
        let e = Error::config("backoff.factor", "must be at least 1.0, got 0.5");
        assert_eq!(
            e.to_string(),
            "invalid configuration `backoff.factor`: must be at least 1.0, got 0.5"
        );
        let e = Error::NotFound {
            what: "queue",
            name: "orders".into(),
            hint: Some("declare the topology or create it".into()),
        };
        assert_eq!(
            e.to_string(),
            "queue `orders` does not exist: declare the topology or create it"
        );
    }

    #[test]
    fn transient_errors_are_told_apart() {
        assert!(Error::connection("reset", std::io::Error::other("x")).is_transient());
        assert!(!Error::config("a", "b").is_transient());
        assert!(!Error::invalid_message("too large").is_transient());
        assert!(!Error::Closed.is_transient());
        assert_eq!(Error::Closed.kind(), ErrorKind::Closed);
        assert_eq!(
            Error::access_denied("ACCESS_REFUSED", std::io::Error::other("x")).kind(),
            ErrorKind::AccessDenied
        );
        assert!(!Error::access_denied("ACCESS_REFUSED", std::io::Error::other("x")).is_transient());
        assert!(Error::invalid_message("too large").is_message_refused());
        assert!(!Error::connection("reset", std::io::Error::other("x")).is_message_refused());
    }
}
