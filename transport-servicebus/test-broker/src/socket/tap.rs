//! The corrections of one connection's frames (see the module docs of `socket`): delivery tags,
//! message headers, the announced frame size, and the settled dispositions the library does
//! not write.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use fe2o3_amqp::types::definitions::{
    AmqpError, DeliveryNumber, DeliveryTag, Error as AmqpErrorFrame, ErrorCondition, Role,
};
use fe2o3_amqp::types::messaging::{DeliveryState, Rejected};
use fe2o3_amqp::types::performatives::{Begin, Disposition, Open, Transfer};
use fe2o3_amqp::types::primitives::Symbol;
use tokio::sync::mpsc;

use super::body::{
    answered_channel, dotnet_guid_bytes, is_terminal, lock_token_in, with_explicit_header,
    with_symbol_info_keys,
};
use super::frame::{BEGIN, DISPOSITION, OPEN, TRANSFER, frame, performative_length};

/// How many bytes a rewritten first transfer frame may grow: the delivery tag (16 bytes
/// instead of 4) and the explicit header (up to 18 bytes instead of 1), with some margin.
pub(super) const FRAME_GROWTH: u32 = 64;
/// The smallest `max-frame-size` AMQP allows.
const MIN_MAX_FRAME_SIZE: u32 = 512;

const LOCK_LOST: &str = "com.microsoft:message-lock-lost";

/// What the writer task writes.
pub(super) enum Out {
    /// Bytes, with the instant they were queued.
    Bytes(Instant, Vec<u8>),
    Shutdown,
}

/// A client's settled-disposition answer waiting for the broker to apply the outcome.
#[derive(Debug)]
struct Echo {
    channel: u16,
    delivery_id: DeliveryNumber,
    state: DeliveryState,
}

#[derive(Debug, Default)]
struct TapState {
    /// The client's outgoing channel of a session → the broker's outgoing channel of it.
    channels: HashMap<u16, u16>,
    /// Unsettled transfers of the broker that the client has not settled yet, by the broker's
    /// channel and delivery id, with the lock token of peek-lock deliveries.
    unsettled: HashMap<(u16, DeliveryNumber), Option<[u8; 16]>>,
    /// Answers waiting for [`Tap::settled`], by lock token.
    echoes: HashMap<[u8; 16], Echo>,
    /// The rewritten tag of a transfer that continues in further frames, by channel and handle.
    continuing: HashMap<(u16, u32), DeliveryTag>,
}

/// The wire-level corrections of one connection (see the module docs).
#[derive(Debug)]
pub(crate) struct Tap {
    state: Mutex<TapState>,
    writer: mpsc::UnboundedSender<Out>,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Out::Bytes(_, bytes) => write!(f, "Bytes({})", bytes.len()),
            Out::Shutdown => f.write_str("Shutdown"),
        }
    }
}

/// How the broker dealt with the outcome a client reported for a peek-lock delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Applied: the client's outcome is confirmed.
    Yes,
    /// Not applied because the lock had expired or the message was settled already.
    LockLost,
    /// Not applied because the operation is not allowed (a description says why).
    NotAllowed(&'static str),
    /// The delivery is gone with its link; nothing is confirmed.
    Forget,
}

impl Tap {
    /// The corrections of a connection whose frames to the client go to `writer`.
    pub(super) fn new(writer: mpsc::UnboundedSender<Out>) -> Self {
        Tap {
            state: Mutex::new(TapState::default()),
            writer,
        }
    }

    /// Queues bytes for the client; `false` once the connection's writer has stopped.
    pub(super) fn write(&self, bytes: Vec<u8>) -> bool {
        self.writer.send(Out::Bytes(Instant::now(), bytes)).is_ok()
    }

    /// Whether the connection's writer has stopped.
    pub(super) fn is_closed(&self) -> bool {
        self.writer.is_closed()
    }

    /// Makes the writer shut the connection down after what it has queued.
    pub(super) fn shut_down(&self) {
        let _ = self.writer.send(Out::Shutdown);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TapState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Confirms (or refuses) the outcome the client reported for the delivery of `token`.
    pub(crate) fn settled(&self, token: [u8; 16], applied: Applied) {
        let Some(echo) = self.lock().echoes.remove(&token) else {
            return;
        };
        let state = match applied {
            // Service Bus confirms a dead-letter as `rejected` without an error: an error
            // would report a settlement it could not apply.
            Applied::Yes => match echo.state {
                DeliveryState::Rejected(_) => DeliveryState::Rejected(Rejected { error: None }),
                other => other,
            },
            Applied::NotAllowed(description) => DeliveryState::Rejected(Rejected {
                error: Some(AmqpErrorFrame::new(
                    AmqpError::NotAllowed,
                    description.to_owned(),
                    None,
                )),
            }),
            Applied::LockLost => DeliveryState::Rejected(Rejected {
                error: Some(AmqpErrorFrame::new(
                    ErrorCondition::Custom(Symbol::from(LOCK_LOST)),
                    "The lock supplied is invalid. Either the lock expired, or the message has \
                     already been removed from the queue."
                        .to_owned(),
                    None,
                )),
            }),
            Applied::Forget => return,
        };
        self.write_disposition(echo.channel, echo.delivery_id, state);
    }

    fn write_disposition(&self, channel: u16, delivery_id: DeliveryNumber, state: DeliveryState) {
        let disposition = Disposition {
            role: Role::Sender,
            first: delivery_id,
            last: None,
            settled: true,
            state: Some(state),
            batchable: false,
        };
        if let Ok(body) = serde_amqp::to_vec(&disposition) {
            self.write(frame(channel, &body));
        }
    }

    /// Looks at a frame the broker writes; returns a replacement body if it must change.
    pub(super) fn on_broker_frame(&self, channel: u16, code: u8, body: &[u8]) -> Option<Vec<u8>> {
        match code {
            BEGIN => {
                let mut state = self.lock();
                // A new session on this channel: forget what an earlier one left behind.
                state.unsettled.retain(|(c, _), _| *c != channel);
                state.continuing.retain(|(c, _), _| *c != channel);
                if let Some(remote) = answered_channel(body) {
                    state.channels.insert(remote, channel);
                }
                None
            }
            TRANSFER => self.on_broker_transfer(channel, body),
            _ => None,
        }
    }

    fn on_broker_transfer(&self, channel: u16, body: &[u8]) -> Option<Vec<u8>> {
        let length = performative_length(body)?;
        let (performative, payload) = body.split_at(length);
        let mut transfer: Transfer = serde_amqp::from_slice(performative).ok()?;
        let key = (channel, transfer.handle.0);
        let mut state = self.lock();
        let mut explicit = None;
        let tag = match transfer.delivery_id {
            Some(delivery_id) => {
                let token = lock_token_in(payload);
                if token.is_some() {
                    explicit = with_explicit_header(payload);
                }
                if transfer.settled != Some(true) {
                    state.unsettled.insert((channel, delivery_id), token);
                }
                let tag = DeliveryTag::from(dotnet_guid_bytes(token?).to_vec());
                if transfer.more {
                    state.continuing.insert(key, tag.clone());
                }
                tag
            }
            None => {
                let tag = if transfer.more {
                    state.continuing.get(&key).cloned()
                } else {
                    state.continuing.remove(&key)
                }?;
                transfer.delivery_tag.as_ref()?;
                tag
            }
        };
        drop(state);
        transfer.delivery_tag = Some(tag);
        let mut rewritten = serde_amqp::to_vec(&transfer).ok()?;
        rewritten.extend_from_slice(explicit.as_deref().unwrap_or(payload));
        Some(rewritten)
    }

    /// Looks at a frame the client wrote; returns a replacement body if it must change.
    pub(super) fn on_client_frame(&self, channel: u16, code: u8, body: &[u8]) -> Option<Vec<u8>> {
        match code {
            BEGIN => {
                let begin: Begin = serde_amqp::from_slice(body).ok()?;
                if begin.remote_channel.is_none() {
                    self.lock().channels.remove(&channel);
                }
                None
            }
            OPEN => {
                let mut open: Open = serde_amqp::from_slice(body).ok()?;
                let announced = open.max_frame_size.0;
                if announced == u32::MAX {
                    return None;
                }
                open.max_frame_size.0 = announced
                    .saturating_sub(FRAME_GROWTH)
                    .max(MIN_MAX_FRAME_SIZE);
                serde_amqp::to_vec(&open).ok()
            }
            DISPOSITION => match serde_amqp::from_slice::<Disposition>(body) {
                Ok(disposition) => {
                    self.on_client_disposition(channel, disposition);
                    None
                }
                Err(_) => {
                    let fixed = with_symbol_info_keys(body)?;
                    let disposition: Disposition = serde_amqp::from_slice(&fixed).ok()?;
                    self.on_client_disposition(channel, disposition);
                    Some(fixed)
                }
            },
            _ => None,
        }
    }

    fn on_client_disposition(&self, client_channel: u16, disposition: Disposition) {
        // Only a receiver's dispositions concern the broker's transfers.
        if disposition.role != Role::Receiver {
            return;
        }
        let mut state = self.lock();
        let Some(&channel) = state.channels.get(&client_channel) else {
            return;
        };
        let first = disposition.first;
        let last = disposition.last.unwrap_or(first);
        let ids: Vec<DeliveryNumber> = state
            .unsettled
            .keys()
            .filter(|(c, id)| *c == channel && (first..=last).contains(id))
            .map(|(_, id)| *id)
            .collect();
        let answer_now =
            !disposition.settled && disposition.state.as_ref().is_some_and(is_terminal);
        let mut immediate = Vec::new();
        for delivery_id in ids {
            let Some(token) = state.unsettled.remove(&(channel, delivery_id)) else {
                continue;
            };
            let (true, Some(outcome)) = (answer_now, disposition.state.clone()) else {
                continue;
            };
            match token {
                Some(token) => {
                    state.echoes.insert(
                        token,
                        Echo {
                            channel,
                            delivery_id,
                            state: outcome,
                        },
                    );
                }
                None => immediate.push((delivery_id, outcome)),
            }
        }
        drop(state);
        for (delivery_id, outcome) in immediate {
            self.write_disposition(channel, delivery_id, outcome);
        }
    }
}
