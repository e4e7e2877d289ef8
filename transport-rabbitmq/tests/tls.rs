//! `amqps://` against the local broker: the test puts its own TLS-terminating proxy (rustls, with
//! a throw-away CA made by rcgen) in front of the broker's plain AMQP port, so the broker's
//! configuration is never touched. Without a broker the test says so on stderr and skips, unless
//! `REDELIVER_REQUIRE_BROKERS=1`.

mod common;

use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use redeliver_core::{ConsumeOptions, Error, Message, Source, Topology};
use redeliver_rabbitmq::{RabbitMqOptions, RabbitMqTransport};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use common::{Fixture, amqp_url, bounded, broker_addr, broker_available, test_options};

/// A CA and a server certificate for 127.0.0.1 signed by it.
struct Pki {
    ca_pem: String,
    server_config: Arc<ServerConfig>,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "redeliver test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("a CA key"))
        .expect("the CA certificate");
    let server_key = KeyPair::generate().expect("a server key");
    let server_cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("server parameters")
        .signed_by(&server_key, &ca)
        .expect("the server certificate");
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let server_config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![server_cert.der().clone(), ca.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .expect("the server's TLS configuration");
    Pki {
        ca_pem: ca.pem(),
        server_config: Arc::new(server_config),
    }
}

/// Accepts TLS on a local port and forwards the plain bytes to the broker.
struct TlsProxy {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    async fn start(config: Arc<ServerConfig>) -> TlsProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the TLS proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let acceptor = TlsAcceptor::from(config);
        let handshakes = Arc::new(AtomicUsize::new(0));
        let upstream = broker_addr();
        let task = tokio::spawn({
            let handshakes = Arc::clone(&handshakes);
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (acceptor, handshakes) = (acceptor.clone(), Arc::clone(&handshakes));
                    tokio::spawn(async move {
                        // A client that does not trust the certificate fails here.
                        let Ok(mut client) = acceptor.accept(client).await else {
                            return;
                        };
                        handshakes.fetch_add(1, Ordering::SeqCst);
                        let Ok(mut broker) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                    });
                }
            }
        });
        TlsProxy {
            addr,
            handshakes,
            task,
        }
    }

    /// The broker's URL through the proxy, with TLS.
    fn url(&self) -> String {
        let uri: lapin::uri::AMQPUri = amqp_url().parse().expect("AMQP_URL parses");
        let vhost = uri.vhost.replace('/', "%2f");
        format!(
            "amqps://{}:{}@{}/{vhost}",
            uri.authority.userinfo.username, uri.authority.userinfo.password, self.addr
        )
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_sends_and_receives() {
    if !broker_available().await {
        return;
    }
    let pki = pki();
    let proxy = TlsProxy::start(Arc::clone(&pki.server_config)).await;
    let options = test_options(proxy.url()).with_ca_certificate(pki.ca_pem.clone());
    let fx = Fixture::with_options(options).await;
    fx.declare(&Topology::new().endpoint("secure")).await;
    let transport = fx.transport();
    transport
        .send("secure", Message::new("over TLS").with_header("k", "v"))
        .await
        .expect("send over amqps://");
    let mut stream = transport
        .consume(&Source::endpoint("secure"), ConsumeOptions::default())
        .await
        .expect("consume over amqps://");
    let delivery = bounded("a delivery over amqps://", stream.next())
        .await
        .expect("the stream goes on")
        .expect("a delivery");
    assert_eq!(delivery.message().body().as_ref(), b"over TLS");
    assert_eq!(delivery.message().headers().get("k"), Some("v"));
    delivery.complete().await.expect("complete");
    drop(stream);
    assert!(
        proxy.handshakes.load(Ordering::SeqCst) >= 1,
        "the transport went through the TLS proxy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_refuses_a_certificate_it_does_not_trust() {
    if !broker_available().await {
        return;
    }
    let pki = pki();
    let proxy = TlsProxy::start(Arc::clone(&pki.server_config)).await;
    // Another CA than the one that signed the proxy's certificate.
    let other = pki_other_ca();
    let options = RabbitMqOptions::new(proxy.url())
        .with_ca_certificate(other)
        .with_connect_attempts(1, Duration::from_millis(10));
    let e = RabbitMqTransport::connect(options)
        .await
        .expect_err("an untrusted certificate is refused");
    assert!(matches!(e, Error::Connection { .. }), "{e:?}");
    let mut chain = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        chain.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert!(chain.to_lowercase().contains("certificate"), "{chain}");
    let uri: lapin::uri::AMQPUri = amqp_url().parse().expect("AMQP_URL parses");
    let password = uri.authority.userinfo.password;
    assert!(!chain.contains(&format!(":{password}@")), "{chain}");
    assert_eq!(proxy.handshakes.load(Ordering::SeqCst), 0);
}

fn pki_other_ca() -> String {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a key"))
        .expect("a CA certificate")
        .pem()
}

#[test]
fn a_ca_certificate_is_checked_with_the_options() {
    let config_field = |options: RabbitMqOptions| match options.validate() {
        Err(Error::Config { field, reason, .. }) => (field, reason),
        other => panic!("{other:?}"),
    };
    let (field, message) = config_field(
        RabbitMqOptions::new("amqps://127.0.0.1:5671/%2f").with_ca_certificate("not a PEM file"),
    );
    assert_eq!(field, "ca_certificate");
    assert!(message.contains("no PEM certificate"), "{message}");
    let (field, message) = config_field(
        RabbitMqOptions::new("amqp://127.0.0.1:5672/%2f").with_ca_certificate(pki_other_ca()),
    );
    assert_eq!(field, "ca_certificate");
    assert!(message.contains("amqps://"), "{message}");
    assert!(
        RabbitMqOptions::new("amqps://127.0.0.1:5671/%2f")
            .with_ca_certificate(pki_other_ca())
            .validate()
            .is_ok()
    );
}
