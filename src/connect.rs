//! Choosing a transport at run time, from a URL or a configuration value, so that switching
//! brokers is a change of configuration, not of code.
//!
//! | configuration | transport | cargo feature of `redeliver` |
//! |---|---|---|
//! | `memory://` | in memory, in this process | `memory` (default) |
//! | `amqp://user:password@host:5672/vhost`, `amqps://...` | RabbitMQ | `rabbitmq` |
//! | `Endpoint=sb://namespace.servicebus.windows.net/;SharedAccessKeyName=...;SharedAccessKey=...` | Azure Service Bus | `servicebus` |
//!
//! A Service Bus connection string with `UseDevelopmentEmulator=true` (the emulator's, and the
//! test broker's) connects without TLS.
//!
//! Each transport recognises and connects its own URLs through its
//! [`Connector`]; a transport of your own joins with
//! [`register`]. A URL of a built-in transport whose feature is not enabled is an
//! [`Error::Config`] that says which feature to enable.

use std::fmt;
use std::sync::{Arc, RwLock};

use redeliver_core::connector::{Connector, connection_string_value, has_scheme};
use redeliver_core::secret::SecretUrl;
use redeliver_core::{Error, Transport};

/// The configuration field the errors of this module name.
const FIELD: &str = "transport";

/// Connectors registered by the application, tried after the built-in ones.
static REGISTERED: RwLock<Vec<Arc<dyn Connector>>> = RwLock::new(Vec::new());

/// Makes [`connect`] and [`TransportUrl`] know the URLs of `connector`'s transport. URLs of the
/// built-in transports stay theirs.
///
/// ```
/// use std::sync::Arc;
/// use redeliver::transport::connector::{Connector, has_scheme};
/// use redeliver::{Error, SecretUrl, Transport};
///
/// #[derive(Debug)]
/// struct Loopback;
///
/// #[async_trait::async_trait]
/// impl Connector for Loopback {
///     fn name(&self) -> &'static str { "loopback" }
///     fn accepts(&self, url: &str) -> bool { has_scheme(url, "loopback") }
///     async fn connect(&self, _: &SecretUrl) -> Result<Arc<dyn Transport>, Error> {
///         Ok(Arc::new(redeliver::memory::MemoryTransport::new()))
///     }
/// }
///
/// redeliver::connect::register(Loopback);
/// let url = redeliver::TransportUrl::parse("loopback://").unwrap();
/// assert_eq!(url.kind(), redeliver::TransportKind::Registered("loopback"));
/// ```
pub fn register(connector: impl Connector) {
    REGISTERED
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(Arc::new(connector));
}

fn registered(url: &str) -> Option<Arc<dyn Connector>> {
    REGISTERED
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .iter()
        .find(|c| c.accepts(url))
        .cloned()
}

/// A transport location: a URL or a Service Bus connection string. Deserializes from a string,
/// so it can sit in an application's configuration struct:
///
/// ```
/// #[derive(serde::Deserialize)]
/// struct Config {
///     transport: redeliver::TransportUrl,
/// }
/// let config: Config = serde_json::from_str(r#"{ "transport": "memory://" }"#).unwrap();
/// assert_eq!(config.transport.kind(), redeliver::TransportKind::Memory);
/// ```
///
/// Its `Debug` and `Display` forms hide passwords and keys.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct TransportUrl {
    kind: TransportKind,
    value: SecretUrl,
}

/// Which transport a [`TransportUrl`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportKind {
    /// `memory://`.
    Memory,
    /// `amqp://` or `amqps://`.
    RabbitMq,
    /// A Service Bus connection string.
    ServiceBus,
    /// A transport added with [`register`], by its connector's name.
    Registered(&'static str),
}

impl TransportKind {
    /// The cargo feature of `redeliver` that provides this transport (none for a registered one).
    pub fn feature(self) -> Option<&'static str> {
        match self {
            TransportKind::Memory => Some("memory"),
            TransportKind::RabbitMq => Some("rabbitmq"),
            TransportKind::ServiceBus => Some("servicebus"),
            TransportKind::Registered(_) => None,
        }
    }

    /// The built-in transport `value` is for, whether or not its feature is enabled.
    fn built_in(value: &str) -> Option<TransportKind> {
        if connection_string_value(value, "Endpoint").is_some() {
            Some(TransportKind::ServiceBus)
        } else if has_scheme(value, "memory") {
            Some(TransportKind::Memory)
        } else if has_scheme(value, "amqp") || has_scheme(value, "amqps") {
            Some(TransportKind::RabbitMq)
        } else {
            None
        }
    }

    /// The connector of this transport, if this build has it.
    fn connector(self) -> Option<Arc<dyn Connector>> {
        match self {
            #[cfg(feature = "memory")]
            TransportKind::Memory => Some(Arc::new(redeliver_memory::MemoryConnector)),
            #[cfg(feature = "rabbitmq")]
            TransportKind::RabbitMq => Some(Arc::new(redeliver_rabbitmq::RabbitMqConnector)),
            #[cfg(feature = "servicebus")]
            TransportKind::ServiceBus => Some(Arc::new(redeliver_servicebus::ServiceBusConnector)),
            TransportKind::Registered(name) => REGISTERED
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .iter()
                .find(|c| c.name() == name)
                .cloned(),
            #[allow(unreachable_patterns)] // Every kind is handled when every feature is on.
            _ => None,
        }
    }
}

impl TransportUrl {
    /// Parses `value`, checking only which transport it names (each transport validates the
    /// rest when connecting).
    pub fn parse(value: &str) -> Result<Self, Error> {
        let trimmed = value.trim();
        let kind = match TransportKind::built_in(trimmed) {
            Some(kind) => kind,
            None => match registered(trimmed) {
                Some(connector) => TransportKind::Registered(connector.name()),
                None => return Err(unknown(trimmed)),
            },
        };
        Ok(TransportUrl {
            kind,
            value: SecretUrl::new(trimmed),
        })
    }

    /// Which transport this names.
    pub fn kind(&self) -> TransportKind {
        self.kind
    }

    /// The value as given, secrets included. Do not log it.
    pub fn expose(&self) -> &str {
        self.value.expose()
    }

    /// The value with passwords and keys replaced by `***`.
    pub fn redacted(&self) -> String {
        match self.kind.connector() {
            Some(connector) => connector.redact(self.value.expose()),
            None => self.value.redacted(),
        }
    }
}

/// The error for a value no transport takes, saying what would be taken.
fn unknown(value: &str) -> Error {
    if let Some((scheme, _)) = value.split_once("://") {
        return Error::config(
            FIELD,
            format!(
                "unknown scheme `{}://`; expected `memory://`, `amqp://`, `amqps://`, a Service \
                 Bus connection string (`Endpoint=sb://...`) or the scheme of a registered \
                 transport",
                scheme.to_ascii_lowercase()
            ),
        );
    }
    if value.contains('=') {
        let keys: Vec<String> = value
            .split(';')
            .filter_map(|part| part.split_once('=').map(|(key, _)| key.trim()))
            .filter(|key| !key.is_empty())
            .map(|key| format!("`{key}`"))
            .collect();
        return Error::config(
            FIELD,
            format!(
                "a Service Bus connection string must hold `Endpoint=sb://<namespace>/`; this one \
                 has only {}",
                keys.join(", ")
            ),
        );
    }
    Error::config(
        FIELD,
        "expected a URL (`memory://`, `amqp://...`) or a Service Bus connection string \
         (`Endpoint=sb://...`), got a value without a scheme",
    )
}

impl TryFrom<String> for TransportUrl {
    type Error = Error;

    fn try_from(value: String) -> Result<Self, Error> {
        TransportUrl::parse(&value)
    }
}

impl std::str::FromStr for TransportUrl {
    type Err = Error;

    fn from_str(value: &str) -> Result<Self, Error> {
        TransportUrl::parse(value)
    }
}

impl fmt::Debug for TransportUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TransportUrl")
            .field(&self.redacted())
            .finish()
    }
}

impl fmt::Display for TransportUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Connects to the transport `url` names (see the [module docs](self)) and returns it ready to
/// use. Declare the application's topology on it with [`Transport::declare`].
///
/// ```
/// use redeliver::{Message, Topology};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), redeliver::Error> {
/// // From configuration: `amqp://user:password@rabbit:5672/%2f` or a Service Bus
/// // connection string work the same, with their features on.
/// let transport = redeliver::connect("memory://").await?;
/// transport.declare(&Topology::new().endpoint("orders")).await?;
/// transport.send("orders", Message::new("hello")).await?;
/// println!("{transport:?}");
/// # Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<Arc<dyn Transport>, Error> {
    connect_to(&TransportUrl::parse(url)?).await
}

/// Like [`connect`], reading the URL from the environment variable `var`. An unset or empty
/// variable, or a value that is not a transport URL, is an [`Error::Config`] naming `var`.
pub async fn connect_from_env(var: &str) -> Result<Arc<dyn Transport>, Error> {
    const EXPECTED: &str = "set it to `memory://`, `amqp://...` or a Service Bus connection string";
    let value = std::env::var(var).map_err(|e| {
        Error::config(
            var,
            format!("the environment variable is not usable ({e}); {EXPECTED}"),
        )
    })?;
    connect_env_value(var, &value).await
}

/// [`connect_from_env`] once the variable is read.
async fn connect_env_value(var: &str, value: &str) -> Result<Arc<dyn Transport>, Error> {
    const EXPECTED: &str = "set it to `memory://`, `amqp://...` or a Service Bus connection string";
    if value.trim().is_empty() {
        return Err(Error::config(
            var,
            format!("the environment variable is empty; {EXPECTED}"),
        ));
    }
    let url = TransportUrl::parse(value).map_err(|e| match e {
        Error::Config { reason, .. } => Error::config(var, reason),
        other => other,
    })?;
    connect_to(&url).await
}

/// Connects to the transport `url` names.
pub async fn connect_to(url: &TransportUrl) -> Result<Arc<dyn Transport>, Error> {
    match url.kind().connector() {
        Some(connector) => connector.connect(&url.value).await,
        None => Err(feature_disabled(url.kind())),
    }
}

fn feature_disabled(kind: TransportKind) -> Error {
    match kind.feature() {
        Some(feature) => Error::config(
            FIELD,
            format!(
                "this build of redeliver has no {kind:?} transport: enable the `{feature}` \
                 feature (`redeliver = {{ version = \"{}\", features = [\"{feature}\"] }}` in \
                 Cargo.toml)",
                env!("CARGO_PKG_VERSION")
            ),
        ),
        None => Error::config(FIELD, format!("no transport is registered for {kind:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_recognised() {
        let kind = |s: &str| TransportUrl::parse(s).unwrap().kind();
        assert_eq!(kind("memory://"), TransportKind::Memory);
        assert_eq!(
            kind("amqp://guest:guest@localhost:5672/%2f"),
            TransportKind::RabbitMq
        );
        assert_eq!(kind("AMQPS://host"), TransportKind::RabbitMq);
        assert_eq!(
            kind(
                "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=a;SharedAccessKey=b"
            ),
            TransportKind::ServiceBus
        );
        assert_eq!(
            kind("SharedAccessKeyName=a;SharedAccessKey=b;Endpoint=sb://ns/"),
            TransportKind::ServiceBus
        );
    }

    #[test]
    fn unknown_schemes_say_what_is_expected() {
        let e = TransportUrl::parse("kafka://broker:9092")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown scheme `kafka://`"), "{e}");
        assert!(e.contains("amqp://"), "{e}");
        let e = TransportUrl::parse("localhost:5672")
            .unwrap_err()
            .to_string();
        assert!(e.contains("without a scheme"), "{e}");
        let e = TransportUrl::parse("SharedAccessKeyName=a;SharedAccessKey=b")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Service Bus connection string must hold `Endpoint=sb://"),
            "{e}"
        );
        assert!(
            e.contains("`SharedAccessKeyName`, `SharedAccessKey`"),
            "{e}"
        );
        assert!(!e.contains("without a scheme"), "{e}");
    }

    #[test]
    fn a_password_with_an_at_sign_is_not_shown() {
        let url = TransportUrl::parse("amqp://u:p@ss@host/%2f").unwrap();
        for shown in [url.to_string(), format!("{url:?}"), url.redacted()] {
            assert!(!shown.contains("ss@"), "{shown}");
            assert!(!shown.contains("p@ss"), "{shown}");
            assert!(shown.contains("host"), "{shown}");
        }
    }

    #[test]
    fn secrets_are_not_shown() {
        let url = TransportUrl::parse("amqp://app:s3cret@rabbit:5672/prod").unwrap();
        assert_eq!(url.to_string(), "amqp://app:***@rabbit:5672/prod");
        assert!(!format!("{url:?}").contains("s3cret"));
        let sb =
            TransportUrl::parse("Endpoint=sb://ns/;SharedAccessKeyName=k;SharedAccessKey=s3cret")
                .unwrap();
        assert_eq!(
            sb.to_string(),
            "Endpoint=sb://ns/;SharedAccessKeyName=k;SharedAccessKey=***"
        );
        assert_eq!(
            sb.expose(),
            "Endpoint=sb://ns/;SharedAccessKeyName=k;SharedAccessKey=s3cret"
        );
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn a_registered_transport_connects_through_its_connector() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        static CONNECTS: AtomicUsize = AtomicUsize::new(0);
        #[derive(Debug)]
        struct Counting;
        #[async_trait::async_trait]
        impl Connector for Counting {
            fn name(&self) -> &'static str {
                "counting"
            }
            fn accepts(&self, url: &str) -> bool {
                has_scheme(url, "counting")
            }
            fn redact(&self, _: &str) -> String {
                "counting://(hidden)".to_owned()
            }
            async fn connect(&self, url: &SecretUrl) -> Result<Arc<dyn Transport>, Error> {
                assert_eq!(url.expose(), "counting://token@somewhere");
                CONNECTS.fetch_add(1, Ordering::SeqCst);
                Ok(Arc::new(redeliver_memory::MemoryTransport::new()))
            }
        }

        assert!(TransportUrl::parse("counting://token@somewhere").is_err());
        register(Counting);
        let url = TransportUrl::parse("counting://token@somewhere").unwrap();
        assert_eq!(url.kind(), TransportKind::Registered("counting"));
        assert_eq!(url.to_string(), "counting://(hidden)");
        connect("counting://token@somewhere").await.unwrap();
        assert_eq!(CONNECTS.load(Ordering::SeqCst), 1);
        // A built-in scheme stays the built-in transport's.
        assert_eq!(
            TransportUrl::parse("memory://").unwrap().kind(),
            TransportKind::Memory
        );
    }

    #[test]
    fn a_disabled_feature_names_the_feature_to_enable() {
        let e = feature_disabled(TransportKind::RabbitMq).to_string();
        assert!(e.contains("enable the `rabbitmq` feature"), "{e}");
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_urls_connect() {
        let transport = connect("memory://").await.unwrap();
        assert_eq!(
            transport.capabilities().scheduling_precision,
            std::time::Duration::ZERO
        );
    }

    #[tokio::test]
    async fn an_empty_environment_variable_is_blamed_on_the_variable() {
        // The value as read (setting a variable needs `unsafe`, which the crate forbids).
        const VAR: &str = "REDELIVER_URL";
        let e = connect_env_value(VAR, "").await.err().unwrap();
        match &e {
            Error::Config { field, reason, .. } => {
                assert_eq!(field, VAR);
                assert!(reason.contains("empty"), "{reason}");
            }
            other => panic!("unexpected {other}"),
        }
        let e = connect_env_value(VAR, "localhost:5672")
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains(VAR), "{e}");
        assert!(!e.to_string().contains("`transport`"), "{e}");
    }

    #[tokio::test]
    async fn a_missing_environment_variable_is_named() {
        let e = connect_from_env("REDELIVER_TEST_SURELY_UNSET_VARIABLE")
            .await
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("REDELIVER_TEST_SURELY_UNSET_VARIABLE"),
            "{e}"
        );
    }
}
