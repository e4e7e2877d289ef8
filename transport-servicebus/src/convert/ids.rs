//! Which id is which: the native `MessageId` of a copy (a retry or a park), and the application
//! property that carries the framework's id on it.

use chrono::Utc;

/// The application property that carries the framework's message id on a copy (a retry or a
/// park), whose native `MessageId` is its own so that duplicate detection keeps it.
pub const MESSAGE_ID_PROPERTY: &str = "redeliver-message-id";
/// The longest `MessageId` `azservicebus` sends, in bytes.
const MAX_NATIVE_ID: usize = 128;

/// The native `MessageId` of the copy that settles the delivery with sequence number
/// `sequence_number` of a message with id `id`: the same for every copy made from that one
/// delivery (so a copy sent again after a crash or a time-out is dropped by duplicate
/// detection), different from every other copy and from the message's own id (so it is not).
pub(crate) fn copy_id(sequence_number: i64, id: &str) -> String {
    let mut native = if sequence_number > 0 {
        format!("redeliver:{sequence_number}:{id}")
    } else {
        // Service Bus numbers every message from 1; without a number, be unique anyway.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
        format!("redeliver:{nanos}-{n}:{id}")
    };
    if native.len() > MAX_NATIVE_ID {
        let mut end = MAX_NATIVE_ID;
        while !native.is_char_boundary(end) {
            end -= 1;
        }
        native.truncate(end);
    }
    native
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_ids_are_the_same_per_delivery_unique_otherwise_and_cut_to_128_bytes() {
        let native = copy_id(42, "order-1");
        assert_eq!(native, copy_id(42, "order-1"), "the same for one delivery");
        assert_ne!(native, copy_id(43, "order-1"));
        assert_ne!(
            copy_id(0, "order-1"),
            copy_id(0, "order-1"),
            "unique without a number"
        );
        assert_eq!(copy_id(7, &"x".repeat(200)).len(), 128);
        let cut = copy_id(7, &"é".repeat(100));
        assert!(cut.len() <= 128 && cut.len() >= 126, "{}", cut.len());
    }
}
