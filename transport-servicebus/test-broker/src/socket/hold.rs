//! Holding back the frames of a session until the broker has answered its `begin`, and only
//! those: see [`Inbound`].

use std::collections::{HashMap, HashSet, VecDeque};

use super::frame::{BEGIN, CLOSE, OPEN, Sink, Unit};

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
pub(super) struct Inbound {
    /// Bytes the library may read, in order.
    pub(super) readable: Vec<u8>,
    /// Frames that wait, in the order they arrived; the last one may still be incomplete.
    held: VecDeque<Held>,
    /// How many frames of each channel wait, and how many connection frames.
    held_on: HashMap<u16, usize>,
    held_connection: usize,
    /// Bytes in `held`.
    pub(super) held_bytes: usize,
    /// Client channels whose `begin` the library has been given and the broker has not answered.
    awaiting: HashSet<u16>,
    /// The bytes of the frame being scanned go to the last held frame, not to `readable`.
    current_held: bool,
    /// The broker closes the connection: nothing waits any more.
    released: bool,
}

impl Inbound {
    pub(super) fn holding(&self) -> bool {
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
    pub(super) fn answered(&mut self, channel: u16) {
        if self.awaiting.remove(&channel) {
            self.release();
        }
    }

    /// The broker closes the connection: a `begin` it has not answered will not be, and the
    /// client's answer to the `close` must reach it.
    pub(super) fn release_all(&mut self) {
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

#[cfg(test)]
mod tests {
    use super::super::frame::{Scanner, begin_body, frame};
    use super::*;

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
            frame(1, &begin_body(None)),
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
                [frame(1, &begin_body(None)), flow_0.clone()].concat(),
                "split at {split}"
            );
            inbound.answered(1);
            assert_eq!(
                inbound.readable,
                [
                    frame(1, &begin_body(None)),
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
            frame(1, &begin_body(None)),
            attach_1.clone(),
            close.clone(),
            flow_2.clone(),
        ]
        .concat();
        let mut inbound = Inbound::default();
        scan_into(&mut inbound, &frames, frames.len());
        assert_eq!(
            inbound.readable,
            frame(1, &begin_body(None)),
            "nothing passes the close"
        );
        inbound.answered(1);
        assert_eq!(inbound.readable, frames, "in the client's order");
    }

    #[test]
    fn a_close_with_nothing_held_before_it_passes_at_once() {
        let close = frame(0, &[0x00, 0x53, 0x18, 0x45]);
        let frames = [frame(1, &begin_body(None)), close].concat();
        let mut inbound = Inbound::default();
        scan_into(&mut inbound, &frames, 3);
        assert_eq!(inbound.readable, frames);
        assert!(!inbound.holding());
    }

    #[test]
    fn the_brokers_close_releases_everything() {
        let attach_1 = frame(1, &[0x00, 0x53, 0x12, 0x45]);
        let begin_3 = frame(3, &begin_body(None));
        let frames = [frame(1, &begin_body(None)), attach_1.clone()].concat();
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
}
