//! Checking the options when the transport connects: the first impossible one is named, with
//! the values it may take.

use std::time::Duration;

use lapin::uri::AMQPScheme;
use redeliver_core::Error;

use super::RabbitMqOptions;
use super::modes::{DelayMode, DeliveryLimit, MAX_DELAY_LEVELS, QueueType};

/// The smallest [`max_message_size`](RabbitMqOptions::with_max_message_size) accepted: room for
/// the framework's headers and a small body.
const MIN_MESSAGE_SIZE: usize = 16 * 1024;

impl RabbitMqOptions {
    /// Checks every option, naming the first impossible one.
    pub fn validate(&self) -> Result<(), Error> {
        self.parsed_nodes()?;
        check_name_part("prefix", &self.prefix, true)?;
        check_name_part("dead_letter_suffix", &self.dead_letter_suffix, false)?;
        match &self.delays {
            DelayMode::Cascade { levels } => {
                if !(1..=MAX_DELAY_LEVELS).contains(levels) {
                    return Err(Error::config(
                        "delays.levels",
                        format!("must be 1 to {MAX_DELAY_LEVELS}, got {levels}"),
                    ));
                }
            }
            DelayMode::FixedTtlRetryQueue { suffix, ttl } => {
                check_name_part("delays.suffix", suffix, false)?;
                if *ttl < Duration::from_millis(1) {
                    return Err(Error::config(
                        "delays.ttl",
                        format!("must be at least 1 ms, got {ttl:?}"),
                    ));
                }
            }
        }
        if let DeliveryLimit::Limit(limit) = self.delivery_limit {
            if self.queue_type != QueueType::Quorum {
                return Err(Error::config(
                    "delivery_limit",
                    "is supported by quorum queues only; set the queue type to quorum",
                ));
            }
            if limit == 0 {
                return Err(Error::config("delivery_limit", "must be at least 1, got 0"));
            }
        }
        if self.connect_attempts == 0 {
            return Err(Error::config(
                "connect_attempts",
                "must be at least 1 (the first try counts), got 0",
            ));
        }
        if self.reconnect_delay.is_zero() {
            return Err(Error::config("reconnect_delay", "must be more than zero"));
        }
        if self.reconnect_max_delay < self.reconnect_delay {
            return Err(Error::config(
                "reconnect_max_delay",
                format!(
                    "must be at least the initial reconnect delay of {:?}, got {:?}",
                    self.reconnect_delay, self.reconnect_max_delay
                ),
            ));
        }
        if self.operation_timeout.is_zero() {
            return Err(Error::config("operation_timeout", "must be more than zero"));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::config("connect_timeout", "must be more than zero"));
        }
        if self.max_message_size < MIN_MESSAGE_SIZE {
            return Err(Error::config(
                "max_message_size",
                format!(
                    "must be at least {MIN_MESSAGE_SIZE} bytes, got {}",
                    self.max_message_size
                ),
            ));
        }
        if self.prefetch_limit == 0 {
            return Err(Error::config("prefetch_limit", "must be at least 1, got 0"));
        }
        if let Some(pem) = &self.ca_certificates {
            check_ca_certificates(pem)?;
            if self
                .parsed_nodes()?
                .iter()
                .any(|node| node.scheme != AMQPScheme::AMQPS)
            {
                return Err(Error::config(
                    "ca_certificate",
                    "is only used by `amqps://` URLs; this URL connects without TLS",
                ));
            }
        }
        Ok(())
    }
}

/// Checks that `pem` holds at least one certificate and nothing unreadable, so that a wrong file
/// fails when the options are checked rather than at every connection attempt.
fn check_ca_certificates(pem: &str) -> Result<(), Error> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        cert.map_err(|e| Error::config("ca_certificate", format!("is not readable PEM: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(Error::config(
            "ca_certificate",
            "holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)",
        ));
    }
    Ok(())
}

fn check_name_part(field: &str, value: &str, may_be_empty: bool) -> Result<(), Error> {
    if value.is_empty() && !may_be_empty {
        return Err(Error::config(field, "must not be empty"));
    }
    if value.contains(['*', '#']) {
        return Err(Error::config(
            field,
            format!("`{value}` contains `*` or `#`, which are wildcards in RabbitMQ bindings"),
        ));
    }
    if value.len() > 100 {
        return Err(Error::config(
            field,
            format!("must be at most 100 bytes, got {}", value.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use redeliver_core::Error;

    use crate::{QueueType, RabbitMqOptions};

    fn field_of(e: Error) -> String {
        match e {
            Error::Config { field, .. } => field,
            other => panic!("not a configuration error: {other}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        RabbitMqOptions::default().validate().unwrap();
        RabbitMqOptions::new("amqps://app:secret@mq.example:5671/prod")
            .validate()
            .unwrap();
        assert_eq!(
            RabbitMqOptions::default().max_delay(),
            Some(Duration::from_secs((1 << 28) - 1))
        );
    }

    #[test]
    fn impossible_options_name_their_field() {
        let bad = [
            (RabbitMqOptions::new("http://localhost"), "url"),
            (RabbitMqOptions::new("not a url"), "url"),
            (
                RabbitMqOptions::default().with_delay_levels(0),
                "delays.levels",
            ),
            (
                RabbitMqOptions::default().with_delay_levels(29),
                "delays.levels",
            ),
            (
                RabbitMqOptions::default().with_fixed_ttl_retry_queue("-retry", Duration::ZERO),
                "delays.ttl",
            ),
            (
                RabbitMqOptions::default().with_fixed_ttl_retry_queue("", Duration::from_secs(1)),
                "delays.suffix",
            ),
            (RabbitMqOptions::default().with_prefix("a.*"), "prefix"),
            (
                RabbitMqOptions::default()
                    .with_queue_type(QueueType::Classic)
                    .with_delivery_limit(3),
                "delivery_limit",
            ),
            (
                RabbitMqOptions::default().with_delivery_limit(0),
                "delivery_limit",
            ),
            (
                RabbitMqOptions::default().with_connect_attempts(0, Duration::ZERO),
                "connect_attempts",
            ),
            (
                RabbitMqOptions::default()
                    .with_reconnect_delay(Duration::from_secs(2), Duration::from_secs(1)),
                "reconnect_max_delay",
            ),
            (
                RabbitMqOptions::default().with_operation_timeout(Duration::ZERO),
                "operation_timeout",
            ),
            (
                RabbitMqOptions::default().with_dead_letter_suffix(""),
                "dead_letter_suffix",
            ),
            (
                RabbitMqOptions::default().with_connect_timeout(Duration::ZERO),
                "connect_timeout",
            ),
            (
                RabbitMqOptions::default().with_max_message_size(100),
                "max_message_size",
            ),
        ];
        for (options, field) in bad {
            assert_eq!(field_of(options.validate().unwrap_err()), field);
        }
    }
}
