//! AMQP plumbing on top of `fe2o3-amqp`'s acceptor API: the listener, the timers, and each
//! connection with its sessions. What a link does is decided by its route (`route`) and
//! carried out by one task per link (`requests`, `ingress`, `egress`).

mod egress;
mod ingress;
mod requests;
mod route;
mod session;

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, SaslAcceptor, SessionAcceptor, sasl_acceptor::SaslServerFrame,
};
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::shared::Shared;
use crate::socket::ClientStream;
use crate::state::now_ms;

use self::requests::ReplyLinks;
use self::session::handle_session;

/// Accepts SASL ANONYMOUS and PLAIN with any credentials: the broker is for tests.
#[derive(Debug, Clone, Default)]
struct AnyCredentials;

impl SaslAcceptor for AnyCredentials {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from("ANONYMOUS"), Symbol::from("PLAIN")])
    }

    fn on_init(&mut self, _init: SaslInit) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Ok,
            additional_data: None,
        })
    }
}

/// Expires locks and releases scheduled messages on time.
pub(crate) async fn run_timers(shared: Arc<Shared>) {
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let next = {
            let mut state = shared.state();
            let changed = state.process_due(Instant::now(), now_ms());
            let next = state.next_deadline();
            drop(state);
            if changed {
                shared.changed.notify_waiters();
            }
            next
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = &mut notified => {}
                }
            }
            None => notified.await,
        }
    }
}

/// Accepts connections until the task is aborted; dropping it ends every connection task.
pub(crate) async fn run_listener(listener: TcpListener, shared: Arc<Shared>, latency: Duration) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    connections.spawn(handle_connection(stream, shared.clone(), latency));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle_connection(stream: TcpStream, shared: Arc<Shared>, latency: Duration) {
    let acceptor = ConnectionAcceptor::builder()
        .container_id("servicebus-test-broker")
        .sasl_acceptor(AnyCredentials)
        .build();
    let (stream, tap) = ClientStream::new(stream, latency);
    let mut connection = match acceptor.accept(stream).await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%error, "connection not opened");
            return;
        }
    };
    let replies = Arc::new(ReplyLinks::default());
    let mut sessions = JoinSet::new();
    let session_acceptor = SessionAcceptor::new();
    while let Some(incoming) = connection.next_incoming_session().await {
        while sessions.try_join_next().is_some() {}
        match session_acceptor
            .accept_incoming_session(incoming, &mut connection)
            .await
        {
            Ok(session) => {
                sessions.spawn(handle_session(
                    session,
                    shared.clone(),
                    replies.clone(),
                    tap.clone(),
                ));
            }
            Err(error) => {
                tracing::debug!(%error, "session not begun");
                break;
            }
        }
    }
    let _ = connection.close().await;
}
