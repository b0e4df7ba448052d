//! Telling an HTTP/2 client to go away only once it has read everything before.
//!
//! A draining HTTP/2 connection gets GOAWAY (hyper's graceful shutdown: GOAWAY with
//! the highest stream id, a PING, then GOAWAY with the real last id), which lets the
//! client's open streams finish and tells it which requests were taken. What the
//! protocol leaves open is what the client has *not read yet* when the GOAWAY
//! arrives. A busy client reads responses in batches; a client that opens a new
//! stream as soon as one ends (h2load, most load balancers, gRPC channels with a
//! queue) queues those new requests while it processes a batch, and when the same
//! batch ends with GOAWAY it must refuse its own queued requests: they were never
//! sent, yet the client reports them as failed (nghttp2 closes them with
//! `REFUSED_STREAM`, h2load counts them as failed). Which responses share a batch
//! with the GOAWAY is up to timing, so restarts under load lost a few dozen requests
//! each, with nginx too.
//!
//! So, below hyper, this module makes the GOAWAY the first thing the client reads
//! after a pause in which it has caught up:
//! 1. at the next frame boundary of what the server writes, it holds the server's
//!    frames and sends a PING of its own;
//! 2. it reads ahead (keeping every byte for hyper) until the client's PING ack
//!    arrives — the client has then processed every frame sent before the PING and
//!    has nothing left to read — and removes that ack from what hyper reads;
//! 3. it sends GOAWAY (last stream id 2³¹−1, "no new streams") and only then lets
//!    the server's held frames follow. The client processes the GOAWAY before any
//!    response that follows, so it stops opening streams *before* it would queue
//!    any; hyper's own GOAWAY, PING and final GOAWAY then finish the drain exactly
//!    as before.
//!
//! If the ack does not come within [`PROBE_TIMEOUT`] (a stalled client), the GOAWAY
//! is sent anyway. Connections that are not HTTP/2 (no client preface) are passed
//! through untouched.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADER_LEN: usize = 9;
const TYPE_PING: u8 = 0x6;
const TYPE_GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
/// The opaque data of this module's PING, so its ack is told from hyper's.
const PROBE_DATA: [u8; 8] = *b"fleet\0go";
/// How long the client may take to acknowledge the PING before GOAWAY goes anyway.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bytes read ahead while waiting for the ack; past this the wait stops reading (and
/// ends at its timeout). It bounds what a client that floods the connection during the
/// drain costs: a quarter of hyper's 1 MiB connection window, per connection, for at
/// most [`PROBE_TIMEOUT`].
const MAX_AHEAD: usize = 256 * 1024;

/// A PING frame: 8 bytes of payload, no flags, stream 0.
fn ping_frame() -> [u8; 17] {
    let mut frame = [0u8; 17];
    frame[2] = 8;
    frame[3] = TYPE_PING;
    frame[9..].copy_from_slice(&PROBE_DATA);
    frame
}

/// GOAWAY with last stream id 2³¹−1 and NO_ERROR: "open no new streams".
fn goaway_frame() -> [u8; 17] {
    let mut frame = [0u8; 17];
    frame[2] = 8;
    frame[3] = TYPE_GOAWAY;
    frame[9..13].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    frame
}

/// A position in a stream of HTTP/2 frames.
#[derive(Debug, Default, Clone)]
struct Frames {
    header: [u8; HEADER_LEN],
    /// Bytes of the current frame's header seen so far (0 at a frame start).
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    /// Follows `bytes` through the stream.
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            bytes = &bytes[self.step(bytes)..];
        }
    }

    /// Consumes the next piece of `bytes` (the rest of a header or of a payload);
    /// returns how many bytes it took.
    fn step(&mut self, bytes: &[u8]) -> usize {
        if self.left > 0 {
            let n = self.left.min(bytes.len());
            self.left -= n;
            return n;
        }
        let n = (HEADER_LEN - self.have).min(bytes.len());
        self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
        self.have += n;
        if self.have == HEADER_LEN {
            self.have = 0;
            self.left = payload_len(&self.header);
        }
        n
    }

    /// How many leading bytes of `bytes` finish the frame in progress: 0 at a
    /// boundary, `bytes.len()` if it does not end within them.
    fn to_boundary(&self, bytes: &[u8]) -> usize {
        let mut probe = self.clone();
        let mut used = 0;
        while !probe.at_boundary() && used < bytes.len() {
            used += probe.step(&bytes[used..]);
        }
        used
    }
}

fn payload_len(header: &[u8]) -> usize {
    (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    /// Not enough bytes read to tell.
    Unknown,
    Http1,
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not draining: frames pass through and are followed.
    Serving,
    /// Drain asked: the server's frames pass up to the next boundary.
    AtBoundary,
    /// Writing the PING; `.0` bytes of it written.
    SendingPing(usize),
    /// The server's frames are held until the client's ack.
    AwaitingAck,
    /// Writing the GOAWAY; `.0` bytes of it written.
    SendingGoaway(usize),
    /// Done (or never needed): everything passes through.
    Done,
}

/// The per-connection state: which protocol, where the frames are, the drain.
#[derive(Debug)]
pub struct GoawayFirst {
    proto: Proto,
    preface_seen: usize,
    /// The client's frames, up to what hyper has read or what was scanned ahead.
    inbound: Frames,
    /// The server's frames, up to what was written.
    outbound: Frames,
    stage: Stage,
    /// Bytes read from the client while waiting for the ack, for hyper.
    ahead: BytesMut,
    /// Leading bytes of `ahead` that were scanned and may be given to hyper.
    ready: usize,
    eof: bool,
    read_error: Option<io::Error>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    probe_sent: Option<Instant>,
    probe_timeout: Duration,
}

impl Default for GoawayFirst {
    fn default() -> Self {
        Self {
            proto: Proto::Unknown,
            preface_seen: 0,
            inbound: Frames::default(),
            outbound: Frames::default(),
            stage: Stage::Serving,
            ahead: BytesMut::new(),
            ready: 0,
            eof: false,
            read_error: None,
            deadline: None,
            probe_sent: None,
            probe_timeout: PROBE_TIMEOUT,
        }
    }
}

impl GoawayFirst {
    /// Starts the drain sequence (on an HTTP/2 connection; otherwise nothing).
    pub fn start(&mut self) {
        if self.stage == Stage::Serving {
            self.stage = match self.proto {
                Proto::Http2 => Stage::AtBoundary,
                _ => Stage::Done,
            };
        }
    }

    pub fn poll_read<IO: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut IO,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.stage == Stage::AwaitingAck {
            self.fill_ahead(cx, io);
            if self.stage != Stage::AwaitingAck {
                // The ack came: let the held frames go (the writer may be parked).
                cx.waker().wake_by_ref();
            }
        }
        if self.ready > 0 {
            let n = self.ready.min(buf.remaining());
            buf.put_slice(&self.ahead[..n]);
            self.ahead.advance(n);
            self.ready -= n;
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = self.read_error.take() {
            return Poll::Ready(Err(e));
        }
        if self.eof {
            return Poll::Ready(Ok(()));
        }
        if self.stage == Stage::AwaitingAck {
            // `fill_ahead` registered for the next bytes.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        ready!(Pin::new(io).poll_read(cx, buf))?;
        self.observe_inbound(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }

    /// Follows bytes read straight into hyper's buffer.
    fn observe_inbound(&mut self, mut bytes: &[u8]) {
        if self.proto == Proto::Unknown && !bytes.is_empty() {
            let want = &PREFACE[self.preface_seen..];
            let n = want.len().min(bytes.len());
            if bytes[..n] != want[..n] {
                self.proto = Proto::Http1;
                return;
            }
            self.preface_seen += n;
            bytes = &bytes[n..];
            if self.preface_seen == PREFACE.len() {
                self.proto = Proto::Http2;
            }
        }
        let scanning = matches!(
            self.stage,
            Stage::Serving | Stage::AtBoundary | Stage::SendingPing(_)
        );
        if self.proto == Proto::Http2 && scanning {
            self.inbound.advance(bytes);
        }
    }

    /// Reads what the client sent into `ahead` until it would block, scanning for
    /// the ack. Registers `cx` for more bytes when it returns without the ack.
    fn fill_ahead<IO: AsyncRead + Unpin>(&mut self, cx: &mut Context<'_>, io: &mut IO) {
        let mut chunk = [0u8; 8192];
        while self.stage == Stage::AwaitingAck
            && !self.eof
            && self.read_error.is_none()
            && self.ahead.len() < MAX_AHEAD
        {
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut *io).poll_read(cx, &mut read) {
                Poll::Pending => return,
                Poll::Ready(Err(e)) => self.read_error = Some(e),
                Poll::Ready(Ok(())) if read.filled().is_empty() => self.eof = true,
                Poll::Ready(Ok(())) => {
                    self.ahead.extend_from_slice(read.filled());
                    self.scan_ahead();
                }
            }
        }
        if self.stage == Stage::AwaitingAck && (self.eof || self.read_error.is_some()) {
            // The client is gone or going: nothing to wait for.
            self.stage = Stage::SendingGoaway(0);
        }
    }

    /// Walks the unscanned part of `ahead` frame by frame, removing the ack.
    fn scan_ahead(&mut self) {
        while self.ready < self.ahead.len() {
            if !self.inbound.at_boundary() {
                let n = self.inbound.step(&self.ahead[self.ready..]);
                self.ready += n;
                continue;
            }
            let rest = &self.ahead[self.ready..];
            if rest.len() < HEADER_LEN {
                return;
            }
            let is_ack = rest[3] == TYPE_PING
                && rest[4] & FLAG_ACK != 0
                && payload_len(rest) == PROBE_DATA.len()
                && rest[5..9] == [0; 4];
            if is_ack {
                if rest.len() < HEADER_LEN + PROBE_DATA.len() {
                    return;
                }
                if rest[HEADER_LEN..HEADER_LEN + PROBE_DATA.len()] == PROBE_DATA {
                    // Ours: hyper never sees it. Everything after it passes unscanned.
                    let start = self.ready;
                    let mut tail = self.ahead.split_off(start);
                    tail.advance(HEADER_LEN + PROBE_DATA.len());
                    self.ahead.unsplit(tail);
                    self.ready = self.ahead.len();
                    self.stage = Stage::SendingGoaway(0);
                    if let Some(sent) = self.probe_sent {
                        tracing::debug!(
                            "HTTP/2 drain: the client caught up in {} µs; GOAWAY goes first",
                            sent.elapsed().as_micros()
                        );
                    }
                    return;
                }
            }
            let n = self.inbound.step(rest);
            self.ready += n;
        }
    }

    /// Drives the drain; `Ready(Ok)` when the server's frames may be written.
    fn pump<IO: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut IO,
    ) -> Poll<io::Result<()>> {
        loop {
            match self.stage {
                Stage::Serving | Stage::Done => return Poll::Ready(Ok(())),
                Stage::AtBoundary if !self.outbound.at_boundary() => {
                    return Poll::Ready(Ok(()));
                }
                Stage::AtBoundary => self.stage = Stage::SendingPing(0),
                Stage::SendingPing(sent) => {
                    let frame = ping_frame();
                    let sent = sent + ready!(Pin::new(&mut *io).poll_write(cx, &frame[sent..]))?;
                    if sent < frame.len() {
                        self.stage = Stage::SendingPing(sent);
                        continue;
                    }
                    ready!(Pin::new(&mut *io).poll_flush(cx))?;
                    self.stage = Stage::AwaitingAck;
                    self.probe_sent = Some(Instant::now());
                    self.deadline = Some(Box::pin(tokio::time::sleep(self.probe_timeout)));
                }
                Stage::AwaitingAck => {
                    self.fill_ahead(cx, io);
                    if self.stage != Stage::AwaitingAck {
                        continue;
                    }
                    let deadline = self.deadline.as_mut().expect("set with the ping");
                    if deadline.as_mut().poll(cx).is_ready() {
                        tracing::debug!(
                            "HTTP/2 drain: no ack from the client in {}: sending GOAWAY anyway",
                            humantime::format_duration(self.probe_timeout)
                        );
                        self.stage = Stage::SendingGoaway(0);
                        continue;
                    }
                    return Poll::Pending;
                }
                Stage::SendingGoaway(sent) => {
                    let frame = goaway_frame();
                    let sent = sent + ready!(Pin::new(&mut *io).poll_write(cx, &frame[sent..]))?;
                    if sent < frame.len() {
                        self.stage = Stage::SendingGoaway(sent);
                        continue;
                    }
                    self.stage = Stage::Done;
                    self.deadline = None;
                }
            }
        }
    }

    /// Writes the server's bytes: through, or up to the next frame boundary, or not
    /// yet (held while the drain waits for the client).
    pub fn poll_write<IO: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut IO,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.proto != Proto::Http2 || self.stage == Stage::Done {
            return write_through(cx, io, bufs);
        }
        ready!(self.pump(cx, io))?;
        let written = if self.stage == Stage::AtBoundary {
            // Only up to the end of the frame in progress.
            let Some(first) = bufs.iter().find(|b| !b.is_empty()) else {
                return Poll::Ready(Ok(0));
            };
            let n = self.outbound.to_boundary(first);
            ready!(Pin::new(&mut *io).poll_write(cx, &first[..n]))?
        } else {
            ready!(write_through(cx, io, bufs))?
        };
        if self.stage != Stage::Done {
            let mut left = written;
            for buf in bufs {
                let n = left.min(buf.len());
                self.outbound.advance(&buf[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
        }
        Poll::Ready(Ok(written))
    }

    pub fn poll_flush<IO: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut IO,
    ) -> Poll<io::Result<()>> {
        if matches!(self.stage, Stage::SendingPing(_) | Stage::SendingGoaway(_)) {
            // Push out a frame of ours that is half written; waiting for the ack
            // does not hold a flush (none of the server's bytes are held here).
            if let Poll::Ready(Err(e)) = self.pump(cx, io) {
                return Poll::Ready(Err(e));
            }
            if matches!(self.stage, Stage::SendingPing(_) | Stage::SendingGoaway(_)) {
                return Poll::Pending;
            }
        }
        Pin::new(io).poll_flush(cx)
    }
}

fn write_through<IO: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    io: &mut IO,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    match bufs {
        [one] => Pin::new(io).poll_write(cx, one),
        _ => Pin::new(io).poll_write_vectored(cx, bufs),
    }
}

#[cfg(test)]
mod tests;
