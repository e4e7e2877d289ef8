//! `lapin` errors into the framework's [`Error`], keeping them as sources.

use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
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

/// Maps `error`, which happened while doing `doing` (`declaring queue \`orders\``).
pub(crate) fn map(error: lapin::Error, doing: impl Into<String>) -> Error {
    let doing = doing.into();
    match soft_error(&error) {
        Some(AMQPSoftError::PRECONDITIONFAILED) => Error::Config {
            field: "topology".to_owned(),
            reason: format!(
                "{doing}: the broker refused ({error}); an existing queue or exchange has \
                 different settings — delete it or align the options"
            ),
        },
        Some(AMQPSoftError::ACCESSREFUSED) => Error::Other {
            message: format!("{doing}: access refused by the broker"),
            source: Some(Box::new(error)),
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
