//! Lets gRPC clients that send a unix socket path as HTTP/2 `:authority` reach the node API.
//!
//! grpc-core clients (Python grpcio, C++, Ruby, ...) send the percent-encoded socket path
//! (`%2Frun%2Fnoded%2Fnoded.sock`) and grpc-java sends it raw; h2's server parses `:authority` with the
//! `http` crate, which refuses both, and resets the stream with PROTOCOL_ERROR (grpc/grpc#38142,
//! hyperium/h2#487). Neither h2, hyper nor tonic has an option to relax that check, so this adapter sits
//! between the accepted socket and tonic and rewrites such an authority to `localhost` in the
//! client→server byte stream. The server→client direction is untouched.
//!
//! Header blocks are HPACK-compressed against a dynamic table that the client's encoder and the server's
//! decoder keep in lockstep, so the adapter decodes every block with its own copy of that table. Blocks
//! pass byte-for-byte until the first one that needs a fix; from then on every block is re-encoded with
//! literals that never touch the server's dynamic table, so the entries the server already holds are
//! never referenced again and cannot go out of step with the client's. All other frames pass unchanged.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
/// Raw bytes (frame headers included) of one HEADERS+CONTINUATION sequence held before it is decoded.
const MAX_HEADER_FRAMES: usize = 64 * 1024;
/// Decoded header list size (RFC 7541 4.1 accounting); indexed references can make a small block
/// expand a lot, so this is bounded separately.
const MAX_DECODED_LIST: usize = 256 * 1024;
/// Frames the adapter writes never exceed the smallest SETTINGS_MAX_FRAME_SIZE a server may advertise
/// (RFC 9113 6.5.2); hyper's server advertises exactly this by default.
const OUT_FRAME_SIZE: usize = 16_384;
/// The dynamic table size the client's encoder may use: the server never sends
/// SETTINGS_HEADER_TABLE_SIZE (hyper leaves it unset), so the protocol default applies.
const CLIENT_TABLE_LIMIT: usize = 4096;
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Why a connection is closed instead of being passed on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error("client did not send the HTTP/2 connection preface")]
    Preface,
    #[error("header block of stream {stream} exceeds {MAX_HEADER_FRAMES} bytes")]
    BlockTooLarge { stream: u32 },
    #[error("decoded header list of stream {stream} exceeds {MAX_DECODED_LIST} bytes")]
    ListTooLarge { stream: u32 },
    #[error("frame type {kind:#x} on stream {stream} interrupts a header block")]
    ExpectedContinuation { kind: u8, stream: u32 },
    #[error("HEADERS frame on stream {stream}: padding or priority longer than the frame")]
    BadPadding { stream: u32 },
    #[error("HPACK: {0}")]
    Hpack(#[from] HpackError),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HpackError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("integer longer than 2^28")]
    IntegerOverflow,
    #[error("index {0} is not in the static or dynamic table")]
    BadIndex(usize),
    #[error("invalid Huffman code")]
    Huffman,
    #[error("dynamic table size update to {0} exceeds {CLIENT_TABLE_LIMIT}")]
    TableSize(usize),
    #[error("dynamic table size update after a header field")]
    LateSizeUpdate,
    #[error("decoded header list exceeds {MAX_DECODED_LIST} bytes")]
    ListTooLarge,
}

/// One decoded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
    /// Sent as "never indexed" (RFC 7541 6.2.3): kept so intermediaries downstream still see it.
    pub never_indexed: bool,
}

/// The accepted socket with the client→server stream rewritten as described in the module docs.
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    out: BytesMut,
    read_buf: Box<[u8]>,
    eof: bool,
    failed: bool,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: Rewriter::new(),
            out: BytesMut::new(),
            read_buf: vec![0; OUT_FRAME_SIZE].into_boxed_slice(),
            eof: false,
            failed: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = buf.remaining().min(this.out.len());
                buf.put_slice(&this.out.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "connection closed by the :authority adapter",
                )));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.read_buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
                continue;
            }
            this.rewriter.push(rb.filled());
            if let Err(e) = this.rewriter.process(&mut this.out) {
                tracing::warn!(error = %e, "node API: closing a client connection");
                this.failed = true;
                // Whatever was complete before the bad frame still reaches the server.
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[derive(Debug, Clone, Copy)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(b: &[u8]) -> Self {
        Self {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Preface(usize),
    FrameHeader,
    /// Payload bytes of a frame that passes unchanged.
    Forward(usize),
    /// Waiting for the whole payload of a HEADERS or CONTINUATION frame.
    HeaderFrame(FrameHead),
}

/// A HEADERS frame whose CONTINUATIONs have not all arrived.
struct Pending {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    /// The frames as received, sent on unchanged while no rewrite has been needed.
    raw: Vec<u8>,
}

/// The client→server half as a push parser, independent of I/O.
pub struct Rewriter {
    state: State,
    input: BytesMut,
    decoder: Decoder,
    pending: Option<Pending>,
    rewriting: bool,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        Self {
            state: State::Preface(0),
            input: BytesMut::new(),
            decoder: Decoder::new(),
            pending: None,
            rewriting: false,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.input.extend_from_slice(data);
    }

    /// Moves every complete unit of input to `out`. Input held back is at most one header frame
    /// sequence (bounded by [`MAX_HEADER_FRAMES`]).
    pub fn process(&mut self, out: &mut BytesMut) -> Result<(), RewriteError> {
        loop {
            match self.state {
                State::Preface(seen) => {
                    let n = (PREFACE.len() - seen).min(self.input.len());
                    if n == 0 {
                        return Ok(());
                    }
                    let chunk = self.input.split_to(n);
                    if chunk[..] != PREFACE[seen..seen + n] {
                        return Err(RewriteError::Preface);
                    }
                    out.extend_from_slice(&chunk);
                    self.state = if seen + n == PREFACE.len() {
                        State::FrameHeader
                    } else {
                        State::Preface(seen + n)
                    };
                }
                State::FrameHeader => {
                    if self.input.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let head = FrameHead::parse(&self.input[..FRAME_HEADER_LEN]);
                    if let Some(p) = &self.pending {
                        // RFC 9113 6.10: nothing may come between a HEADERS and its CONTINUATIONs.
                        if head.kind != FRAME_CONTINUATION || head.stream != p.stream {
                            return Err(RewriteError::ExpectedContinuation {
                                kind: head.kind,
                                stream: head.stream,
                            });
                        }
                    }
                    let header_frame = head.kind == FRAME_HEADERS
                        || (head.kind == FRAME_CONTINUATION && self.pending.is_some());
                    if header_frame {
                        let held = self.pending.as_ref().map_or(0, |p| p.raw.len());
                        if held + FRAME_HEADER_LEN + head.len > MAX_HEADER_FRAMES {
                            return Err(RewriteError::BlockTooLarge {
                                stream: head.stream,
                            });
                        }
                        self.state = State::HeaderFrame(head);
                    } else {
                        // A stray CONTINUATION also lands here: h2 rejects it as a protocol error.
                        out.extend_from_slice(&self.input.split_to(FRAME_HEADER_LEN));
                        self.state = State::Forward(head.len);
                    }
                }
                State::Forward(0) => self.state = State::FrameHeader,
                State::Forward(rest) => {
                    let n = rest.min(self.input.len());
                    if n == 0 {
                        return Ok(());
                    }
                    out.extend_from_slice(&self.input.split_to(n));
                    self.state = State::Forward(rest - n);
                }
                State::HeaderFrame(head) => {
                    if self.input.len() < FRAME_HEADER_LEN + head.len {
                        return Ok(());
                    }
                    let frame = self.input.split_to(FRAME_HEADER_LEN + head.len);
                    self.state = State::FrameHeader;
                    self.header_frame(head, &frame, out)?;
                }
            }
        }
    }

    fn header_frame(
        &mut self,
        head: FrameHead,
        frame: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), RewriteError> {
        let payload = &frame[FRAME_HEADER_LEN..];
        match self.pending.as_mut() {
            Some(p) => {
                p.block.extend_from_slice(payload);
                p.raw.extend_from_slice(frame);
            }
            None => {
                let bad = RewriteError::BadPadding {
                    stream: head.stream,
                };
                let mut start = 0;
                let mut pad = 0;
                if head.flags & FLAG_PADDED != 0 {
                    pad = usize::from(*payload.first().ok_or(bad)?);
                    start = 1;
                }
                let mut priority = None;
                if head.flags & FLAG_PRIORITY != 0 {
                    let p = payload
                        .get(start..start + 5)
                        .ok_or(RewriteError::BadPadding {
                            stream: head.stream,
                        })?;
                    priority = Some([p[0], p[1], p[2], p[3], p[4]]);
                    start += 5;
                }
                if start + pad > payload.len() {
                    return Err(RewriteError::BadPadding {
                        stream: head.stream,
                    });
                }
                self.pending = Some(Pending {
                    stream: head.stream,
                    flags: head.flags,
                    priority,
                    block: payload[start..payload.len() - pad].to_vec(),
                    raw: frame.to_vec(),
                });
            }
        }
        if head.flags & FLAG_END_HEADERS == 0 {
            return Ok(());
        }
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let mut fields = self.decoder.decode(&p.block).map_err(|e| match e {
            HpackError::ListTooLarge => RewriteError::ListTooLarge { stream: p.stream },
            other => RewriteError::Hpack(other),
        })?;
        let mut fixed = false;
        for f in &mut fields {
            if f.name == b":authority" && http::uri::Authority::try_from(&f.value[..]).is_err() {
                if !self.rewriting {
                    tracing::debug!(
                        authority = %String::from_utf8_lossy(&f.value),
                        "node API: client sent an authority h2 refuses; rewriting header blocks"
                    );
                }
                f.value = REPLACEMENT_AUTHORITY.to_vec();
                fixed = true;
            }
        }
        self.rewriting |= fixed;
        if self.rewriting {
            write_header_frames(out, p.stream, p.flags, p.priority, &encode(&fields));
        } else {
            out.extend_from_slice(&p.raw);
        }
        Ok(())
    }
}

/// Writes a header block as HEADERS plus as many CONTINUATION frames as [`OUT_FRAME_SIZE`] needs.
/// Padding is dropped; END_STREAM and the priority fields are kept.
fn write_header_frames(
    out: &mut BytesMut,
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: &[u8],
) {
    let prio_len = if priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = block.split_at(block.len().min(OUT_FRAME_SIZE - prio_len));
    let mut first_flags = flags & (FLAG_END_STREAM | FLAG_PRIORITY);
    if rest.is_empty() {
        first_flags |= FLAG_END_HEADERS;
    }
    put_frame_head(
        out,
        prio_len + first.len(),
        FRAME_HEADERS,
        first_flags,
        stream,
    );
    if let Some(p) = priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(OUT_FRAME_SIZE));
        let f = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        put_frame_head(out, chunk.len(), FRAME_CONTINUATION, f, stream);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}

fn put_frame_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// HPACK-encodes fields as literals that neither use nor change the decoder's dynamic table
/// (RFC 7541 6.2.2 / 6.2.3, new name, no Huffman).
pub fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        out.push(if f.never_indexed { 0x10 } else { 0x00 });
        put_string(&mut out, &f.name);
        put_string(&mut out, &f.value);
    }
    out
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    put_int(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// RFC 7541 5.1: `flags` fills the bits above the `prefix`-bit integer in the first octet.
// Every `as u8` is of a value below 0x80: `value < max` with `prefix <= 7`, a 7-bit mask, or the
// loop's exit condition.
#[allow(clippy::cast_possible_truncation)]
fn put_int(out: &mut Vec<u8>, flags: u8, prefix: u8, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// HPACK decoder with the dynamic table the client's encoder maintains (RFC 7541 2.3, 4).
pub struct Decoder {
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: CLIENT_TABLE_LIMIT,
        }
    }

    /// Decodes one complete header block.
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut buf = block;
        let mut fields = Vec::new();
        let mut list_size = 0usize;
        while let Some(&first) = buf.first() {
            let (name, value, never_indexed) = if first & 0x80 != 0 {
                let index = take_int(&mut buf, 7)?;
                let (n, v) = self.get(index)?;
                account(&mut list_size, n.len() + v.len())?;
                (n.clone(), v.clone(), false)
            } else if first & 0xe0 == 0x20 {
                if !fields.is_empty() {
                    return Err(HpackError::LateSizeUpdate);
                }
                let size = take_int(&mut buf, 5)?;
                if size > CLIENT_TABLE_LIMIT {
                    return Err(HpackError::TableSize(size));
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                let indexing = first & 0xc0 == 0x40;
                let never_indexed = !indexing && first & 0x10 != 0;
                let index = take_int(&mut buf, if indexing { 6 } else { 4 })?;
                let name = if index == 0 {
                    take_string(&mut buf)?
                } else {
                    self.get(index)?.0.clone()
                };
                let value = take_string(&mut buf)?;
                account(&mut list_size, name.len() + value.len())?;
                if indexing {
                    self.insert(name.clone(), value.clone());
                }
                (name, value, never_indexed)
            };
            fields.push(Field {
                name,
                value,
                never_indexed,
            });
        }
        Ok(fields)
    }

    fn get(&self, index: usize) -> Result<&(Vec<u8>, Vec<u8>), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            i if i <= STATIC_TABLE.len() => Ok(&static_table()[i - 1]),
            i => self
                .table
                .get(i - STATIC_TABLE.len() - 1)
                .ok_or(HpackError::BadIndex(i)),
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + 32;
        if size > self.max_size {
            // RFC 7541 4.4: an entry larger than the table empties it and is not added.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Evicts oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => break,
            }
        }
    }
}

fn account(list_size: &mut usize, field: usize) -> Result<(), HpackError> {
    *list_size += field + 32;
    if *list_size > MAX_DECODED_LIST {
        return Err(HpackError::ListTooLarge);
    }
    Ok(())
}

fn take_int(buf: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    let (&first, rest) = buf.split_first().ok_or(HpackError::Truncated)?;
    *buf = rest;
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let (&b, rest) = buf.split_first().ok_or(HpackError::Truncated)?;
        *buf = rest;
        value += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        if shift > 21 {
            return Err(HpackError::IntegerOverflow);
        }
    }
}

fn take_string(buf: &mut &[u8]) -> Result<Vec<u8>, HpackError> {
    let huffman = buf.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = take_int(buf, 7)?;
    if len > buf.len() {
        return Err(HpackError::Truncated);
    }
    let (s, rest) = buf.split_at(len);
    *buf = rest;
    if huffman {
        huffman_decode(s)
    } else {
        Ok(s.to_vec())
    }
}

/// Huffman decoding tree: node i has children `[zero, one]`; a child >= 0 is a node, a child < 0 is the
/// leaf for symbol `-(child + 1)`, and `MISSING` marks a code that does not exist (EOS or beyond).
const MISSING: i32 = i32::MIN;

// Symbols are below 256 and there are at most 255 inner nodes, and the sign tells leaves (negative)
// from inner nodes, so the i32 <-> usize casts neither wrap nor lose a sign.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]
fn huffman_tree() -> &'static Vec<[i32; 2]> {
    static TREE: OnceLock<Vec<[i32; 2]>> = OnceLock::new();
    TREE.get_or_init(|| {
        let mut nodes = vec![[MISSING, MISSING]];
        for (symbol, &(code, bits)) in HUFFMAN_CODES.iter().enumerate() {
            let mut node = 0usize;
            for i in (0..bits).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    nodes[node][bit] = -(symbol as i32) - 1;
                } else {
                    if nodes[node][bit] == MISSING {
                        nodes.push([MISSING, MISSING]);
                        nodes[node][bit] = (nodes.len() - 1) as i32;
                    }
                    node = nodes[node][bit] as usize;
                }
            }
        }
        nodes
    })
}

/// RFC 7541 5.2 / Appendix B; padding must be < 8 bits and all ones, EOS inside the string is an error.
// A leaf is `-(symbol + 1)` with symbol < 256 (EOS has no leaf), an inner node a non-negative
// index: see `huffman_tree`.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, HpackError> {
    let tree = huffman_tree();
    let mut out = Vec::with_capacity(src.len() * 8 / 5);
    let mut node = 0usize;
    let mut pending_bits = 0u32;
    let mut pending_all_ones = true;
    for &byte in src {
        for i in (0..8).rev() {
            let bit = usize::from((byte >> i) & 1);
            pending_bits += 1;
            pending_all_ones &= bit == 1;
            match tree[node][bit] {
                MISSING => return Err(HpackError::Huffman),
                next if next < 0 => {
                    out.push((-(next + 1)) as u8);
                    node = 0;
                    pending_bits = 0;
                    pending_all_ones = true;
                }
                next => node = next as usize,
            }
        }
    }
    if pending_bits > 7 || !pending_all_ones {
        return Err(HpackError::Huffman);
    }
    Ok(out)
}

fn static_table() -> &'static Vec<(Vec<u8>, Vec<u8>)> {
    static TABLE: OnceLock<Vec<(Vec<u8>, Vec<u8>)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        STATIC_TABLE
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    })
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// RFC 7541 Appendix B: (code, length in bits) of symbols 0..=255; EOS is left out so that it decodes
/// as an error.
#[rustfmt::skip]
const HUFFMAN_CODES: [(u32, u8); 256] = [
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28), (0xfffffe4, 28), (0xfffffe5, 28),
    (0xfffffe6, 28), (0xfffffe7, 28), (0xfffffe8, 28), (0xffffea, 24), (0x3ffffffc, 30), (0xfffffe9, 28),
    (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28), (0xfffffec, 28), (0xfffffed, 28), (0xfffffee, 28),
    (0xfffffef, 28), (0xffffff0, 28), (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28),
    (0xffffff4, 28), (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28), (0xffffff8, 28), (0xffffff9, 28),
    (0xffffffa, 28), (0xffffffb, 28), (0x14, 6), (0x3f8, 10), (0x3f9, 10), (0xffa, 12),
    (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11), (0x3fa, 10), (0x3fb, 10),
    (0xf9, 8), (0x7fb, 11), (0xfa, 8), (0x16, 6), (0x17, 6), (0x18, 6),
    (0x0, 5), (0x1, 5), (0x2, 5), (0x19, 6), (0x1a, 6), (0x1b, 6),
    (0x1c, 6), (0x1d, 6), (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8),
    (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10), (0x1ffa, 13), (0x21, 6),
    (0x5d, 7), (0x5e, 7), (0x5f, 7), (0x60, 7), (0x61, 7), (0x62, 7),
    (0x63, 7), (0x64, 7), (0x65, 7), (0x66, 7), (0x67, 7), (0x68, 7),
    (0x69, 7), (0x6a, 7), (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7),
    (0x6f, 7), (0x70, 7), (0x71, 7), (0x72, 7), (0xfc, 8), (0x73, 7),
    (0xfd, 8), (0x1ffb, 13), (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14), (0x22, 6),
    (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5), (0x24, 6), (0x5, 5),
    (0x25, 6), (0x26, 6), (0x27, 6), (0x6, 5), (0x74, 7), (0x75, 7),
    (0x28, 6), (0x29, 6), (0x2a, 6), (0x7, 5), (0x2b, 6), (0x76, 7),
    (0x2c, 6), (0x8, 5), (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7),
    (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15), (0x7fc, 11), (0x3ffd, 14),
    (0x1ffd, 13), (0xffffffc, 28), (0xfffe6, 20), (0x3fffd2, 22), (0xfffe7, 20), (0xfffe8, 20),
    (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22), (0x7fffd9, 23), (0x3fffd6, 22), (0x7fffda, 23),
    (0x7fffdb, 23), (0x7fffdc, 23), (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23),
    (0xffffec, 24), (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23), (0xffffee, 24), (0x7fffe1, 23),
    (0x7fffe2, 23), (0x7fffe3, 23), (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22), (0x7fffe5, 23),
    (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24), (0x3fffda, 22), (0x1fffdd, 21),
    (0xfffe9, 20), (0x3fffdb, 22), (0x3fffdc, 22), (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21),
    (0x7fffea, 23), (0x3fffdd, 22), (0x3fffde, 22), (0xfffff0, 24), (0x1fffdf, 21), (0x3fffdf, 22),
    (0x7fffeb, 23), (0x7fffec, 23), (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21),
    (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23), (0xfffea, 20), (0x3fffe2, 22),
    (0x3fffe3, 22), (0x3fffe4, 22), (0x7ffff0, 23), (0x3fffe5, 22), (0x3fffe6, 22), (0x7ffff1, 23),
    (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20), (0x7fff1, 19), (0x3fffe7, 22), (0x7ffff2, 23),
    (0x3fffe8, 22), (0x1ffffec, 25), (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27),
    (0x7ffffdf, 27), (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25), (0x7fff2, 19), (0x1fffe3, 21),
    (0x3ffffe6, 26), (0x7ffffe0, 27), (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27), (0xfffff2, 24),
    (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26), (0xffffffd, 28), (0x7ffffe3, 27),
    (0x7ffffe4, 27), (0x7ffffe5, 27), (0xfffec, 20), (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21),
    (0x3fffe9, 22), (0x1fffe7, 21), (0x1fffe8, 21), (0x7ffff3, 23), (0x3fffea, 22), (0x3fffeb, 22),
    (0x1ffffee, 25), (0x1ffffef, 25), (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26), (0x7ffffe7, 27), (0x7ffffe8, 27),
    (0x7ffffe9, 27), (0x7ffffea, 27), (0x7ffffeb, 27), (0xffffffe, 28), (0x7ffffec, 27), (0x7ffffed, 27),
    (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27), (0x3ffffee, 26),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn pairs(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8_lossy(&f.name).into_owned(),
                    String::from_utf8_lossy(&f.value).into_owned(),
                )
            })
            .collect()
    }

    fn owned(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_frame_head(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    /// Literal with incremental indexing, new name (how grpc-core sends most headers).
    fn lit_indexed(out: &mut Vec<u8>, name: &str, value: &str) {
        out.push(0x40);
        put_string(out, name.as_bytes());
        put_string(out, value.as_bytes());
    }

    /// Splits adapter output (after the preface) into frames.
    fn frames(out: &[u8]) -> Vec<(FrameHead, Vec<u8>)> {
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut rest = &out[PREFACE.len()..];
        let mut v = Vec::new();
        while !rest.is_empty() {
            let head = FrameHead::parse(rest);
            v.push((
                head,
                rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + head.len].to_vec(),
            ));
            rest = &rest[FRAME_HEADER_LEN + head.len..];
        }
        v
    }

    /// Plays h2's role: reassembles header blocks from the adapter's frames and decodes them.
    fn server_view(out: &[u8]) -> (Vec<Vec<(String, String)>>, Decoder) {
        let mut decoder = Decoder::new();
        let mut blocks = Vec::new();
        let mut block = Vec::new();
        for (head, payload) in frames(out) {
            assert!(head.len <= OUT_FRAME_SIZE, "frame larger than 16384");
            match head.kind {
                FRAME_HEADERS => {
                    let mut start = 0;
                    let mut pad = 0;
                    if head.flags & FLAG_PADDED != 0 {
                        pad = usize::from(payload[0]);
                        start = 1;
                    }
                    if head.flags & FLAG_PRIORITY != 0 {
                        start += 5;
                    }
                    block.extend_from_slice(&payload[start..payload.len() - pad]);
                }
                FRAME_CONTINUATION => block.extend_from_slice(&payload),
                _ => continue,
            }
            if head.flags & FLAG_END_HEADERS != 0 {
                blocks.push(pairs(&decoder.decode(&block).expect("server decode")));
                block.clear();
            }
        }
        (blocks, decoder)
    }

    fn run(input: &[u8], chunk: usize) -> Result<Vec<u8>, RewriteError> {
        let mut r = Rewriter::new();
        let mut out = BytesMut::new();
        for c in input.chunks(chunk) {
            r.push(c);
            r.process(&mut out)?;
        }
        Ok(out.to_vec())
    }

    fn client_stream(blocks: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut s = PREFACE.to_vec();
        s.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff])); // SETTINGS
        for (stream, block) in blocks {
            s.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, *stream, block));
            s.extend(frame(0x0, FLAG_END_STREAM, *stream, &[0, 0, 0, 0, 0]));
        }
        s
    }

    const SOCKET_AUTHORITY: &str = "%2Frun%2Fnoded%2Fnoded.sock";

    fn grpc_block(authority_first: Option<&str>) -> Vec<u8> {
        let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
        lit_indexed(&mut b, ":path", "/noded.v1.Node/Status");
        if let Some(a) = authority_first {
            lit_indexed(&mut b, ":authority", a);
        }
        lit_indexed(&mut b, "content-type", "application/grpc");
        lit_indexed(&mut b, "te", "trailers");
        b
    }

    #[test]
    fn rfc7541_c3_requests_without_huffman() {
        let mut d = Decoder::new();
        let a = d
            .decode(&hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"))
            .expect("C.3.1");
        assert_eq!(
            pairs(&a),
            owned(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(d.size, 57);
        let b = d
            .decode(&hex("8286 84be 5808 6e6f 2d63 6163 6865"))
            .expect("C.3.2");
        assert_eq!(b[3].value, b"www.example.com");
        assert_eq!(b[4].value, b"no-cache");
        assert_eq!(d.size, 110);
        let c = d
            .decode(&hex(
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ))
            .expect("C.3.3");
        assert_eq!(
            pairs(&c),
            owned(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(d.size, 164);
    }

    #[test]
    fn rfc7541_c4_requests_with_huffman() {
        let mut d = Decoder::new();
        let a = d
            .decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"))
            .expect("C.4.1");
        assert_eq!(a[3].value, b"www.example.com");
        let b = d
            .decode(&hex("8286 84be 5886 a8eb 1064 9cbf"))
            .expect("C.4.2");
        assert_eq!(b[4].value, b"no-cache");
        let c = d
            .decode(&hex(
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ))
            .expect("C.4.3");
        assert_eq!(c[4].name, b"custom-key");
        assert_eq!(c[4].value, b"custom-value");
        assert_eq!(d.size, 164);
    }

    #[test]
    fn huffman_rejects_bad_padding_and_eos() {
        // "a" is 00011; padding with zeros instead of ones.
        assert_eq!(huffman_decode(&[0x18]), Err(HpackError::Huffman));
        assert_eq!(huffman_decode(&[0x1f]).expect("a"), b"a");
        // A whole byte of padding (8 one bits) is too long.
        assert_eq!(huffman_decode(&[0x1f, 0xff]), Err(HpackError::Huffman));
        // EOS is 30 one bits.
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(HpackError::Huffman)
        );
    }

    #[test]
    fn integers_round_trip_across_prefix_boundaries() {
        for prefix in 1..=8u8 {
            for value in [
                0,
                1,
                30,
                31,
                126,
                127,
                128,
                254,
                255,
                256,
                1337,
                16_383,
                1 << 20,
            ] {
                let mut out = Vec::new();
                put_int(&mut out, 0, prefix, value);
                let mut buf = &out[..];
                assert_eq!(take_int(&mut buf, prefix), Ok(value), "{prefix} {value}");
                assert!(buf.is_empty());
            }
        }
        let mut buf: &[u8] = &[0x1f, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert_eq!(take_int(&mut buf, 5), Err(HpackError::IntegerOverflow));
        let mut buf: &[u8] = &[0x1f, 0xff];
        assert_eq!(take_int(&mut buf, 5), Err(HpackError::Truncated));
    }

    #[test]
    fn valid_authorities_pass_byte_for_byte() {
        let mut second = vec![0x83, 0x86, 0xbe, 0xbf, 0xc0, 0xc1]; // all from the dynamic table
        lit_indexed(&mut second, "grpc-timeout", "9S");
        let input = client_stream(&[(1, grpc_block(Some("localhost"))), (3, second)]);
        for chunk in [1, 7, 4096, input.len()] {
            assert_eq!(run(&input, chunk).expect("run"), input, "chunk {chunk}");
        }
    }

    #[test]
    fn socket_authority_is_rewritten_also_when_referenced_from_the_table() {
        // grpc-core indexes :authority and refers to it by index on later requests.
        let first = grpc_block(Some(SOCKET_AUTHORITY));
        let second = vec![0x83, 0x86, 0xc1, 0xc0, 0xbf, 0xbe]; // :path :authority content-type te
        let input = client_stream(&[(1, first), (3, second)]);
        let expected = owned(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/noded.v1.Node/Status"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]);
        for chunk in [1, 5, input.len()] {
            let out = run(&input, chunk).expect("run");
            let (blocks, server) = server_view(&out);
            assert_eq!(blocks, vec![expected.clone(), expected.clone()]);
            assert!(server.table.is_empty(), "re-encoded blocks must not index");
            // DATA frames pass unchanged.
            let data: Vec<_> = frames(&out).into_iter().filter(|f| f.0.kind == 0).collect();
            assert_eq!(data.len(), 2);
            assert_eq!(data[1].1, [0, 0, 0, 0, 0]);
        }
    }

    #[test]
    fn raw_socket_path_and_table_entries_from_before_the_switch() {
        // Stream 1 is passed verbatim (valid authority, fills both tables); stream 3 switches to
        // rewriting; stream 5 refers to entries stream 1 added, which only the adapter can resolve now.
        let first = grpc_block(Some("localhost"));
        // Table after stream 1: 62 te, 63 content-type, 64 :authority localhost, 65 :path.
        let mut second = vec![0x83, 0x86, 0xc1];
        lit_indexed(&mut second, ":authority", "/run/noded/noded.sock");
        second.push(0xbf); // te, one further down after the insert
        // Now: 62 :authority /run/..., 63 te, 64 content-type, 65 :authority localhost, 66 :path.
        let third = vec![0x83, 0x86, 0xc2, 0xbe, 0xc0, 0xbf];
        let input = client_stream(&[(1, first.clone()), (3, second), (5, third)]);
        let out = run(&input, 3).expect("run");
        let (blocks, _) = server_view(&out);
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[0][3], (":authority".into(), "localhost".into()));
        assert_eq!(
            blocks[1][2],
            (":path".into(), "/noded.v1.Node/Status".into())
        );
        assert_eq!(blocks[1][3], (":authority".into(), "localhost".into()));
        assert_eq!(blocks[1][4], ("te".into(), "trailers".into()));
        assert_eq!(
            blocks[2],
            owned(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/noded.v1.Node/Status"),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ])
        );
        // The first HEADERS frame went out unchanged.
        let f = frames(&out);
        assert_eq!(f[1].1, first);
    }

    #[test]
    fn large_block_is_split_into_continuations_with_priority_and_end_stream_kept() {
        let mut block = grpc_block(Some(SOCKET_AUTHORITY));
        let big = "x".repeat(40_000);
        block.push(0x10); // never indexed
        put_string(&mut block, b"x-big");
        put_string(&mut block, big.as_bytes());
        // Client frames: padded + priority HEADERS, then two CONTINUATIONs.
        let (a, rest) = block.split_at(10_000);
        let (b, c) = rest.split_at(16_000);
        let mut headers = vec![3]; // pad length
        headers.extend([0x80, 0, 0, 1, 200]); // exclusive dep on stream 1, weight 200
        headers.extend_from_slice(a);
        headers.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            FRAME_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            3,
            &headers,
        ));
        input.extend(frame(FRAME_CONTINUATION, 0, 3, b));
        input.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 3, c));
        let out = run(&input, 1000).expect("run");
        let f = frames(&out);
        assert_eq!(f.len(), 3, "40 KB re-encoded needs three 16 KiB frames");
        assert_eq!(f[0].0.kind, FRAME_HEADERS);
        assert_eq!(f[0].0.flags, FLAG_PRIORITY | FLAG_END_STREAM);
        assert_eq!(&f[0].1[..5], &[0x80, 0, 0, 1, 200]);
        for (i, (head, _)) in f.iter().enumerate() {
            assert!(head.len <= OUT_FRAME_SIZE);
            assert_eq!(head.stream, 3);
            if i > 0 {
                assert_eq!(head.kind, FRAME_CONTINUATION);
            }
            assert_eq!(head.flags & FLAG_END_HEADERS != 0, i == 2);
        }
        let (blocks, _) = server_view(&out);
        assert_eq!(blocks[0][3].1, "localhost");
        assert_eq!(blocks[0][6], ("x-big".into(), big));
        let mut d = Decoder::new();
        let mut whole = f[0].1[5..].to_vec();
        whole.extend_from_slice(&f[1].1);
        whole.extend_from_slice(&f[2].1);
        assert!(d.decode(&whole).expect("decode")[6].never_indexed);
    }

    #[test]
    fn hostile_input_closes_the_connection() {
        let with = |frames: &[Vec<u8>]| {
            let mut s = PREFACE.to_vec();
            for f in frames {
                s.extend_from_slice(f);
            }
            s
        };
        // A frame header announcing 16 MiB is refused before any payload is buffered.
        let mut huge = with(&[]);
        huge.extend([
            0xff,
            0xff,
            0xff,
            FRAME_HEADERS,
            FLAG_END_HEADERS,
            0,
            0,
            0,
            1,
        ]);
        assert_eq!(
            run(&huge, huge.len()),
            Err(RewriteError::BlockTooLarge { stream: 1 })
        );
        // CONTINUATIONs that never end.
        let mut endless = vec![frame(FRAME_HEADERS, 0, 1, &[0x83])];
        for _ in 0..5 {
            endless.push(frame(FRAME_CONTINUATION, 0, 1, &[0x86; 16_000]));
        }
        assert_eq!(
            run(&with(&endless), 4096),
            Err(RewriteError::BlockTooLarge { stream: 1 })
        );
        // A small block that expands through indexed references.
        let mut bomb = Vec::new();
        lit_indexed(&mut bomb, "x", &"y".repeat(4000));
        bomb.extend([0xbe; 100]);
        assert_eq!(
            run(
                &with(&[frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &bomb)]),
                999
            ),
            Err(RewriteError::ListTooLarge { stream: 1 })
        );
        // Another frame in the middle of a header block.
        let interleaved = [frame(FRAME_HEADERS, 0, 1, &[0x83]), frame(0x0, 0, 1, &[])];
        assert_eq!(
            run(&with(&interleaved), 64),
            Err(RewriteError::ExpectedContinuation { kind: 0, stream: 1 })
        );
        // Padding longer than the frame.
        let padded = [frame(
            FRAME_HEADERS,
            FLAG_PADDED | FLAG_END_HEADERS,
            1,
            &[9, 0x83],
        )];
        assert_eq!(
            run(&with(&padded), 64),
            Err(RewriteError::BadPadding { stream: 1 })
        );
        // Table size above what the server allows, index beyond the table, size update late.
        for (block, err) in [
            (vec![0x3f, 0xe2, 0x1f], HpackError::TableSize(4097)),
            (vec![0xbf], HpackError::BadIndex(63)),
            (vec![0x83, 0x20], HpackError::LateSizeUpdate),
            (vec![0x40, 0x05, b'a'], HpackError::Truncated),
        ] {
            let input = with(&[frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &block)]);
            assert_eq!(run(&input, 64), Err(RewriteError::Hpack(err)));
        }
        assert_eq!(
            run(b"GET / HTTP/1.1\r\n\r\n", 64),
            Err(RewriteError::Preface)
        );
    }

    #[test]
    fn size_update_evicts_and_shrinks_the_table() {
        let mut d = Decoder::new();
        let mut block = Vec::new();
        lit_indexed(&mut block, "a", "1");
        lit_indexed(&mut block, "b", "2");
        d.decode(&block).expect("decode");
        assert_eq!(d.table.len(), 2);
        // Size update to 40 keeps only the newest entry (34 bytes).
        let f = d.decode(&[0x3f, 0x09, 0xbe]).expect("decode");
        assert_eq!(pairs(&f), owned(&[("b", "2")]));
        assert_eq!(d.table.len(), 1);
        assert_eq!(d.decode(&[0xbf]), Err(HpackError::BadIndex(63)));
    }

    #[tokio::test]
    async fn adapter_rewrites_over_a_socket_and_passes_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let input = client_stream(&[(1, grpc_block(Some(SOCKET_AUTHORITY)))]);
        let expected = run(&input, input.len()).expect("run");
        let (mut client, server) = tokio::io::duplex(64);
        let mut fixed = AuthorityFix::new(server);
        let writer = tokio::spawn(async move {
            for c in input.chunks(13) {
                client.write_all(c).await.expect("write");
            }
            let mut back = [0u8; 5];
            client.read_exact(&mut back).await.expect("read back");
            back
        });
        let mut got = vec![0u8; expected.len()];
        fixed.read_exact(&mut got).await.expect("read");
        assert_eq!(got, expected);
        fixed.write_all(b"hello").await.expect("write back");
        assert_eq!(&writer.await.expect("join"), b"hello");
    }
}
