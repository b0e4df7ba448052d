//! A tap on an HTTP/2 connection's bytes, between the socket (or TLS) and hyper, that
//! notes what a failure message needs and hyper does not expose: the GOAWAYs and
//! RST_STREAMs the server sent, its PINGs and when the client acked them (a
//! draining server may wait on that ack before its GOAWAY), and the highest stream
//! the client opened. It only reads frame headers (and the first bytes of GOAWAY,
//! RST_STREAM and PING); every byte passes through unchanged.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use h2::Reason;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface ("PRI * HTTP/2.0…"), written before the first frame.
const PREFACE_LEN: usize = 24;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
/// RST_STREAMs and PINGs kept per connection for messages (resets are all counted).
const MAX_RESETS: usize = 8;

/// What one connection saw, shared by the tap and the clients that use it.
#[derive(Debug, Default)]
pub(super) struct ConnLog {
    highest_opened: AtomicU32,
    server: Mutex<ServerFrames>,
    /// The connection's task ended: it carries no more streams.
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct ServerFrames {
    /// (when, last stream id, error code) of each GOAWAY.
    goaways: Vec<(Instant, u32, u32)>,
    /// (stream id, error code) of the first RST_STREAMs.
    resets: Vec<(u32, u32)>,
    resets_total: u64,
    /// When the server sent each of its first PINGs, and when the client acked it.
    pings: Vec<(Instant, Option<Instant>, [u8; 8])>,
}

impl ConnLog {
    /// The connection's task ended (closed, or failed): it opens no more streams.
    pub(super) fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(super) fn set_closed(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// The server sent at least one GOAWAY on this connection.
    pub(super) fn saw_goaway(&self) -> bool {
        !self.server.lock().unwrap().goaways.is_empty()
    }

    /// One line for a failure message: the streams opened, every GOAWAY (last stream
    /// id, code, when relative to `origin`) and the RST_STREAMs received.
    pub(super) fn describe(&self, origin: Instant) -> String {
        let server = self.server.lock().unwrap();
        let mut text = format!(
            "streams opened up to id {}",
            self.highest_opened.load(Ordering::Relaxed)
        );
        for (at, last, code) in &server.goaways {
            text.push_str(&format!(
                "; GOAWAY last stream id {last} {:?} received {:.1}ms into the load",
                Reason::from(*code),
                at.saturating_duration_since(origin).as_secs_f64() * 1e3
            ));
        }
        if server.goaways.is_empty() {
            text.push_str("; no GOAWAY received");
        }
        for (sent, acked, _) in &server.pings {
            let ms = |t: &Instant| t.saturating_duration_since(origin).as_secs_f64() * 1e3;
            match acked {
                Some(acked) => text.push_str(&format!(
                    "; server PING at {:.1}ms acked at {:.1}ms",
                    ms(sent),
                    ms(acked)
                )),
                None => text.push_str(&format!("; server PING at {:.1}ms not acked", ms(sent))),
            }
        }
        if server.resets_total > 0 {
            let listed: Vec<String> = server
                .resets
                .iter()
                .map(|(id, code)| format!("stream {id} {:?}", Reason::from(*code)))
                .collect();
            text.push_str(&format!(
                "; {} RST_STREAM received ({})",
                server.resets_total,
                listed.join(", ")
            ));
        }
        text
    }

    fn server_frame(&self, frame: &Frame) {
        let word = |at: usize| u32::from_be_bytes(frame.body[at..at + 4].try_into().unwrap());
        match frame.kind {
            GOAWAY if frame.body_len >= 8 => {
                let mut server = self.server.lock().unwrap();
                server
                    .goaways
                    .push((Instant::now(), word(0) & 0x7fff_ffff, word(4)));
            }
            PING if frame.flags & ACK == 0 && frame.body_len == 8 => {
                let mut server = self.server.lock().unwrap();
                if server.pings.len() < MAX_RESETS {
                    server.pings.push((Instant::now(), None, frame.body));
                }
            }
            RST_STREAM if frame.body_len >= 4 => {
                let mut server = self.server.lock().unwrap();
                server.resets_total += 1;
                if server.resets.len() < MAX_RESETS {
                    server.resets.push((frame.stream, word(0)));
                }
            }
            _ => {}
        }
    }

    fn client_frame(&self, frame: &Frame) {
        if frame.kind == HEADERS {
            self.highest_opened
                .fetch_max(frame.stream, Ordering::Relaxed);
        } else if frame.kind == PING && frame.flags & ACK != 0 {
            let mut server = self.server.lock().unwrap();
            if let Some(ping) = server
                .pings
                .iter_mut()
                .find(|p| p.1.is_none() && p.2 == frame.body)
            {
                ping.1 = Some(Instant::now());
            }
        }
    }
}

/// A frame's header and the first 8 bytes of its payload.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    body: [u8; 8],
    body_len: usize,
}

/// Follows frame boundaries in a byte stream fed in arbitrary pieces.
struct Scanner {
    /// Bytes still to skip before the first frame (the client's preface).
    skip: usize,
    head: [u8; 9],
    /// Header bytes read; 9 while inside the payload.
    have: usize,
    /// Payload bytes still to come.
    left: usize,
    frame: Frame,
}

impl Scanner {
    fn new(skip: usize) -> Scanner {
        Scanner {
            skip,
            head: [0; 9],
            have: 0,
            left: 0,
            frame: Frame {
                kind: 0,
                flags: 0,
                stream: 0,
                body: [0; 8],
                body_len: 0,
            },
        }
    }

    fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(&Frame)) {
        let skip = self.skip.min(bytes.len());
        self.skip -= skip;
        bytes = &bytes[skip..];
        while !bytes.is_empty() {
            if self.have < 9 {
                let n = (9 - self.have).min(bytes.len());
                self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == 9 {
                    let h = self.head;
                    self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    self.frame.kind = h[3];
                    self.frame.flags = h[4];
                    self.frame.stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    self.frame.body_len = 0;
                    if self.left == 0 {
                        on_frame(&self.frame);
                        self.have = 0;
                    }
                }
                continue;
            }
            let n = self.left.min(bytes.len());
            let keep = (8 - self.frame.body_len).min(n);
            let at = self.frame.body_len;
            self.frame.body[at..at + keep].copy_from_slice(&bytes[..keep]);
            self.frame.body_len += keep;
            self.left -= n;
            bytes = &bytes[n..];
            if self.left == 0 {
                on_frame(&self.frame);
                self.have = 0;
            }
        }
    }
}

/// An IO that notes the frames passing through it in a [`ConnLog`].
pub(super) struct Tap<T> {
    inner: T,
    log: std::sync::Arc<ConnLog>,
    read: Scanner,
    write: Scanner,
}

impl<T> Tap<T> {
    pub(super) fn new(inner: T, log: std::sync::Arc<ConnLog>) -> Tap<T> {
        Tap {
            inner,
            log,
            read: Scanner::new(0),
            write: Scanner::new(PREFACE_LEN),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tap<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let this = &mut *self;
            let log = &this.log;
            this.read
                .feed(&buf.filled()[before..], |f| log.server_frame(f));
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tap<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            let this = &mut *self;
            let log = &this.log;
            this.write.feed(&buf[..n], |f| log.client_frame(f));
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_found_across_any_split_of_the_bytes() {
        let mut bytes = Vec::new();
        // SETTINGS (empty), GOAWAY last id 7 REFUSED_STREAM + 3 bytes of debug data,
        // RST_STREAM on stream 5 CANCEL.
        bytes.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 11, GOAWAY, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 7, b'b', b'y', b'e']);
        bytes.extend_from_slice(&[0, 0, 4, RST_STREAM, 0, 0, 0, 0, 5, 0, 0, 0, 8]);
        for step in 1..bytes.len() {
            let log = ConnLog::default();
            let mut scanner = Scanner::new(0);
            for piece in bytes.chunks(step) {
                scanner.feed(piece, |f| log.server_frame(f));
            }
            let server = log.server.lock().unwrap();
            let goaways: Vec<(u32, u32)> = server.goaways.iter().map(|g| (g.1, g.2)).collect();
            assert_eq!(goaways, [(7, 7)], "pieces of {step}");
            assert_eq!(server.resets, [(5, 8)], "pieces of {step}");
        }
    }

    #[test]
    fn a_server_ping_is_matched_with_the_clients_ack() {
        let log = ConnLog::default();
        let ping = |flags: u8, data: &[u8; 8]| {
            let mut bytes = vec![0, 0, 8, PING, flags, 0, 0, 0, 0];
            bytes.extend_from_slice(data);
            bytes
        };
        Scanner::new(0).feed(&ping(0, b"fleet\0go"), |f| log.server_frame(f));
        let origin = Instant::now();
        assert!(log.describe(origin).contains("not acked"));
        // The client's preface, then an ack of another PING, then the right one.
        let mut client = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        client.extend(ping(ACK, b"otherone"));
        client.extend(ping(ACK, b"fleet\0go"));
        Scanner::new(PREFACE_LEN).feed(&client, |f| log.client_frame(f));
        assert!(
            log.describe(origin).contains("acked at"),
            "{}",
            log.describe(origin)
        );
    }
}
