//! The vendored tonic's idle-buffer switch (`tonic::codec::release_idle_buffers`,
//! vendor/README.md): a gRPC stream that waits for its peer with no partial message
//! buffered frees its receive buffer. The controller turns it on, for the heartbeat
//! stream each agent holds open. These tests feed a stream frame by frame, waiting
//! between frames, so that every wait is a chance to free the buffer: messages cut at
//! every awkward place must still come out whole, and the memory held by idle streams
//! must actually go.

use std::alloc::{GlobalAlloc, Layout, System};
use std::pin::Pin;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf as _, Bytes};
use futures_util::{Stream as _, StreamExt as _};
use http_body_util::StreamBody;
use hyper::body::Frame;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codec::{DecodeBuf, Decoder, Streaming};

/// Counts the bytes allocated and not yet freed, to see buffers go.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only counted.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A message's bytes as they were sent.
struct Raw;

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

type Sender = mpsc::UnboundedSender<Result<Frame<Bytes>, Status>>;

/// A request stream whose DATA frames are whatever the test sends, when it sends them.
fn stream() -> (Sender, Streaming<Vec<u8>>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    (tx, Streaming::new_request(Raw, body, None, None))
}

/// A message framed as gRPC frames it: uncompressed, its length, its bytes.
fn framed(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

fn message(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Polls the stream once: what it has, or `None` if it waits for more.
fn poll_once(stream: &mut Streaming<Vec<u8>>) -> Option<Vec<u8>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Pin::new(stream).poll_next(&mut cx) {
        Poll::Ready(Some(Ok(m))) => Some(m),
        Poll::Ready(other) => panic!("the stream ended or failed: {other:?}"),
        Poll::Pending => None,
    }
}

/// Sends `pieces` one at a time, polling the stream after each (so that it waits,
/// with whatever it holds, between any two), and returns the messages it gave.
fn feed(tx: &Sender, stream: &mut Streaming<Vec<u8>>, pieces: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    for piece in pieces {
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(piece))))
            .unwrap();
        while let Some(m) = poll_once(stream) {
            got.push(m);
        }
    }
    got
}

/// One test, not two: the switch is process-wide, and the memory it saves is read
/// from a process-wide count, so nothing else may run beside it.
#[test]
fn an_idle_stream_frees_its_buffer_and_messages_cut_anywhere_come_out_whole() {
    const STREAMS: usize = 200;
    let kept = held_by_idle_streams(STREAMS);
    tonic::codec::release_idle_buffers(true);
    let freed = held_by_idle_streams(STREAMS);
    // tonic's default receive buffer is 8 KiB a stream.
    let saved_per_stream = (kept - freed) / STREAMS as isize;
    assert!(
        saved_per_stream >= 8 << 10,
        "an idle stream holds {} bytes with the switch off and {} with it on",
        kept / STREAMS as isize,
        freed / STREAMS as isize
    );

    let (tx, mut s) = stream();
    let (a, b, c) = (message(200, 1), message(3, 2), message(0, 3));
    let big = message(1 << 20, 4);

    // One message per frame, a wait after each.
    for m in [&a, &b, &c] {
        assert_eq!(feed(&tx, &mut s, &[&framed(m)]), vec![m.clone()]);
    }

    // Two messages and the first two bytes of a third's header in one frame; the
    // rest of the header, then its body in two pieces, each after a wait.
    let mut joined = framed(&a);
    joined.extend(framed(&b));
    let third = framed(&a);
    joined.extend_from_slice(&third[..2]);
    assert_eq!(feed(&tx, &mut s, &[&joined]), vec![a.clone(), b.clone()]);
    assert_eq!(
        feed(&tx, &mut s, &[&third[2..5], &third[5..100], &third[100..]]),
        vec![a.clone()]
    );

    // A header alone: the stream waits with nothing buffered but knows the length.
    let fourth = framed(&b);
    assert_eq!(
        feed(&tx, &mut s, &[&fourth[..5], &fourth[5..]]),
        vec![b.clone()]
    );

    // A message bigger than any buffer, in 16 KiB frames with a wait between each.
    let whole = framed(&big);
    let pieces: Vec<&[u8]> = whole.chunks(16 << 10).collect();
    assert_eq!(feed(&tx, &mut s, &pieces), vec![big.clone()]);

    // And small ones again after it.
    assert_eq!(feed(&tx, &mut s, &[&framed(&a)]), vec![a]);
    drop(tx);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(matches!(s.poll_next_unpin(&mut cx), Poll::Ready(None)));
}

/// What `count` streams, each given one message and then waiting for the next, hold.
fn held_by_idle_streams(count: usize) -> isize {
    let before = LIVE.load(Ordering::Relaxed);
    let streams: Vec<_> = (0..count)
        .map(|i| {
            let (tx, mut s) = stream();
            let m = message(100, i as u8);
            assert_eq!(feed(&tx, &mut s, &[&framed(&m)]), vec![m]);
            (tx, s)
        })
        .collect();
    let held = LIVE.load(Ordering::Relaxed) - before;
    drop(streams);
    held
}
