//! HTTP/1.1 to upstreams, driven inside the request's own task.
//!
//! A connection is a socket plus a read buffer; sending a request writes its head, streams
//! its body (Content-Length or chunked) while the response head is awaited, and hands the
//! connection to the response body, which frames the upstream's body (RFC 9112 section 6)
//! and gives the connection back for reuse only when both messages ended exactly and
//! nothing asked to close. No task of its own and no channel: a request costs no wake-up
//! of another task, which is where most of the cost of a client library's connection
//! task went.

use std::fmt;
use std::future::{poll_fn, Future};
use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::body::{BoxError, RequestBody};
use super::{OpenConnection, UpstreamStream};
use crate::head_out as out;
use crate::spares::{self, Stock};

/// Largest response head (status line and headers, also a trailer block) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields accepted in a response head or trailer block.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 16 * 1024;

/// Most emptied header maps a thread keeps for the heads it parses next: as many as the
/// requests a busy worker has in flight at once (it takes a batch of request heads off
/// its sockets, and then a batch of responses, before the maps come back). With 8, a
/// worker serving 32 keep-alive clients allocated and freed a map for most requests
/// (0.9 per request under callgrind with 64 clients, against 0.13 with 8), and no more
/// than a few hundred kilobytes are kept even when every spare map is the largest kept.
const SPARE_MAPS: usize = 64;
/// Maps with room for more fields than this are not kept (a rare large head's).
const SPARE_MAP_FIELDS: usize = 48;

thread_local! {
    /// Header maps of messages this thread is done with (a request sent upstream, a
    /// response head written to its client), emptied, for the heads it parses next. A map
    /// for a usual head holds more than 1 KiB of entries, a block mimalloc serves on its
    /// slower path: two such maps were allocated and freed per proxied request.
    static SPARES: Stock<HeaderMap> = const { Stock::new(SPARE_MAPS) };
}

/// An empty header map with room for `fields` fields: one this thread was done with, if
/// it kept one.
pub(crate) fn header_map(fields: usize) -> HeaderMap {
    match spares::take(&SPARES) {
        Some(mut map) => {
            map.reserve(fields);
            map
        }
        None => HeaderMap::with_capacity(fields),
    }
}

/// Header maps a quiet thread keeps (see [`settle_header_maps`]).
const QUIET_MAPS: usize = 8;

/// Lets go of the spare header maps beyond what a quiet thread needs.
pub(crate) fn settle_header_maps() {
    spares::settle(&SPARES, QUIET_MAPS);
}

/// Keeps `map`, emptied, for [`header_map`], unless the thread has enough or it is large.
pub(crate) fn spare_header_map(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > SPARE_MAP_FIELDS {
        return;
    }
    map.clear();
    spares::give(&SPARES, map);
}

/// What went wrong on an upstream HTTP/1.1 connection.
#[derive(Debug, Error)]
pub enum H1Error {
    /// The upstream closed the connection before the message ended.
    #[error("the upstream closed the connection {0}")]
    Closed(&'static str),
    /// Reading from the upstream failed.
    #[error("reading from the upstream: {0}")]
    Read(#[source] io::Error),
    /// Writing to the upstream failed.
    #[error("writing to the upstream: {0}")]
    Write(#[source] io::Error),
    /// The response head is not valid HTTP/1.1.
    #[error("malformed response head: {0}")]
    Head(&'static str),
    /// No response head by the time [`H1Conn::send`] was given.
    #[error("no response head in time")]
    HeadTimedOut,
    /// The response head is longer than [`MAX_HEAD_BYTES`] or has more than
    /// [`MAX_HEADERS`] fields.
    #[error("response head larger than {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} fields")]
    HeadTooLarge,
    /// The response's body length cannot be told without ambiguity.
    #[error("response framing: {0}")]
    Framing(&'static str),
    /// The chunked response body is malformed.
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
    /// The request body (the client's) failed or did not match its declared length.
    #[error("request body: {0}")]
    Body(#[source] BoxError),
}

/// A failed exchange: the error, whether the upstream sent anything at all, and whether
/// the request, left where the caller keeps it, was written.
#[derive(Debug)]
pub struct SendError {
    /// What failed.
    pub error: H1Error,
    /// No response byte arrived on the connection during this exchange.
    pub nothing_read: bool,
    /// The request failed before its head was written (it can go elsewhere as it is).
    /// When it was written instead, has no body and no response byte came, it is left to
    /// the caller too, whose call it is whether it may go again (an idempotent method
    /// may); any other request is gone.
    pub unsent: bool,
}

/// An HTTP/1.1 connection to an upstream.
pub struct H1Conn {
    io: UpstreamStream,
    /// Read but not yet consumed.
    buf: BytesMut,
    /// The request head being written.
    out: Vec<u8>,
    /// Where the fields of the response head being parsed are (name start and end, value
    /// start and end), kept for the next response: filled without zeroing or allocating.
    spans: Vec<(usize, usize, usize, usize)>,
    /// Whether it served a request before (a reused connection may have gone stale).
    reused: bool,
    /// The timer of the waits for a response head (see [`H1Conn::send`]): made at the
    /// first and moved to each next deadline, rather than a timer made, registered and
    /// removed for every request.
    head_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Dropped with the connection: frees its place under `max_connections_per_upstream`.
    _open: Option<OpenConnection>,
}

impl fmt::Debug for H1Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Conn")
            .field("buffered", &self.buf.len())
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

/// How the request body is delimited on the wire.
#[derive(Debug, Clone, Copy)]
enum Sending {
    Length(u64),
    Chunked,
}

/// The rest of a request body on its way to the upstream.
struct Upload {
    body: RequestBody,
    framing: Sending,
    /// Encoded and not yet written.
    out: Vec<u8>,
    written: usize,
    /// The last piece is encoded (`out` holds the end of the body).
    last: bool,
    /// `out` holds the request head and the body was not polled yet: the head waits for
    /// the first piece of body, so a body that fails at once sends the upstream nothing.
    head_waits: bool,
}

impl Upload {
    /// Writes the body to `io` as far as it can: `Ready(Ok)` once all of it is written.
    fn poll(&mut self, io: &mut UpstreamStream, cx: &mut Context<'_>) -> Poll<Result<(), H1Error>> {
        loop {
            while !self.head_waits && self.written < self.out.len() {
                match Pin::new(&mut *io).poll_write(cx, &self.out[self.written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(H1Error::Write(io::ErrorKind::WriteZero.into())))
                    }
                    Poll::Ready(Ok(n)) => self.written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(H1Error::Write(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !self.head_waits {
                self.out.clear();
                self.written = 0;
            }
            if self.last {
                return Pin::new(&mut *io).poll_flush(cx).map_err(H1Error::Write);
            }
            let polled = Pin::new(&mut self.body).poll_frame(cx);
            if std::mem::take(&mut self.head_waits) && polled.is_pending() {
                // The client takes its time (it may wait for `100 Continue`): the head
                // goes now.
                continue;
            }
            let frame = match polled {
                Poll::Pending => {
                    // Everything so far goes out while the client takes its time.
                    return match Pin::new(&mut *io).poll_flush(cx) {
                        Poll::Ready(Err(e)) => Poll::Ready(Err(H1Error::Write(e))),
                        _ => Poll::Pending,
                    };
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(H1Error::Body(e))),
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    self.last = true;
                    match &mut self.framing {
                        Sending::Length(0) => {}
                        Sending::Length(_) => {
                            return Poll::Ready(Err(H1Error::Body(
                                "the body ended before its Content-Length".into(),
                            )))
                        }
                        Sending::Chunked => self.out.extend_from_slice(b"0\r\n\r\n"),
                    }
                    continue;
                }
            };
            match frame.into_data() {
                Ok(data) => self.encode(data)?,
                Err(frame) => {
                    // Trailers end the body; a length-delimited body has nowhere to put
                    // them and they are dropped.
                    self.last = true;
                    match self.framing {
                        Sending::Length(0) => {}
                        Sending::Length(_) => {
                            return Poll::Ready(Err(H1Error::Body(
                                "the body ended before its Content-Length".into(),
                            )))
                        }
                        Sending::Chunked => {
                            self.out.extend_from_slice(b"0\r\n");
                            if let Ok(trailers) = frame.into_trailers() {
                                encode_fields(&mut self.out, &trailers);
                            }
                            self.out.extend_from_slice(b"\r\n");
                        }
                    }
                }
            }
        }
    }

    fn encode(&mut self, data: Bytes) -> Result<(), H1Error> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.framing {
            Sending::Length(left) => {
                let n = data.len() as u64;
                if n > *left {
                    return Err(H1Error::Body(
                        "the body is longer than its Content-Length".into(),
                    ));
                }
                *left -= n;
                self.out.extend_from_slice(&data);
            }
            Sending::Chunked => {
                // Written in place: `format!` would allocate a string per chunk.
                let _ = write!(self.out, "{:x}\r\n", data.len());
                self.out.extend_from_slice(&data);
                self.out.extend_from_slice(b"\r\n");
            }
        }
        Ok(())
    }
}

fn encode_fields(out: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        out::put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// How the request gets its body framed: by its Content-Length, by its size when the body
/// knows it, chunked otherwise; a request without body gets no framing header.
fn request_framing(req: &mut Request<RequestBody>) -> Option<Sending> {
    if req.body().is_end_stream() {
        return None;
    }
    if let Some(n) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Some(Sending::Length(n));
    }
    if let Some(n) = req.body().size_hint().exact() {
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        return Some(Sending::Length(n));
    }
    req.headers_mut().insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    Some(Sending::Chunked)
}

/// Lets go of a request the upstream took (or could not take again): its header map is
/// kept for the next head this thread parses.
fn finish_request(slot: &mut Option<Request<RequestBody>>) {
    if let Some(req) = slot.as_mut() {
        spare_header_map(std::mem::take(req.headers_mut()));
    }
    *slot = None;
}

fn encode_head(out: &mut Vec<u8>, req: &Request<RequestBody>) {
    out.clear();
    out::put(out, req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    out::put(out, target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    encode_fields(out, req.headers());
    out.extend_from_slice(b"\r\n");
}

/// How the response body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304), or all of a Content-Length read.
    Done,
    /// This many bytes left.
    Length(u64),
    /// Chunked, at this point of its grammar.
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
    /// `101 Switching Protocols` (or a CONNECT's 2xx): the connection is a tunnel now.
    Tunnel,
}

/// Where a chunked body (RFC 9112 section 7.1) is in its grammar; the client side's
/// request bodies (see `crate::http`) are decoded by the same steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// A chunk-size line comes next.
    Size,
    /// This many bytes of chunk data left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk.
    Trailers,
}

impl H1Conn {
    /// A new connection on `stream`; `open` is held as long as the connection lives.
    /// Boxed from the start: the connection goes from the idle store into a request's
    /// exchange, its response body and back, and each of those moves is a pointer's
    /// rather than the whole connection's (socket, buffers) copied.
    pub fn new(stream: UpstreamStream, open: Option<OpenConnection>) -> Box<Self> {
        Box::new(H1Conn {
            io: stream,
            buf: BytesMut::new(),
            out: Vec::new(),
            spans: Vec::new(),
            reused: false,
            head_timer: None,
            _open: open,
        })
    }

    /// Whether it served a request before.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Marks it as taken from the idle store.
    pub fn set_reused(&mut self) {
        self.reused = true;
    }

    /// Whether an idle connection can take a request: the upstream has neither closed it
    /// nor sent anything unasked (either means it is not a clean keep-alive connection).
    pub fn idle_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut read = ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut read),
            Poll::Pending
        )
    }

    /// Prepares it to wait for its next request: buffers that grew beyond their usual
    /// size (a large head) are let go; the usual ones are kept, so the next request on it
    /// allocates none.
    pub fn park(&mut self) {
        if self.buf.capacity() > 2 * READ_SIZE {
            self.buf = BytesMut::new();
        }
        if self.out.capacity() > 2 * READ_SIZE {
            self.out = Vec::new();
        }
    }

    /// Lets go of its buffers and its head timer while it waits in the idle store (see
    /// [`super::idle::sweep_once`]): 16 KiB and more each, held by every connection a
    /// burst of requests left idle, where the next request on it makes them again. Bytes
    /// read and not yet consumed stay (a connection holding any is not reused anyway).
    pub fn release_buffers(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        self.out = Vec::new();
        self.spans = Vec::new();
        self.head_timer = None;
    }

    /// Sends the request in `slot` and waits for the response head. The request body is
    /// streamed while the response head is awaited; if the head comes first, the response
    /// body finishes it.
    ///
    /// The request stays in the caller's `slot` rather than moving (a few hundred bytes)
    /// into this exchange and back: it is left there when it failed before its head was
    /// written, or when it has no body and no response byte came (see [`SendError`]), and
    /// taken (its header map kept for the next head) otherwise. An empty slot fails at
    /// once, as a request that could not be written.
    ///
    /// With `head_due`, a head not complete by then fails the exchange with
    /// [`H1Error::HeadTimedOut`], on the connection's own timer; without, the caller
    /// bounds the wait.
    pub async fn send(
        mut self: Box<Self>,
        slot: &mut Option<Request<RequestBody>>,
        head_due: Option<Instant>,
    ) -> Result<Response<H1Body>, SendError> {
        let Some(req) = slot.as_mut() else {
            return Err(SendError {
                error: H1Error::Write(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "no request to send",
                )),
                nothing_read: true,
                unsent: true,
            });
        };
        let framing = request_framing(req);
        let head_request = req.method() == Method::HEAD;
        let connect = req.method() == Method::CONNECT;
        let mut upload = match framing {
            // Without body the head goes now, alone.
            None => {
                let mut out = std::mem::take(&mut self.out);
                encode_head(&mut out, req);
                let written = async {
                    self.io.write_all(&out).await?;
                    self.io.flush().await
                }
                .await;
                self.out = out;
                if let Err(e) = written {
                    return Err(SendError {
                        error: H1Error::Write(e),
                        nothing_read: true,
                        unsent: true,
                    });
                }
                None
            }
            // With a body, the head goes with its first piece, from the connection's
            // buffer, which comes back once the body is written.
            Some(framing) => {
                let mut out = std::mem::take(&mut self.out);
                encode_head(&mut out, req);
                Some(Upload {
                    body: std::mem::take(req.body_mut()),
                    framing,
                    out,
                    written: 0,
                    last: false,
                    head_waits: true,
                })
            }
        };
        // A request with a body cannot be sent again (its body is on its way), and its
        // head is written: it goes. One without is left until the answer comes, for the
        // caller to send again if none does.
        if upload.is_some() {
            finish_request(slot);
        }
        // A write failure may just be the upstream answering early and closing its
        // side: the response head, if it comes, still counts.
        let mut write_error = None;
        let mut read_any = false;
        let head = poll_fn(|cx| {
            if let Some(u) = &mut upload {
                match u.poll(&mut self.io, cx) {
                    Poll::Ready(Ok(())) => {
                        if let Some(u) = upload.take() {
                            self.out = u.out;
                        }
                    }
                    Poll::Ready(Err(H1Error::Write(e))) => {
                        upload = None;
                        write_error = Some(e);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            match self.poll_head(cx, &mut read_any) {
                Poll::Pending => {}
                ready => return ready,
            }
            match head_due {
                Some(due) if self.poll_due(due, cx).is_ready() => {
                    Poll::Ready(Err(H1Error::HeadTimedOut))
                }
                _ => Poll::Pending,
            }
        })
        .await;
        let Head {
            status,
            version,
            headers,
            keep_alive,
            framing,
        } = match head {
            Ok(head) => {
                // Answered: the request is not needed any more.
                finish_request(slot);
                head
            }
            Err(error) => {
                let error = match (error, write_error) {
                    (H1Error::Closed(_) | H1Error::Read(_), Some(e)) => H1Error::Write(e),
                    (error, _) => error,
                };
                // Part of an answer came: the request was taken in.
                if read_any {
                    finish_request(slot);
                }
                return Err(SendError {
                    error,
                    nothing_read: !read_any,
                    unsent: false,
                });
            }
        };
        let framing = match response_framing(status, version, framing, head_request, connect) {
            Ok(framing) => framing,
            Err(error) => {
                return Err(SendError {
                    error,
                    nothing_read: false,
                    unsent: false,
                })
            }
        };
        let mut response = Response::new(H1Body {
            conn: Some(self),
            framing,
            upload: upload.map(Box::new),
            keep_alive: keep_alive && write_error.is_none(),
        });
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        Ok(response)
    }

    /// `Ready` once `due` has passed; otherwise the task is woken then or before. The
    /// connection's one head timer is moved to `due` only when it was set for later: one
    /// set earlier (for an earlier exchange's deadline, which every next one passes) stays
    /// and, when it fires before `due`, is moved on then. So a connection that answers a
    /// request every few milliseconds moves its timer once per head timeout rather than
    /// once per request (callgrind, HTTP/1.1 keep-alive: 24,186 -> 24,058 instructions
    /// per request), and a head that is late still fails at its own due time.
    fn poll_due(&mut self, due: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let due = tokio::time::Instant::from_std(due);
        let timer = self
            .head_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        poll_until(timer.as_mut(), due, cx)
    }

    /// Reads until a final response head (1xx other than 101 are skipped) is complete.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        read_any: &mut bool,
    ) -> Poll<Result<Head, H1Error>> {
        loop {
            if !self.buf.is_empty() {
                if let Some(head) = self.parse_head()? {
                    return Poll::Ready(Ok(head));
                }
                continue_if_room(&self.buf)?;
            }
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(H1Error::Closed(if *read_any {
                        "in the middle of the response head"
                    } else {
                        "before any response byte"
                    })))
                }
                Poll::Ready(Ok(_)) => *read_any = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(H1Error::Read(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// One final head from the buffer, if complete (informational heads are consumed).
    fn parse_head(&mut self) -> Result<Option<Head>, H1Error> {
        loop {
            // Left uninitialised: the parser writes only the fields it finds, rather than
            // every response first writing 100 empty ones (3.2 KiB).
            let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut parsed,
                &self.buf,
                &mut fields,
            ) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => return Err(H1Error::HeadTooLarge),
                Err(e) => return Err(H1Error::Head(head_error(e))),
            };
            if len > MAX_HEAD_BYTES {
                return Err(H1Error::HeadTooLarge);
            }
            let code = parsed.code.unwrap_or(0);
            let status = StatusCode::from_u16(code).map_err(|_| H1Error::Head("status code"))?;
            if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                self.buf.advance(len);
                if self.buf.is_empty() {
                    return Ok(None);
                }
                continue;
            }
            let version = if parsed.version == Some(1) {
                Version::HTTP_11
            } else {
                Version::HTTP_10
            };
            // Where each field is, as offsets: the buffer is split off before the values
            // are taken from it without a copy.
            let base = self.buf.as_ptr() as usize;
            self.spans.clear();
            self.spans
                .extend(parsed.headers.iter().map(|field| field_span(base, field)));
            // With room for the `Via` the request path adds: a map filled to its
            // capacity grows (allocating and rehashing) on the next insert.
            let mut headers = header_map(self.spans.len() + 1);
            let mut keep_alive = version == Version::HTTP_11;
            let mut close = false;
            let mut framing = FramingFields::NONE;
            let head = self.buf.split_to(len).freeze();
            for &(name_start, name_end, value_start, value_end) in &self.spans {
                let raw_value = &head[value_start..value_end];
                let raw_name = &head[name_start..name_end];
                let name = match known_name(raw_name) {
                    Some(name) => name,
                    None => HeaderName::from_bytes(raw_name)
                        .map_err(|_| H1Error::Head("header name"))?,
                };
                if name == header::CONNECTION {
                    let mut names_more = false;
                    for token in raw_value.split(|b| *b == b',') {
                        let token = token.trim_ascii();
                        if token.eq_ignore_ascii_case(b"close") {
                            close = true;
                        } else if token.eq_ignore_ascii_case(b"keep-alive") {
                            keep_alive = true;
                        } else if !token.is_empty() {
                            names_more = true;
                        }
                    }
                    // A field that only says whether the connection stays open is read
                    // here and nowhere else: the request path strips `Connection` from
                    // every response but a protocol switch's, so it is not put in the
                    // map (nor looked up and removed again). One that names anything
                    // more (`upgrade`, a field to strip with it) is kept for that path.
                    if !names_more && status != StatusCode::SWITCHING_PROTOCOLS {
                        continue;
                    }
                } else {
                    framing.field(&name, raw_value);
                }
                let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end))
                    .map_err(|_| H1Error::Head("header value"))?;
                headers.append(name, value);
            }
            return Ok(Some(Head {
                status,
                version,
                headers,
                keep_alive: keep_alive && !close,
                framing,
            }));
        }
    }

    /// Reads more into the buffer: the number of bytes read, 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// Joins the connection, after a protocol switch, with the client's side: what the
    /// upstream already sent goes first.
    pub async fn tunnel<C>(mut self: Box<Self>, client: &mut C) -> io::Result<()>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        if !self.buf.is_empty() {
            client.write_all(&self.buf).await?;
            self.buf.clear();
        }
        tokio::io::copy_bidirectional(client, &mut self.io)
            .await
            .map(|_| ())
    }
}

/// The name of a header field most requests or responses carry, found by its length and
/// a case-insensitive comparison: a fraction of what the general parse of a name costs
/// (which also allocates a copy of a name the `http` crate does not know), for nearly
/// every field of a usual message. `raw` is a token, as httparse gives a field name;
/// equal to one of these, the result is the one `HeaderName::from_bytes` gives.
#[inline]
pub(crate) fn known_name(raw: &[u8]) -> Option<HeaderName> {
    let words = name_words(raw)?;
    // Within an arm the length is known: only the words it spans are compared.
    let len = raw.len();
    let is = |name: [u64; NAME_WORDS]| {
        words[0] == name[0]
            && (len <= 8 || words[1] == name[1])
            && (len <= 16 || words[2] == name[2])
    };
    Some(match len {
        4 if is(const { words_of("date") }) => header::DATE,
        4 if is(const { words_of("host") }) => header::HOST,
        4 if is(const { words_of("etag") }) => header::ETAG,
        4 if is(const { words_of("vary") }) => header::VARY,
        6 if is(const { words_of("server") }) => header::SERVER,
        6 if is(const { words_of("accept") }) => header::ACCEPT,
        6 if is(const { words_of("cookie") }) => header::COOKIE,
        6 if is(const { words_of("origin") }) => header::ORIGIN,
        7 if is(const { words_of("expires") }) => header::EXPIRES,
        7 if is(const { words_of("referer") }) => header::REFERER,
        8 if is(const { words_of("location") }) => header::LOCATION,
        9 if is(const { words_of("x-real-ip") }) => const { HeaderName::from_static("x-real-ip") },
        10 if is(const { words_of("connection") }) => header::CONNECTION,
        10 if is(const { words_of("user-agent") }) => header::USER_AGENT,
        10 if is(const { words_of("set-cookie") }) => header::SET_COOKIE,
        12 if is(const { words_of("content-type") }) => header::CONTENT_TYPE,
        12 if is(const { words_of("x-request-id") }) => {
            const { HeaderName::from_static("x-request-id") }
        }
        13 if is(const { words_of("last-modified") }) => header::LAST_MODIFIED,
        13 if is(const { words_of("accept-ranges") }) => header::ACCEPT_RANGES,
        13 if is(const { words_of("cache-control") }) => header::CACHE_CONTROL,
        13 if is(const { words_of("authorization") }) => header::AUTHORIZATION,
        13 if is(const { words_of("if-none-match") }) => header::IF_NONE_MATCH,
        14 if is(const { words_of("content-length") }) => header::CONTENT_LENGTH,
        15 if is(const { words_of("accept-encoding") }) => header::ACCEPT_ENCODING,
        15 if is(const { words_of("accept-language") }) => header::ACCEPT_LANGUAGE,
        15 if is(const { words_of("x-forwarded-for") }) => {
            const { HeaderName::from_static("x-forwarded-for") }
        }
        16 if is(const { words_of("content-encoding") }) => header::CONTENT_ENCODING,
        16 if is(const { words_of("x-forwarded-host") }) => {
            const { HeaderName::from_static("x-forwarded-host") }
        }
        17 if is(const { words_of("transfer-encoding") }) => header::TRANSFER_ENCODING,
        17 if is(const { words_of("if-modified-since") }) => header::IF_MODIFIED_SINCE,
        17 if is(const { words_of("x-forwarded-proto") }) => {
            const { HeaderName::from_static("x-forwarded-proto") }
        }
        _ => return None,
    })
}

/// Words of [`name_words`]: names up to 24 bytes.
const NAME_WORDS: usize = 3;
/// Sets the bit that makes an ASCII capital its small letter, in every byte.
const LOWER: u64 = 0x2020_2020_2020_2020;

/// A field name as 8-byte words, with [`LOWER`]'s bit set in every byte: compared a
/// word at a time rather than byte by byte. The words are loads of fixed size that
/// overlap as the length needs (4 to 8 bytes: the first four and the last four; up to
/// 16: the first eight and the last eight; up to 24: the first sixteen and the last
/// eight), so every byte is in a word without a copy of variable length (a call to
/// `memcpy` per field); names of one length, the only ones compared, share the layout.
/// The bit turns a capital into its small letter; of the other bytes httparse lets
/// through in a name (a token: digits, letters and `!#$%&'*+-.^_`|~`) none becomes a
/// letter or `-` by it, so a name equal to a known one (letters and `-`) in this form is
/// that name in some case. `None` for a name shorter or longer than any known one.
fn name_words(raw: &[u8]) -> Option<[u64; NAME_WORDS]> {
    let n = raw.len();
    let half = |at: usize| {
        let mut le = [0u8; 4];
        le.copy_from_slice(&raw[at..at + 4]);
        u64::from(u32::from_le_bytes(le))
    };
    let word = |at: usize| {
        let mut le = [0u8; 8];
        le.copy_from_slice(&raw[at..at + 8]);
        u64::from_le_bytes(le)
    };
    let words = match n {
        4..=8 => [half(0) | half(n - 4) << 32, 0, 0],
        9..=16 => [word(0), word(n - 8), 0],
        17..=24 => [word(0), word(8), word(n - 8)],
        _ => return None,
    };
    Some(words.map(|w| w | LOWER))
}

/// [`name_words`] of a known name (4 to 24 bytes), made at compile time.
const fn words_of(name: &str) -> [u64; NAME_WORDS] {
    /// `size` bytes of `bytes` from `at`, little-endian.
    const fn load(bytes: &[u8], at: usize, size: usize) -> u64 {
        let mut word = 0;
        let mut i = 0;
        while i < size {
            word |= (bytes[at + i] as u64) << (8 * i);
            i += 1;
        }
        word
    }
    let b = name.as_bytes();
    let n = b.len();
    let words = if n <= 8 {
        [load(b, 0, 4) | load(b, n - 4, 4) << 32, 0, 0]
    } else if n <= 16 {
        [load(b, 0, 8), load(b, n - 8, 8), 0]
    } else {
        [load(b, 0, 8), load(b, 8, 8), load(b, n - 8, 8)]
    };
    [words[0] | LOWER, words[1] | LOWER, words[2] | LOWER]
}

/// `Ready` once `due` has passed, on a timer kept across waits: moved to `due` only when
/// it is set for later. Set for earlier (a previous wait's end, which every later one
/// passes), it stays, and when it fires before `due` it is moved on then: a timer that
/// serves a wait every few milliseconds is moved about once per its span instead of once
/// per wait, and a wait still ends at its own `due`, not before.
pub(crate) fn poll_until(
    mut timer: Pin<&mut tokio::time::Sleep>,
    due: tokio::time::Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if timer.deadline() > due {
        timer.as_mut().reset(due);
    }
    loop {
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // Set for `due` (or later, never: see above), it fired at or after `due`.
        if timer.deadline() >= due {
            return Poll::Ready(());
        }
        // Fired for an earlier end: on to this one's.
        timer.as_mut().reset(due);
    }
}

/// A partial head must still be able to complete within the limit.
fn continue_if_room(buf: &BytesMut) -> Result<(), H1Error> {
    if buf.len() >= MAX_HEAD_BYTES {
        Err(H1Error::HeadTooLarge)
    } else {
        Ok(())
    }
}

fn head_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "header name",
        httparse::Error::HeaderValue => "header value",
        httparse::Error::NewLine => "line ending",
        httparse::Error::Status => "status code",
        httparse::Error::Token => "token",
        httparse::Error::Version => "HTTP version",
        httparse::Error::TooManyHeaders => "too many header fields",
    }
}

/// A final response head, parsed.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    /// Neither the version nor `Connection` ask to close.
    keep_alive: bool,
    /// What the body's framing is told by.
    framing: FramingFields,
}

/// The fields a response body's framing depends on (RFC 9112 section 6.3), gathered one
/// by one while the head's map is built: looked up in the map afterwards, each cost a
/// hash and a probe per response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FramingFields {
    /// The Content-Length when every value so far (fields and list members) is the same
    /// decimal number, `None` before any; otherwise the first fault found.
    length: Result<Option<u64>, &'static str>,
    /// A Transfer-Encoding field is there.
    transfer_encoding: bool,
    /// The last Transfer-Encoding field's last coding is `chunked`.
    ends_chunked: bool,
}

impl FramingFields {
    /// Before any field.
    const NONE: FramingFields = FramingFields {
        length: Ok(None),
        transfer_encoding: false,
        ends_chunked: false,
    };

    /// Takes in the next field of the head, `name: value`, in the order of the head.
    fn field(&mut self, name: &HeaderName, value: &[u8]) {
        if *name == header::CONTENT_LENGTH {
            self.content_length(value);
        } else if *name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
            self.ends_chunked = value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }

    fn content_length(&mut self, value: &[u8]) {
        let Ok(mut found) = self.length else {
            return;
        };
        for part in value.split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                self.length = Err("invalid Content-Length");
                return;
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match found {
                Some(seen) if seen != n => {
                    self.length = Err("differing Content-Length values");
                    return;
                }
                _ => found = Some(n),
            }
        }
        self.length = Ok(found);
    }
}

/// The response body's framing from its head (RFC 9112 section 6.3). Ambiguous framing
/// (both Transfer-Encoding and Content-Length, differing or invalid Content-Length) is
/// refused: a proxy that picks one reading may not agree with the next hop.
fn response_framing(
    status: StatusCode,
    version: Version,
    fields: FramingFields,
    head_request: bool,
    connect: bool,
) -> Result<Framing, H1Error> {
    if status == StatusCode::SWITCHING_PROTOCOLS || (connect && status.is_success()) {
        return Ok(Framing::Tunnel);
    }
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Done);
    }
    let length = fields.length.map_err(H1Error::Framing)?;
    if fields.transfer_encoding {
        if length.is_some() {
            return Err(H1Error::Framing(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        if version == Version::HTTP_10 {
            return Err(H1Error::Framing(
                "Transfer-Encoding in an HTTP/1.0 response",
            ));
        }
        return Ok(if fields.ends_chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::Close
        });
    }
    Ok(match length {
        Some(0) => Framing::Done,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

/// A response body read from an upstream HTTP/1.1 connection; the connection comes back
/// through [`H1Body::take_idle`] once the exchange ended cleanly.
pub struct H1Body {
    conn: Option<Box<H1Conn>>,
    framing: Framing,
    /// The request body, when the response head came before all of it was sent (boxed:
    /// rare, and the body is moved with every response).
    upload: Option<Box<Upload>>,
    keep_alive: bool,
}

impl fmt::Debug for H1Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Body")
            .field("framing", &self.framing)
            .field("keep_alive", &self.keep_alive)
            .finish_non_exhaustive()
    }
}

impl H1Body {
    /// The connection for reuse: the response body was read to its end, the request sent
    /// in full, nothing asked to close and nothing unasked followed the response.
    pub fn take_idle(&mut self) -> Option<Box<H1Conn>> {
        let conn = self.conn.take()?;
        (self.framing == Framing::Done
            && self.keep_alive
            && self.upload.is_none()
            && conn.buf.is_empty())
        .then_some(conn)
    }

    /// After `101 Switching Protocols`: the connection, to be joined with the client's.
    pub fn into_tunnel(mut self) -> Option<Box<H1Conn>> {
        if self.framing == Framing::Tunnel {
            self.conn.take()
        } else {
            None
        }
    }

    /// Ends reading on a failure: the connection is not reused.
    fn fail(&mut self, error: H1Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.keep_alive = false;
        self.conn = None;
        self.upload = None;
        Poll::Ready(Some(Err(Box::new(error))))
    }

    fn data(&mut self, n: usize) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(conn) = &mut self.conn else {
            return Poll::Ready(None);
        };
        Poll::Ready(Some(Ok(Frame::data(conn.buf.split_to(n).freeze()))))
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(conn) = &mut this.conn else {
            return Poll::Ready(None);
        };
        if let Some(upload) = &mut this.upload {
            match upload.poll(&mut conn.io, cx) {
                Poll::Ready(Ok(())) => {
                    if let Some(upload) = this.upload.take() {
                        conn.out = upload.out;
                    }
                }
                Poll::Ready(Err(e)) => {
                    // The upstream answered before the request ended; the answer is read
                    // on, but the connection cannot carry another request.
                    tracing::debug!(error = %e, "request body after the response head failed");
                    this.upload = None;
                    this.keep_alive = false;
                }
                Poll::Pending => {}
            }
        }
        loop {
            let Some(conn) = &mut this.conn else {
                return Poll::Ready(None);
            };
            match this.framing {
                Framing::Done | Framing::Tunnel => return Poll::Ready(None),
                Framing::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = usize::try_from(left)
                            .unwrap_or(usize::MAX)
                            .min(conn.buf.len());
                        let rest = left - n as u64;
                        this.framing = if rest == 0 {
                            Framing::Done
                        } else {
                            Framing::Length(rest)
                        };
                        return this.data(n);
                    }
                }
                Framing::Close => {
                    if !conn.buf.is_empty() {
                        let n = conn.buf.len();
                        return this.data(n);
                    }
                }
                Framing::Chunked(state) => match step_chunked(&mut conn.buf, state) {
                    Err(e) => return this.fail(e),
                    Ok(Chunked::NeedMore) => {}
                    Ok(Chunked::Next(state)) => {
                        this.framing = Framing::Chunked(state);
                        continue;
                    }
                    Ok(Chunked::Data(n, state)) => {
                        this.framing = Framing::Chunked(state);
                        return this.data(n);
                    }
                    Ok(Chunked::End(trailers)) => {
                        this.framing = Framing::Done;
                        return match trailers {
                            Some(trailers) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                            None => Poll::Ready(None),
                        };
                    }
                },
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return this.fail(H1Error::Read(e)),
                Poll::Ready(Ok(0)) => {
                    if this.framing == Framing::Close {
                        this.framing = Framing::Done;
                        this.keep_alive = false;
                        return Poll::Ready(None);
                    }
                    return this.fail(H1Error::Closed("before the end of the response body"));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not after a failure: a body that failed did not end.
        matches!(self.framing, Framing::Done | Framing::Tunnel)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done | Framing::Tunnel => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// What one step through chunked framing gave.
#[derive(Debug)]
pub(crate) enum Chunked {
    /// More bytes are needed.
    NeedMore,
    /// A state change without data (a size line or a data CRLF consumed).
    Next(Chunk),
    /// This many data bytes at the front of the buffer, then this state.
    Data(usize, Chunk),
    /// The body ended, with its trailers if it had any.
    End(Option<HeaderMap>),
}

/// Where a field httparse parsed out of a buffer starting at address `base` lies in it:
/// name start, name end, value start, value end, as offsets. Offsets survive the buffer
/// being split off, so values can then be taken from it without a copy.
pub(crate) fn field_span(
    base: usize,
    field: &httparse::Header<'_>,
) -> (usize, usize, usize, usize) {
    let name = field.name.as_ptr() as usize - base;
    let value = field.value.as_ptr() as usize - base;
    (
        name,
        name + field.name.len(),
        value,
        value + field.value.len(),
    )
}

/// One step of the chunked grammar (RFC 9112 section 7.1) over `buf`, consuming what it
/// recognised (data bytes are left for the caller to take).
pub(crate) fn step_chunked(buf: &mut BytesMut, state: Chunk) -> Result<Chunked, H1Error> {
    match state {
        Chunk::Size => {
            let Some(end) = find_crlf(buf, MAX_CHUNK_LINE)? else {
                return Ok(Chunked::NeedMore);
            };
            let size = chunk_size(&buf[..end])?;
            buf.advance(end + 2);
            Ok(Chunked::Next(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Chunked::NeedMore);
            }
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            let rest = left - n as u64;
            Ok(Chunked::Data(
                n,
                if rest == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(rest)
                },
            ))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Chunked::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err(H1Error::Chunked("chunk data not followed by CRLF"));
            }
            buf.advance(2);
            Ok(Chunked::Next(Chunk::Size))
        }
        Chunk::Trailers => {
            if buf.len() < 2 {
                return Ok(Chunked::NeedMore);
            }
            if &buf[..2] == b"\r\n" {
                buf.advance(2);
                return Ok(Chunked::End(None));
            }
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                if buf.len() >= MAX_HEAD_BYTES {
                    return Err(H1Error::Chunked("trailer section too large"));
                }
                return Ok(Chunked::NeedMore);
            };
            if end + 4 > MAX_HEAD_BYTES {
                return Err(H1Error::Chunked("trailer section too large"));
            }
            let block = buf.split_to(end + 4).freeze();
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let parsed = match httparse::parse_headers(&block, &mut fields) {
                Ok(httparse::Status::Complete((_, parsed))) => parsed,
                _ => return Err(H1Error::Chunked("malformed trailer section")),
            };
            let mut trailers = HeaderMap::with_capacity(parsed.len());
            for field in parsed.iter() {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| H1Error::Chunked("trailer field name"))?;
                let value = HeaderValue::from_maybe_shared(block.slice_ref(field.value))
                    .map_err(|_| H1Error::Chunked("trailer field value"))?;
                trailers.append(name, value);
            }
            Ok(Chunked::End(Some(trailers)))
        }
    }
}

/// Where the first CRLF of `buf` is, within `limit` bytes; a bare CR or LF is an error.
fn find_crlf(buf: &[u8], limit: usize) -> Result<Option<usize>, H1Error> {
    for (i, b) in buf.iter().enumerate().take(limit) {
        match b {
            b'\r' => {
                return match buf.get(i + 1) {
                    Some(b'\n') => Ok(Some(i)),
                    Some(_) => Err(H1Error::Chunked("bare CR in a chunk-size line")),
                    None => Ok(None),
                }
            }
            b'\n' => return Err(H1Error::Chunked("bare LF in a chunk-size line")),
            _ => {}
        }
    }
    if buf.len() >= limit {
        Err(H1Error::Chunked("chunk-size line too long"))
    } else {
        Ok(None)
    }
}

/// The size of a chunk-size line (extensions, after `;`, are ignored).
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(H1Error::Chunked("chunk size is not hexadecimal"));
    }
    if digits > 15 {
        return Err(H1Error::Chunked("chunk size too large"));
    }
    // Only SP and HTAB may follow the size (RFC 9112's BWS), as the request framing
    // model has it; `trim_ascii_start` would pass a form feed too.
    let rest = &line[digits..];
    let ext = &rest[rest
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(rest.len())..];
    if !ext.is_empty() && ext[0] != b';' {
        return Err(H1Error::Chunked("chunk size is not hexadecimal"));
    }
    if ext.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
        return Err(H1Error::Chunked("control character in a chunk extension"));
    }
    let size = line[..digits].iter().fold(0u64, |n, d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        (n << 4) | u64::from(v)
    });
    Ok(size)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::super::idle::{self, ConnKey};
    use super::*;
    use http_body_util::BodyExt;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// An upstream on 127.0.0.1 that answers the n-th request head on any connection with
    /// `replies[n]` (closing the connection after the last one), counting connections.
    async fn upstream(replies: Vec<&'static [u8]>) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut replies = replies.into_iter();
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let mut seen = Vec::new();
                while next_head(&mut socket, &mut seen).await {
                    match replies.next() {
                        Some(reply) => socket.write_all(reply).await.unwrap(),
                        None => return,
                    }
                    if replies.len() == 0 {
                        let _ = socket.shutdown().await;
                    }
                }
            }
        });
        (addr, accepted)
    }

    /// Reads from `socket` until `seen` holds a whole request head, and takes it off:
    /// `false` once the socket ends first.
    async fn next_head(socket: &mut TcpStream, seen: &mut Vec<u8>) -> bool {
        loop {
            if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                seen.drain(..end + 4);
                return true;
            }
            let mut tmp = [0u8; 4096];
            let n = socket.read(&mut tmp).await.unwrap_or(0);
            if n == 0 {
                return false;
            }
            seen.extend_from_slice(&tmp[..n]);
        }
    }

    async fn conn(addr: SocketAddr) -> Box<H1Conn> {
        let stream = TcpStream::connect(addr).await.unwrap();
        H1Conn::new(UpstreamStream::Tcp(stream), None)
    }

    fn get(method: Method) -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::empty());
        *req.method_mut() = method;
        *req.uri_mut() = http::Uri::from_static("/x");
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("up"));
        req
    }

    /// Sends `get(method)` on `c`, the request handed over for good.
    async fn send_get(c: Box<H1Conn>, method: Method) -> Result<Response<H1Body>, SendError> {
        c.send(&mut Some(get(method)), None).await
    }

    /// A GET on a new connection to `addr` (its head due at `head_due`), answered `one`
    /// completely: the connection, ready for reuse.
    async fn idle_after_one(addr: SocketAddr, head_due: Option<Instant>) -> Box<H1Conn> {
        let response = conn(addr)
            .await
            .send(&mut Some(get(Method::GET)), head_due)
            .await;
        let mut body = response.unwrap().into_body();
        assert_eq!(read_all(&mut body).await.unwrap().0, b"one");
        body.take_idle().expect("complete: reusable")
    }

    /// A second GET on `reused` (its head due at `head_due`) is answered `two`, with no
    /// connection accepted by the upstream but the first (`accepted` counts them).
    async fn answers_two_on_the_same_connection(
        mut reused: Box<H1Conn>,
        head_due: Option<Instant>,
        accepted: &AtomicUsize,
    ) {
        reused.set_reused();
        let response = reused.send(&mut Some(get(Method::GET)), head_due).await;
        let mut body = response.unwrap().into_body();
        assert_eq!(read_all(&mut body).await.unwrap().0, b"two");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "the same connection");
    }

    /// Reads the body to its end: data, trailers, or the error.
    async fn read_all(body: &mut H1Body) -> Result<(Vec<u8>, Option<HeaderMap>), BoxError> {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        Ok((data, trailers))
    }

    /// Sends `get(GET)` on `c` with the head due at `due`; the connection back once the
    /// body is read, with the body.
    async fn get_due(c: Box<H1Conn>, due: Instant) -> Result<(Box<H1Conn>, Vec<u8>), SendError> {
        let mut response = c.send(&mut Some(get(Method::GET)), Some(due)).await?;
        let (data, _) = read_all(response.body_mut()).await.unwrap();
        let conn = response
            .body_mut()
            .take_idle()
            .expect("kept for the next request");
        Ok((conn, data))
    }

    /// An upstream that answers its first head at once (`a`), its second after `delay`
    /// (`b`) and no later one.
    async fn answering_the_second_head_after(delay: Duration) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut heads = 0;
            while next_head(&mut socket, &mut seen).await {
                heads += 1;
                let reply: &[u8] = match heads {
                    1 => b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
                    2 => {
                        tokio::time::sleep(delay).await;
                        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"
                    }
                    _ => continue,
                };
                socket.write_all(reply).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_head_not_there_by_its_due_time_fails_on_the_connections_own_timer() {
        let addr = answering_the_second_head_after(Duration::from_millis(300)).await;
        let soon = || Instant::now() + Duration::from_millis(100);
        let (c, data) = get_due(conn(addr).await, soon()).await.unwrap();
        assert_eq!(data, b"a");
        // The first request's due time passes while the connection waits for the next: the
        // timer it was set to is moved to the next request's own.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let later = Instant::now() + Duration::from_secs(30);
        let (c, data) = get_due(c, later)
            .await
            .expect("answered within its own due time");
        assert_eq!(data, b"b");
        // Never answered: the exchange fails when the head is due, nothing read.
        let err = get_due(c, soon()).await.expect_err("no head in time");
        assert!(matches!(err.error, H1Error::HeadTimedOut), "{}", err.error);
        assert!(err.nothing_read && !err.unsent);
    }

    #[tokio::test]
    async fn a_head_due_later_than_the_timer_waits_until_its_own_due_time() {
        // The second head comes after the first one's due time.
        let addr = answering_the_second_head_after(Duration::from_millis(600)).await;
        let first_due = Instant::now() + Duration::from_millis(300);
        let (c, data) = get_due(conn(addr).await, first_due).await.unwrap();
        assert_eq!(data, b"a");
        // Sent at once: the timer, set for the first request's due time if it was set at
        // all, fires while this one waits, and this one waits on until its own.
        let (c, data) = get_due(c, Instant::now() + Duration::from_secs(30))
            .await
            .expect("answered within its own due time");
        assert_eq!(data, b"b");
        assert!(
            Instant::now() > first_due,
            "the answer came after the first due time"
        );
        // Due before the timer is set for: it fails at its own due time.
        let sent = Instant::now();
        let err = get_due(c, sent + Duration::from_millis(200))
            .await
            .expect_err("no head in time");
        assert!(matches!(err.error, H1Error::HeadTimedOut), "{}", err.error);
        assert!(
            sent.elapsed() < Duration::from_secs(20),
            "failed at its own due time, not the timer's earlier setting"
        );
    }

    #[tokio::test]
    async fn a_request_stays_with_the_caller_until_it_is_answered() {
        // Answered: the request is taken.
        let (addr, _) = upstream(vec![b"HTTP/1.1 204 No Content\r\n\r\n"]).await;
        let mut slot = Some(get(Method::GET));
        conn(addr).await.send(&mut slot, None).await.unwrap();
        assert!(slot.is_none());

        // Written, and the connection closed before any response byte: it is left, whole,
        // for the caller to send again or not.
        let (addr, _) = upstream(vec![]).await;
        let mut slot = Some(get(Method::DELETE));
        let err = conn(addr).await.send(&mut slot, None).await.unwrap_err();
        assert!(err.nothing_read && !err.unsent, "{}", err.error);
        let left = slot.expect("left with the caller");
        assert_eq!(left.method(), Method::DELETE);
        assert_eq!(left.uri(), "/x");
        assert_eq!(left.headers()[header::HOST], "up");

        // Part of an answer came: the upstream took the request in, and it is gone.
        let (addr, _) = upstream(vec![b"HTTP/1.1 200 OK\r\nContent-Le"]).await;
        let mut slot = Some(get(Method::GET));
        let err = conn(addr).await.send(&mut slot, None).await.unwrap_err();
        assert!(!err.nothing_read, "{}", err.error);
        assert!(slot.is_none());

        // Nothing to send.
        let (addr, _) = upstream(vec![]).await;
        let err = conn(addr).await.send(&mut None, None).await.unwrap_err();
        assert!(err.unsent && err.nothing_read, "{}", err.error);
    }

    #[tokio::test]
    async fn chunked_body_with_extensions_and_trailers() {
        let (addr, _) = upstream(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n",
        ])
        .await;
        let response = send_get(conn(addr).await, Method::GET).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let (data, trailers) = read_all(&mut body).await.unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(trailers.unwrap()["x-sum"], "42");
        assert!(
            body.take_idle().is_some(),
            "a complete exchange is reusable"
        );
    }

    #[tokio::test]
    async fn close_delimited_body_ends_at_close_and_is_not_reused() {
        let (addr, _) = upstream(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil the end"]).await;
        let response = send_get(conn(addr).await, Method::GET).await.unwrap();
        let mut body = response.into_body();
        let (data, _) = read_all(&mut body).await.unwrap();
        assert_eq!(data, b"until the end");
        assert!(body.take_idle().is_none());
    }

    #[tokio::test]
    async fn bodiless_responses_read_no_body_and_the_connection_goes_on() {
        let (addr, accepted) = upstream(vec![
            b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ])
        .await;
        let mut c = conn(addr).await;
        for (method, status) in [(Method::GET, 204), (Method::GET, 304), (Method::HEAD, 200)] {
            let response = send_get(c, method).await.unwrap();
            assert_eq!(response.status().as_u16(), status);
            let mut body = response.into_body();
            assert!(body.is_end_stream());
            assert_eq!(read_all(&mut body).await.unwrap().0, b"");
            c = body.take_idle().expect("reusable");
            assert!(c.idle_usable());
        }
        // An informational head is skipped.
        let response = send_get(c, Method::GET).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(read_all(&mut response.into_body()).await.unwrap().0, b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_field_is_kept_only_when_it_names_more_than_the_connection_state() {
        let (addr, accepted) = upstream(vec![
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal\r\nX-Internal: 1\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        ])
        .await;
        let mut c = conn(addr).await;
        // Only the connection's state: read, not kept.
        let response = send_get(c, Method::GET).await.unwrap();
        assert_eq!(response.headers().get(header::CONNECTION), None);
        let mut body = response.into_body();
        read_all(&mut body).await.unwrap();
        c = body.take_idle().expect("kept alive");
        // A field named as well: kept, for the request path to strip both.
        let response = send_get(c, Method::GET).await.unwrap();
        assert_eq!(
            response.headers()[header::CONNECTION],
            "keep-alive, X-Internal"
        );
        assert_eq!(response.headers()["x-internal"], "1");
        let mut body = response.into_body();
        read_all(&mut body).await.unwrap();
        c = body.take_idle().expect("kept alive");
        // `close`: not kept, and the connection ends with the exchange.
        let response = send_get(c, Method::GET).await.unwrap();
        assert_eq!(response.headers().get(header::CONNECTION), None);
        let mut body = response.into_body();
        read_all(&mut body).await.unwrap();
        assert!(body.take_idle().is_none());
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn malformed_chunk_sizes_fail_the_body() {
        for reply in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nhello\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        ] {
            let (addr, _) = upstream(vec![reply]).await;
            let response = send_get(conn(addr).await, Method::GET).await.unwrap();
            let mut body = response.into_body();
            let err = read_all(&mut body).await.expect_err("malformed chunking");
            assert!(err.to_string().contains("chunk"), "{err}");
            assert!(body.take_idle().is_none());
        }
    }

    #[tokio::test]
    async fn oversized_or_malformed_heads_are_refused() {
        let long: &'static [u8] = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
                "a".repeat(MAX_HEAD_BYTES)
            )
            .into_bytes()
            .into_boxed_slice(),
        );
        let many: &'static [u8] = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\n{}\r\n",
                (0..=MAX_HEADERS)
                    .map(|i| format!("x-{i}: v\r\n"))
                    .collect::<String>()
            )
            .into_bytes()
            .into_boxed_slice(),
        );
        for reply in [long, many] {
            let (addr, _) = upstream(vec![reply]).await;
            let err = send_get(conn(addr).await, Method::GET).await.unwrap_err();
            assert!(matches!(err.error, H1Error::HeadTooLarge), "{}", err.error);
        }
        for reply in [
            &b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
        ] {
            let (addr, _) = upstream(vec![reply]).await;
            let err = send_get(conn(addr).await, Method::GET).await.unwrap_err();
            assert!(
                matches!(err.error, H1Error::Head(_) | H1Error::Framing(_)),
                "{}",
                err.error
            );
        }
        // The same length twice is one length.
        let (addr, _) = upstream(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"]).await;
        let response = send_get(conn(addr).await, Method::GET).await.unwrap();
        assert_eq!(read_all(&mut response.into_body()).await.unwrap().0, b"ok");
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_not_reused() {
        let (addr, _) = upstream(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfour"]).await;
        let response = send_get(conn(addr).await, Method::GET).await.unwrap();
        let mut body = response.into_body();
        let err = read_all(&mut body).await.expect_err("cut short");
        assert!(err.to_string().contains("closed"), "{err}");
        assert!(body.take_idle().is_none());
        // Chunked, cut between chunks.
        let (addr, _) = upstream(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfour\r\n",
        ])
        .await;
        let response = send_get(conn(addr).await, Method::GET).await.unwrap();
        let mut body = response.into_body();
        assert!(read_all(&mut body).await.is_err());
        assert!(body.take_idle().is_none());
    }

    #[tokio::test]
    async fn a_quiet_worker_has_its_idle_connections_let_go_of_their_buffers() {
        let (addr, accepted) = upstream(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo",
        ])
        .await;
        // With a due time for the head, so that the connection makes its head timer.
        let due = Some(Instant::now() + Duration::from_secs(30));
        let idle_conn = idle_after_one(addr, due).await;

        let address = addr.to_string();
        let runtime = super::super::UpstreamRuntime::new(&address);
        let key = ConnKey {
            address: &address,
            tls: 0,
        };
        let timeout = Duration::from_secs(60);
        // Kept in the idle store, a connection holds on to its buffers...
        idle::put(key, idle_conn, Instant::now(), timeout);
        let kept = idle::take(key, &runtime, timeout, Instant::now()).expect("kept");
        assert!(
            kept.buf.capacity() > 0,
            "a parked connection keeps its read buffer"
        );
        assert!(kept.out.capacity() > 0, "and its request head buffer");
        assert!(kept.head_timer.is_some(), "and its head timer");
        // ... until its worker goes quiet.
        idle::put(key, kept, Instant::now(), timeout);
        idle::settle();
        let quiet = idle::take(key, &runtime, timeout, Instant::now()).expect("still kept");
        assert_eq!(quiet.buf.capacity(), 0);
        assert_eq!(quiet.out.capacity(), 0);
        assert_eq!(quiet.spans.capacity(), 0);
        assert!(quiet.head_timer.is_none());

        // It serves its next request as before, on the same connection.
        answers_two_on_the_same_connection(quiet, due, &accepted).await;
    }

    #[tokio::test]
    async fn a_workers_sweep_closes_what_the_upstream_closed_and_lets_go_of_old_buffers() {
        let (addr, accepted) = upstream(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo",
        ])
        .await;
        // This upstream closes its connection after one response.
        let (closing, _) = upstream(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"]).await;
        let (address, closing_address) = (addr.to_string(), closing.to_string());
        let key = ConnKey {
            address: &address,
            tls: 0,
        };
        let closing_key = ConnKey {
            address: &closing_address,
            tls: 0,
        };
        let back = Instant::now();
        let timeout = Duration::from_secs(60);
        idle::put(key, idle_after_one(addr, None).await, back, timeout);
        idle::put(
            closing_key,
            idle_after_one(closing, None).await,
            back,
            timeout,
        );
        let runtime = super::super::UpstreamRuntime::new(&address);

        // Connections that came back later than the sweep's limit keep their buffers...
        idle::sweep_once(back, Duration::from_millis(1));
        let kept = idle::take(key, &runtime, timeout, Instant::now()).expect("kept");
        assert!(kept.buf.capacity() > 0 && kept.out.capacity() > 0);
        idle::put(key, kept, back, timeout);

        // ... and the thread's sweep, with no client of the thread going dormant, has those
        // idle for a period let go of them and closes the one its upstream closed.
        let sweep = tokio::spawn(idle::sweep(Duration::from_millis(50)));
        let deadline = Instant::now() + Duration::from_secs(10);
        let swept = loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if idle::kept(closing_key) == 0 {
                let conn = idle::take(key, &runtime, timeout, Instant::now()).expect("kept");
                if conn.buf.capacity() == 0 {
                    break conn;
                }
                idle::put(key, conn, back, timeout);
            }
            assert!(Instant::now() < deadline, "not swept within 10 s");
        };
        sweep.abort();
        assert_eq!(swept.out.capacity(), 0);
        assert_eq!(swept.spans.capacity(), 0);

        // The live one serves its next request as before, on the same connection.
        answers_two_on_the_same_connection(swept, None, &accepted).await;
    }

    #[tokio::test]
    async fn the_sweep_closes_a_connection_idle_past_its_pools_idle_timeout() {
        // An upstream that answers one request and reports when its connection ends.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let short = listener.local_addr().unwrap();
        let (ended, ended_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            assert!(next_head(&mut socket, &mut seen).await);
            socket
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
                .await
                .unwrap();
            let more = next_head(&mut socket, &mut seen).await;
            let _ = ended.send(more);
        });
        let (long, accepted) = upstream(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo",
        ])
        .await;
        let (short_address, long_address) = (short.to_string(), long.to_string());
        let short_key = ConnKey {
            address: &short_address,
            tls: 0,
        };
        let long_key = ConnKey {
            address: &long_address,
            tls: 0,
        };
        let back = Instant::now();
        // Put back by pools with an idle timeout of 1 s and of 60 s.
        idle::put(
            short_key,
            idle_after_one(short, None).await,
            back,
            Duration::from_secs(1),
        );
        let timeout = Duration::from_secs(60);
        idle::put(long_key, idle_after_one(long, None).await, back, timeout);

        // Within its timeout, a sweep keeps it...
        idle::sweep_once(back + Duration::from_millis(999), idle::SWEEP_PERIOD);
        assert_eq!(idle::kept(short_key), 1);
        // ... and past it closes it, with no request asking: the upstream sees its end.
        idle::sweep_once(back + Duration::from_secs(1), idle::SWEEP_PERIOD);
        assert_eq!(idle::kept(short_key), 0);
        let more = tokio::time::timeout(Duration::from_secs(10), ended_rx)
            .await
            .expect("the upstream saw the connection end within 10 s")
            .unwrap();
        assert!(!more, "no request came on it before it ended");

        // The other pool's connection is still kept, and serves its next request.
        let runtime = super::super::UpstreamRuntime::new(&long_address);
        let kept = idle::take(long_key, &runtime, timeout, Instant::now()).expect("kept");
        answers_two_on_the_same_connection(kept, None, &accepted).await;
    }

    /// An upstream that answers every request on every connection `one`, its connections
    /// served at once.
    async fn answers_every_connection() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while next_head(&mut socket, &mut seen).await {
                        let one = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none";
                        if socket.write_all(one).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn idle_connections_take_turns_under_load_and_the_most_recent_serves_when_quiet() {
        let addr = answers_every_connection().await;
        let address = addr.to_string();
        let key = ConnKey {
            address: &address,
            tls: 0,
        };
        let runtime = super::super::UpstreamRuntime::new(&address);
        let timeout = Duration::from_secs(60);
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(idle_after_one(addr, None).await);
        }
        let ids: Vec<*const H1Conn> = conns.iter().map(|c| &**c as *const H1Conn).collect();
        let id = |c: &H1Conn| ids.iter().position(|&i| std::ptr::eq(i, c));
        let now = Instant::now();
        let at = |ms: u64| now - Duration::from_millis(ms);

        // Busy: the oldest came back 30 ms ago, so they take turns, oldest first.
        for (conn, ms) in conns.drain(..).zip([30, 20, 10]) {
            idle::put(key, conn, at(ms), timeout);
        }
        for expected in 0..3 {
            let conn = idle::take(key, &runtime, timeout, now).expect("kept");
            assert_eq!(id(&conn), Some(expected));
            conns.push(conn);
        }
        assert_eq!(idle::kept(key), 0);

        // Quiet: the oldest came back 2 s ago, so the most recent serves, then the next.
        for (conn, ms) in conns.drain(..).zip([2000, 1000, 10]) {
            idle::put(key, conn, at(ms), timeout);
        }
        for expected in [2, 1, 0] {
            let conn = idle::take(key, &runtime, timeout, now).expect("kept");
            assert_eq!(id(&conn), Some(expected));
            conns.push(conn);
        }

        // Taking turns skips one past its pool's idle timeout (shorter than a turn), and
        // keeps the younger ones.
        let short = Duration::from_millis(100);
        for (conn, ms) in conns.drain(..).zip([200, 50, 10]) {
            idle::put(key, conn, at(ms), short);
        }
        let conn = idle::take(key, &runtime, short, now).expect("a younger one");
        assert_eq!(id(&conn), Some(1));
        assert_eq!(idle::kept(key), 1);
        // The connection it took serves its next request.
        let response = send_get(conn, Method::GET).await.unwrap();
        assert_eq!(read_all(&mut response.into_body()).await.unwrap().0, b"one");
    }

    #[tokio::test]
    async fn reuse_only_after_a_complete_exchange_that_keeps_the_connection() {
        let (addr, accepted) = upstream(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo",
        ])
        .await;
        let mut again = idle_after_one(addr, None).await;
        assert!(again.idle_usable());
        answers_two_on_the_same_connection(again, None, &accepted).await;

        // `Connection: close`, or HTTP/1.0 without keep-alive: not reused either.
        for reply in [
            &b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"[..],
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ] {
            let (addr, _) = upstream(vec![reply, reply]).await;
            let response = send_get(conn(addr).await, Method::GET).await.unwrap();
            let mut body = response.into_body();
            assert_eq!(read_all(&mut body).await.unwrap().0, b"ok");
            assert!(body.take_idle().is_none());
        }
    }

    #[tokio::test]
    async fn a_partly_read_body_is_not_reused() {
        let (addr, _) = upstream(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfive"]).await;
        let response = send_get(conn(addr).await, Method::GET).await.unwrap();
        let mut body = response.into_body();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "five"
        );
        assert!(!body.is_end_stream());
        assert!(body.take_idle().is_none());
    }

    #[tokio::test]
    async fn a_closed_idle_connection_is_not_usable_and_fails_before_any_byte() {
        let (addr, _) = upstream(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]).await;
        let response = send_get(conn(addr).await, Method::GET).await.unwrap();
        let mut body = response.into_body();
        read_all(&mut body).await.unwrap();
        let mut idle = body.take_idle().expect("complete");
        // The upstream closes after its last reply.
        for _ in 0..200 {
            if !idle.idle_usable() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!idle.idle_usable());
        let err = send_get(idle, Method::GET).await.unwrap_err();
        assert!(err.nothing_read, "{}", err.error);
    }

    #[test]
    fn known_field_names_are_the_names_the_general_parse_gives() {
        for name in [
            "date",
            "Host",
            "accept",
            "Cookie",
            "origin",
            "Referer",
            "X-Real-IP",
            "User-Agent",
            "x-request-id",
            "Authorization",
            "If-None-Match",
            "Accept-Encoding",
            "accept-language",
            "X-Forwarded-For",
            "x-forwarded-host",
            "X-Forwarded-Proto",
            "If-Modified-Since",
            "ETag",
            "Vary",
            "SERVER",
            "Expires",
            "location",
            "Connection",
            "Set-Cookie",
            "Content-Type",
            "last-modified",
            "Accept-Ranges",
            "Cache-Control",
            "Content-Length",
            "Content-Encoding",
            "Transfer-Encoding",
        ] {
            let known = known_name(name.as_bytes()).expect(name);
            let parsed = HeaderName::from_bytes(name.as_bytes()).expect(name);
            assert_eq!(known, parsed, "{name}");
            assert_eq!(known.as_str(), name.to_ascii_lowercase());
        }
        // Same length, other bytes: left to the general parse (which refuses the
        // invalid ones).
        for other in [
            "dat3",
            "x-ca",
            "content_length",
            "transfer-encodin",
            "servers",
            "",
            "a-name-longer-than-twenty-four-bytes",
        ] {
            assert_eq!(known_name(other.as_bytes()), None, "{other}");
        }
        // Any other token byte in any place: not the known name (in no case).
        let token: Vec<u8> = (b'0'..=b'9')
            .chain(b'a'..=b'z')
            .chain(b'A'..=b'Z')
            .chain(b"!#$%&'*+-.^_`|~".iter().copied())
            .collect();
        // A name of each length from 4 to 8, then each class of longer ones (the words
        // overlap differently in each).
        for name in [
            "date",
            "server",
            "expires",
            "location",
            "x-real-ip",
            "content-type",
            "transfer-encoding",
            "set-cookie",
            "x-forwarded-for",
        ] {
            for at in 0..name.len() {
                for &b in &token {
                    let mut other = name.as_bytes().to_vec();
                    if other[at].eq_ignore_ascii_case(&b) {
                        continue;
                    }
                    other[at] = b;
                    let found = known_name(&other).map(|n| n.as_str().to_string());
                    let parsed = HeaderName::from_bytes(&other).expect("a token");
                    assert_ne!(found.as_deref(), Some(name), "{other:?}");
                    if let Some(found) = found {
                        assert_eq!(found, parsed.as_str(), "{other:?}");
                    }
                }
            }
        }
    }

    /// The framing fields as the map of a whole head tells them (each looked up in it
    /// once the head is parsed): what gathering them field by field must give.
    fn framing_of_map(headers: &HeaderMap) -> FramingFields {
        let mut length = Ok(None);
        'values: for value in headers.get_all(header::CONTENT_LENGTH) {
            for part in value.as_bytes().split(|b| *b == b',') {
                let part = part.trim_ascii();
                if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                    length = Err("invalid Content-Length");
                    break 'values;
                }
                let n: u64 = std::str::from_utf8(part).unwrap().parse().unwrap();
                match length {
                    Ok(Some(seen)) if seen != n => {
                        length = Err("differing Content-Length values");
                        break 'values;
                    }
                    _ => length = Ok(Some(n)),
                }
            }
        }
        let last_coding = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().unwrap().rsplit(',').next().map(str::trim));
        FramingFields {
            length,
            transfer_encoding: headers.contains_key(header::TRANSFER_ENCODING),
            ends_chunked: last_coding.is_some_and(|c| c.eq_ignore_ascii_case("chunked")),
        }
    }

    #[test]
    fn framing_fields_gathered_field_by_field_are_those_of_the_whole_head() {
        let heads: &[&[(&str, &str)]] = &[
            &[],
            &[("content-length", "5")],
            &[("Content-Length", "5"), ("content-length", " 5 ")],
            &[("content-length", "5, 5")],
            &[("content-length", "0")],
            &[("content-length", "5"), ("content-length", "6")],
            &[("content-length", "5,6")],
            &[("content-length", "+5")],
            &[("content-length", "")],
            &[("content-length", "5,")],
            &[("content-length", "1234567890123456789")],
            &[("content-length", "12345678901234567890")],
            // The first fault is the one told.
            &[("content-length", "x"), ("content-length", "5")],
            &[
                ("content-length", "5"),
                ("content-length", "6"),
                ("content-length", "x"),
            ],
            &[("transfer-encoding", "chunked")],
            &[("transfer-encoding", "gzip, chunked")],
            &[("transfer-encoding", "chunked, gzip")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "gzip"),
            ],
            &[
                ("transfer-encoding", "gzip"),
                ("Transfer-Encoding", " CHUNKED "),
            ],
            &[("transfer-encoding", "chunked"), ("content-length", "5")],
            &[
                ("x-other", "5"),
                ("connection", "close"),
                ("content-type", "a/b"),
            ],
        ];
        for fields in heads {
            let mut gathered = FramingFields::NONE;
            let mut map = HeaderMap::new();
            for (name, value) in *fields {
                let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
                gathered.field(&name, value.as_bytes());
                map.append(name, HeaderValue::from_str(value).unwrap());
            }
            assert_eq!(gathered, framing_of_map(&map), "{fields:?}");
        }
        // A few outcomes spelled out, so that the reference above is not the only word.
        let mut f = FramingFields::NONE;
        f.field(&header::CONTENT_LENGTH, b"7, 7");
        assert_eq!(f.length, Ok(Some(7)));
        f.field(&header::CONTENT_LENGTH, b"8");
        assert_eq!(f.length, Err("differing Content-Length values"));
        let mut f = FramingFields::NONE;
        f.field(&header::TRANSFER_ENCODING, b"chunked");
        f.field(&header::TRANSFER_ENCODING, b"gzip");
        assert!(f.transfer_encoding && !f.ends_chunked);
    }

    #[tokio::test]
    async fn a_last_transfer_coding_other_than_chunked_reads_to_the_close() {
        let (addr, _) = upstream(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ])
        .await;
        let response = send_get(conn(addr).await, Method::GET).await.unwrap();
        let mut body = response.into_body();
        let (data, _) = read_all(&mut body).await.unwrap();
        assert_eq!(data, b"5\r\nhello\r\n0\r\n\r\n");
        assert!(body.take_idle().is_none());
    }

    fn spares() -> usize {
        spares::len(&SPARES)
    }

    #[test]
    fn header_maps_are_kept_emptied_for_the_next_head() {
        let mut map = header_map(9);
        let room = map.capacity();
        map.insert(header::HOST, HeaderValue::from_static("a"));
        map.append(header::VIA, HeaderValue::from_static("1.1 a"));
        spare_header_map(map);
        assert_eq!(spares(), 1);
        let again = header_map(3);
        assert!(again.is_empty());
        // The kept map, with its room, rather than a new one sized for three fields.
        assert_eq!(again.capacity(), room);
        assert!(HeaderMap::<HeaderValue>::with_capacity(3).capacity() < room);
        assert_eq!(spares(), 0);
        // More room asked than the kept map has: it grows.
        spare_header_map(again);
        assert!(header_map(room + 1).capacity() > room);
        // Large maps and empty ones are not kept, nor more than SPARE_MAPS.
        spare_header_map(HeaderMap::with_capacity(SPARE_MAP_FIELDS + 1));
        spare_header_map(HeaderMap::new());
        assert_eq!(spares(), 0);
        for _ in 0..SPARE_MAPS + 2 {
            spare_header_map(HeaderMap::with_capacity(4));
        }
        assert_eq!(spares(), SPARE_MAPS);
        // A quiet thread keeps fewer.
        settle_header_maps();
        assert_eq!(spares(), QUIET_MAPS);
        assert!(header_map(3).capacity() >= 4);
        assert_eq!(spares(), QUIET_MAPS - 1);
    }

    #[tokio::test]
    async fn an_answered_request_leaves_its_header_map_to_the_thread() {
        let (addr, _) = upstream(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]).await;
        let mut req = get(Method::GET);
        *req.headers_mut() = header_map(8);
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("up"));
        // None kept before: the response head's map is a new one.
        spares::settle(&SPARES, 0);
        let response = conn(addr).await.send(&mut Some(req), None).await.unwrap();
        assert_eq!(spares(), 1);
        // The response's own map is the client side's to give back once written.
        assert_eq!(response.headers()["content-length"], "2");
    }

    #[test]
    fn chunk_size_lines() {
        assert_eq!(chunk_size(b"1a").unwrap(), 26);
        assert_eq!(chunk_size(b"A ; x=y").unwrap(), 10);
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b"0x1").is_err());
        assert!(chunk_size(b"1 2").is_err());
        assert!(chunk_size(b"1000000000000000").is_err());
        assert!(find_crlf(b"5\nabc", 10).is_err());
        assert!(find_crlf(b"5\rabc", 10).is_err());
        assert!(find_crlf(&[b'1'; 20], 10).is_err());
        assert_eq!(find_crlf(b"5\r", 10).unwrap(), None);
    }
}
