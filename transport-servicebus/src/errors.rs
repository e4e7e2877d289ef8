//! Client errors as redeliver [`Error`]s.
//!
//! `azservicebus` 0.25.1 wraps its AMQP errors in crate-private types whose `source` chains
//! skip the AMQP error itself (`#[error(transparent)]`), so the error condition can only be read
//! from the rendered text. The classification below looks for the AMQP condition names and the
//! client's own outcome names in it; anything it does not recognise is treated as transient, so
//! that an unknown failure is retried (bounded) rather than mistaken for a permanent refusal.

use redeliver_core::Error;

/// What kind of failure a client error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `amqp:not-found`: the entity does not exist.
    NotFound,
    /// The message is larger than the entity accepts (`amqp:link:message-size-exceeded`):
    /// sending it again fails the same way.
    TooLarge,
    /// The broker refused the message (rejected outcome, not allowed).
    Rejected,
    /// Unauthorized or forbidden: retrying will not help.
    Unauthorized,
    /// An operation timed out.
    Timeout,
    /// Anything else: connection and link failures, released/modified outcomes.
    Transient,
}

/// The error's display text and that of every source, for classification.
fn chain_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = format!("{error} | {error:?}");
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(" | ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

pub(crate) fn classify(error: &azure_core::Error) -> Kind {
    let text = chain_text(error);
    let has = |needle: &str| text.contains(needle);
    // Condition names as the AMQP symbol or as `fe2o3-amqp`'s debug form; not a bare
    // `NotFound`, which an I/O error (a failed name lookup) could contain too.
    if has("amqp:not-found") || has("AmqpError(NotFound)") || has("could not be found") {
        Kind::NotFound
    } else if has("AmqpError(UnauthorizedAccess)")
        || has("amqp:unauthorized-access")
        // A CBS `put-token` answered with another status than 202.
        || has("StatusCode(401)")
        || has("StatusCode(403)")
    {
        Kind::Unauthorized
    } else if has("MessageSizeExceeded") || has("message-size-exceeded") {
        Kind::TooLarge
    } else if has("Rejceted") // sic: the client's spelling of its `Rejected` outcome error
        || has("Rejected(")
        || has("AmqpError(NotAllowed)")
        || has("amqp:not-allowed")
    {
        Kind::Rejected
    } else if has("Elapsed") || has("deadline has elapsed") || has("timed out") {
        Kind::Timeout
    } else {
        Kind::Transient
    }
}

/// Converts a client error from `operation` (a phrase such as "sending to queue `orders`"),
/// keeping the client's error as the source.
pub(crate) fn from_client(
    error: azure_core::Error,
    operation: &str,
    entity: Option<(&'static str, &str)>,
    timeout: std::time::Duration,
) -> Error {
    match classify(&error) {
        Kind::NotFound => match entity {
            Some((what, name)) => Error::not_found(what, name.to_owned()).with_hint(format!(
                "the broker answered amqp:not-found while {operation}; provision it \
                     (see the redeliver-servicebus docs)"
            )),
            None => Error::other(format!("{operation}: not found")).with_source(error),
        },
        Kind::TooLarge => Error::invalid_message(format!(
            "{operation}: larger than the entity accepts (Service Bus standard tier: 256 KiB \
                 per message, 64 KiB of properties): {error}"
        ))
        .with_source(error),
        Kind::Rejected => Error::rejected(format!("{operation}: {error}")).with_source(error),
        Kind::Unauthorized => Error::access_denied(
            format!(
                "{operation}: {error}; check the connection string's SharedAccessKeyName and key \
                 (or signature), and that its policy has the Send and Listen claims"
            ),
            error,
        ),
        Kind::Timeout => Error::timeout(operation.to_owned(), timeout),
        Kind::Transient => {
            Error::connection_lost(format!("{operation}: {error}")).with_source(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Text(&'static str);
    impl std::fmt::Display for Text {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Text {}

    fn kind_of(text: &'static str) -> Kind {
        let e = azure_core::Error::new(azure_core::error::ErrorKind::Other, Text(text));
        classify(&e)
    }

    #[test]
    fn unauthorized_is_access_denied_and_too_large_is_a_refused_message() {
        let error = |text: &'static str| {
            from_client(
                azure_core::Error::new(azure_core::error::ErrorKind::Other, Text(text)),
                "sending to queue `q`",
                Some(("queue", "q")),
                std::time::Duration::from_secs(1),
            )
        };
        let denied = error("Remote peer closed the link with an error: amqp:unauthorized-access");
        assert!(matches!(denied, Error::AccessDenied { .. }), "{denied:?}");
        assert!(!denied.is_transient());
        let large = error("Rejceted: ... condition: LinkError(MessageSizeExceeded) ...");
        assert!(matches!(large, Error::InvalidMessage { .. }), "{large:?}");
        assert!(large.is_message_refused() && !large.is_transient());
        let refused = error("Rejceted: ... condition: AmqpError(NotAllowed) ...");
        assert!(matches!(refused, Error::Rejected { .. }), "{refused:?}");
        assert!(
            !refused.is_message_refused(),
            "a read-only queue may accept it later"
        );
    }

    #[test]
    fn conditions_are_recognised() {
        assert_eq!(
            kind_of("Remote peer closed the link with an error: amqp:not-found"),
            Kind::NotFound
        );
        assert_eq!(
            kind_of(
                "Rejceted: Rejected { error: Some(Error { condition: AmqpError(NotAllowed) }) }"
            ),
            Kind::Rejected
        );
        assert_eq!(kind_of("deadline has elapsed"), Kind::Timeout);
        assert_eq!(
            kind_of(
                "Rejceted: Rejected { error: Some(Error { condition: LinkError(MessageSizeExceeded) }) }"
            ),
            Kind::TooLarge
        );
        assert_eq!(
            kind_of(
                "StatusError {code: StatusCode(401), description: Some(\"InvalidSignature\") }"
            ),
            Kind::Unauthorized
        );
        assert_eq!(kind_of("Session has dropped"), Kind::Transient);
        assert_eq!(
            kind_of("Io(Custom { kind: NotFound, error: \"no such host\" })"),
            Kind::Transient,
            "an I/O NotFound is not a missing entity"
        );
    }
}
