//! Reaching a transport from a URL: each transport declares which URLs are its own and how to
//! connect to them, so that choosing a broker is a line of configuration and a third-party
//! transport joins `redeliver::connect` without a change to redeliver.
//!
//! A [`Connector`] recognises its URLs ([`accepts`](Connector::accepts): by scheme, or by the
//! shape of a connection string), redacts their secrets for messages, and connects. The
//! `redeliver` facade holds the connectors of the transports its features enable, and
//! `redeliver::connect::register` adds others.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::secret::{self, SecretUrl};
use crate::{Error, Transport};

/// How a transport is reached from a URL or connection string.
#[async_trait]
pub trait Connector: fmt::Debug + Send + Sync + 'static {
    /// The transport's name, for messages (`RabbitMQ`).
    fn name(&self) -> &'static str;

    /// Whether `url` is one of this transport's (its scheme, or a connection string's keys).
    fn accepts(&self, url: &str) -> bool;

    /// `url` with its secrets replaced by `***`, for messages and logs.
    fn redact(&self, url: &str) -> String {
        secret::redact(url)
    }

    /// Connects to `url`, one this connector [`accepts`](Connector::accepts), and returns the
    /// transport ready to use. Errors name what is wrong with the URL and never show its
    /// secrets.
    async fn connect(&self, url: &SecretUrl) -> Result<Arc<dyn Transport>, Error>;
}

/// Whether `url` starts with `scheme://`, in any case.
pub fn has_scheme(url: &str, scheme: &str) -> bool {
    url.trim()
        .split_once("://")
        .is_some_and(|(found, _)| found.eq_ignore_ascii_case(scheme))
}

/// The value of `key` in a connection string (`Key=value;Other=...`, keys in any case), if
/// present.
pub fn connection_string_value<'a>(connection_string: &'a str, key: &str) -> Option<&'a str> {
    connection_string.split(';').find_map(|part| {
        let (k, v) = part.split_once('=')?;
        k.trim().eq_ignore_ascii_case(key).then(|| v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_string_values_are_found_by_key() {
        let s = "Endpoint=sb://ns/;UseDevelopmentEmulator=true";
        assert_eq!(connection_string_value(s, "endpoint"), Some("sb://ns/"));
        assert_eq!(
            connection_string_value(s, "UseDevelopmentEmulator"),
            Some("true")
        );
        assert_eq!(connection_string_value(s, "SharedAccessKey"), None);
    }

    #[test]
    fn schemes_match_in_any_case() {
        assert!(has_scheme("AMQPS://host", "amqps"));
        assert!(has_scheme(" memory://", "memory"));
        assert!(!has_scheme("amqp://host", "amqps"));
        assert!(!has_scheme("Endpoint=sb://ns/", "sb"));
    }
}
