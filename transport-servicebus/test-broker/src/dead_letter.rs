//! What a test sees of a dead-lettered message.

/// A message in a dead-letter sub-queue, as seen by [`BrokerHandle::dead_letters`](crate::BrokerHandle::dead_letters).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The message's sequence number.
    pub sequence_number: i64,
    /// The `message-id` property, if any (non-string ids in debug form).
    pub message_id: Option<String>,
    /// The `subject` property, if any.
    pub subject: Option<String>,
    /// The concatenated data sections of the body (empty for other body kinds).
    pub body: Vec<u8>,
    /// The `DeadLetterReason` application property.
    pub reason: Option<String>,
    /// The `DeadLetterErrorDescription` application property.
    pub description: Option<String>,
    /// How many times the message had been delivered when it was dead-lettered.
    pub delivery_count: u32,
}
