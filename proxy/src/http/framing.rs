//! The reference model of HTTP/1.1 request framing that proxyd's codec is held to.
//!
//! hyper resolves a request carrying both `Content-Length` and `Transfer-Encoding` the way
//! RFC 9112 allows (chunked wins, the length is dropped); like nginx, proxyd refuses such
//! requests with 400 instead. [`Scanner`] follows HTTP/1.1 message framing byte by byte, in
//! place: no copy of the stream, no buffer that grows. Its state machine accepts exactly
//! what hyper's parser accepts (request heads as httparse reads them, chunked bodies as
//! hyper's decoder reads them) and refuses every head that declares both lengths, or that
//! it cannot follow (an invalid or overflowing chunk size, a bad line ending, a header
//! hyper would refuse anyway).
//!
//! It once sat below hyper's server and spoiled refused bytes before hyper saw them. The
//! HTTP/1 server codec ([`super::h1`]) now reads the stream itself and is the one parser a
//! request passes, so the scanner is its oracle instead: [`fuzz_scan`] (the fuzz target,
//! and the seed corpus on every test run) checks that the codec takes no message the
//! scanner refuses, and ends every message it takes where the scanner does.

use std::sync::atomic::{AtomicBool, Ordering};

/// The byte written over a refused position. NUL is invalid wherever the scanner refuses
/// (request line, header name or value, after CR, in a chunk size), but in a chunk
/// extension.
const POISON: u8 = 0;
/// In a chunk extension hyper accepts any byte but CR and LF; a bare LF is refused there.
const POISON_EXTENSION: u8 = b'\n';
/// Longest chunk extension (per chunk-size line) followed; hyper's own limit is 16 KiB
/// per body, so a longer one is refused by both.
const MAX_EXTENSION: u32 = 16 * 1024;

/// The header fields whose values decide body framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ContentLength,
    TransferEncoding,
    Upgrade,
    Other,
}

/// Progress through the last comma-separated token of a `Transfer-Encoding` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// No byte of the token yet (leading whitespace skipped).
    Empty,
    /// Inside the token.
    Word,
    /// Whitespace after the token: only more whitespace or a comma may follow.
    After,
    /// Cannot be `chunked`.
    Bad,
}

/// Chunked body states, one per state of hyper's chunked decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// First hex digit of a chunk size.
    Start,
    /// Further hex digits.
    Size,
    /// Whitespace after the size.
    SizeLws,
    /// In a chunk extension, until CR.
    Extension,
    /// LF ending the size line.
    SizeLf,
    /// CR after chunk data.
    BodyCr,
    /// LF after chunk data.
    BodyLf,
    /// After the last chunk: CR of the final empty line, or a trailer line.
    EndCr,
    /// In a trailer line, until CR.
    Trailer,
    /// LF ending a trailer line.
    TrailerLf,
    /// LF ending the message.
    EndLf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a request line: empty lines are skipped, as httparse does.
    Idle,
    /// In the method of the request line.
    Method,
    /// In the rest of the request line.
    RequestLine,
    /// At the start of a header line, or of the empty line that ends the head.
    LineStart,
    /// In a header name.
    Name,
    /// In a header value.
    Value,
    /// Skipping a body of known length.
    Fixed(u64),
    /// In a chunked body.
    Chunked(Chunk),
    /// Skipping chunk data.
    ChunkData(u64),
    /// Not HTTP/1 framing any more (HTTP/2 preface, upgrade, CONNECT): nothing to follow.
    Passthrough,
    /// A byte was overwritten: hyper refuses the message and closes the connection.
    Refused,
}

/// What one request head declared, collected while it streams past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    method: [u8; 8],
    method_len: usize,
    name: [u8; 17],
    name_len: usize,
    field: Field,
    /// A CR was seen in the current line: the next byte must be LF.
    cr: bool,
    /// The current `Content-Length` value so far.
    length: u64,
    length_digits: bool,
    length_bad: bool,
    /// The `Content-Length` of the head, once one was complete.
    content_length: Option<u64>,
    has_length: bool,
    lengths_invalid: bool,
    /// The last token of the current `Transfer-Encoding` value.
    token: [u8; 7],
    token_len: usize,
    token_state: Token,
    has_te: bool,
    te_chunked: bool,
    upgrade: bool,
}

impl Head {
    const fn new() -> Self {
        Head {
            method: [0; 8],
            method_len: 0,
            name: [0; 17],
            name_len: 0,
            field: Field::Other,
            cr: false,
            length: 0,
            length_digits: false,
            length_bad: false,
            content_length: None,
            has_length: false,
            lengths_invalid: false,
            token: [0; 7],
            token_len: 0,
            token_state: Token::Empty,
            has_te: false,
            te_chunked: false,
            upgrade: false,
        }
    }

    /// Takes the header-name bytes at the start of `bytes` as [`Scanner::step`] would
    /// (lowercased into `name` as far as it goes); returns how many there were.
    fn name_run(&mut self, bytes: &[u8]) -> usize {
        let run = bytes
            .iter()
            .position(|&b| !is_token(b))
            .unwrap_or(bytes.len());
        if let Some(room) = self.name.get_mut(self.name_len..) {
            for (slot, b) in room.iter_mut().zip(&bytes[..run]) {
                *slot = b.to_ascii_lowercase();
            }
        }
        self.name_len = self.name_len.saturating_add(run);
        run
    }

    fn start_value(&mut self) {
        self.field = match &self.name[..self.name_len.min(self.name.len())] {
            _ if self.name_len > self.name.len() => Field::Other,
            b"content-length" => Field::ContentLength,
            b"transfer-encoding" => Field::TransferEncoding,
            b"upgrade" => Field::Upgrade,
            _ => Field::Other,
        };
        match self.field {
            Field::ContentLength => {
                self.has_length = true;
                self.token_state = Token::Empty;
                self.length = 0;
                self.length_digits = false;
                self.length_bad = false;
            }
            Field::TransferEncoding => {
                self.has_te = true;
                self.token_len = 0;
                self.token_state = Token::Empty;
            }
            Field::Upgrade => self.upgrade = true,
            Field::Other => {}
        }
    }

    fn value_byte(&mut self, b: u8) {
        match self.field {
            Field::ContentLength => match b {
                b'0'..=b'9' if !self.length_bad => {
                    // A digit after trailing whitespace ("1 2") is no number.
                    if self.length_digits && self.token_state == Token::After {
                        self.length_bad = true;
                    }
                    match self
                        .length
                        .checked_mul(10)
                        .and_then(|n| n.checked_add(u64::from(b - b'0')))
                    {
                        Some(n) => self.length = n,
                        None => self.length_bad = true,
                    }
                    self.length_digits = true;
                }
                b' ' | b'\t' if self.length_digits => self.token_state = Token::After,
                b' ' | b'\t' => {}
                _ => self.length_bad = true,
            },
            Field::TransferEncoding => {
                self.token_state = match (self.token_state, b) {
                    (_, b',') => {
                        self.token_len = 0;
                        Token::Empty
                    }
                    (_, 0x80..) => Token::Bad,
                    (Token::Bad, _) => Token::Bad,
                    (Token::Empty, b' ' | b'\t') => Token::Empty,
                    (Token::Word | Token::After, b' ' | b'\t') => Token::After,
                    (Token::After, _) => Token::Bad,
                    (Token::Empty | Token::Word, _) => {
                        if self.token_len < self.token.len() {
                            self.token[self.token_len] = b.to_ascii_lowercase();
                            self.token_len += 1;
                            Token::Word
                        } else {
                            Token::Bad
                        }
                    }
                };
            }
            Field::Upgrade | Field::Other => {}
        }
    }

    fn end_value(&mut self) {
        match self.field {
            Field::ContentLength => {
                if self.length_bad
                    || !self.length_digits
                    || self.content_length.is_some_and(|n| n != self.length)
                {
                    self.lengths_invalid = true;
                } else {
                    self.content_length = Some(self.length);
                }
                self.token_state = Token::Empty;
            }
            Field::TransferEncoding => {
                // hyper goes by the last Transfer-Encoding line.
                self.te_chunked = matches!(self.token_state, Token::Word | Token::After)
                    && &self.token[..self.token_len] == b"chunked";
            }
            Field::Upgrade | Field::Other => {}
        }
        self.name_len = 0;
        self.field = Field::Other;
    }
}

/// Follows the framing of the requests on one client connection.
#[derive(Debug, Clone)]
pub struct Scanner {
    state: State,
    head: Head,
    /// Whether a request head was seen on this connection (an HTTP/2 preface comes first).
    started: bool,
    /// Extension bytes on the current chunk-size line.
    extension: u32,
    /// The chunk size being read.
    size: u64,
    /// Request heads completed on this connection.
    heads: u64,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner::new()
    }
}

impl Scanner {
    /// A scanner at the start of a connection.
    pub const fn new() -> Self {
        Scanner {
            state: State::Idle,
            head: Head::new(),
            started: false,
            extension: 0,
            size: 0,
            heads: 0,
        }
    }

    /// Whether the scanner refused a message on this connection (a byte was overwritten).
    pub fn refused(&self) -> bool {
        self.state == State::Refused
    }

    /// Whether every byte so far belongs to a complete message (empty lines between
    /// messages aside): nothing of a next request has arrived.
    pub fn between_messages(&self) -> bool {
        self.state == State::Idle && !self.head.cr
    }

    /// How many request heads were completed on this connection.
    pub fn heads(&self) -> u64 {
        self.heads
    }

    /// Whether scanning stopped because the connection no longer speaks HTTP/1 framing.
    pub fn passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// Scans the next bytes the client sent, in order. A byte that must not reach a
    /// parser as it is gets overwritten in `data`, and the scanner stops. When that byte
    /// is part of a request head its index is returned.
    pub fn feed(&mut self, data: &mut [u8]) -> Option<usize> {
        self.scan::<true>(data)
    }

    /// [`Scanner::feed`] with every byte of a head taken one at a time by the state machine,
    /// none skipped: the reference the fuzz target holds `feed` to.
    fn feed_bytewise(&mut self, data: &mut [u8]) -> Option<usize> {
        self.scan::<false>(data)
    }

    /// With `SKIP`, runs of bytes that cannot change the state (the rest of a request line,
    /// a header name, a value whose field does not decide framing) are passed over a word
    /// at a time; the byte that ends a run still goes through [`Scanner::step`]. The bytes
    /// skipped are exactly those `step` would accept without a change beyond the name it
    /// keeps, so the verdict is the same either way (the fuzz target checks it).
    fn scan<const SKIP: bool>(&mut self, data: &mut [u8]) -> Option<usize> {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Passthrough | State::Refused => return None,
                State::Fixed(left) => {
                    let n = left.min((data.len() - i) as u64);
                    let left = left - n;
                    // `n` fits: it is at most the slice length.
                    i += usize::try_from(n).unwrap_or(data.len());
                    self.state = if left == 0 {
                        State::Idle
                    } else {
                        State::Fixed(left)
                    };
                    continue;
                }
                State::ChunkData(left) => {
                    let n = left.min((data.len() - i) as u64);
                    let left = left - n;
                    i += usize::try_from(n).unwrap_or(data.len());
                    self.state = if left == 0 {
                        State::Chunked(Chunk::BodyCr)
                    } else {
                        State::ChunkData(left)
                    };
                    continue;
                }
                // A CR pending decides the next byte alone: no run to skip then.
                State::RequestLine if SKIP && !self.head.cr => {
                    i += line_end(&data[i..]);
                }
                State::Name if SKIP && !self.head.cr => {
                    i += self.head.name_run(&data[i..]);
                }
                State::Value
                    if SKIP
                        && !self.head.cr
                        && matches!(self.head.field, Field::Other | Field::Upgrade) =>
                {
                    i += value_end(&data[i..]);
                }
                _ => {}
            }
            let Some(&b) = data.get(i) else {
                break;
            };
            if !self.step(b) {
                let in_body = matches!(self.state, State::Chunked(_));
                data[i] = if self.state == State::Chunked(Chunk::Extension) {
                    POISON_EXTENSION
                } else {
                    POISON
                };
                self.state = State::Refused;
                return (!in_body).then_some(i);
            }
            i += 1;
        }
        None
    }

    /// Advances over one byte; `false` refuses it.
    fn step(&mut self, b: u8) -> bool {
        let head = &mut self.head;
        // In a head, CR must be followed by LF (httparse refuses anything else).
        if head.cr
            && matches!(
                self.state,
                State::Idle
                    | State::Method
                    | State::RequestLine
                    | State::LineStart
                    | State::Name
                    | State::Value
            )
        {
            if b != b'\n' {
                return false;
            }
            head.cr = false;
        } else if b == b'\r'
            && matches!(
                self.state,
                State::Idle | State::Method | State::RequestLine | State::LineStart | State::Value
            )
        {
            head.cr = true;
            return true;
        }
        match self.state {
            State::Idle => match b {
                b'\n' => {}
                _ => {
                    *head = Head::new();
                    self.state = State::Method;
                    return self.step(b);
                }
            },
            State::Method => match b {
                b' ' => {
                    let method = &head.method[..head.method_len.min(head.method.len())];
                    if !self.started && method == b"PRI" {
                        // The HTTP/2 preface: hyper switches protocols before HTTP/1 parsing.
                        self.state = State::Passthrough;
                        return true;
                    }
                    self.started = true;
                    self.state = State::RequestLine;
                }
                b'\n' => return false,
                _ => {
                    if head.method_len < head.method.len() {
                        head.method[head.method_len] = b;
                    }
                    head.method_len = head.method_len.saturating_add(1);
                }
            },
            State::RequestLine => {
                if b == b'\n' {
                    self.state = State::LineStart;
                }
            }
            State::LineStart => match b {
                b'\n' => return self.end_head(),
                b':' | b' ' | b'\t' => return false,
                _ => {
                    head.name_len = 0;
                    self.state = State::Name;
                    return self.step(b);
                }
            },
            State::Name => match b {
                b':' => {
                    head.start_value();
                    self.state = State::Value;
                }
                _ if is_token(b) => {
                    if head.name_len < head.name.len() {
                        head.name[head.name_len] = b.to_ascii_lowercase();
                    }
                    head.name_len = head.name_len.saturating_add(1);
                }
                // Whitespace before the colon, a line without one, control bytes: hyper
                // refuses the head.
                _ => return false,
            },
            State::Value => match b {
                b'\n' => {
                    head.end_value();
                    self.state = State::LineStart;
                }
                b'\t' | b' '..=0x7e | 0x80.. => head.value_byte(b),
                _ => return false,
            },
            State::Chunked(chunk) => return self.chunk_step(chunk, b),
            State::Fixed(_) | State::ChunkData(_) | State::Passthrough | State::Refused => {}
        }
        true
    }

    /// The empty line ending a head: decide, then follow the body.
    fn end_head(&mut self) -> bool {
        let head = &self.head;
        let ambiguous = head.has_length && head.has_te;
        if ambiguous || head.lengths_invalid || (head.has_te && !head.te_chunked) {
            return false;
        }
        self.heads += 1;
        let method = &head.method[..head.method_len.min(head.method.len())];
        if head.upgrade || (head.method_len == 7 && method == b"CONNECT") {
            // What follows may be another protocol; the request path closes the connection
            // unless the upgrade happens (see `proxy::handle`).
            self.state = State::Passthrough;
            return true;
        }
        self.state = if head.te_chunked {
            self.size = 0;
            self.extension = 0;
            State::Chunked(Chunk::Start)
        } else {
            match head.content_length {
                Some(n) if n > 0 => State::Fixed(n),
                _ => State::Idle,
            }
        };
        true
    }

    fn chunk_step(&mut self, chunk: Chunk, b: u8) -> bool {
        let next = match chunk {
            Chunk::Start => match hex(b) {
                Some(d) => {
                    self.size = u64::from(d);
                    self.extension = 0;
                    Chunk::Size
                }
                None => return false,
            },
            Chunk::Size => match (hex(b), b) {
                (Some(d), _) => {
                    match self
                        .size
                        .checked_mul(16)
                        .and_then(|n| n.checked_add(u64::from(d)))
                    {
                        Some(n) => self.size = n,
                        None => return false,
                    }
                    Chunk::Size
                }
                (None, b'\t' | b' ') => Chunk::SizeLws,
                (None, b';') => Chunk::Extension,
                (None, b'\r') => Chunk::SizeLf,
                (None, _) => return false,
            },
            Chunk::SizeLws => match b {
                b'\t' | b' ' => Chunk::SizeLws,
                b';' => Chunk::Extension,
                b'\r' => Chunk::SizeLf,
                _ => return false,
            },
            Chunk::Extension => match b {
                b'\r' => Chunk::SizeLf,
                b'\n' => return false,
                _ => {
                    self.extension += 1;
                    if self.extension >= MAX_EXTENSION {
                        self.state = State::Chunked(Chunk::Extension);
                        return false;
                    }
                    Chunk::Extension
                }
            },
            Chunk::SizeLf => match b {
                b'\n' if self.size == 0 => Chunk::EndCr,
                b'\n' => {
                    self.state = State::ChunkData(self.size);
                    return true;
                }
                _ => return false,
            },
            Chunk::BodyCr => match b {
                b'\r' => Chunk::BodyLf,
                _ => return false,
            },
            Chunk::BodyLf => match b {
                b'\n' => Chunk::Start,
                _ => return false,
            },
            Chunk::EndCr => match b {
                b'\r' => Chunk::EndLf,
                _ => Chunk::Trailer,
            },
            Chunk::Trailer => match b {
                b'\r' => Chunk::TrailerLf,
                _ => Chunk::Trailer,
            },
            Chunk::TrailerLf => match b {
                b'\n' => Chunk::EndCr,
                _ => return false,
            },
            Chunk::EndLf => match b {
                b'\n' => {
                    self.state = State::Idle;
                    return true;
                }
                _ => return false,
            },
        };
        self.state = State::Chunked(next);
        true
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 9110 `tchar`: what a header name may be made of.
fn is_token(b: u8) -> bool {
    TOKEN[usize::from(b)]
}

/// [`is_token`] by byte value: one load per byte of a header name.
const TOKEN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    table
};

/// Eight bytes at a time: a word with every byte `b`.
const fn splat(b: u8) -> u64 {
    u64::from_ne_bytes([b; 8])
}

/// Marks (high bit) the zero bytes of `word`. Only the lowest mark is sure to be right (a
/// borrow out of a zero byte can mark the byte above it), and only the lowest is used.
const fn zero_bytes(word: u64) -> u64 {
    word.wrapping_sub(splat(1)) & !word & splat(0x80)
}

/// Marks the bytes of `word` below 0x20 (the same way, lowest mark exact).
const fn control_bytes(word: u64) -> u64 {
    word.wrapping_sub(splat(0x20)) & !word & splat(0x80)
}

/// Index of the first CR or LF in `bytes` (its length without one): where a request line
/// can end or be refused.
fn line_end(bytes: &[u8]) -> usize {
    let (words, rest) = bytes.as_chunks::<8>();
    for (n, word) in words.iter().enumerate() {
        let word = u64::from_le_bytes(*word);
        let marks = zero_bytes(word ^ splat(b'\r')) | zero_bytes(word ^ splat(b'\n'));
        if marks != 0 {
            return n * 8 + first_mark(marks);
        }
    }
    let done = words.len() * 8;
    rest.iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .map_or(bytes.len(), |at| done + at)
}

/// Index of the first byte of `bytes` a header value may not simply contain (CR, LF,
/// another control byte but tab, DEL), or its length: where a value ends or is refused.
fn value_end(bytes: &[u8]) -> usize {
    let mut at = 0;
    loop {
        at += control_run(&bytes[at..]);
        // A tab is as good as a space in a value; tabs are rare enough to step over.
        match bytes.get(at) {
            Some(b'\t') => at += 1,
            _ => return at,
        }
    }
}

/// Index of the first control byte (below 0x20, or DEL) of `bytes`, or its length.
fn control_run(bytes: &[u8]) -> usize {
    let (words, rest) = bytes.as_chunks::<8>();
    for (n, word) in words.iter().enumerate() {
        let word = u64::from_le_bytes(*word);
        let marks = control_bytes(word) | zero_bytes(word ^ splat(0x7f));
        if marks != 0 {
            return n * 8 + first_mark(marks);
        }
    }
    let done = words.len() * 8;
    rest.iter()
        .position(|&b| b < 0x20 || b == 0x7f)
        .map_or(bytes.len(), |at| done + at)
}

/// The byte of the lowest mark in a word read little-endian.
fn first_mark(marks: u64) -> usize {
    (marks.trailing_zeros() / 8) as usize
}

/// Whether a connection's client sent a request yet, shared between the request path
/// (which sees requests arrive) and the code that ends the connection, which must tell a
/// client that never sent one from one idle between requests.
#[derive(Debug, Default)]
pub struct HeadProgress {
    requested: AtomicBool,
}

impl HeadProgress {
    /// Notes that a request reached the handler.
    pub fn request_arrived(&self) {
        self.requested.store(true, Ordering::Relaxed);
    }

    /// Whether any request reached the handler on this connection.
    pub fn any_request(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }
}

/// Fuzz entry point: feeds `data` to a fresh scanner in pieces whose sizes come from the
/// first byte, and checks that splitting never changes the outcome, and that skipping over
/// runs of bytes never does either (against a scanner that steps through every byte).
/// Then holds the HTTP/1 codec to the scanner on the same bytes (see [`codec_agrees`]).
pub fn fuzz_scan(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    codec_agrees(rest);
    let mut whole = rest.to_vec();
    let mut one = Scanner::new();
    let head_at = one.feed(&mut whole);
    let mut bytewise = rest.to_vec();
    let mut reference = Scanner::new();
    assert_eq!(
        reference.feed_bytewise(&mut bytewise),
        head_at,
        "skipping runs refuses where stepping does"
    );
    assert_eq!(whole, bytewise, "skipping runs spoils what stepping does");
    assert_eq!(reference.state, one.state);
    assert_eq!(reference.head, one.head);
    assert_eq!(reference.heads(), one.heads());
    let mut pieces = rest.to_vec();
    let mut many = Scanner::new();
    let step = usize::from(split % 16) + 1;
    let mut offset = 0;
    let mut pieces_head_at = None;
    for piece in pieces.chunks_mut(step) {
        if let Some(at) = many.feed(piece) {
            pieces_head_at = Some(offset + at);
        }
        offset += piece.len();
    }
    assert_eq!(
        whole, pieces,
        "the same bytes are refused however they arrive"
    );
    assert_eq!(head_at, pieces_head_at);
    assert_eq!(one.refused(), many.refused());
    assert_eq!(one.passthrough(), many.passthrough());
    if let Some(at) = head_at {
        assert!(one.refused() && at < rest.len());
    }
}

/// The HTTP/1 codec, reading `data` as one connection's requests, takes no byte the
/// scanner refuses, and ends every message it takes where the scanner ends one, until the
/// scanner stops following HTTP/1 framing (an upgrade, a CONNECT, the HTTP/2 preface). The
/// codec may refuse more than the scanner (what httparse or the `http` types refuse, an
/// HTTP/1.0 request with a transfer coding, limits), never less.
fn codec_agrees(data: &[u8]) {
    let mut scanner = Scanner::new();
    let mut fed = 0;
    let mut messages = 0;
    for (at, ended) in super::h1::taken(data) {
        let mut piece = data[fed..at].to_vec();
        scanner.feed(&mut piece);
        fed = at;
        if scanner.passthrough() {
            return;
        }
        assert!(
            !scanner.refused(),
            "the codec took bytes up to {at} that the scanner refuses: {:?}",
            String::from_utf8_lossy(&data[..at])
        );
        if ended {
            messages += 1;
            assert!(
                scanner.between_messages() && scanner.heads() == messages,
                "the codec ended message {messages} at {at}, the scanner does not: {:?}",
                String::from_utf8_lossy(&data[..at])
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `parts` in order; returns the bytes as hyper would see them and whether a
    /// byte was refused.
    fn scan(parts: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut scanner = Scanner::new();
        let mut out = Vec::new();
        for part in parts {
            let mut bytes = part.to_vec();
            let _ = scanner.feed(&mut bytes);
            out.extend_from_slice(&bytes);
        }
        (out, scanner.refused())
    }

    /// Where the scanner overwrote a byte (`usize::MAX`: refused a byte that was already
    /// the poison).
    fn refused_at(input: &[u8]) -> Option<usize> {
        let (out, refused) = scan(&[input]);
        let at = out.iter().zip(input).position(|(a, b)| a != b);
        refused.then_some(at.unwrap_or(usize::MAX))
    }

    #[test]
    fn refuses_the_ambiguous_head_on_its_last_byte() {
        let input: &[u8] =
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(refused_at(input), Some(input.len() - 1));
    }

    #[test]
    fn follows_pipelined_framing_across_reads() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 33\r\n\r\nContent-Length: 1\r\nTransfer-E\r\n\r\nPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /c HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n";
        // Byte by byte, the body of /a (which looks like headers) is skipped, not scanned;
        // only the last head is refused.
        let parts: Vec<&[u8]> = stream.chunks(1).collect();
        let (out, refused) = scan(&parts);
        assert!(refused);
        assert_eq!(out[..stream.len() - 1], stream[..stream.len() - 1]);
        assert_eq!(refused_at(stream), Some(stream.len() - 1));
    }

    #[test]
    fn bare_lf_heads_are_followed() {
        let input: &[u8] = b"GET /a HTTP/1.1\nHost: h\n\nPOST /b HTTP/1.1\nHost: h\nContent-Length: 3\nTransfer-Encoding: chunked\n\n";
        assert_eq!(refused_at(input), Some(input.len() - 1));
    }

    #[test]
    fn transfer_encoding_variants() {
        for (te, refused) in [
            ("chunked", false),
            ("Chunked", false),
            (" chunked ", false),
            ("\tchunked", false),
            ("gzip, chunked", false),
            ("chunked, identity", true),
            ("xchunked", true),
            ("chunked2", true),
            ("chun ked", true),
            ("", true),
            ("identity", true),
        ] {
            let input = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {te}\r\n\r\n0\r\n\r\n");
            assert_eq!(refused_at(input.as_bytes()).is_some(), refused, "{te:?}");
        }
    }

    #[test]
    fn content_length_variants() {
        for (cl, refused) in [
            ("5", false),
            ("005", false),
            (" 5 ", false),
            ("+5", true),
            ("-5", true),
            ("5, 5", true),
            ("5 5", true),
            ("0x5", true),
            ("", true),
            ("99999999999999999999999", true),
        ] {
            let input = format!("POST / HTTP/1.1\r\nContent-Length: {cl}\r\n\r\nhello");
            assert_eq!(refused_at(input.as_bytes()).is_some(), refused, "{cl:?}");
        }
        let twice = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!";
        assert!(refused_at(twice).is_some());
        let same = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello";
        assert!(refused_at(same).is_none());
    }

    #[test]
    fn chunk_lines_hyper_refuses_are_refused() {
        for body in [
            "zz\r\nhello\r\n0\r\n\r\n",
            "5\nhello\r\n0\r\n\r\n",
            "5\r\nhelloXX0\r\n\r\n",
            "11111111111111111\r\n",
            "5;ext\nhello",
            " 5\r\n",
        ] {
            let input = format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
            assert!(refused_at(input.as_bytes()).is_some(), "{body:?}");
        }
        let long = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;{}\r\nhello\r\n0\r\n\r\n",
            "e".repeat(20_000)
        );
        let (out, refused) = scan(&[long.as_bytes()]);
        assert!(refused);
        assert!(out.contains(&b'\n'));
        let ok = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5 ;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert!(refused_at(ok.as_bytes()).is_none());
    }

    #[test]
    fn heads_hyper_refuses_are_refused() {
        for head in [
            "POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nX: 1\r\n Transfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nX: a\0b\r\n\r\n",
            "POST / HTTP/1.1\r\nX: a\rb\r\n\r\n",
        ] {
            assert!(refused_at(head.as_bytes()).is_some(), "{head:?}");
        }
    }

    #[test]
    fn http2_preface_and_upgrades_stop_scanning() {
        let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let mut s = Scanner::new();
        assert_eq!(s.feed(&mut preface), None);
        assert!(s.passthrough());
        let mut ws = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let copy = ws.clone();
        let mut s = Scanner::new();
        assert_eq!(s.feed(&mut ws), None);
        assert!(s.passthrough());
        assert_eq!(ws, copy);
    }

    /// The seeds of [`skipping_runs_decides_as_stepping_does`]: heads with every kind of
    /// run the scanner skips, and the bytes that end one.
    const SEEDS: &[&[u8]] = &[
        b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8.0 (x86_64)\r\nAccept: */*\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nX-Very-Long-Header-Name-Here: v\r\nContent-Length: 5\r\nTransfer-Encoding:\tgzip,\tchunked\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX-A: tab\there and there\t\r\n\r\n5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n",
        b"GET / HTTP/1.1\nUpgrade: websocket\nConnection: upgrade\n\n",
        b"\r\n\r\nGET /\x80\xff HTTP/1.1\r\nX-Obs: caf\xc3\xa9 \x7f \r\nContent-Length: 0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        b"PUT /x HTTP/1.1\r\ncontent-length: 3\r\nContent-Length: 3\r\nX-Transfer-Encoding-Long-Name: chunked\r\n\r\nabcDELETE / HTTP/1.1\r\nX: a\rb\r\n\r\n",
    ];

    /// Seeds with bytes replaced, inserted and removed (a fixed pseudo-random sequence):
    /// the fast scan must refuse exactly what stepping through each byte refuses, at the
    /// same place, however the bytes are split (`fuzz_scan` asserts both).
    #[test]
    fn skipping_runs_decides_as_stepping_does() {
        const BYTES: &[u8] = b"\r\n\t :;,\x00\x01\x1f\x7f\x80\xffaZ0-_\\\"/";
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % bound as u64).unwrap_or(0)
        };
        let mut refused = 0;
        for round in 0..4000 {
            let seed = SEEDS[round % SEEDS.len()];
            let mut input = vec![u8::try_from(next(256)).unwrap_or(0)];
            input.extend_from_slice(seed);
            for _ in 0..=next(3) {
                let at = 1 + next(input.len() - 1);
                let b = BYTES[next(BYTES.len())];
                match next(3) {
                    0 => input[at] = b,
                    1 => input.insert(at, b),
                    _ if input.len() > 2 => {
                        input.remove(at);
                    }
                    _ => {}
                }
            }
            fuzz_scan(&input);
            let mut copy = input[1..].to_vec();
            let mut s = Scanner::new();
            s.feed(&mut copy);
            refused += usize::from(s.refused());
        }
        // The mutations reach both verdicts often: the comparison is not only of accepts.
        assert!(refused > 500 && refused < 3500, "{refused} of 4000 refused");
    }

    #[test]
    fn skipped_runs_end_at_the_right_byte() {
        assert_eq!(line_end(b"GET / HTTP/1.1\r\n"), 14);
        assert_eq!(line_end(b"/a/very/long/path/indeed\n"), 24);
        assert_eq!(line_end(b"no end"), 6);
        assert_eq!(value_end(b"text/html; q=0.9\r\n"), 16);
        assert_eq!(value_end(b"a\tb\tc and more words\x7f"), 20);
        assert_eq!(value_end(b"caf\xc3\xa9\x80\xff\x00"), 7);
        assert_eq!(value_end(b"\t\t\t"), 3);
        for at in 0..20 {
            let mut bytes = vec![b'x'; 20];
            bytes[at] = 0x1f;
            assert_eq!(control_run(&bytes), at);
            bytes[at] = 0x7f;
            assert_eq!(control_run(&bytes), at);
            bytes[at] = b'\r';
            assert_eq!(line_end(&bytes), at);
        }
        let mut head = Head::new();
        assert_eq!(head.name_run(b"Transfer-Encoding-Extra: x"), 23);
        assert_eq!(&head.name, b"transfer-encoding");
        assert_eq!(head.name_len, 23);
    }

    /// The heads, lengths and chunks the tests above have the scanner refuse or accept, read
    /// by the HTTP/1 codec: it takes none of what the scanner refuses.
    #[test]
    fn the_codec_takes_nothing_the_scanner_refuses() {
        let mut inputs: Vec<String> = Vec::new();
        for te in [
            "chunked",
            " chunked ",
            "gzip, chunked",
            "chunked, identity",
            "chun ked",
            "",
        ] {
            inputs.push(format!(
                "POST / HTTP/1.1\r\nTransfer-Encoding: {te}\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n"
            ));
        }
        for cl in [
            "5",
            "005",
            " 5 ",
            "+5",
            "5, 5",
            "5,5",
            "5 5",
            "",
            "99999999999999999999999",
        ] {
            inputs.push(format!(
                "POST / HTTP/1.1\r\nContent-Length: {cl}\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n"
            ));
        }
        for body in [
            "zz\r\nhello\r\n0\r\n\r\n",
            "5\nhello\r\n0\r\n\r\n",
            "5\r\nhelloXX0\r\n\r\n",
            "5\x0c\r\nhello\r\n0\r\n\r\n",
            "5\x0c;a\r\nhello\r\n0\r\n\r\n",
            "5 ;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
            " 5\r\nhello\r\n0\r\n\r\n",
        ] {
            inputs.push(format!(
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{body}GET / HTTP/1.1\r\n\r\n"
            ));
        }
        for head in [
            "POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nX: 1\r\n Transfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nX: a\0b\r\n\r\n",
            "POST / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            "POST / HTTP/1.1\nContent-Length: 3\nTransfer-Encoding: chunked\n\n0\r\n\r\n",
        ] {
            inputs.push(format!(
                "GET /a HTTP/1.1\r\n\r\n{head}GET / HTTP/1.1\r\n\r\n"
            ));
        }
        let mut taken_whole = 0;
        for input in &inputs {
            codec_agrees(input.as_bytes());
            let mut bytes = input.as_bytes().to_vec();
            let mut scanner = Scanner::new();
            scanner.feed(&mut bytes);
            let ends = crate::http::h1::taken(input.as_bytes());
            let whole = ends.last() == Some(&(input.len(), true));
            // Both read the same inputs whole, and only those.
            assert_eq!(whole, !scanner.refused(), "{input:?}");
            taken_whole += usize::from(whole);
        }
        assert!(
            taken_whole > 5 && taken_whole < inputs.len() - 5,
            "{taken_whole}"
        );
    }

    #[test]
    fn splitting_never_changes_the_outcome() {
        let mut input = vec![3u8];
        input.extend_from_slice(b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\nContent-Length: 1\nTransfer-Encoding: chunked\n\n");
        fuzz_scan(&input);
    }
}
