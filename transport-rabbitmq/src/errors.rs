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
pub(crate) fn map(error: lapin::Error, doing: impl Into<String>) -> Error {
    let doing = doing.into();
    if let Some(said) = refusal(&error) {
        let message = format!(
            "{doing}: {said} (check the user name, password, virtual host and the user's \
             permissions)"
        );
        return Error::access_denied(message, error);
    }
    match soft_error(&error) {
        Some(AMQPSoftError::PRECONDITIONFAILED) => Error::Config {
            field: "topology".to_owned(),
            reason: format!(
                "{doing}: the broker refused ({error}); an existing queue or exchange has \
                 different settings — delete it or align the options"
            ),
        },
        Some(_) => Error::Other {
            message: format!("{doing}: the broker refused"),
            source: Some(Box::new(error)),
        },
        None => Error::Connection {
            message: format!("{doing}: {error}"),
            source: Some(Box::new(error)),
        },
    }
}
