//! `lapin` errors into the framework's [`Error`], keeping them as sources.

use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use redeliver_core::Error;

/// Whether the broker answered "not found" (a missing queue or exchange).
pub(crate) fn is_not_found(error: &lapin::Error) -> bool {
    soft_error(error) == Some(AMQPSoftError::NOTFOUND)
}

fn soft_error(error: &lapin::Error) -> Option<AMQPSoftError> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Whether the broker refused access for good: wrong credentials (`ACCESS_REFUSED`), a user
/// without permission, or an unknown virtual host (`NOT_ALLOWED`).
fn refusal(error: &lapin::Error) -> Option<&str> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Some(amqp.get_message().as_str()),
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => Some(amqp.get_message().as_str()),
            _ => None,
        },
        _ => None,
    }
}

/// Whether the broker refused a published message for its size (`PRECONDITION_FAILED -
/// message size N is larger than max size M`).
fn is_too_large(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => {
            matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            ) && amqp.get_message().as_str().contains("larger than max size")
        }
        _ => false,
    }
}

/// Whether lapin could not read what the broker sent, which ends the whole connection: a
/// delivery whose properties it cannot parse (a content type that is not UTF-8), or a frame
/// larger than the negotiated `frame_max` (the broker does not split a content header, so a
/// message whose headers grew on the way, by `x-death` for one, can exceed it).
pub(crate) fn is_unreadable(error: &lapin::Error) -> bool {
    match error.kind() {
        ErrorKind::ParsingError(_) => true,
        ErrorKind::ProtocolError(amqp) => {
            matches!(amqp.kind(), AMQPErrorKind::Hard(AMQPHardError::FRAMEERROR))
        }
        _ => false,
    }
}

/// Maps `error`, which happened while doing `doing` (`declaring queue \`orders\``).
pub(crate) fn from_client(error: lapin::Error, doing: impl Into<String>) -> Error {
    let doing = doing.into();
    if let Some(said) = refusal(&error) {
        let message = format!(
            "{doing}: {said} (check the user name, password, virtual host and the user's \
             permissions)"
        );
        return Error::access_denied(message, error);
    }
    if is_too_large(&error) {
        // The broker's max_message_size is below the configured one: the same message is
        // refused the same way every time.
        return Error::invalid_message(format!(
            "{doing}: the broker refused the message as too large; its max_message_size is \
                 smaller than RabbitMqOptions::with_max_message_size"
        ))
        .with_source(error);
    }
    match soft_error(&error) {
        Some(AMQPSoftError::PRECONDITIONFAILED) => Error::config(
            "topology".to_owned(),
            format!(
                "{doing}: the broker refused ({error}); an existing queue or exchange has \
                 different settings — delete it or align the options"
            ),
        ),
        Some(_) => Error::other(format!("{doing}: the broker refused")).with_source(error),
        None => Error::connection_lost(format!("{doing}: {error}")).with_source(error),
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::AMQPError;

    use super::*;

    fn protocol(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into()
    }

    #[test]
    fn refusals_are_classified_by_what_the_broker_said() {
        let e = from_client(
            protocol(
                AMQPSoftError::ACCESSREFUSED.into(),
                "ACCESS_REFUSED - Login was refused",
            ),
            "connecting",
        );
        assert!(matches!(e, Error::AccessDenied { .. }), "{e:?}");
        assert!(
            e.to_string().contains("ACCESS_REFUSED - Login was refused"),
            "{e}"
        );
        let e = from_client(
            protocol(
                AMQPHardError::NOTALLOWED.into(),
                "NOT_ALLOWED - vhost x not found",
            ),
            "connecting",
        );
        assert!(matches!(e, Error::AccessDenied { .. }), "{e:?}");
        let e = from_client(
            protocol(
                AMQPSoftError::PRECONDITIONFAILED.into(),
                "PRECONDITION_FAILED - message size 20 is larger than max size 10",
            ),
            "publishing",
        );
        assert!(e.is_message_refused(), "{e:?}");
        let e = from_client(
            protocol(
                AMQPSoftError::PRECONDITIONFAILED.into(),
                "PRECONDITION_FAILED - inequivalent arg 'x-queue-type'",
            ),
            "declaring",
        );
        assert!(matches!(e, Error::Config { .. }), "{e:?}");
        assert!(is_unreadable(&protocol(
            AMQPHardError::FRAMEERROR.into(),
            "frame too large"
        )));
    }
}
