//! A connection read through a filter for the one frame h2 takes for a protocol error while
//! the plugin stops gracefully.
//!
//! At a graceful stop (tonic's `serve_with_incoming_shutdown`, hyper, h2) the server sends
//! GOAWAY naming the largest stream id, then a PING. When the client acknowledges the PING,
//! h2 takes no stream above the last one it opened, and says so in a second GOAWAY. A
//! stream the client opened after that is "late": RFC 9113 (section 6.8) has the server
//! ignore its frames, and the client, told by the second GOAWAY, sends the call again on a
//! new connection. h2 (0.4.20 here; 0.4.21, the latest, alike) ignores a late stream's
//! HEADERS, DATA and RST_STREAM, but takes its WINDOW_UPDATE for one on an idle stream
//! (`Recv::ensure_not_idle`): a connection error. It then sends GOAWAY PROTOCOL_ERROR and
//! closes the connection under every call still in flight on it: calls the plugin took,
//! whose answers are lost, and which the host cannot tell from calls that never ran.
//!
//! grpc core, the dispatcher's channel, writes exactly that when its write races the first
//! GOAWAY: a call it had numbered before reading the GOAWAY goes out after its PING
//! acknowledgement, in the same write (its writer puts ping acknowledgements first, then
//! each stream's HEADERS, WINDOW_UPDATE and DATA). Under load, a stopping Rust plugin lost
//! the calls in flight on a connection that way, once in about 60 stops.
//!
//! [`LateStreams`] wraps each accepted connection and drops a late stream's WINDOW_UPDATE
//! before h2 reads it, as h2 ignores that stream's other frames. It reads the bytes going
//! both ways: the server's own GOAWAY and PING (what it writes) say which acknowledgement
//! caps the streams; the client's HEADERS before that acknowledgement (what it reads) say
//! where the cap is. Nothing is dropped before the plugin stops.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// What a client sends before its first frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const ACK: u8 = 0x1;
/// The largest stream id: a GOAWAY naming it announces a graceful stop.
const MAX_STREAM_ID: u32 = (1 << 31) - 1;
/// How much is read from the client at once.
const READ_SIZE: usize = 16 * 1024;

/// One frame's header (RFC 9113, section 4.1).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Head {
    length: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Head {
    fn parse(bytes: &[u8]) -> Head {
        Head {
            length: usize::from(bytes[0]) << 16
                | usize::from(bytes[1]) << 8
                | usize::from(bytes[2]),
            kind: bytes[3],
            flags: bytes[4],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & MAX_STREAM_ID,
        }
    }
}

/// The frames the server writes, as far as they tell the payload of the PING it sent with
/// its first GOAWAY of a graceful stop. Fed the bytes as written, in pieces of any size.
#[derive(Default)]
pub(crate) struct Outbound {
    header: [u8; HEADER_LEN],
    header_len: usize,
    head: Option<Head>,
    /// Payload bytes of the current frame seen so far, and the first eight of them.
    seen: usize,
    start: [u8; 8],
    going_away: bool,
    shutdown_ping: Option<[u8; 8]>,
}

impl Outbound {
    pub(crate) fn wrote(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let Some(head) = self.head else {
                let taken = (HEADER_LEN - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + taken]
                    .copy_from_slice(&bytes[..taken]);
                self.header_len += taken;
                bytes = &bytes[taken..];
                if self.header_len == HEADER_LEN {
                    self.head = Some(Head::parse(&self.header));
                    self.seen = 0;
                    self.end_if_whole();
                }
                continue;
            };
            let taken = (head.length - self.seen).min(bytes.len());
            if self.seen < self.start.len() {
                let kept = (self.start.len() - self.seen).min(taken);
                self.start[self.seen..self.seen + kept].copy_from_slice(&bytes[..kept]);
            }
            self.seen += taken;
            bytes = &bytes[taken..];
            self.end_if_whole();
        }
    }

    fn end_if_whole(&mut self) {
        let Some(head) = self.head else { return };
        if self.seen < head.length {
            return;
        }
        match head.kind {
            GOAWAY if head.length >= 8 => {
                let last = u32::from_be_bytes([
                    self.start[0],
                    self.start[1],
                    self.start[2],
                    self.start[3],
                ]) & MAX_STREAM_ID;
                self.going_away |= last == MAX_STREAM_ID;
            }
            PING if head.flags & ACK == 0 && head.length == 8 && self.going_away => {
                self.shutdown_ping.get_or_insert(self.start);
            }
            _ => {}
        }
        self.head = None;
        self.header_len = 0;
    }

    /// The payload of the PING the server sent after announcing its graceful stop.
    pub(crate) fn shutdown_ping(&self) -> Option<[u8; 8]> {
        self.shutdown_ping
    }
}

/// The client's bytes, filtered frame by frame: a late stream's WINDOW_UPDATE is cut out.
#[derive(Default)]
pub(crate) struct Inbound {
    preface_left: usize,
    /// Payload bytes of the frame being passed on that are still to come.
    payload_left: usize,
    /// The largest stream id the client opened (sent HEADERS on) so far.
    highest_opened: u32,
    /// The largest stream id h2 takes, once the client has acknowledged the shutdown PING.
    cap: Option<u32>,
}

impl Inbound {
    pub(crate) fn new() -> Self {
        Inbound {
            preface_left: PREFACE.len(),
            ..Inbound::default()
        }
    }

    /// Filters `bytes[from..]` in place, cutting out each late stream's WINDOW_UPDATE.
    /// Returns where the filtered bytes end and how many bytes are left: past the first,
    /// the start of a frame whose header (or a PING acknowledgement's payload) is not all
    /// there yet, to be filtered once it is.
    pub(crate) fn filter(
        &mut self,
        bytes: &mut [u8],
        from: usize,
        shutdown_ping: Option<[u8; 8]>,
    ) -> (usize, usize) {
        let mut len = bytes.len();
        let mut at = from;
        loop {
            let left = len - at;
            if self.preface_left > 0 || self.payload_left > 0 {
                let passing = if self.preface_left > 0 {
                    &mut self.preface_left
                } else {
                    &mut self.payload_left
                };
                let passed = (*passing).min(left);
                *passing -= passed;
                at += passed;
                if *passing > 0 {
                    return (at, len);
                }
                continue;
            }
            if left < HEADER_LEN {
                return (at, len);
            }
            let head = Head::parse(&bytes[at..at + HEADER_LEN]);
            match head.kind {
                HEADERS => self.highest_opened = self.highest_opened.max(head.stream),
                PING if head.flags & ACK != 0 && head.length == 8 && shutdown_ping.is_some() => {
                    if left < HEADER_LEN + 8 {
                        return (at, len);
                    }
                    let payload = &bytes[at + HEADER_LEN..at + HEADER_LEN + 8];
                    if shutdown_ping.is_some_and(|ping| ping == payload) {
                        self.cap.get_or_insert(self.highest_opened);
                    }
                }
                WINDOW_UPDATE
                    if head.length == 4 && self.cap.is_some_and(|cap| head.stream > cap) =>
                {
                    if left < HEADER_LEN + 4 {
                        return (at, len);
                    }
                    bytes.copy_within(at + HEADER_LEN + 4..len, at);
                    len -= HEADER_LEN + 4;
                    continue;
                }
                _ => {}
            }
            at += HEADER_LEN;
            self.payload_left = head.length;
        }
    }
}

/// An accepted connection whose late streams' WINDOW_UPDATEs h2 never reads (see the
/// module's documentation).
pub(crate) struct LateStreams<IO> {
    io: IO,
    inbound: Inbound,
    outbound: Outbound,
    /// What was read from the client: `inbox[start..filtered]` is filtered and yet to be
    /// handed on; `inbox[filtered..end]` waits for the rest of its frame's header.
    inbox: Box<[u8]>,
    start: usize,
    filtered: usize,
    end: usize,
    ended: bool,
}

impl<IO> LateStreams<IO> {
    pub(crate) fn new(io: IO) -> Self {
        LateStreams {
            io,
            inbound: Inbound::new(),
            outbound: Outbound::default(),
            inbox: vec![0; READ_SIZE].into_boxed_slice(),
            start: 0,
            filtered: 0,
            end: 0,
            ended: false,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for LateStreams<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.filtered > this.start {
                let handed = (this.filtered - this.start).min(buf.remaining());
                buf.put_slice(&this.inbox[this.start..this.start + handed]);
                this.start += handed;
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                // A truncated frame is h2's to refuse, as it would be without the filter.
                this.filtered = this.end;
                if this.filtered == this.start {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // All that is filtered is handed on: what is left is part of one frame's start.
            this.inbox.copy_within(this.start..this.end, 0);
            this.end -= this.start;
            this.filtered = 0;
            this.start = 0;
            let mut read = ReadBuf::new(&mut this.inbox[this.end..]);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            let arrived = read.filled().len();
            if arrived == 0 {
                this.ended = true;
                continue;
            }
            this.end += arrived;
            (this.filtered, this.end) = this.inbound.filter(
                &mut this.inbox[..this.end],
                0,
                this.outbound.shutdown_ping(),
            );
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for LateStreams<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.outbound.wrote(&buf[..written]);
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let mut left = written;
        for buf in bufs {
            if left == 0 {
                break;
            }
            let taken = left.min(buf.len());
            this.outbound.wrote(&buf[..taken]);
            left -= taken;
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for LateStreams<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SHUTDOWN_PING: &[u8; 8] = b"stopping";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        bytes.extend([kind, flags]);
        bytes.extend(stream.to_be_bytes());
        bytes.extend(payload);
        bytes
    }

    fn window_update(stream: u32) -> Vec<u8> {
        frame(WINDOW_UPDATE, 0, stream, &65_535u32.to_be_bytes())
    }

    /// A stop as h2 writes it: GOAWAY naming the largest stream id, then its PING.
    fn stop_announced(ping: &[u8; 8]) -> Vec<u8> {
        let mut bytes = frame(0x4, ACK, 0, &[]);
        bytes.extend(frame(GOAWAY, 0, 0, &[0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0]));
        bytes.extend(frame(PING, 0, 0, ping));
        bytes
    }

    /// A client's bytes, as grpc core writes them: a call on stream 1, the acknowledgement
    /// of `ping`, then a late call on stream 3; then frames h2 takes, or ignores itself.
    /// And those bytes without the late call's WINDOW_UPDATE.
    fn client(ping: &[u8; 8]) -> (Vec<u8>, Vec<u8>) {
        let late_window_update = window_update(3);
        let frames = [
            frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]),
            frame(HEADERS, 0x4, 1, b"a header block"),
            window_update(1),
            frame(0x0, 0x1, 1, &[0; 40]),
            frame(PING, ACK, 0, ping),
            frame(HEADERS, 0x4, 3, b"a late block"),
            late_window_update.clone(),
            frame(0x0, 0x1, 3, &[0; 40]),
            window_update(1),
            window_update(0),
            frame(0x3, 0, 3, &[0, 0, 0, 8]), // RST_STREAM, which h2 ignores
        ];
        let mut all = PREFACE.to_vec();
        let mut filtered = PREFACE.to_vec();
        for frame in frames {
            all.extend(&frame);
            if frame != late_window_update {
                filtered.extend(frame);
            }
        }
        (all, filtered)
    }

    /// Bytes read in pieces of `size`, and what is written, kept.
    struct Pieces {
        bytes: Vec<u8>,
        size: usize,
        written: Vec<u8>,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let taken = self.size.min(self.bytes.len()).min(buf.remaining());
            buf.put_slice(&self.bytes[..taken]);
            self.bytes.drain(..taken);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Pieces {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let taken = self.size.min(buf.len());
            self.written.extend(&buf[..taken]);
            Poll::Ready(Ok(taken))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// What h2 reads of `client` once the server has written `server`, both in pieces of
    /// `size` bytes.
    async fn through(server: &[u8], client: &[u8], size: usize) -> Vec<u8> {
        let mut connection = LateStreams::new(Pieces {
            bytes: client.to_vec(),
            size,
            written: Vec::new(),
        });
        connection.write_all(server).await.unwrap();
        assert_eq!(connection.io.written, server);
        let mut read = Vec::new();
        connection.read_to_end(&mut read).await.unwrap();
        read
    }

    #[tokio::test]
    async fn a_late_streams_window_update_is_cut_out_however_the_bytes_are_split() {
        let (client, expected) = client(SHUTDOWN_PING);
        for size in 1..=client.len() {
            let read = through(&stop_announced(SHUTDOWN_PING), &client, size).await;
            assert_eq!(read, expected, "read in pieces of {size}");
        }
    }

    #[tokio::test]
    async fn nothing_is_cut_before_the_server_stops() {
        let (client, _) = client(SHUTDOWN_PING);
        for size in [1, 7, client.len()] {
            let read = through(&frame(0x4, ACK, 0, &[]), &client, size).await;
            assert_eq!(read, client, "read in pieces of {size}");
        }
    }

    #[tokio::test]
    async fn only_the_acknowledgement_of_the_shutdown_ping_caps_the_streams() {
        // The client acknowledges a PING of its own choosing, not the server's.
        let (client, _) = client(b"not-ours");
        let read = through(&stop_announced(SHUTDOWN_PING), &client, client.len()).await;
        assert_eq!(read, client);
        // A PING the server sent before announcing its stop is not the shutdown PING.
        let mut server = frame(PING, 0, 0, SHUTDOWN_PING);
        server.extend(frame(GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0]));
        let read = through(&server, &client, 5).await;
        assert_eq!(read, client);
    }

    #[test]
    fn a_truncated_frame_is_handed_on_as_it_came() {
        let mut inbound = Inbound::new();
        let mut bytes = PREFACE.to_vec();
        bytes.extend(&window_update(3)[..6]);
        let (filtered, len) = inbound.filter(&mut bytes, 0, Some(*SHUTDOWN_PING));
        assert_eq!((filtered, len), (PREFACE.len(), bytes.len()));
    }
}
