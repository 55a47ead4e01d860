//! RFC 6455 framing and RFC 7692 permessage-deflate, without I/O: bytes in, messages out
//! ([`Decoder`]), messages in, bytes out ([`Encoder`]). The connection (`super::session`)
//! feeds what it reads and writes what these give back; everything a peer can get wrong
//! is decided here, and tested synchronously.
//!
//! What a peer gets wrong ends the connection with the close code RFC 6455 gives it
//! ([`Violation`]): a message over the bound, judged by each frame header's length before
//! its payload is read, is `1009`, and so is a deflated one that inflates past the bound
//! (inflating stops there: a bomb costs the bound, not what it would inflate to); broken
//! framing (an unmasked frame from a client, a reserved bit, an unknown opcode, a control
//! frame fragmented or over 125 bytes, a continuation of nothing) is `1002`; deflated data
//! that is not valid deflate is `1007`. A text message is not checked for UTF-8 here: the
//! protocol reads text and binary messages alike and answers what is not UTF-8 JSON with
//! an `error` frame, keeping the connection.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Which end of the connection this is: a server reads masked frames and writes plain
/// ones, a client the other way round (RFC 6455 §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Server,
    Client,
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Close codes (RFC 6455 §7.4.1).
pub(crate) const CLOSE_NORMAL: u16 = 1000;
pub(crate) const CLOSE_GOING_AWAY: u16 = 1001;
pub(crate) const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub(crate) const CLOSE_INVALID_DATA: u16 = 1007;
pub(crate) const CLOSE_TOO_LARGE: u16 = 1009;

/// The four bytes a sync flush ends a deflated message with, which RFC 7692 §7.2.1 leaves
/// off the wire and the receiver puts back.
const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// How much inflated output is made room for at a time.
const INFLATE_STEP: usize = 64 * 1024;

/// What one frame or message of the peer was, once whole.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A text or binary message, inflated when it came deflated.
    Message(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    /// The peer's close: its code (none when it sent no payload) and reason, as sent.
    Close(Option<u16>, Vec<u8>),
}

/// Why the connection must end: each is a close code and a short reason for the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Violation {
    /// A message over the bound, on the wire or once inflated.
    TooLarge,
    /// Framing RFC 6455 forbids.
    Protocol(&'static str),
    /// A deflated message that is not valid deflate.
    BadDeflate,
}

impl Violation {
    pub(crate) fn close_code(self) -> u16 {
        match self {
            Violation::TooLarge => CLOSE_TOO_LARGE,
            Violation::Protocol(_) => CLOSE_PROTOCOL_ERROR,
            Violation::BadDeflate => CLOSE_INVALID_DATA,
        }
    }

    pub(crate) fn reason(self) -> &'static str {
        match self {
            Violation::TooLarge => "message too large",
            Violation::Protocol(why) => why,
            Violation::BadDeflate => "a deflated message that is not valid deflate",
        }
    }
}

/// permessage-deflate as agreed at the upgrade (RFC 7692 §7.1): whether each side starts
/// every message with an empty window. Window sizes are always 15 bits here: the side
/// that serves declines an offer asking for less, and the side that dials offers none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Deflate {
    pub(crate) server_no_context_takeover: bool,
    pub(crate) client_no_context_takeover: bool,
}

impl Deflate {
    /// Whether the side in `role` resets its compressor after each message it sends.
    fn resets_sending(self, role: Role) -> bool {
        match role {
            Role::Server => self.server_no_context_takeover,
            Role::Client => self.client_no_context_takeover,
        }
    }

    /// Whether the peer of `role` resets its compressor, so ours inflates each afresh.
    fn resets_receiving(self, role: Role) -> bool {
        match role {
            Role::Server => self.client_no_context_takeover,
            Role::Client => self.server_no_context_takeover,
        }
    }
}

/// A message whose frames are still arriving.
struct Partial {
    deflated: bool,
    data: Vec<u8>,
}

/// Turns the bytes read from the peer into whole messages and control frames.
pub(crate) struct Decoder {
    role: Role,
    max_message: usize,
    inflater: Option<(Decompress, bool)>,
    buffer: Vec<u8>,
    /// Bytes of `buffer` already taken.
    taken: usize,
    partial: Option<Partial>,
}

impl Decoder {
    /// A decoder for the side in `role`, taking messages of at most `max_message` bytes
    /// (on the wire and inflated), inflating them when `deflate` was agreed.
    pub(crate) fn new(role: Role, max_message: usize, deflate: Option<Deflate>) -> Self {
        Decoder {
            role,
            max_message,
            inflater: deflate.map(|d| (Decompress::new(false), d.resets_receiving(role))),
            buffer: Vec::new(),
            taken: 0,
            partial: None,
        }
    }

    /// Adds bytes read from the peer.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        if self.taken > 0 && self.taken == self.buffer.len() {
            // All taken: a buffer grown for a large message is let go, not kept idle.
            if self.buffer.capacity() > 1 << 20 {
                self.buffer = Vec::new();
            }
            self.buffer.clear();
            self.taken = 0;
        } else if self.taken > 64 * 1024 && self.taken * 2 > self.buffer.len() {
            self.buffer.drain(..self.taken);
            self.taken = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole message or control frame, `None` until more bytes are fed, or what
    /// the peer got wrong. A frame header announcing more than the bound is refused as
    /// soon as the header is in, before its payload is read.
    pub(crate) fn next(&mut self) -> Result<Option<Incoming>, Violation> {
        loop {
            let available = &self.buffer[self.taken..];
            let Some(header) = Header::parse(available)? else {
                return Ok(None);
            };
            self.check(&header)?;
            let end = header.size + header.length as usize;
            if available.len() < end {
                // Room for the rest at once, not doubling up to it: at most the bound.
                self.buffer.reserve_exact(end - available.len());
                return Ok(None);
            }
            let mut payload = available[header.size..end].to_vec();
            self.taken += end;
            if let Some(key) = header.mask {
                apply_mask(&mut payload, key);
            }
            match header.opcode {
                OP_PING => return Ok(Some(Incoming::Ping(payload))),
                OP_PONG => return Ok(Some(Incoming::Pong)),
                OP_CLOSE => return close_frame(payload).map(Some),
                OP_CONTINUATION => {
                    let partial = self.partial.as_mut().expect("checked: a message is open");
                    partial.data.extend_from_slice(&payload);
                }
                _ => {
                    self.partial = Some(Partial {
                        deflated: header.rsv1,
                        data: payload,
                    })
                }
            }
            if header.fin {
                let partial = self.partial.take().expect("a data frame opened it");
                let data = if partial.deflated {
                    self.inflate(&partial.data)?
                } else {
                    partial.data
                };
                return Ok(Some(Incoming::Message(data)));
            }
        }
    }

    /// What RFC 6455 and the bound say of a frame, from its header alone.
    fn check(&self, header: &Header) -> Result<(), Violation> {
        if header.rsv23 {
            return Err(Violation::Protocol("a frame with a reserved bit set"));
        }
        let masked = header.mask.is_some();
        match (self.role, masked) {
            (Role::Server, false) => return Err(Violation::Protocol("an unmasked client frame")),
            (Role::Client, true) => return Err(Violation::Protocol("a masked server frame")),
            _ => {}
        }
        match header.opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !header.fin || header.length > 125 {
                    return Err(Violation::Protocol(
                        "a control frame fragmented or over 125 bytes",
                    ));
                }
                if header.rsv1 {
                    return Err(Violation::Protocol("a deflated control frame"));
                }
                return Ok(());
            }
            OP_CONTINUATION => {
                if self.partial.is_none() {
                    return Err(Violation::Protocol("a continuation frame of no message"));
                }
                if header.rsv1 {
                    return Err(Violation::Protocol("RSV1 set on a continuation frame"));
                }
            }
            OP_TEXT | OP_BINARY => {
                if self.partial.is_some() {
                    return Err(Violation::Protocol(
                        "a new message before the last one ended",
                    ));
                }
                if header.rsv1 && self.inflater.is_none() {
                    return Err(Violation::Protocol(
                        "a deflated frame without permessage-deflate",
                    ));
                }
            }
            _ => return Err(Violation::Protocol("an unknown opcode")),
        }
        let so_far = self.partial.as_ref().map_or(0, |p| p.data.len()) as u64;
        if so_far + header.length > self.max_message as u64 {
            return Err(Violation::TooLarge);
        }
        Ok(())
    }

    /// A deflated message inflated, up to the bound and no further.
    fn inflate(&mut self, data: &[u8]) -> Result<Vec<u8>, Violation> {
        let limit = self.max_message;
        let (inflater, resets) = self.inflater.as_mut().expect("checked: deflate agreed");
        let mut out: Vec<u8> = Vec::new();
        for input in [data, &DEFLATE_TAIL[..]] {
            let mut offset = 0;
            loop {
                if out.len() == out.capacity() {
                    // Doubling, never past one byte over the bound: that byte says "over".
                    let want = (out.capacity() * 2).max(INFLATE_STEP).min(limit + 1);
                    out.reserve_exact(want.saturating_sub(out.len()).max(1));
                }
                let (before_in, before_out) = (inflater.total_in(), out.len());
                let status = inflater
                    .decompress_vec(&input[offset..], &mut out, FlushDecompress::Sync)
                    .map_err(|_| Violation::BadDeflate)?;
                let consumed = (inflater.total_in() - before_in) as usize;
                offset += consumed;
                if out.len() > limit {
                    return Err(Violation::TooLarge);
                }
                let full = out.len() == out.capacity();
                if status == Status::StreamEnd || (offset == input.len() && !full) {
                    break;
                }
                if consumed == 0 && out.len() == before_out && !full {
                    return Err(Violation::BadDeflate); // no progress: not deflate
                }
            }
        }
        if *resets {
            inflater.reset(false);
        }
        Ok(out)
    }
}

/// A close frame's code and reason; a payload of one byte, or a code no peer may send, is
/// broken framing.
fn close_frame(payload: Vec<u8>) -> Result<Incoming, Violation> {
    match payload.len() {
        0 => Ok(Incoming::Close(None, Vec::new())),
        1 => Err(Violation::Protocol("a close frame of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let sendable = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !sendable {
                return Err(Violation::Protocol("a close code no peer may send"));
            }
            Ok(Incoming::Close(Some(code), payload[2..].to_vec()))
        }
    }
}

/// One frame's header (RFC 6455 §5.2).
struct Header {
    fin: bool,
    rsv1: bool,
    rsv23: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    length: u64,
    /// The header's own length in bytes.
    size: usize,
}

impl Header {
    /// The header at the start of `bytes`, `None` until all of it is there.
    fn parse(bytes: &[u8]) -> Result<Option<Header>, Violation> {
        if bytes.len() < 2 {
            return Ok(None);
        }
        let (first, second) = (bytes[0], bytes[1]);
        let (length, mut size) = match second & 0x7f {
            126 => match bytes.get(2..4) {
                None => return Ok(None),
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            },
            127 => match bytes.get(2..10) {
                None => return Ok(None),
                Some(b) => {
                    let length = u64::from_be_bytes(b.try_into().expect("eight bytes"));
                    if length >> 63 != 0 {
                        return Err(Violation::Protocol("a frame length over 2^63"));
                    }
                    (length, 10)
                }
            },
            short => (u64::from(short), 2),
        };
        let mask = if second & 0x80 != 0 {
            let Some(key) = bytes.get(size..size + 4) else {
                return Ok(None);
            };
            size += 4;
            Some(key.try_into().expect("four bytes"))
        } else {
            None
        };
        Ok(Some(Header {
            fin: first & 0x80 != 0,
            rsv1: first & 0x40 != 0,
            rsv23: first & 0x30 != 0,
            opcode: first & 0x0f,
            mask,
            length,
            size,
        }))
    }
}

/// XORs `data` with the masking key, eight bytes at a time where it can.
fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let value = u64::from_ne_bytes(chunk.try_into().expect("eight bytes")) ^ wide;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

/// Masking keys for a client's frames: SipHash, keyed at random once per process, of a
/// counter. RFC 6455 asks that a key be unpredictable to the code whose data it masks;
/// this costs no system call per frame.
fn mask_key() -> [u8; 4] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static KEYS: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    let mut hasher = KEYS.get_or_init(std::hash::RandomState::new).build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let value = hasher.finish();
    (value as u32).to_ne_bytes()
}

/// Turns messages and control frames into the bytes to write, deflating messages when
/// permessage-deflate was agreed.
pub(crate) struct Encoder {
    role: Role,
    deflater: Option<(Compress, bool)>,
}

impl Encoder {
    pub(crate) fn new(role: Role, deflate: Option<Deflate>) -> Self {
        Encoder {
            role,
            // Level 1: JSON deflates well at it, and a large answer is not held up.
            deflater: deflate.map(|d| {
                (
                    Compress::new(Compression::fast(), false),
                    d.resets_sending(role),
                )
            }),
        }
    }

    /// One text message, in one frame.
    pub(crate) fn message(&mut self, payload: &[u8]) -> Vec<u8> {
        match self.deflater.as_mut() {
            None => frame(self.role, OP_TEXT, false, payload),
            Some((compressor, resets)) => {
                let deflated = deflate(compressor, payload);
                if *resets {
                    compressor.reset();
                }
                frame(self.role, OP_TEXT, true, &deflated)
            }
        }
    }

    pub(crate) fn ping(&self, payload: &[u8]) -> Vec<u8> {
        frame(
            self.role,
            OP_PING,
            false,
            &payload[..payload.len().min(125)],
        )
    }

    pub(crate) fn pong(&self, payload: &[u8]) -> Vec<u8> {
        frame(
            self.role,
            OP_PONG,
            false,
            &payload[..payload.len().min(125)],
        )
    }

    /// A close frame with `code` and as much of `reason` as fits (123 bytes, whole
    /// characters).
    pub(crate) fn close(&self, code: u16, reason: &str) -> Vec<u8> {
        let mut cut = reason.len().min(123);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(&reason.as_bytes()[..cut]);
        frame(self.role, OP_CLOSE, false, &payload)
    }
}

/// `payload` deflated and sync-flushed, its last four bytes (`00 00 ff ff`) left off.
pub(crate) fn deflate(compressor: &mut Compress, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() / 4 + 64);
    let mut offset = 0;
    loop {
        if out.len() == out.capacity() {
            out.reserve(out.capacity().max(64));
        }
        let before = compressor.total_in();
        compressor
            .compress_vec(&payload[offset..], &mut out, FlushCompress::Sync)
            .expect("deflating into memory cannot fail");
        offset += (compressor.total_in() - before) as usize;
        // Done once every byte went in and the flush left room to spare in `out`.
        if offset == payload.len() && out.len() < out.capacity() {
            break;
        }
    }
    if out.ends_with(&DEFLATE_TAIL) {
        out.truncate(out.len() - DEFLATE_TAIL.len());
    }
    out
}

/// One whole frame: header, masking key for a client, payload.
fn frame(role: Role, opcode: u8, deflated: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | if deflated { 0x40 } else { 0 } | opcode);
    let mask_bit = if role == Role::Client { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let start = out.len();
    match role {
        Role::Server => out.extend_from_slice(payload),
        Role::Client => {
            let key = mask_key();
            out.extend_from_slice(&key);
            out.extend_from_slice(payload);
            apply_mask(&mut out[start + 4..], key);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1024;

    /// A client's frame as a host would write it, masked with `key`.
    fn client_frame(first: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&key);
        let mut masked = payload.to_vec();
        apply_mask(&mut masked, key);
        out.extend_from_slice(&masked);
        out
    }

    fn server() -> Decoder {
        Decoder::new(Role::Server, LIMIT, None)
    }

    fn all(decoder: &mut Decoder) -> Result<Vec<Incoming>, Violation> {
        let mut found = Vec::new();
        while let Some(incoming) = decoder.next()? {
            found.push(incoming);
        }
        Ok(found)
    }

    #[test]
    fn a_masked_text_message_is_read_whole_however_it_is_cut() {
        let bytes = client_frame(0x81, b"{\"type\":\"health\"}", [1, 2, 3, 4]);
        for cut in 0..bytes.len() {
            let mut decoder = server();
            decoder.feed(&bytes[..cut]);
            assert_eq!(decoder.next(), Ok(None), "cut at {cut}");
            decoder.feed(&bytes[cut..]);
            assert_eq!(
                decoder.next(),
                Ok(Some(Incoming::Message(b"{\"type\":\"health\"}".to_vec())))
            );
            assert_eq!(decoder.next(), Ok(None));
        }
    }

    #[test]
    fn fragments_join_and_control_frames_come_between() {
        let mut decoder = server();
        decoder.feed(&client_frame(0x01, b"[1,", [9, 9, 9, 9]));
        decoder.feed(&client_frame(0x89, b"hi", [0, 1, 0, 1]));
        decoder.feed(&client_frame(0x00, b"2", [5, 6, 7, 8]));
        decoder.feed(&client_frame(0x80, b"]", [1, 1, 1, 1]));
        decoder.feed(&client_frame(0x8A, b"", [1, 1, 1, 1]));
        assert_eq!(
            all(&mut decoder),
            Ok(vec![
                Incoming::Ping(b"hi".to_vec()),
                Incoming::Message(b"[1,2]".to_vec()),
                Incoming::Pong,
            ])
        );
    }

    #[test]
    fn binary_and_text_messages_read_alike_and_bytes_are_not_checked_for_utf8() {
        let mut decoder = server();
        decoder.feed(&client_frame(0x82, b"\xff\xfe", [3, 3, 3, 3]));
        decoder.feed(&client_frame(0x81, b"\xff", [3, 3, 3, 3]));
        decoder.feed(&client_frame(0x81, b"", [3, 3, 3, 3]));
        assert_eq!(
            all(&mut decoder),
            Ok(vec![
                Incoming::Message(b"\xff\xfe".to_vec()),
                Incoming::Message(b"\xff".to_vec()),
                Incoming::Message(Vec::new()),
            ])
        );
    }

    #[test]
    fn a_header_over_the_bound_is_refused_before_its_payload() {
        let mut decoder = server();
        // 16-bit and 64-bit lengths, nothing of the payload yet.
        let mut header = vec![0x81, 0x80 | 126];
        header.extend_from_slice(&((LIMIT + 1) as u16).to_be_bytes());
        header.extend_from_slice(&[0, 0, 0, 0]);
        decoder.feed(&header);
        assert_eq!(decoder.next(), Err(Violation::TooLarge));
        let mut decoder = server();
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&(8u64 << 30).to_be_bytes());
        header.extend_from_slice(&[9, 9, 9, 9]);
        decoder.feed(&header);
        assert_eq!(decoder.next(), Err(Violation::TooLarge));
        assert_eq!(Violation::TooLarge.close_code(), 1009);
    }

    #[test]
    fn fragments_adding_up_past_the_bound_are_too_large() {
        let mut decoder = server();
        decoder.feed(&client_frame(0x01, &[b'x'; LIMIT - 10], [1, 2, 3, 4]));
        decoder.feed(&client_frame(0x80, &[b'x'; 11], [1, 2, 3, 4]));
        assert_eq!(decoder.next(), Err(Violation::TooLarge));
        let mut decoder = server();
        decoder.feed(&client_frame(0x01, &[b'x'; LIMIT - 10], [1, 2, 3, 4]));
        decoder.feed(&client_frame(0x80, &[b'x'; 10], [1, 2, 3, 4]));
        assert!(matches!(decoder.next(), Ok(Some(Incoming::Message(m))) if m.len() == LIMIT));
    }

    #[test]
    fn broken_framing_is_a_protocol_error() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x81, 0x02, b'h', b'i'], "unmasked"),
            (client_frame(0x91, b"x", [1, 1, 1, 1]), "reserved"),
            (
                client_frame(0xC1, b"x", [1, 1, 1, 1]),
                "without permessage-deflate",
            ),
            (client_frame(0x83, b"x", [1, 1, 1, 1]), "unknown opcode"),
            (client_frame(0x80, b"x", [1, 1, 1, 1]), "continuation"),
            (client_frame(0x09, b"x", [1, 1, 1, 1]), "control frame"),
            (client_frame(0x89, &[0; 126], [1, 1, 1, 1]), "control frame"),
            (client_frame(0x88, &[3], [1, 1, 1, 1]), "one byte"),
            (
                client_frame(0x88, &1005u16.to_be_bytes(), [1, 1, 1, 1]),
                "close code",
            ),
        ];
        for (bytes, why) in cases {
            let mut decoder = server();
            decoder.feed(&bytes);
            match decoder.next() {
                Err(Violation::Protocol(said)) => assert!(said.contains(why), "{said} / {why}"),
                other => panic!("{why}: {other:?}"),
            }
        }
        let mut decoder = server();
        decoder.feed(&client_frame(0x01, b"x", [1, 1, 1, 1]));
        decoder.feed(&client_frame(0x81, b"y", [1, 1, 1, 1]));
        assert!(matches!(decoder.next(), Err(Violation::Protocol(_))));
        let mut client = Decoder::new(Role::Client, LIMIT, None);
        client.feed(&client_frame(0x81, b"x", [1, 1, 1, 1]));
        assert_eq!(
            client.next(),
            Err(Violation::Protocol("a masked server frame"))
        );
    }

    #[test]
    fn a_close_frame_gives_its_code_and_reason() {
        let mut decoder = server();
        let mut payload = 4403u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"admitted as version 2.0.0");
        decoder.feed(&client_frame(0x88, &payload, [7, 7, 7, 7]));
        decoder.feed(&client_frame(0x88, b"", [7, 7, 7, 7]));
        assert_eq!(
            all(&mut decoder),
            Ok(vec![
                Incoming::Close(Some(4403), b"admitted as version 2.0.0".to_vec()),
                Incoming::Close(None, Vec::new()),
            ])
        );
    }

    #[test]
    fn what_the_encoder_writes_the_decoder_reads_both_ways() {
        for deflate in [None, Some(Deflate::default())] {
            for (writer, reader) in [(Role::Client, Role::Server), (Role::Server, Role::Client)] {
                let mut encoder = Encoder::new(writer, deflate);
                let mut decoder = Decoder::new(reader, 1 << 20, deflate);
                for size in [0, 1, 125, 126, 65_535, 65_536, 300_000] {
                    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
                    decoder.feed(&encoder.message(&payload));
                    assert_eq!(decoder.next(), Ok(Some(Incoming::Message(payload))));
                }
                decoder.feed(&encoder.ping(b"p"));
                decoder.feed(&encoder.pong(b"p"));
                decoder.feed(&encoder.close(1001, &"é".repeat(100)));
                let found = all(&mut decoder).unwrap();
                assert_eq!(found[0], Incoming::Ping(b"p".to_vec()));
                assert_eq!(found[1], Incoming::Pong);
                match &found[2] {
                    Incoming::Close(Some(1001), reason) => {
                        assert!(reason.len() <= 123);
                        assert!(std::str::from_utf8(reason).is_ok(), "cut at a character");
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_servers_frames_are_unmasked_and_a_clients_masked() {
        let server = Encoder::new(Role::Server, None).ping(b"x");
        assert_eq!(server, vec![0x89, 0x01, b'x']);
        let client = Encoder::new(Role::Client, None).ping(b"x");
        assert_eq!(client[1], 0x81);
        assert_eq!(client.len(), 2 + 4 + 1);
        let other = Encoder::new(Role::Client, None).ping(b"x");
        assert_ne!(client[2..6], other[2..6], "a new key each frame");
    }

    #[test]
    fn context_takeover_carries_over_and_a_reset_does_not() {
        let json =
            br#"{"type":"response","id":1,"response":{"ok":true,"result":{"rows":[1,2,3]}}}"#;
        for resets in [false, true] {
            let agreed = Deflate {
                server_no_context_takeover: resets,
                client_no_context_takeover: resets,
            };
            let mut encoder = Encoder::new(Role::Server, Some(agreed));
            let mut decoder = Decoder::new(Role::Client, LIMIT, Some(agreed));
            let first = encoder.message(json);
            let second = encoder.message(json);
            if resets {
                assert_eq!(first.len(), second.len());
            } else {
                assert!(
                    second.len() < first.len() / 2,
                    "the second refers to the first"
                );
            }
            decoder.feed(&first);
            decoder.feed(&second);
            let found = all(&mut decoder).unwrap();
            assert_eq!(
                found,
                vec![
                    Incoming::Message(json.to_vec()),
                    Incoming::Message(json.to_vec())
                ]
            );
        }
    }

    #[test]
    fn repetitive_json_deflates_to_a_small_fraction() {
        let rows: Vec<String> = (0..40_000)
            .map(|n| format!("{{\"name\":\"row\",\"value\":{}}}", n % 10))
            .collect();
        let payload = format!("{{\"rows\":[{}]}}", rows.join(","));
        let frame =
            Encoder::new(Role::Server, Some(Deflate::default())).message(payload.as_bytes());
        assert!(
            frame.len() < payload.len() / 20,
            "{} of {}",
            frame.len(),
            payload.len()
        );
    }

    /// One deflated message of `size` bytes of one letter, as a host would send it.
    fn deflated_bomb(size: usize) -> Vec<u8> {
        let mut compressor = Compress::new(Compression::best(), false);
        let body = deflate(&mut compressor, &vec![b'x'; size]);
        let mut out = vec![0xC1, 0x80 | 127];
        out.extend_from_slice(&(body.len() as u64).to_be_bytes());
        let key = [1, 2, 3, 4];
        out.extend_from_slice(&key);
        let mut masked = body;
        apply_mask(&mut masked, key);
        out.extend_from_slice(&masked);
        out
    }

    #[test]
    fn a_deflate_bomb_stops_at_the_bound() {
        let limit = 8 << 20;
        let bomb = deflated_bomb(64 << 20);
        assert!(bomb.len() < limit / 8, "small on the wire: {}", bomb.len());
        let mut decoder = Decoder::new(Role::Server, limit, Some(Deflate::default()));
        decoder.feed(&bomb);
        assert_eq!(decoder.next(), Err(Violation::TooLarge));
        // Exactly the bound inflates.
        let mut decoder = Decoder::new(Role::Server, limit, Some(Deflate::default()));
        decoder.feed(&deflated_bomb(limit));
        assert!(matches!(decoder.next(), Ok(Some(Incoming::Message(m))) if m.len() == limit));
    }

    #[test]
    fn deflated_garbage_is_invalid_data() {
        let mut decoder = Decoder::new(Role::Server, LIMIT, Some(Deflate::default()));
        decoder.feed(&client_frame(
            0xC1,
            b"\xff\xff\xff\xff not deflate",
            [1, 2, 3, 4],
        ));
        assert_eq!(decoder.next(), Err(Violation::BadDeflate));
        assert_eq!(Violation::BadDeflate.close_code(), 1007);
    }
}
