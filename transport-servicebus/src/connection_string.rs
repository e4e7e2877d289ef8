//! Checking a connection string before the client sees it, so that a mistake is a
//! configuration error naming what is wrong (never its secret), not a failed connection.
//!
//! `azservicebus` 0.25.1 reads the keys `Endpoint`, `SharedAccessKeyName`, `SharedAccessKey`,
//! `SharedAccessSignature` and `EntityPath` case-sensitively, skips empty values, and keeps only
//! the host of the endpoint: it connects to port 5671 (TLS) or 5672 (plain AMQP) whatever the
//! endpoint says.

use azure_core::http::Url;
use redeliver_core::Error;
use redeliver_core::secret::SecretUrl;

const FIELD: &str = "connection_string";
const ENDPOINT: &str = "Endpoint";
const KEY_NAME: &str = "SharedAccessKeyName";
const KEY: &str = "SharedAccessKey";
const SIGNATURE: &str = "SharedAccessSignature";
const EMULATOR: &str = "UseDevelopmentEmulator";
const KNOWN: [&str; 6] = [ENDPOINT, KEY_NAME, KEY, SIGNATURE, EMULATOR, "EntityPath"];
/// The longest key name and key the client accepts, in bytes.
const MAX_KEY_BYTES: usize = 256;
/// What a connection string looks like, for error messages.
const SHAPE: &str = "a Service Bus connection string looks like \
     `Endpoint=sb://<namespace>.servicebus.windows.net/;SharedAccessKeyName=<policy>;\
     SharedAccessKey=<key>` (as the Azure portal shows it under \"Shared access policies\")";

/// The port `azservicebus` connects to over TLS.
pub(crate) const TLS_PORT: u16 = 5671;
/// The port `azservicebus` connects to over plain AMQP.
pub(crate) const PLAIN_PORT: u16 = 5672;

/// A connection string that passed the checks.
#[derive(Clone)]
pub(crate) struct Checked {
    /// What the client is given: the connection string itself, or for the emulator without a
    /// key, the connection string with a placeholder key the emulator accepts.
    pub(crate) for_client: SecretUrl,
    /// The namespace host.
    pub(crate) host: String,
    /// `UseDevelopmentEmulator=true`: plain AMQP, whatever the options say.
    pub(crate) emulator: bool,
}

impl Checked {
    /// The port the client connects to.
    pub(crate) fn port(&self, unsecured: bool) -> u16 {
        if unsecured || self.emulator {
            PLAIN_PORT
        } else {
            TLS_PORT
        }
    }
}

/// Checks `connection_string`; `unsecured` is the transport's option (which port is dialled).
pub(crate) fn check(connection_string: &SecretUrl, unsecured: bool) -> Result<Checked, Error> {
    let text = connection_string.expose();
    let mut endpoint = None;
    let mut key_name = false;
    let mut key = false;
    let mut signature = false;
    let mut emulator = false;
    for part in text.split(';') {
        if part.trim().is_empty() {
            continue;
        }
        // Never show `part`: it may be the key.
        let Some((name, value)) = part.split_once('=') else {
            return Err(Error::config(
                FIELD,
                format!("is not a connection string: a part has no `=`; {SHAPE}"),
            ));
        };
        let (name, value) = (name.trim(), value.trim());
        if let Some(known) = KNOWN
            .iter()
            .find(|known| known.eq_ignore_ascii_case(name) && **known != name)
            .filter(|known| **known != EMULATOR)
        {
            return Err(Error::config(
                FIELD,
                format!(
                    "has the key `{name}`, which the Service Bus client does not read: write \
                     `{known}` (keys are case-sensitive)"
                ),
            ));
        }
        if value.is_empty() {
            // The client skips empty values: treat them as missing.
            continue;
        }
        if (name == KEY_NAME || name == KEY) && value.len() > MAX_KEY_BYTES {
            return Err(Error::config(
                FIELD,
                format!(
                    "its `{name}` is {} bytes long; the Service Bus client accepts at most \
                     {MAX_KEY_BYTES}",
                    value.len()
                ),
            ));
        }
        match name {
            ENDPOINT => endpoint = Some(value),
            KEY_NAME => key_name = true,
            KEY => key = true,
            SIGNATURE => signature = true,
            _ if name.eq_ignore_ascii_case(EMULATOR) => {
                emulator = value.eq_ignore_ascii_case("true");
            }
            _ => {}
        }
    }
    let Some(endpoint) = endpoint else {
        return Err(Error::config(
            FIELD,
            format!("is not a Service Bus connection string: it has no `Endpoint`; {SHAPE}"),
        ));
    };
    let host = check_endpoint(endpoint, unsecured || emulator)?;
    let for_client = if signature || (key_name && key) {
        connection_string.clone()
    } else if emulator && !key_name && !key {
        // The emulator accepts any key; the client insists on one.
        SecretUrl::new(format!(
            "{};{KEY_NAME}=emulator;{KEY}=emulator",
            text.trim_end_matches(';')
        ))
    } else {
        let missing = if key_name { KEY } else { KEY_NAME };
        return Err(Error::config(
            FIELD,
            format!(
                "has no `{missing}`: give `{KEY_NAME}` and `{KEY}`, or `{SIGNATURE}` (or \
                 `{EMULATOR}=true` for the Service Bus emulator)"
            ),
        ));
    };
    Ok(Checked {
        for_client,
        host,
        emulator,
    })
}

/// The host of `endpoint`; an endpoint with a port other than the one the client will dial is
/// refused rather than silently not honoured.
fn check_endpoint(endpoint: &str, unsecured: bool) -> Result<String, Error> {
    let invalid = |why: &str| {
        Error::config(
            FIELD,
            format!(
                "its `Endpoint` `{endpoint}` {why}: write it as \
                 `sb://<namespace>.servicebus.windows.net/`"
            ),
        )
    };
    let url = Url::parse(endpoint).map_err(|_| invalid("is not a URL"))?;
    if url.scheme() != "sb" {
        return Err(invalid("does not start with `sb://`"));
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| invalid("has no host"))?
        .to_owned();
    let dialled = if unsecured { PLAIN_PORT } else { TLS_PORT };
    match url.port() {
        Some(port) if port != dialled => Err(Error::config(
            FIELD,
            format!(
                "its `Endpoint` names port {port}, but the Service Bus client always connects to \
                 port {dialled} of `{host}` ({TLS_PORT} with TLS, {PLAIN_PORT} without): remove \
                 the port, or run the broker on port {dialled}"
            ),
        )),
        _ => Ok(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_VALUE: &str = "k3y+VALUE/that=is-secret";

    fn checked(text: &str) -> Result<Checked, Error> {
        check(&SecretUrl::new(text), false)
    }

    fn reason(text: &str) -> String {
        match checked(text) {
            Err(Error::Config { field, reason, .. }) => {
                assert_eq!(field, FIELD);
                assert!(!reason.contains(KEY_VALUE), "the key shows: {reason}");
                reason
            }
            Err(other) => panic!("expected a configuration error, got {other:?}"),
            Ok(_) => panic!("`{text}` was accepted"),
        }
    }

    #[test]
    fn a_portal_connection_string_is_accepted() {
        let c = checked(&format!(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey={KEY_VALUE}"
        ))
        .unwrap();
        assert_eq!(c.host, "ns.servicebus.windows.net");
        assert!(!c.emulator);
        assert_eq!(c.port(false), TLS_PORT);
        assert!(
            checked("SharedAccessSignature=SharedAccessSignature sr=x&sig=y;Endpoint=sb://ns/")
                .is_ok(),
            "a signature instead of a key, in any order"
        );
    }

    #[test]
    fn a_missing_key_is_named() {
        let r = reason("Endpoint=sb://ns/;SharedAccessKeyName=Root");
        assert!(r.contains("no `SharedAccessKey`"), "{r}");
        let r = reason(&format!("Endpoint=sb://ns/;SharedAccessKey={KEY_VALUE}"));
        assert!(r.contains("no `SharedAccessKeyName`"), "{r}");
        let r = reason("Endpoint=sb://ns/;SharedAccessKeyName=Root;SharedAccessKey=");
        assert!(
            r.contains("no `SharedAccessKey`"),
            "an empty key is missing: {r}"
        );
        let long = format!(
            "Endpoint=sb://ns/;SharedAccessKeyName=Root;SharedAccessKey={}",
            "k".repeat(257)
        );
        let r = reason(&long);
        assert!(r.contains("`SharedAccessKey` is 257 bytes"), "{r}");
    }

    #[test]
    fn the_emulator_needs_no_key_and_is_plain_amqp() {
        let c = checked("Endpoint=sb://localhost;UseDevelopmentEmulator=true;").unwrap();
        assert!(c.emulator);
        assert_eq!(c.port(false), PLAIN_PORT);
        assert!(c.for_client.expose().contains("SharedAccessKey="));
        let c = checked("Endpoint=sb://localhost:5672;UseDevelopmentEmulator=true").unwrap();
        assert_eq!(c.host, "localhost");
    }

    #[test]
    fn a_port_the_client_would_not_dial_is_refused() {
        let r = reason(&format!(
            "Endpoint=sb://127.0.0.1:5999/;SharedAccessKeyName=Root;SharedAccessKey={KEY_VALUE}"
        ));
        assert!(
            r.contains("port 5999") && r.contains("always connects to port 5671"),
            "{r}"
        );
        let plain = check(
            &SecretUrl::new("Endpoint=sb://127.0.0.1:5999/;UseDevelopmentEmulator=true"),
            false,
        );
        assert!(
            matches!(&plain, Err(Error::Config { reason, .. }) if reason.contains("port 5672")),
            "{:?}",
            plain.err()
        );
        assert!(
            checked("Endpoint=sb://ns:5671/;SharedAccessKeyName=a;SharedAccessKey=b").is_ok(),
            "the port it dials anyway is fine"
        );
    }

    #[test]
    fn something_else_gets_told_what_a_connection_string_is() {
        for text in [
            "amqp://guest:guest@localhost:5672",
            "",
            "my-namespace.servicebus.windows.net",
        ] {
            let r = reason(text);
            assert!(r.contains("Endpoint=sb://<namespace>"), "{text}: {r}");
        }
        let r = reason(&format!("SharedAccessKey={KEY_VALUE};Endpoint"));
        assert!(r.contains("has no `=`"), "{r}");
        let r = reason(
            "Endpoint=https://ns.servicebus.windows.net/;SharedAccessKeyName=a;SharedAccessKey=b",
        );
        assert!(r.contains("sb://"), "{r}");
        let r = reason("endpoint=sb://ns/;SharedAccessKeyName=a;SharedAccessKey=b");
        assert!(r.contains("write `Endpoint`"), "{r}");
    }
}
