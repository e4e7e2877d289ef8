//! Secrets in transport locations: a URL's password and a connection string's shared access key
//! never appear in a `Debug` or `Display` form, an error or a log line.
//!
//! [`SecretUrl`] holds a URL (`amqp://user:password@host/vhost`) or a connection string
//! (`Endpoint=sb://...;SharedAccessKey=...`) and shows only its [`redacted`](SecretUrl::redacted)
//! form; [`expose`](SecretUrl::expose) gives the value itself to the client that connects. Every
//! transport redacts with this one implementation.

use std::fmt;

/// What replaces a secret in a redacted form.
pub const MASK: &str = "***";

/// Connection-string keys whose values are secrets.
const SECRET_KEYS: [&str; 2] = ["SharedAccessKey", "SharedAccessSignature"];

/// A URL or connection string that may carry a secret; `Debug` and `Display` show it redacted.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SecretUrl {
    value: String,
}

impl SecretUrl {
    /// Wraps `value`, as given.
    pub fn new(value: impl Into<String>) -> Self {
        SecretUrl {
            value: value.into(),
        }
    }

    /// The value with its secret, for the client that connects. Never log it.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// The value with its password or keys replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.value)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SecretUrl").field(&self.redacted()).finish()
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl From<String> for SecretUrl {
    fn from(value: String) -> Self {
        SecretUrl::new(value)
    }
}

impl From<&str> for SecretUrl {
    fn from(value: &str) -> Self {
        SecretUrl::new(value)
    }
}

/// `value` with its secrets replaced by `***`: the password of a URL, the values of
/// `SharedAccessKey` and `SharedAccessSignature` in a connection string. Text that is neither
/// is returned unchanged, unless it could hold a password in an unparseable URL, whose whole
/// user information is then masked.
pub fn redact(value: &str) -> String {
    if looks_like_connection_string(value) {
        return redact_connection_string(value);
    }
    match url::Url::parse(value) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Cannot fail: a URL with a password has a host.
                let _ = url.set_password(Some(MASK));
            }
            url.to_string()
        }
        Err(_) => redact_unparseable_url(value),
    }
}

fn looks_like_connection_string(value: &str) -> bool {
    const KEYS: [&str; 3] = ["Endpoint", "SharedAccessKeyName", SECRET_KEYS[0]];
    value
        .split(';')
        .filter_map(|part| part.split_once('='))
        .any(|(key, _)| {
            let key = key.trim();
            KEYS.iter()
                .chain(&SECRET_KEYS)
                .any(|known| key.eq_ignore_ascii_case(known))
        })
}

fn redact_connection_string(value: &str) -> String {
    value
        .split(';')
        .map(|part| match part.split_once('=') {
            Some((key, _))
                if SECRET_KEYS
                    .iter()
                    .any(|secret| key.trim().eq_ignore_ascii_case(secret)) =>
            {
                format!("{key}={MASK}")
            }
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// A URL that `url` cannot parse may still hold `user:password@`: mask everything between the
/// scheme and the last `@` of the authority.
fn redact_unparseable_url(value: &str) -> String {
    let Some((scheme, rest)) = value.split_once("://") else {
        return value.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://{MASK}{}{path}", &authority[at..]),
        None => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_password_is_masked() {
        assert_eq!(
            redact("amqps://app:s3cret@mq.example:5671/prod"),
            "amqps://app:***@mq.example:5671/prod"
        );
        assert_eq!(redact("amqp://localhost"), "amqp://localhost");
        assert_eq!(
            redact("amqp://app@localhost/%2f"),
            "amqp://app@localhost/%2f"
        );
    }

    #[test]
    fn a_password_with_an_at_sign_is_masked_whole() {
        let shown = redact("amqp://u:p@ss@host/%2f");
        assert!(!shown.contains("ss@"), "{shown}");
        assert!(!shown.contains("p%40ss"), "{shown}");
        assert!(shown.contains("host"), "{shown}");
    }

    #[test]
    fn an_unparseable_url_loses_its_user_information() {
        let shown = redact("amqp://u:s3cret@[bad/%2f");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(shown, "amqp://***@[bad/%2f");
    }

    #[test]
    fn connection_string_keys_are_masked() {
        let value = "Endpoint=sb://ns.example/;SharedAccessKeyName=root;SharedAccessKey=abc=";
        assert_eq!(
            redact(value),
            "Endpoint=sb://ns.example/;SharedAccessKeyName=root;SharedAccessKey=***"
        );
        let value = "Endpoint=sb://ns.example/;sharedaccesssignature=SharedAccessSignature sr=x";
        assert_eq!(
            redact(value),
            "Endpoint=sb://ns.example/;sharedaccesssignature=***"
        );
    }

    #[test]
    fn debug_and_display_are_redacted() {
        let url = SecretUrl::new("amqp://guest:hunter2@localhost/%2f");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert!(!format!("{url}").contains("hunter2"));
        assert_eq!(url.expose(), "amqp://guest:hunter2@localhost/%2f");
    }
}
