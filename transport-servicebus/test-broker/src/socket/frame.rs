//! AMQP frames, read only as far as the corrections need: the 8-byte frame header and the
//! descriptor of the performative. [`Scanner`] splits a byte stream into frames and lets a
//! callback replace the bodies of the frames it is interested in.

/// Frames larger than this are passed through without being inspected.
pub(super) const MAX_INSPECTED_FRAME: usize = 64 * 1024 * 1024;

pub(super) const OPEN: u8 = 0x10;
pub(super) const BEGIN: u8 = 0x11;
pub(super) const TRANSFER: u8 = 0x14;
pub(super) const DISPOSITION: u8 = 0x15;
pub(super) const CLOSE: u8 = 0x18;

/// An AMQP frame (doff 2, type 0) on `channel` with `body`.
pub(super) fn frame(channel: u16, body: &[u8]) -> Vec<u8> {
    let size = u32::try_from(body.len() + 8).unwrap_or(u32::MAX);
    let mut bytes = Vec::with_capacity(body.len() + 8);
    bytes.extend_from_slice(&size.to_be_bytes());
    bytes.extend_from_slice(&[2, 0]);
    bytes.extend_from_slice(&channel.to_be_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// The encoded length of the composite value (list or map) at the start of `bytes`.
pub(super) fn composite_length(bytes: &[u8]) -> Option<usize> {
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
pub(super) fn performative_length(body: &[u8]) -> Option<usize> {
    let fields = body.get(3..)?;
    let length = 3 + composite_length(fields)?;
    (length <= body.len()).then_some(length)
}

/// What a [`Scanner`] found at the start of the bytes it writes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
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
pub(super) trait Sink {
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
pub(super) struct Scanner {
    /// Bytes of an incomplete frame.
    pending: Vec<u8>,
    /// Bytes of the current frame still to pass through uninspected.
    passing: usize,
    /// The stream did not parse: everything passes through.
    off: bool,
}

impl Scanner {
    pub(super) fn feed(
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

/// The body of a `begin` frame, answering client channel `remote_channel` if it is set.
#[cfg(test)]
pub(super) fn begin_body(remote_channel: Option<u16>) -> Vec<u8> {
    let begin = fe2o3_amqp::types::performatives::Begin {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
