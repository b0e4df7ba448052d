use std::future::poll_fn;
use std::io::IoSlice;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf};

use super::*;

/// A frame: 24-bit length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const WINDOW_UPDATE: u8 = 0x8;

fn ping_ack(data: &[u8; 8]) -> Vec<u8> {
    frame(TYPE_PING, FLAG_ACK, 0, data)
}

/// The server's end: the drain state over one end of an in-memory pipe.
struct Server {
    io: DuplexStream,
    drain: GoawayFirst,
}

impl Server {
    async fn read(&mut self) -> Vec<u8> {
        let mut buf = [0u8; 4096];
        let n = poll_fn(|cx| {
            let mut read = ReadBuf::new(&mut buf);
            match self.drain.poll_read(cx, &mut self.io, &mut read) {
                Poll::Ready(Ok(())) => Poll::Ready(read.filled().len()),
                Poll::Ready(Err(e)) => panic!("read failed: {e}"),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        buf[..n].to_vec()
    }

    /// Reads until `n` bytes arrived.
    async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < n {
            let got = self.read().await;
            assert!(!got.is_empty(), "end of stream after {} bytes", out.len());
            out.extend(got);
        }
        out
    }

    async fn write(&mut self, bytes: &[u8]) -> usize {
        poll_fn(|cx| {
            self.drain
                .poll_write(cx, &mut self.io, &[IoSlice::new(bytes)])
        })
        .await
        .expect("write")
    }

    /// One try at writing, without waiting.
    fn try_write(&mut self, bytes: &[u8]) -> Poll<usize> {
        let mut cx = Context::from_waker(Waker::noop());
        self.drain
            .poll_write(&mut cx, &mut self.io, &[IoSlice::new(bytes)])
            .map(|r| r.expect("write"))
    }
}

async fn client_reads(client: &mut DuplexStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    client.read_exact(&mut buf).await.expect("client read");
    buf
}

/// A connected HTTP/2 pair after the client's preface and SETTINGS went through.
async fn h2_pair() -> (Server, DuplexStream) {
    let (server, mut client) = tokio::io::duplex(1 << 16);
    let mut server = Server {
        io: server,
        drain: GoawayFirst::default(),
    };
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    client.write_all(&hello).await.unwrap();
    assert_eq!(server.read_exact(hello.len()).await, hello);
    assert_eq!(server.drain.proto, Proto::Http2);
    (server, client)
}

#[test]
fn frame_boundaries_are_found_across_pieces() {
    let mut frames = Frames::default();
    let data = frame(DATA, 0, 1, b"0123456789");
    let empty = frame(SETTINGS, 1, 0, &[]);
    assert_eq!(
        frames.to_boundary(&data),
        0,
        "a fresh stream is at a boundary"
    );
    frames.advance(&data[..4]);
    assert!(!frames.at_boundary());
    assert_eq!(frames.to_boundary(&data[4..]), data.len() - 4);
    assert_eq!(frames.to_boundary(&data[4..7]), 3, "does not end here");
    frames.advance(&data[4..]);
    assert!(frames.at_boundary());
    frames.advance(&empty[..5]);
    assert_eq!(
        frames.to_boundary(&empty[5..]),
        4,
        "a frame with no payload"
    );
    frames.advance(&empty[5..]);
    assert!(frames.at_boundary());
}

#[tokio::test]
async fn goaway_comes_after_the_clients_ack_and_before_the_held_frames() {
    let (mut server, mut client) = h2_pair().await;

    // A response frame is half written when the drain starts.
    let response = frame(DATA, 1, 1, b"0123456789");
    assert_eq!(server.write(&response[..13]).await, 13);
    server.drain.start();
    // The rest of that frame plus the next one: only the rest goes.
    let next = frame(HEADERS, 4, 3, b"abc");
    let mut rest = response[13..].to_vec();
    rest.extend(&next);
    assert_eq!(server.write(&rest).await, response.len() - 13);
    // At the boundary the probe goes out and the server's frames are held.
    assert!(server.try_write(&next).is_pending());
    let got = client_reads(&mut client, response.len() + 17).await;
    assert_eq!(got[..response.len()], response[..]);
    assert_eq!(got[response.len()..], ping_frame()[..]);

    // The client sends a frame, the ack (split in two writes), and another frame.
    let update = frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0]);
    let headers = frame(HEADERS, 5, 5, b"xy");
    let ack = ping_ack(&PROBE_DATA);
    client.write_all(&update).await.unwrap();
    client.write_all(&ack[..5]).await.unwrap();
    let read_before_ack = server.read().await;
    assert_eq!(read_before_ack, update, "a frame before the ack passes");
    client.write_all(&ack[5..]).await.unwrap();
    client.write_all(&headers).await.unwrap();

    // The held frame now follows a GOAWAY.
    assert_eq!(server.write(&next).await, next.len());
    let got = client_reads(&mut client, 17 + next.len()).await;
    assert_eq!(got[..17], goaway_frame()[..]);
    assert_eq!(got[17..], next[..]);
    // The server never sees the ack, only the frames around it.
    assert_eq!(server.read_exact(headers.len()).await, headers);
    assert_eq!(server.drain.stage, Stage::Done);
}

#[tokio::test]
async fn another_ping_ack_reaches_the_server() {
    let (mut server, mut client) = h2_pair().await;
    server.drain.start();
    assert!(server.try_write(&frame(HEADERS, 4, 1, b"a")).is_pending());
    assert_eq!(client_reads(&mut client, 17).await, ping_frame());
    // The ack of the server's own PING (other data) is not the probe's.
    let theirs = ping_ack(b"hyper!!!");
    client.write_all(&theirs).await.unwrap();
    assert_eq!(server.read_exact(theirs.len()).await, theirs);
    assert_eq!(server.drain.stage, Stage::AwaitingAck);
}

#[tokio::test]
async fn a_client_that_never_acks_gets_the_goaway_after_the_timeout() {
    let (mut server, mut client) = h2_pair().await;
    server.drain.probe_timeout = Duration::from_millis(50);
    server.drain.start();
    let next = frame(HEADERS, 4, 1, b"a");
    assert!(server.try_write(&next).is_pending());
    assert_eq!(client_reads(&mut client, 17).await, ping_frame());
    // Waits for the probe's own timer, then writes.
    assert_eq!(server.write(&next).await, next.len());
    let got = client_reads(&mut client, 17 + next.len()).await;
    assert_eq!(got[..17], goaway_frame()[..]);
    assert_eq!(got[17..], next[..]);
}

#[tokio::test]
async fn a_client_that_closes_while_awaited_ends_the_wait() {
    let (mut server, mut client) = h2_pair().await;
    server.drain.start();
    assert!(server.try_write(&frame(HEADERS, 4, 1, b"a")).is_pending());
    assert_eq!(client_reads(&mut client, 17).await, ping_frame());
    client.shutdown().await.unwrap();
    assert_eq!(
        server.read().await,
        Vec::<u8>::new(),
        "end of stream for hyper"
    );
    assert_eq!(server.drain.stage, Stage::SendingGoaway(0));
}

#[tokio::test]
async fn http1_passes_untouched() {
    let (server, mut client) = tokio::io::duplex(1 << 16);
    let mut server = Server {
        io: server,
        drain: GoawayFirst::default(),
    };
    let request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    client.write_all(request).await.unwrap();
    assert_eq!(server.read_exact(request.len()).await, request);
    server.drain.start();
    let response = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    assert_eq!(server.write(response).await, response.len());
    assert_eq!(client_reads(&mut client, response.len()).await, response);
    assert_eq!(server.drain.stage, Stage::Done);
}

#[tokio::test]
async fn a_client_that_floods_instead_of_acking_costs_a_bounded_buffer_until_the_timeout() {
    let (mut server, client) = h2_pair().await;
    server.drain.probe_timeout = Duration::from_millis(100);
    server.drain.start();
    let next = frame(HEADERS, 4, 1, b"a");
    assert!(server.try_write(&next).is_pending());
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    assert_eq!(client_reads_half(&mut client_rx, 17).await, ping_frame());
    // 4 MiB of DATA frames, never an ack: the writer blocks once the server stops reading.
    let flood = tokio::spawn(async move {
        let chunk = frame(DATA, 0, 1, &[0u8; 16 * 1024]);
        for _ in 0..256 {
            if client_tx.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    assert_eq!(
        server.write(&next).await,
        next.len(),
        "the timeout ends the hold"
    );
    assert!(
        server.drain.ahead.len() <= MAX_AHEAD + 8192,
        "read ahead {} bytes",
        server.drain.ahead.len()
    );
    let got = client_reads_half(&mut client_rx, 17 + next.len()).await;
    assert_eq!(got[..17], goaway_frame()[..]);
    flood.abort();
}

async fn client_reads_half(client: &mut tokio::io::ReadHalf<DuplexStream>, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    client.read_exact(&mut buf).await.expect("client read");
    buf
}
