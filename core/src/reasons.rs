//! Dead-letter reasons the framework itself gives. Handlers give their own through
//! [`Outcome::DeadLetter`](crate::Outcome::DeadLetter) and [`Outcome::Retry`](crate::Outcome::Retry).

/// The body could not be decoded into the handler's type.
pub const INVALID_PAYLOAD: &str = "invalid payload";

/// The framework's headers on the message could not be read (see [`wire`](crate::wire)).
pub const MALFORMED_HEADERS: &str = "malformed headers";

/// The broker refused the copy that a retry or a park would have stored (for example, it is
/// larger than the broker accepts), so the message is dead-lettered instead of being delivered
/// again at the same attempt for ever.
pub const COPY_REFUSED: &str = "copy refused";

/// A message on an endpoint that routes by message type had no type, or one no handler takes
/// (see [`Routes`](crate::host::Routes)).
pub const UNKNOWN_MESSAGE_TYPE: &str = "unknown message type";

/// A retry was over its consumer's retry budget, configured to dead-letter what is over (see
/// [`resilience`](crate::host::resilience)).
pub const RETRY_BUDGET_EXHAUSTED: &str = "retry budget exhausted";
