//! How the worker turns a message's body into the handler's argument.
//!
//! Every type that deserializes from JSON is a [`Payload`] (decoded with [`Message::decode`]);
//! [`RawBody`] takes the body as it is, for other encodings and for handlers that decode it
//! themselves.

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::message::Message;

/// What a handler receives, decoded from the message. A body that cannot be decoded is an
/// invalid payload: the worker dead-letters it (or discards it, if configured) without calling
/// the handler.
pub trait Payload: Sized + Send + 'static {
    /// Decodes the payload of `message`.
    fn decode(message: &Message) -> Result<Self, Error>;
}

impl<T: DeserializeOwned + Send + 'static> Payload for T {
    fn decode(message: &Message) -> Result<Self, Error> {
        message.decode()
    }
}

/// The body as it came, undecoded: never an invalid payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawBody(pub Bytes);

impl Payload for RawBody {
    fn decode(message: &Message) -> Result<Self, Error> {
        Ok(RawBody(message.body().clone()))
    }
}
