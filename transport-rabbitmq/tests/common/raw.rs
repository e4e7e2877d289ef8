//! A minimal AMQP 0-9-1 client written frame by frame, for messages lapin cannot produce or
//! read: a foreign producer's message whose properties are not valid AMQP (a content type that
//! is not UTF-8), and reading such a message back without parsing its properties.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;
const BASIC: u16 = 60;

/// One frame as received.
pub struct Frame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The class and method of a method frame.
    pub fn method(&self) -> Option<(u16, u16)> {
        (self.kind == FRAME_METHOD && self.payload.len() >= 4).then(|| {
            (
                u16::from_be_bytes([self.payload[0], self.payload[1]]),
                u16::from_be_bytes([self.payload[2], self.payload[3]]),
            )
        })
    }
}

/// A message as read back: the content header's raw bytes (properties unparsed) and the body.
pub struct RawMessage {
    pub header: Vec<u8>,
    pub body: Vec<u8>,
}

/// A connection with channel 1 open in confirm mode.
pub struct RawClient {
    stream: TcpStream,
    frame_max: u32,
}

fn short(out: &mut Vec<u8>, text: &[u8]) {
    out.push(u8::try_from(text.len()).expect("a short string"));
    out.extend_from_slice(text);
}

fn long(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
    out.extend_from_slice(bytes);
}

fn method(class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(4 + args.len());
    payload.extend_from_slice(&class.to_be_bytes());
    payload.extend_from_slice(&method.to_be_bytes());
    payload.extend_from_slice(args);
    payload
}

impl RawClient {
    /// Connects to the test broker (`AMQP_URL`) and opens channel 1 with publisher confirms.
    pub async fn connect() -> RawClient {
        let uri: lapin::uri::AMQPUri = super::amqp_url().parse().expect("AMQP_URL parses");
        let stream = super::bounded(
            "raw client: connecting",
            TcpStream::connect(super::broker_addr()),
        )
        .await
        .expect("raw client: TCP connection to the broker");
        let mut client = RawClient {
            stream,
            frame_max: 4096,
        };
        client
            .stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .unwrap();
        client.expect(0, (10, 10)).await; // connection.start
        let mut args = Vec::new();
        args.extend_from_slice(&0u32.to_be_bytes()); // client properties: none
        short(&mut args, b"PLAIN");
        let user = &uri.authority.userinfo;
        long(
            &mut args,
            format!("\0{}\0{}", user.username, user.password).as_bytes(),
        );
        short(&mut args, b"en_US");
        client.send(FRAME_METHOD, 0, &method(10, 11, &args)).await;
        let tune = client.expect(0, (10, 30)).await; // connection.tune
        let frame_max = u32::from_be_bytes(tune.payload[6..10].try_into().unwrap());
        client.frame_max = frame_max;
        let mut args = Vec::new();
        args.extend_from_slice(&tune.payload[4..6]); // channel max as proposed
        args.extend_from_slice(&frame_max.to_be_bytes());
        args.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
        client.send(FRAME_METHOD, 0, &method(10, 31, &args)).await;
        let mut args = Vec::new();
        short(&mut args, uri.vhost.as_bytes());
        short(&mut args, b"");
        args.push(0);
        client.send(FRAME_METHOD, 0, &method(10, 40, &args)).await;
        client.expect(0, (10, 41)).await; // connection.open-ok
        client.send(FRAME_METHOD, 1, &method(20, 10, &[0])).await;
        client.expect(1, (20, 11)).await; // channel.open-ok
        client.send(FRAME_METHOD, 1, &method(85, 10, &[0])).await;
        client.expect(1, (85, 11)).await; // confirm.select-ok
        client
    }

    async fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(kind);
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        self.stream
            .write_all(&frame)
            .await
            .expect("raw client: write");
    }

    async fn read(&mut self) -> Frame {
        super::bounded("raw client: reading a frame", async {
            let mut head = [0u8; 7];
            self.stream
                .read_exact(&mut head)
                .await
                .expect("raw client: read");
            let size = u32::from_be_bytes(head[3..7].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; size + 1];
            self.stream
                .read_exact(&mut payload)
                .await
                .expect("raw client: read");
            assert_eq!(payload.pop(), Some(FRAME_END), "a frame end");
            Frame {
                kind: head[0],
                channel: u16::from_be_bytes([head[1], head[2]]),
                payload,
            }
        })
        .await
    }

    /// Reads frames until the method `expected` arrives on `channel`, failing on a close.
    async fn expect(&mut self, channel: u16, expected: (u16, u16)) -> Frame {
        loop {
            let frame = self.read().await;
            match frame.method() {
                Some(m) if m == expected && frame.channel == channel => return frame,
                Some((10, 50)) | Some((20, 40)) => panic!(
                    "raw client: the broker closed while waiting for {expected:?}: {}",
                    String::from_utf8_lossy(&frame.payload[6..])
                ),
                _ => {}
            }
        }
    }

    /// Publishes `body` to `queue` through the default exchange, persistent, with the raw
    /// bytes `content_type` as its content type, and waits for the broker's confirm.
    pub async fn publish_with_content_type(
        &mut self,
        queue: &str,
        content_type: &[u8],
        body: &[u8],
    ) {
        let mut args = Vec::new();
        args.extend_from_slice(&0u16.to_be_bytes());
        short(&mut args, b"");
        short(&mut args, queue.as_bytes());
        args.push(0); // neither mandatory nor immediate
        self.send(FRAME_METHOD, 1, &method(BASIC, 40, &args)).await;
        let mut header = Vec::new();
        header.extend_from_slice(&BASIC.to_be_bytes());
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&(body.len() as u64).to_be_bytes());
        // Property flags: content-type (bit 15) and delivery-mode (bit 12).
        header.extend_from_slice(&((1u16 << 15) | (1u16 << 12)).to_be_bytes());
        short(&mut header, content_type);
        header.push(2);
        self.send(FRAME_HEADER, 1, &header).await;
        assert!(body.len() + 8 <= self.frame_max as usize, "one body frame");
        self.send(FRAME_BODY, 1, body).await;
        let confirm = self.read_method(1).await;
        assert_eq!(
            confirm.method(),
            Some((BASIC, 80)),
            "a positive confirm (basic.ack)"
        );
    }

    async fn read_method(&mut self, channel: u16) -> Frame {
        loop {
            let frame = self.read().await;
            if frame.channel == channel && frame.kind == FRAME_METHOD {
                return frame;
            }
        }
    }

    /// Takes the next message of `queue` (`basic.get`, acknowledged), its properties unparsed;
    /// `None` if the queue is empty.
    pub async fn get(&mut self, queue: &str) -> Option<RawMessage> {
        let mut args = Vec::new();
        args.extend_from_slice(&0u16.to_be_bytes());
        short(&mut args, queue.as_bytes());
        args.push(0); // no-ack = false
        self.send(FRAME_METHOD, 1, &method(BASIC, 70, &args)).await;
        let answer = self.read_method(1).await;
        match answer.method() {
            Some((BASIC, 72)) => return None, // get-empty
            Some((BASIC, 71)) => {}
            other => panic!("raw client: unexpected answer to basic.get: {other:?}"),
        }
        let tag = u64::from_be_bytes(answer.payload[4..12].try_into().unwrap());
        let header = self.read().await;
        assert_eq!(header.kind, FRAME_HEADER);
        let size = u64::from_be_bytes(header.payload[4..12].try_into().unwrap()) as usize;
        let mut body = Vec::with_capacity(size);
        while body.len() < size {
            let frame = self.read().await;
            assert_eq!(frame.kind, FRAME_BODY);
            body.extend_from_slice(&frame.payload);
        }
        let mut args = tag.to_be_bytes().to_vec();
        args.push(0);
        self.send(FRAME_METHOD, 1, &method(BASIC, 80, &args)).await;
        Some(RawMessage {
            header: header.payload,
            body,
        })
    }

    /// Closes the connection, waiting briefly for the broker's `close-ok`.
    pub async fn close(mut self) {
        let mut args = Vec::new();
        args.extend_from_slice(&200u16.to_be_bytes());
        short(&mut args, b"done");
        args.extend_from_slice(&0u32.to_be_bytes());
        self.send(FRAME_METHOD, 0, &method(10, 50, &args)).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.expect(0, (10, 51))).await;
    }
}
