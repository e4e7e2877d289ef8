//! Accepted connections: written at once, acknowledged at once, and with the few frames that
//! `fe2o3-amqp`'s acceptor cannot produce the Service Bus way corrected on the wire.
//!
//! # Prompt writes and acknowledgements
//!
//! `fe2o3-amqp` never sets `TCP_NODELAY` on the sockets it opens, so an `azservicebus` client
//! holds a small frame back (Nagle's algorithm) while an earlier one is unacknowledged. A
//! consumer writes two such frames per message (a disposition, then link credit), and with the
//! receiving side's delayed acknowledgement the second waited about 40 ms on Linux: a receiver
//! on loopback got about 25 messages/s. The broker therefore acknowledges what it reads at once
//! (`TCP_QUICKACK`, which Linux clears again after a while, so it is set after every read) and
//! writes without delay (`TCP_NODELAY`).
//!
//! # Frames corrected on the wire
//!
//! The acceptor API of `fe2o3-amqp` (0.14, and still 0.17, the newest read) has limits that
//! Microsoft's SDKs notice, with no public way around them inside the library:
//!
//! - its sender always uses a 4-byte counter as delivery tag. Service Bus uses the message's
//!   16-byte lock token (in .NET `Guid` byte order), and the Python and .NET SDKs take the lock
//!   token from the tag. The broker therefore rewrites the tag of every transfer that carries
//!   an `x-opt-lock-token` delivery annotation (the broker's own) to that token. Dispositions
//!   name deliveries by id, not by tag, so the library never sees the difference. To leave room
//!   for the longer first frame, the client's `max-frame-size` is announced to the library
//!   [`FRAME_GROWTH`] bytes smaller.
//! - it leaves out trailing fields of the message header that have their default value, so a
//!   first delivery had no `delivery-count`; the Python SDK reports that as `None`, where
//!   Service Bus says 0. The header of those transfers is written out in full.
//! - when a receiver in rcv-settle-mode second reports an outcome (an unsettled disposition),
//!   the session is meant to answer with a settled disposition, but its code drops the last
//!   (for a single delivery: the only) range of delivery ids, so nothing is sent. A client that
//!   waits for the answer (the Python SDK, 60 s, then it retries through the management link
//!   and gets "lock lost") never gets it. The broker therefore writes the settled disposition
//!   itself: for a peek-lock delivery once the outcome was applied ([`Tap::settled`]), with the
//!   client's outcome (a dead-letter as `rejected` without error, as Service Bus does), or
//!   `rejected` with `com.microsoft:message-lock-lost` if the lock was gone; for any other
//!   unsettled delivery at once.
//! - a frame for a session that the application has not accepted yet closes the whole
//!   connection with `amqp:not-found`; clients pipeline `begin` and `attach`. The frames of
//!   such a session are held back until the broker has answered its `begin`, and only those:
//!   see [`Inbound`] for the order the library then sees.
//!
//! Frames are parsed only as far as needed (the 8-byte frame header and the performative's
//! descriptor); others pass through untouched, and a stream that does not parse as AMQP frames
//! is passed through unchanged from that point on, for the library to refuse.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use fe2o3_amqp::types::definitions::{
    AmqpError, DeliveryNumber, DeliveryTag, Error as AmqpErrorFrame, ErrorCondition, Role,
};
use fe2o3_amqp::types::messaging::{DeliveryState, Header, Rejected};
use fe2o3_amqp::types::performatives::{Begin, Disposition, Open, Transfer};
use fe2o3_amqp::types::primitives::{OrderedMap, Symbol};
use serde_amqp::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;

/// How many bytes a rewritten first transfer frame may grow: the delivery tag (16 bytes
/// instead of 4) and the explicit header (up to 18 bytes instead of 1), with some margin.
pub(crate) const FRAME_GROWTH: u32 = 64;
/// How many bytes of a client's frames the broker buffers while it holds them back.
const MAX_HELD: usize = 16 * 1024 * 1024;
/// The smallest `max-frame-size` AMQP allows.
const MIN_MAX_FRAME_SIZE: u32 = 512;
/// Frames larger than this are passed through without being inspected.
const MAX_INSPECTED_FRAME: usize = 64 * 1024 * 1024;

const OPEN: u8 = 0x10;
const HEADER: [u8; 3] = [0x00, 0x53, 0x70];
const BEGIN: u8 = 0x11;
const TRANSFER: u8 = 0x14;
const DISPOSITION: u8 = 0x15;
const CLOSE: u8 = 0x18;

const LOCK_LOST: &str = "com.microsoft:message-lock-lost";

/// What the writer task writes.
enum Out {
    Bytes(Vec<u8>),
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
            Out::Bytes(bytes) => write!(f, "Bytes({})", bytes.len()),
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
            let _ = self.writer.send(Out::Bytes(frame(channel, &body)));
        }
    }

    /// Looks at a frame the broker writes; returns a replacement body if it must change.
    fn on_broker_frame(&self, channel: u16, code: u8, body: &[u8]) -> Option<Vec<u8>> {
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
    fn on_client_frame(&self, channel: u16, code: u8, body: &[u8]) -> Option<Vec<u8>> {
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

/// The client channel whose `begin` a `begin` of the broker answers.
fn answered_channel(body: &[u8]) -> Option<u16> {
    serde_amqp::from_slice::<Begin>(body).ok()?.remote_channel
}

fn is_terminal(state: &DeliveryState) -> bool {
    matches!(
        state,
        DeliveryState::Accepted(_)
            | DeliveryState::Rejected(_)
            | DeliveryState::Released(_)
            | DeliveryState::Modified(_)
    )
}

/// An AMQP frame (doff 2, type 0) on `channel` with `body`.
fn frame(channel: u16, body: &[u8]) -> Vec<u8> {
    let size = u32::try_from(body.len() + 8).unwrap_or(u32::MAX);
    let mut bytes = Vec::with_capacity(body.len() + 8);
    bytes.extend_from_slice(&size.to_be_bytes());
    bytes.extend_from_slice(&[2, 0]);
    bytes.extend_from_slice(&channel.to_be_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// The encoded length of the composite value (list or map) at the start of `bytes`.
fn composite_length(bytes: &[u8]) -> Option<usize> {
    match *bytes.first()? {
        0x45 => Some(1),
        0xc0 | 0xc1 => Some(2 + usize::from(*bytes.get(1)?)),
        0xd0 | 0xd1 => {
            let size = u32::from_be_bytes(bytes.get(1..5)?.try_into().ok()?);
            Some(5 + usize::try_from(size).ok()?)
        }
        _ => None,
    }
}

/// The length of the performative (descriptor and list) at the start of a frame body.
fn performative_length(body: &[u8]) -> Option<usize> {
    let fields = body.get(3..)?;
    let length = 3 + composite_length(fields)?;
    (length <= body.len()).then_some(length)
}

/// The `x-opt-lock-token` the broker put in the delivery annotations of a message, from the
/// start of its encoding (the first frame of a transfer is enough).
fn lock_token_in(payload: &[u8]) -> Option<[u8; 16]> {
    const DELIVERY_ANNOTATIONS: [u8; 3] = [0x00, 0x53, 0x71];
    const KEY: &[u8] = b"\xa3\x10x-opt-lock-token\x98";
    let mut rest = payload;
    if let Some(after) = rest.strip_prefix(&HEADER) {
        rest = after.get(composite_length(after)?..)?;
    }
    let map = rest.strip_prefix(&DELIVERY_ANNOTATIONS)?;
    let map = &map[..composite_length(map)?.min(map.len())];
    let at = map.windows(KEY.len()).position(|window| window == KEY)? + KEY.len();
    map.get(at..at + 16)?.try_into().ok()
}

/// A UUID's bytes in the order .NET's `Guid.ToByteArray` writes them (the first three fields
/// little-endian), which is how Service Bus puts a lock token into a delivery tag.
pub(crate) fn dotnet_guid_bytes(uuid: [u8; 16]) -> [u8; 16] {
    let mut bytes = uuid;
    bytes[0..4].reverse();
    bytes[4..6].reverse();
    bytes[6..8].reverse();
    bytes
}

/// The message encoding with its header section written out in full, if it has a shorter
/// one. `fe2o3-amqp` leaves out trailing fields that have their default value, so a first
/// delivery carried no `delivery-count`; Service Bus writes 0, and the Python SDK reports a
/// missing count as `None`.
fn with_explicit_header(payload: &[u8]) -> Option<Vec<u8>> {
    let fields = payload.strip_prefix(&HEADER)?;
    let end = HEADER.len() + composite_length(fields)?;
    let header: Header = serde_amqp::from_slice(payload.get(..end)?).ok()?;
    let boolean = |value: bool| if value { 0x41 } else { 0x42 };
    let mut list = vec![5, boolean(header.durable), 0x50, header.priority.0];
    match header.ttl {
        Some(ttl) => {
            list.push(0x70);
            list.extend_from_slice(&ttl.to_be_bytes());
        }
        None => list.push(0x40),
    }
    list.push(boolean(header.first_acquirer));
    list.push(0x70);
    list.extend_from_slice(&header.delivery_count.to_be_bytes());
    let mut encoded = HEADER.to_vec();
    encoded.push(0xc0);
    encoded.push(u8::try_from(list.len()).ok()?);
    encoded.extend_from_slice(&list);
    encoded.extend_from_slice(&payload[end..]);
    Some(encoded)
}

/// A disposition whose `rejected` error has string keys in its `info`, with those keys
/// turned into symbols. AMQP's `fields` are keyed by symbols, and `fe2o3-amqp` cannot decode
/// the frame otherwise (its session then stops answering), but the JavaScript SDK dead-letters
/// with string keys, which Service Bus accepts.
fn with_symbol_info_keys(body: &[u8]) -> Option<Vec<u8>> {
    let mut value: Value = serde_amqp::from_slice(body).ok()?;
    let Value::Described(disposition) = &mut value else {
        return None;
    };
    let Value::List(fields) = &mut disposition.value else {
        return None;
    };
    let Value::Described(state) = fields.get_mut(4)? else {
        return None;
    };
    let Value::List(state_fields) = &mut state.value else {
        return None;
    };
    let Value::Described(error) = state_fields.get_mut(0)? else {
        return None;
    };
    let Value::List(error_fields) = &mut error.value else {
        return None;
    };
    let Value::Map(info) = error_fields.get_mut(2)? else {
        return None;
    };
    if !info.keys().any(|key| matches!(key, Value::String(_))) {
        return None;
    }
    let mut fixed = OrderedMap::new();
    for (key, entry) in info.iter() {
        let key = match key {
            Value::String(name) => Value::Symbol(Symbol::from(name.as_str())),
            other => other.clone(),
        };
        fixed.insert(key, entry.clone());
    }
    *info = fixed;
    serde_amqp::to_vec(&value).ok()
}

/// What a [`Scanner`] found at the start of the bytes it writes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Not a frame: a protocol header, or the rest of a stream that does not parse.
    Raw,
    /// A frame on `channel`; `code` is the descriptor of its performative, if it is an AMQP
    /// frame with one (SASL frames and empty frames have none).
    Frame {
        channel: u16,
        amqp: bool,
        code: Option<u8>,
    },
}

/// Where a [`Scanner`] writes the stream: the bytes, told where each unit starts.
trait Sink {
    /// The bytes written next, up to the next call, are `unit`.
    fn start(&mut self, unit: Unit);
    fn write(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn start(&mut self, _: Unit) {}

    fn write(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Splits a byte stream into AMQP frames and lets a callback replace the bodies of the frames
/// it is interested in.
#[derive(Debug, Default)]
struct Scanner {
    /// Bytes of an incomplete frame.
    pending: Vec<u8>,
    /// Bytes of the current frame still to pass through uninspected.
    passing: usize,
    /// The stream did not parse: everything passes through.
    off: bool,
}

impl Scanner {
    fn feed(
        &mut self,
        mut data: &[u8],
        out: &mut impl Sink,
        interesting: impl Fn(u8) -> bool,
        mut inspect: impl FnMut(u16, u8, &[u8]) -> Option<Vec<u8>>,
    ) {
        loop {
            if self.off {
                out.write(&self.pending);
                self.pending.clear();
                out.write(data);
                return;
            }
            if self.passing > 0 {
                let n = self.passing.min(data.len());
                out.write(&data[..n]);
                data = &data[n..];
                self.passing -= n;
                if self.passing > 0 {
                    return;
                }
                continue;
            }
            self.pending.extend_from_slice(data);
            data = &[];
            if self.pending.len() < 8 {
                return;
            }
            if self.pending.starts_with(b"AMQP") {
                out.start(Unit::Raw);
                out.write(&self.pending[..8]);
                self.pending.drain(..8);
                continue;
            }
            let size = u32::from_be_bytes([
                self.pending[0],
                self.pending[1],
                self.pending[2],
                self.pending[3],
            ]);
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            let header = usize::from(self.pending[4]) * 4;
            let amqp = self.pending[5] == 0;
            if size < 8 || header < 8 || header > size {
                self.off = true;
                out.start(Unit::Raw);
                continue;
            }
            let code = if amqp && size >= header + 3 {
                let Some(descriptor) = self.pending.get(header..header + 3) else {
                    return;
                };
                (descriptor[0] == 0x00 && descriptor[1] == 0x53).then_some(descriptor[2])
            } else {
                None
            };
            let channel = u16::from_be_bytes([self.pending[6], self.pending[7]]);
            let inspected = code.filter(|code| interesting(*code) && size <= MAX_INSPECTED_FRAME);
            let Some(inspected) = inspected else {
                out.start(Unit::Frame {
                    channel,
                    amqp,
                    code,
                });
                let n = size.min(self.pending.len());
                out.write(&self.pending[..n]);
                self.pending.drain(..n);
                self.passing = size - n;
                continue;
            };
            if self.pending.len() < size {
                return;
            }
            let whole: Vec<u8> = self.pending.drain(..size).collect();
            out.start(Unit::Frame {
                channel,
                amqp,
                code,
            });
            match inspect(channel, inspected, &whole[header..]) {
                Some(body) => out.write(&frame(channel, &body)),
                None => out.write(&whole),
            }
        }
    }
}

/// What a frame means for the order of a client's frames (see [`Inbound`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Belongs to the whole connection: protocol headers, SASL, `open`, `close`.
    Connection,
    /// A `begin` on this channel: what follows on the channel waits for the broker's answer.
    Begin(u16),
    /// Any other frame of the session on this channel.
    Session(u16),
}

impl Place {
    fn of(unit: Unit) -> Self {
        match unit {
            Unit::Frame {
                channel,
                amqp: true,
                code,
            } => match code {
                Some(OPEN | CLOSE) => Place::Connection,
                Some(BEGIN) => Place::Begin(channel),
                _ => Place::Session(channel),
            },
            Unit::Raw | Unit::Frame { amqp: false, .. } => Place::Connection,
        }
    }
}

/// A frame held back, with its place.
#[derive(Debug)]
struct Held {
    place: Place,
    bytes: Vec<u8>,
}

/// A client's frames on their way to the library: a frame waits while it must not reach the
/// library yet, and only as long as that.
///
/// The frames of a session wait after its `begin` until the broker has answered it: clients
/// pipeline (the Python SDK sends `begin` and its first `attach` before the broker's `open` has
/// arrived), and `fe2o3-amqp`'s acceptor closes the connection with `amqp:not-found` when a
/// frame reaches a session it has not accepted yet. The order the library sees differs from
/// the client's only where AMQP allows it:
///
/// - the frames of one channel keep their order (a frame waits behind any earlier frame of its
///   channel that waits);
/// - frames of other channels do not wait for them: sessions are independent, and a session
///   that is established goes on (credit, settlements) while another one begins;
/// - a connection frame (`close`, `open`, SASL, a protocol header) keeps its place relative to
///   everything before it, and nothing after it overtakes it.
///
/// Every `begin` is answered, or the broker closes the connection: then everything is released.
#[derive(Debug, Default)]
struct Inbound {
    /// Bytes the library may read, in order.
    readable: Vec<u8>,
    /// Frames that wait, in the order they arrived; the last one may still be incomplete.
    held: VecDeque<Held>,
    /// How many frames of each channel wait, and how many connection frames.
    held_on: HashMap<u16, usize>,
    held_connection: usize,
    /// Bytes in `held`.
    held_bytes: usize,
    /// Client channels whose `begin` the library has been given and the broker has not answered.
    awaiting: HashSet<u16>,
    /// The bytes of the frame being scanned go to the last held frame, not to `readable`.
    current_held: bool,
    /// The broker closes the connection: nothing waits any more.
    released: bool,
}

impl Inbound {
    fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Whether a frame at `place` may go to the library after what is handed over already and
    /// what waits.
    fn passes(&self, place: Place) -> bool {
        if self.released {
            return true;
        }
        match place {
            Place::Connection => self.held.is_empty(),
            Place::Begin(channel) | Place::Session(channel) => {
                self.held_connection == 0
                    && !self.held_on.contains_key(&channel)
                    && !self.awaiting.contains(&channel)
            }
        }
    }

    fn hand_over(&mut self, place: Place, bytes: &[u8]) {
        if let (Place::Begin(channel), false) = (place, self.released) {
            self.awaiting.insert(channel);
        }
        self.readable.extend_from_slice(bytes);
    }

    fn hold(&mut self, held: Held) {
        match held.place {
            Place::Connection => self.held_connection += 1,
            Place::Begin(channel) | Place::Session(channel) => {
                *self.held_on.entry(channel).or_default() += 1;
            }
        }
        self.held_bytes += held.bytes.len();
        self.held.push_back(held);
    }

    /// The broker answered the `begin` of client `channel`.
    fn answered(&mut self, channel: u16) {
        if self.awaiting.remove(&channel) {
            self.release();
        }
    }

    /// The broker closes the connection: a `begin` it has not answered will not be, and the
    /// client's answer to the `close` must reach it.
    fn release_all(&mut self) {
        self.released = true;
        self.awaiting.clear();
        self.release();
    }

    /// Hands over every held frame that may go now, in order.
    fn release(&mut self) {
        let waiting = std::mem::take(&mut self.held);
        let last = waiting.len().saturating_sub(1);
        self.held_on.clear();
        self.held_connection = 0;
        self.held_bytes = 0;
        for (index, held) in waiting.into_iter().enumerate() {
            if self.passes(held.place) {
                self.hand_over(held.place, &held.bytes);
                if index == last {
                    // The rest of an incomplete frame follows it.
                    self.current_held = false;
                }
            } else {
                self.hold(held);
            }
        }
    }
}

impl Sink for Inbound {
    fn start(&mut self, unit: Unit) {
        let place = Place::of(unit);
        self.current_held = !self.passes(place);
        if self.current_held {
            self.hold(Held {
                place,
                bytes: Vec::new(),
            });
        } else {
            self.hand_over(place, &[]);
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        match self.held.back_mut() {
            Some(held) if self.current_held => {
                held.bytes.extend_from_slice(bytes);
                self.held_bytes += bytes.len();
            }
            _ => self.readable.extend_from_slice(bytes),
        }
    }
}

/// A client connection as the broker's `fe2o3-amqp` connection sees it: with the corrections
/// of the module docs, and a session's frames held back until the broker has answered its
/// `begin` (see [`Inbound`]).
#[derive(Debug)]
pub(crate) struct ClientStream {
    read: OwnedReadHalf,
    /// Read bytes, already inspected, on their way to the library.
    inbound: Inbound,
    /// The reader, woken when the broker's answer to a `begin` releases held frames.
    held_reader: Option<std::task::Waker>,
    read_scanner: Scanner,
    write_scanner: Scanner,
    tap: Arc<Tap>,
}

impl ClientStream {
    /// Wraps an accepted connection; the returned [`Tap`] confirms settlements on it.
    pub(crate) fn new(stream: TcpStream) -> (Self, Arc<Tap>) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        acknowledge_promptly(&stream);
        let (read, mut write) = stream.into_split();
        let (writer, mut outgoing) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(out) = outgoing.recv().await {
                match out {
                    Out::Bytes(bytes) => {
                        if write.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    Out::Shutdown => break,
                }
            }
            let _ = write.shutdown().await;
        });
        let tap = Arc::new(Tap {
            state: Mutex::new(TapState::default()),
            writer,
        });
        let stream = ClientStream {
            read,
            inbound: Inbound::default(),
            held_reader: None,
            read_scanner: Scanner::default(),
            write_scanner: Scanner::default(),
            tap: tap.clone(),
        };
        (stream, tap)
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        let _ = self.tap.writer.send(Out::Shutdown);
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn acknowledge_promptly(stream: &TcpStream) {
    // Best effort: without it the broker is only slower.
    let _ = stream.set_quickack(true);
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn acknowledge_promptly(_: &TcpStream) {}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let readable = &mut this.inbound.readable;
            if !readable.is_empty() {
                let n = readable.len().min(buf.remaining());
                buf.put_slice(&readable[..n]);
                readable.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.inbound.holding() {
                this.held_reader = Some(cx.waker().clone());
                if this.inbound.held_bytes > MAX_HELD {
                    return Poll::Pending;
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.read).poll_read(cx, &mut chunk_buf) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            let read = chunk_buf.filled();
            if read.is_empty() {
                // End of stream: the library sees the end; a partial frame is of no use.
                return Poll::Ready(Ok(()));
            }
            acknowledge_promptly(this.read.as_ref());
            let tap = &this.tap;
            this.read_scanner.feed(
                read,
                &mut this.inbound,
                |code| matches!(code, OPEN | BEGIN | DISPOSITION),
                |channel, code, body| tap.on_client_frame(channel, code, body),
            );
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.tap.writer.is_closed() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let mut out = Vec::new();
        let (tap, inbound) = (&this.tap, &mut this.inbound);
        let mut released = false;
        this.write_scanner.feed(
            buf,
            &mut out,
            |code| matches!(code, BEGIN | TRANSFER | CLOSE),
            |channel, code, body| {
                match code {
                    BEGIN => {
                        if let Some(client_channel) = answered_channel(body) {
                            inbound.answered(client_channel);
                            released = true;
                        }
                    }
                    CLOSE => {
                        inbound.release_all();
                        released = true;
                    }
                    _ => {}
                }
                tap.on_broker_frame(channel, code, body)
            },
        );
        if released && let Some(reader) = this.held_reader.take() {
            reader.wake();
        }
        if !out.is_empty() && this.tap.writer.send(Out::Bytes(out)).is_err() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.tap.writer.send(Out::Shutdown);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(remote_channel: Option<u16>) -> Vec<u8> {
        let begin = Begin {
            remote_channel,
            next_outgoing_id: 0,
            incoming_window: 100,
            outgoing_window: 100,
            handle_max: fe2o3_amqp::types::definitions::Handle(u32::MAX),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        serde_amqp::to_vec(&begin).unwrap()
    }

    async fn read_some(stream: &mut ClientStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("read in time")
            .unwrap();
        buf.truncate(n);
        buf
    }

    #[tokio::test]
    async fn frames_after_a_begin_wait_for_the_brokers_answer() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let (mut stream, _tap) = ClientStream::new(accepted);

        let client_begin = frame(3, &begin(None));
        let attach_like = frame(3, &[0x00, 0x53, 0x12, 0x45]);
        let mut sent = b"AMQP\x00\x01\x00\x00".to_vec();
        sent.extend_from_slice(&client_begin);
        sent.extend_from_slice(&attach_like);
        client.write_all(&sent).await.unwrap();

        let mut first = Vec::new();
        while first.len() < 8 + client_begin.len() {
            first.extend(read_some(&mut stream).await);
        }
        assert_eq!(
            first,
            sent[..8 + client_begin.len()],
            "up to the begin only"
        );

        // The broker answers the begin of client channel 3 on its channel 0.
        stream.write_all(&frame(0, &begin(Some(3)))).await.unwrap();
        assert_eq!(read_some(&mut stream).await, attach_like, "released");
    }

    #[tokio::test]
    async fn a_frame_of_an_established_session_does_not_wait_for_another_sessions_begin() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let (mut stream, _tap) = ClientStream::new(accepted);

        let mut opening = b"AMQP\x00\x01\x00\x00".to_vec();
        opening.extend_from_slice(&frame(0, &begin(None)));
        client.write_all(&opening).await.unwrap();
        let mut read = Vec::new();
        while read.len() < opening.len() {
            read.extend(read_some(&mut stream).await);
        }
        stream.write_all(&frame(0, &begin(Some(0)))).await.unwrap();

        // Session 1 begins; before the broker answers, session 0 grants credit.
        let begin_1 = frame(1, &begin(None));
        let attach_1 = frame(1, &[0x00, 0x53, 0x12, 0x45]);
        let flow_0 = frame(0, &[0x00, 0x53, 0x13, 0x45]);
        client
            .write_all(&[begin_1.clone(), attach_1.clone(), flow_0.clone()].concat())
            .await
            .unwrap();
        let mut read = Vec::new();
        while read.len() < begin_1.len() + flow_0.len() {
            read.extend(read_some(&mut stream).await);
        }
        assert_eq!(
            read,
            [begin_1, flow_0].concat(),
            "the flow overtakes the attach"
        );

        stream.write_all(&frame(1, &begin(Some(1)))).await.unwrap();
        assert_eq!(read_some(&mut stream).await, attach_1, "released");
    }

    /// Scans `frames` into `inbound`, in two parts split at `split` bytes.
    fn scan_into(inbound: &mut Inbound, frames: &[u8], split: usize) {
        let mut scanner = Scanner::default();
        for part in [&frames[..split], &frames[split..]] {
            scanner.feed(part, inbound, |code| code == BEGIN, |_, _, _| None);
        }
    }

    #[test]
    fn a_session_waits_for_its_begin_and_others_overtake_it() {
        let attach_1 = frame(1, &[0x00, 0x53, 0x12, 0x45]);
        let flow_1 = frame(1, &[0x00, 0x53, 0x13, 0x45]);
        let flow_0 = frame(0, &[0x00, 0x53, 0x13, 0x45]);
        let frames = [
            frame(1, &begin(None)),
            attach_1.clone(),
            flow_0.clone(),
            flow_1.clone(),
        ]
        .concat();
        for split in 0..frames.len() {
            let mut inbound = Inbound::default();
            scan_into(&mut inbound, &frames, split);
            assert_eq!(
                inbound.readable,
                [frame(1, &begin(None)), flow_0.clone()].concat(),
                "split at {split}"
            );
            inbound.answered(1);
            assert_eq!(
                inbound.readable,
                [
                    frame(1, &begin(None)),
                    flow_0.clone(),
                    attach_1.clone(),
                    flow_1.clone()
                ]
                .concat(),
                "split at {split}: channel 1 in order after its answer"
            );
            assert!(!inbound.holding());
        }
    }

    #[test]
    fn a_close_keeps_its_place_behind_held_frames() {
        let attach_1 = frame(1, &[0x00, 0x53, 0x12, 0x45]);
        let close = frame(0, &[0x00, 0x53, 0x18, 0x45]);
        let flow_2 = frame(2, &[0x00, 0x53, 0x13, 0x45]);
        let frames = [
            frame(1, &begin(None)),
            attach_1.clone(),
            close.clone(),
            flow_2.clone(),
        ]
        .concat();
        let mut inbound = Inbound::default();
        scan_into(&mut inbound, &frames, frames.len());
        assert_eq!(
            inbound.readable,
            frame(1, &begin(None)),
            "nothing passes the close"
        );
        inbound.answered(1);
        assert_eq!(inbound.readable, frames, "in the client's order");
    }

    #[test]
    fn a_close_with_nothing_held_before_it_passes_at_once() {
        let close = frame(0, &[0x00, 0x53, 0x18, 0x45]);
        let frames = [frame(1, &begin(None)), close].concat();
        let mut inbound = Inbound::default();
        scan_into(&mut inbound, &frames, 3);
        assert_eq!(inbound.readable, frames);
        assert!(!inbound.holding());
    }

    #[test]
    fn the_brokers_close_releases_everything() {
        let attach_1 = frame(1, &[0x00, 0x53, 0x12, 0x45]);
        let begin_3 = frame(3, &begin(None));
        let frames = [frame(1, &begin(None)), attach_1.clone()].concat();
        let mut scanner = Scanner::default();
        let mut inbound = Inbound::default();
        let mut feed = |inbound: &mut Inbound, bytes: &[u8]| {
            scanner.feed(bytes, inbound, |code| code == BEGIN, |_, _, _| None);
        };
        // The attach is still incomplete when the close releases it; its rest follows.
        feed(&mut inbound, &frames[..frames.len() - 1]);
        assert!(inbound.holding());
        inbound.release_all();
        feed(&mut inbound, &frames[frames.len() - 1..]);
        feed(&mut inbound, &[begin_3.clone(), attach_1.clone()].concat());
        assert_eq!(inbound.readable, [frames, begin_3, attach_1].concat());
        assert!(!inbound.holding());
    }

    #[test]
    fn a_short_header_is_written_in_full() {
        let rest = [0x00, 0x53, 0x75, 0xa0, 1, b'x'];
        let mut payload = HEADER.to_vec();
        payload.push(0x45); // an empty list: every field at its default
        payload.extend_from_slice(&rest);
        let explicit = with_explicit_header(&payload).expect("rewritten");
        let header: Header =
            serde_amqp::from_slice(&explicit[..explicit.len() - rest.len()]).expect("a header");
        assert_eq!(header.delivery_count, 0);
        assert_eq!(header.priority.0, 4);
        assert_eq!(
            &explicit[..HEADER.len() + 3],
            &[0x00, 0x53, 0x70, 0xc0, 11, 5],
            "five fields on the wire"
        );
        assert_eq!(&explicit[explicit.len() - rest.len()..], &rest);
    }

    #[test]
    fn string_keys_of_a_dead_letter_error_become_symbols() {
        // The frame body the JavaScript SDK 7.9.5 writes to dead-letter delivery 1.
        let hex = "005315d00000007b00000005415201520142005325d0000000690000000100531dd00000005d\
                   00000003a319636f6d2e6d6963726f736f66743a646561642d6c657474657240d10000003800\
                   000004a110446561644c6574746572526561736f6ea10172a11a446561644c65747465724572\
                   726f724465736372697074696f6ea10164";
        let hex: String = hex.split_whitespace().collect::<Vec<_>>().concat();
        let body: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert!(serde_amqp::from_slice::<Disposition>(&body).is_err());
        let fixed = with_symbol_info_keys(&body).expect("rewritten");
        let disposition: Disposition = serde_amqp::from_slice(&fixed).expect("decodes");
        let Some(DeliveryState::Rejected(Rejected { error: Some(error) })) = disposition.state
        else {
            panic!("a rejected state");
        };
        let info = error.info.expect("info");
        assert_eq!(
            info.get(&Symbol::from("DeadLetterReason")),
            Some(&Value::String("r".into()))
        );
        assert_eq!(disposition.first, 1);
    }

    #[test]
    fn dotnet_order_reverses_the_first_three_fields() {
        let uuid: [u8; 16] = std::array::from_fn(|i| u8::try_from(i).unwrap());
        assert_eq!(
            dotnet_guid_bytes(uuid),
            [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15]
        );
    }

    #[test]
    fn frames_split_anywhere_come_out_whole_and_unchanged() {
        let frames = [
            b"AMQP\x00\x01\x00\x00".to_vec(),
            frame(3, &[0x00, 0x53, 0x13, 0x45]),
            frame(0, &[]),
            frame(1, &[0x00, 0x53, 0x15, 0x45]),
        ]
        .concat();
        for split in 0..frames.len() {
            let mut scanner = Scanner::default();
            let mut out = Vec::new();
            let mut seen = Vec::new();
            for part in [&frames[..split], &frames[split..]] {
                scanner.feed(
                    part,
                    &mut out,
                    |code| code == DISPOSITION,
                    |channel, code, body| {
                        seen.push((channel, code, body.to_vec()));
                        None
                    },
                );
            }
            assert_eq!(out, frames, "split at {split}");
            assert_eq!(seen, vec![(1, DISPOSITION, vec![0x00, 0x53, 0x15, 0x45])]);
        }
    }

    #[test]
    fn a_stream_that_is_not_amqp_passes_through() {
        let mut scanner = Scanner::default();
        let mut out = Vec::new();
        let garbage = b"\x00\x00\x00\x03garbage and more".to_vec();
        scanner.feed(
            &garbage,
            &mut out,
            |_| true,
            |_, _, _| panic!("not a frame"),
        );
        assert_eq!(out, garbage);
    }

    #[test]
    fn the_lock_token_is_found_after_the_header() {
        let token: [u8; 16] = [7; 16];
        let mut map = vec![0xc1, 0, 1];
        map.extend_from_slice(b"\xa3\x10x-opt-lock-token\x98");
        map.extend_from_slice(&token);
        map[1] = u8::try_from(map.len() - 2).unwrap();
        let mut payload = vec![0x00, 0x53, 0x70, 0xc0, 2, 1, 0x41];
        payload.extend_from_slice(&[0x00, 0x53, 0x71]);
        payload.extend_from_slice(&map);
        payload.extend_from_slice(&[0x00, 0x53, 0x75, 0xa0, 1, b'x']);
        assert_eq!(lock_token_in(&payload), Some(token));
        assert_eq!(lock_token_in(&payload[7..]), Some(token), "without header");
        assert_eq!(
            lock_token_in(&payload[..7]),
            None,
            "no delivery annotations"
        );
    }
}
