//! The `servicebus-test-broker` binary: entities from flags, connection string on stdout.
#![allow(missing_docs)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use fe2o3_amqp::{Connection, Sender, Session};

#[tokio::test]
async fn binary_creates_entities_from_flags_and_prints_the_connection_string() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_servicebus-test-broker"))
        .args([
            "--address",
            "127.0.0.1:0",
            "--queue",
            "orders,lock=2,max-delivery=3",
            "--topic",
            "events",
            "--subscription",
            "events/all,forward-to=orders,subject=order",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut connection_string = String::new();
    stdout.read_line(&mut connection_string).unwrap();
    let mut listening = String::new();
    stderr.read_line(&mut listening).unwrap();

    let result = async {
        assert!(
            connection_string.starts_with("Endpoint=sb://127.0.0.1/;SharedAccessKeyName="),
            "{connection_string:?} / {listening:?}"
        );
        let address = listening
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split(';').next())
            .expect("listening line names the address");
        let mut connection =
            Connection::open("binary-test", format!("amqp://any:any@{address}").as_str())
                .await
                .unwrap();
        let mut session = Session::begin(&mut connection).await.unwrap();
        let orders = Sender::attach(&mut session, "orders", "orders").await;
        let events = Sender::attach(&mut session, "events", "events").await;
        let missing = Sender::attach(&mut session, "missing", "missing").await;
        (orders.is_ok(), events.is_ok(), missing.is_ok())
    }
    .await;
    child.kill().expect("broker process stops");
    child.wait().unwrap();
    assert_eq!(result, (true, true, false));
}

#[test]
fn binary_rejects_unknown_flags_with_usage() {
    let output = Command::new(env!("CARGO_BIN_EXE_servicebus-test-broker"))
        .args(["--bogus", "x"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("usage:"));
}
