//! Between the UTC instants of redeliver and the client's time type, never moving a scheduled
//! time earlier.

use chrono::{DateTime, Utc};
use redeliver_core::Error;
use time::OffsetDateTime;

/// A UTC instant as the client's time type, rounded *up* to the millisecond: AMQP timestamps
/// carry milliseconds, and a scheduled time must never move earlier.
pub(crate) fn to_offset_date_time(at: DateTime<Utc>) -> Result<OffsetDateTime, Error> {
    let nanos = at.timestamp_nanos_opt().ok_or_else(|| {
        Error::invalid_message(format!("the not-before {at} is out of the supported range"))
    })?;
    let millis =
        i128::from(nanos).div_euclid(1_000_000) + i128::from(nanos.rem_euclid(1_000_000) != 0);
    OffsetDateTime::from_unix_timestamp_nanos(millis * 1_000_000).map_err(|e| {
        Error::invalid_message(format!("the not-before {at} is out of the supported range"))
            .with_source(e)
    })
}

/// A client time as a UTC instant.
pub(crate) fn to_utc(at: OffsetDateTime) -> DateTime<Utc> {
    let nanos = at.unix_timestamp_nanos();
    let secs = nanos.div_euclid(1_000_000_000);
    let sub = nanos.rem_euclid(1_000_000_000);
    i64::try_from(secs)
        .ok()
        .and_then(|secs| DateTime::from_timestamp(secs, u32::try_from(sub).unwrap_or(0)))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduled_times_round_up_to_the_millisecond() {
        let at = DateTime::parse_from_rfc3339("2026-11-21T10:00:01.250400Z")
            .unwrap()
            .with_timezone(&Utc);
        let rounded = to_utc(to_offset_date_time(at).unwrap());
        assert_eq!(
            rounded,
            DateTime::parse_from_rfc3339("2026-11-21T10:00:01.251Z").unwrap()
        );
        let exact = DateTime::parse_from_rfc3339("2026-11-21T10:00:01.250Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(to_utc(to_offset_date_time(exact).unwrap()), exact);
    }
}
