//! HTTP/1.1 from clients: proxyd's own server codec, driven in the connection's task.
//!
//! A connection is the client stream plus a read buffer. A request head is read into the
//! buffer (bounded by the listener's `max_header_bytes`), parsed once with httparse and
//! handed to the request path (`proxy::handle`) in this same task; its body, if it has one, is
//! decoded from the same stream when the request path reads it (Content-Length or chunked
//! with trailers, strict as [`crate::upstream::h1`] decodes responses); the response is
//! encoded (RFC 9112 framing) and written, and the next head may already be buffered
//! (pipelining). Between requests a connection first lingers here, buffers kept, for
//! [`Conn::park_after`]: a client that sends its next request within it is served on
//! without allocating anything again. Once it stayed idle that long with nothing of the
//! client's buffered, the stream goes back to the caller, which waits for the next request
//! holding only the stream (it "parks"): an idle keep-alive connection keeps no buffer.
//!
//! This is the one parser a request passes: it reads the client stream itself, with no
//! layer scanning the bytes below it. It refuses every head and chunk that proxyd's
//! framing model ([`super::framing`]) refuses (both lengths, a length list, a bad line
//! ending, a chunk size it cannot follow...), which the fuzz target checks on every input
//! (see [`taken`]): a refused head is answered `400`, a refused chunk fails the body. The
//! answers to malformed heads are the ones hyper gave: `400`, `431` for a head over the
//! limit or with too many fields, `414` for a target over 65,534 bytes.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::body::ResponseBody;
use super::detect::Replayed;
use super::framing::HeadProgress;
use super::hygiene;
use crate::head_out as out;
use crate::listener::ReadReady;
use crate::shutdown::Shutdown;
use crate::spares::{self, Stock};
use crate::telemetry::{ClientTimeout, ListenerSeries};
use crate::upstream::body::{BoxError, ClientBody, ClientBodySource};
use crate::upstream::h1::{
    field_span, header_map, known_name, poll_until, settle_header_maps, spare_header_map,
    step_chunked, Chunk, Chunked,
};

/// Most header fields in a request head (hyper's limit, answered the same way: `431`).
const MAX_HEADERS: usize = 100;
/// Header fields of a request head whose positions are kept on the stack while it is
/// parsed (see [`parse_head`]).
const INLINE_FIELDS: usize = 24;
/// Longest request target (hyper's limit, answered the same way: `414`).
const MAX_TARGET: usize = u16::MAX as usize - 1;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 8 * 1024;
/// Response bytes gathered before they are written even though more are ready.
const WRITE_AT: usize = 64 * 1024;
/// Room made for a response head at first.
const OUT_SIZE: usize = 512;
/// A response buffer grown past this (for a large head or copied body) is let go after
/// its response rather than kept for the next one.
const OUT_KEPT: usize = 4 * OUT_SIZE;
/// What a client that asked for it gets before it sends its body.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How a call to [`serve`] ended.
pub(super) enum Served<S> {
    /// Idle between requests for [`Conn::park_after`] with nothing of the client's
    /// buffered: the stream, to wait on, and when its next request head is due.
    Parked(S, Instant),
    /// The connection is over.
    Ended,
}

/// The client stream, what was read from it but not yet used, and the buffer responses
/// are encoded in (kept from one response to the next while the connection is served,
/// let go with the rest when it parks).
struct Wire<S> {
    io: S,
    buf: ReadBuffer,
    out: OutBuffer,
    /// Something was written to the connection already (in this call or before it).
    written: bool,
    /// `io` sends small writes at once (see [`Wire::writer`]).
    at_once: bool,
}

impl<S: ReadReady> Wire<S> {
    /// The stream, for a write. A socket holds a small write back until its last small
    /// one is acknowledged (Nagle's algorithm), which would delay a response written after
    /// another, or a body's next part after its head, by as much as the client's delayed
    /// acknowledgement (40 ms on Linux). A connection's first write has nothing before it
    /// to wait for, so the stream is told to send at once from its second write on: a
    /// connection that is answered once and closed makes no system call for it (nginx
    /// likewise sets `TCP_NODELAY` only once a connection is kept alive).
    fn writer(&mut self) -> &mut S {
        if self.written {
            self.send_at_once();
        }
        self.written = true;
        &mut self.io
    }

    /// Has the stream send its writes at once from now on.
    fn send_at_once(&mut self) {
        if !self.at_once {
            self.io.send_at_once();
            self.at_once = true;
        }
    }
}

impl<S: AsyncRead + Unpin> Wire<S> {
    /// Reads more into the buffer: the number of bytes read, 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            if self.buf.capacity() == 0 {
                self.buf.0 = read_buffer();
            } else {
                self.buf.reserve(READ_SIZE);
            }
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut *self.buf)
    }
}

/// Most read buffers a thread keeps for its next connections (half a MiB at most): as
/// many as a busy worker has connections reading at once. With 32, 50 clients opening a
/// connection per request on one worker found none spare for a third of their
/// connections (callgrind).
const SPARE_READS: usize = 64;

thread_local! {
    /// Read buffers of this thread's connections that ended or parked, for its next ones:
    /// a new connection then reads into one of them instead of allocating 8 KiB, which
    /// takes mimalloc's slower path for blocks over 1 KiB (callgrind, a new connection per
    /// request: about 650 instructions).
    static SPARES: Stock<BytesMut> = const { Stock::new(SPARE_READS) };
}

/// Read buffers a quiet worker keeps (see [`settle_spares`]).
const QUIET_READS: usize = 8;

/// Most response buffers a thread keeps for its next connections (32 KiB at most), as
/// many as it keeps read buffers.
const SPARE_OUTS: usize = SPARE_READS;

thread_local! {
    /// Response buffers of this thread's connections that ended or parked, for its next
    /// ones: a new connection's first response is encoded into one of them instead of a
    /// block allocated and grown for it (callgrind, a new connection per request: about
    /// 200 instructions).
    static SPARE_OUT: Stock<Vec<u8>> = const { Stock::new(SPARE_OUTS) };
}

/// Lets go of the spare read and response buffers and header maps this thread keeps
/// beyond what a quiet worker needs, and of the buffers of its idle upstream connections:
/// called when its connections went dormant, so that what a busy spell filled is not held
/// for as long as the worker stays quiet.
pub(super) fn settle_spares() {
    spares::settle(&SPARES, QUIET_READS);
    spares::settle(&SPARE_OUT, QUIET_READS);
    settle_header_maps();
    crate::upstream::idle::settle();
}

/// An empty buffer of at least [`OUT_SIZE`] bytes to encode responses in: one that an
/// earlier connection of this thread gave back, if there is one.
fn out_buffer() -> Vec<u8> {
    spares::take(&SPARE_OUT).unwrap_or_else(|| Vec::with_capacity(OUT_SIZE))
}

/// A connection's response buffer, given back to the thread's spares when the connection
/// ends or parks unless a large response grew it past [`OUT_KEPT`].
struct OutBuffer(Vec<u8>);

impl Drop for OutBuffer {
    fn drop(&mut self) {
        let out = &mut self.0;
        if out.capacity() == 0 || out.capacity() > OUT_KEPT {
            return;
        }
        out.clear();
        spares::give(&SPARE_OUT, std::mem::take(out));
    }
}

/// An empty buffer of at least [`READ_SIZE`] bytes for a connection's reads: one that an
/// earlier connection of this thread gave back, if there is one.
pub(super) fn read_buffer() -> BytesMut {
    spares::take(&SPARES).unwrap_or_else(|| BytesMut::with_capacity(READ_SIZE))
}

/// A connection's read buffer, given back to the thread's spares when the connection ends
/// or parks, if nothing read into it is still in use (no request head or body part split
/// from it is alive) and it did not grow past twice [`READ_SIZE`] for a large head.
struct ReadBuffer(BytesMut);

impl std::ops::Deref for ReadBuffer {
    type Target = BytesMut;
    fn deref(&self) -> &BytesMut {
        &self.0
    }
}

impl std::ops::DerefMut for ReadBuffer {
    fn deref_mut(&mut self) -> &mut BytesMut {
        &mut self.0
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        let buf = &mut self.0;
        if buf.capacity() == 0 {
            return;
        }
        buf.clear();
        // Whole again only when no part split from it is alive; bytes of the last client
        // left in it are never read (a read fills the buffer before it is looked at).
        if !buf.try_reclaim(READ_SIZE) || buf.capacity() > 2 * READ_SIZE {
            return;
        }
        spares::give(&SPARES, std::mem::take(buf));
    }
}

/// A parsed request head, with what the connection needs to know of it.
struct Head {
    /// The request, without its body yet (the connection decides how it is read). Built
    /// whole here rather than from parts later: a request is a few hundred bytes, copied
    /// at every move.
    request: Request<ClientBody>,
    body: Option<Framing>,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
}

/// Why no request head came.
enum NoHead {
    /// The client closed, the read failed or a timeout closed it (counted): nothing to say.
    Closed,
    /// A malformed head: this status, then the connection ends.
    Refused(StatusCode),
}

/// What the codec needs of its connection besides the stream.
pub(super) struct Conn<'a, H> {
    /// The listener's `max_header_bytes`.
    pub max_header_bytes: usize,
    /// The listener's `header_timeout`.
    pub header_timeout: Duration,
    /// How long a connection that stays idle once draining began is kept.
    pub drain_grace: Duration,
    /// How long a connection between requests keeps its buffers (and this call) before it
    /// parks; at most `header_timeout`.
    pub park_after: Duration,
    pub shutdown: &'a Shutdown,
    pub series: &'a ListenerSeries,
    pub progress: &'a HeadProgress,
    pub client: SocketAddr,
    /// The request path.
    pub handler: H,
}

/// Serves requests on `io` until the connection ends or has waited `park_after` for its
/// next request with nothing buffered. `read` holds what was read from `io` already (a
/// new connection's first bytes). The first head is due at `head_due`, each further one
/// `header_timeout` after the response before it; `drain_due` is set once draining began
/// (when a connection that stays idle is closed). `written_before` says whether anything
/// was written to the connection before this call (it parked since).
pub(super) async fn serve<S, H, F>(
    io: S,
    read: BytesMut,
    conn: &Conn<'_, H>,
    mut head_due: Instant,
    drain_due: &mut Option<Instant>,
    written_before: bool,
) -> Served<S>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
    H: Fn(Request<ClientBody>) -> F,
    F: Future<Output = Result<Response<ResponseBody>, Infallible>>,
{
    let mut wire = Wire {
        io,
        buf: ReadBuffer(read),
        out: OutBuffer(Vec::new()),
        written: written_before,
        at_once: false,
    };
    // The one timer of the waits between requests, for as long as this call serves: it is
    // armed at the first wait and re-armed only when it fires (see `linger`), not once per
    // request. Its first deadline is a placeholder, never later than a real one: it may
    // fire early, and is then re-armed.
    let lull = tokio::time::sleep_until(Instant::now() + conn.park_after);
    tokio::pin!(lull);
    // When the last response was written.
    let mut idle_since = None;
    loop {
        if let Some(since) = idle_since.filter(|_| wire.buf.is_empty()) {
            match linger(&mut wire, conn, lull.as_mut(), since, drain_due).await {
                Lull::Bytes => {}
                Lull::Quiet => return Served::Parked(wire.io, head_due),
                Lull::Closed => return Served::Ended,
            }
        }
        // Its fields are used where they are: bound to names of their own, each would
        // be a copy in this connection's state.
        let mut head = match read_head(&mut wire, conn, head_due, drain_due).await {
            Ok(head) => head,
            Err(NoHead::Closed) => return Served::Ended,
            Err(NoHead::Refused(status)) => {
                let mut out = Vec::new();
                encode_refusal(&mut out, status);
                let _ = async {
                    wire.writer().write_all(&out).await?;
                    close(&mut wire.io).await
                }
                .await;
                return Served::Ended;
            }
        };
        let method = head.request.method().clone();
        let version = head.request.version();
        let mut keep_alive = head.keep_alive;
        let upgraded = head.upgrade.then(|| {
            let (tx, rx) = oneshot::channel();
            head.request
                .extensions_mut()
                .insert(ClientUpgrade(Arc::new(Mutex::new(Some(rx)))));
            tx
        });
        let continue_at = (head.expect_continue && version == Version::HTTP_11).then_some(0);
        // Without a body the stream stays here, borrowed while the response is written;
        // with one, it is shared with the body (which reads from it while the request is
        // served) and comes back once the response is written.
        let written = match head.body {
            None => {
                let mut response = match (conn.handler)(head.request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                let mut link = Link::Own(&mut wire);
                write_response(&mut link, &mut response, &method, version, &mut keep_alive).await
            }
            Some(framing) => {
                let shared = Arc::new(Shared {
                    inner: Mutex::new(Reading {
                        wire,
                        framing,
                        continue_at,
                    }),
                });
                *head.request.body_mut() = ClientBody::Http1(shared.clone());
                let mut response = match (conn.handler)(head.request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                let mut link = Link::Shared(&shared);
                let written =
                    write_response(&mut link, &mut response, &method, version, &mut keep_alive)
                        .await;
                // The stream back from the request body, which has ended with the response.
                wire = match Arc::try_unwrap(shared) {
                    Ok(shared) => {
                        let mut reading = shared
                            .inner
                            .into_inner()
                            .unwrap_or_else(PoisonError::into_inner);
                        // A body the request path did not read to its end is skipped if the
                        // rest of it is here already; otherwise the connection cannot go on.
                        if !reading.skip_buffered() {
                            keep_alive = false;
                        }
                        reading.wire
                    }
                    Err(_) => return Served::Ended,
                };
                written
            }
        };
        let ended = match written {
            Written::Failed => return Served::Ended,
            Written::Switched => {
                if let Some(tx) = upgraded {
                    let leftover = wire.buf.split().freeze();
                    // The tunnel relays whatever comes, as it comes.
                    wire.send_at_once();
                    let _ = tx.send(Replayed::new(Box::new(wire.io), leftover));
                }
                return Served::Ended;
            }
            Written::Complete(ended) => ended,
        };
        if !keep_alive {
            let _ = close(&mut wire.io).await;
            return Served::Ended;
        }
        let now = ended.unwrap_or_else(Instant::now);
        // The response's last bytes moved at this reading: the stream's idle limit counts
        // from it instead of taking one of its own.
        wire.io.moved_at(now);
        head_due = now + conn.header_timeout;
        // The read buffer is kept for the next request: its storage is taken back whole
        // once the heads split from it are gone, without an allocation. It goes with the
        // rest when the connection parks.
        idle_since = Some(now);
    }
}

/// Ends the writing side of a connection that ends here: a shutdown where the stream needs
/// one (TLS sends its `close_notify`; a socket holding its last bytes back sends them with
/// its FIN), nothing where its drop closes it the same way.
async fn close<S: AsyncWrite + ReadReady + Unpin>(io: &mut S) -> io::Result<()> {
    if io.closes_cleanly_on_drop() {
        return Ok(());
    }
    io.shutdown().await
}

/// How a connection's wait between requests, buffers kept, ended.
enum Lull {
    /// The next bytes are in the buffer.
    Bytes,
    /// Nothing for `park_after`, or draining began: the connection parks.
    Quiet,
    /// The client closed, or the read failed (the idle timeout among its causes).
    Closed,
}

/// Waits for the next request's first bytes, reading them into the connection's buffer,
/// until the connection has been idle for `park_after` since `idle_since`. `lull` is the
/// timer kept for these waits (`poll_until`): when it fires before that end, it is set to
/// it (so a connection that is busy again costs no timer until the timer next fires).
async fn linger<S, H>(
    wire: &mut Wire<S>,
    conn: &Conn<'_, H>,
    mut lull: Pin<&mut tokio::time::Sleep>,
    idle_since: Instant,
    drain_due: &Option<Instant>,
) -> Lull
where
    S: AsyncRead + ReadReady + Unpin,
{
    // Draining: the parked wait gives the connection its grace and closes it.
    if conn.park_after.is_zero() || drain_due.is_some() || conn.shutdown.is_triggered() {
        return Lull::Quiet;
    }
    let quiet_at = idle_since + conn.park_after;
    // `lull` ends this wait by then: the stream's idle limit needs no timer of its own.
    wire.io.bound_waits(Some(quiet_at));
    let lull = poll_fn(|cx| {
        match wire.poll_fill(cx) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Lull::Closed),
            Poll::Ready(Ok(_)) => return Poll::Ready(Lull::Bytes),
            Poll::Ready(Err(e)) => {
                tracing::debug!(client = %conn.client, error = %e, "client connection ended with an error");
                return Poll::Ready(Lull::Closed);
            }
            Poll::Pending => {}
        }
        // A drain that began meanwhile is noticed by the parked wait.
        poll_until(lull.as_mut(), quiet_at, cx).map(|()| Lull::Quiet)
    })
    .await;
    wire.io.bound_waits(None);
    lull
}

/// Reads until a request head is complete, by `head_due`.
async fn read_head<S, H>(
    wire: &mut Wire<S>,
    conn: &Conn<'_, H>,
    head_due: Instant,
    drain_due: &mut Option<Instant>,
) -> Result<Head, NoHead>
where
    S: AsyncRead + Unpin,
{
    let max = conn.max_header_bytes;
    loop {
        if !wire.buf.is_empty() {
            if let Some(head) = parse_head(&mut wire.buf, max).map_err(NoHead::Refused)? {
                return Ok(head);
            }
        }
        // Most heads are in the socket already: read them without arming any timer.
        let read = match poll_fn(|cx| Poll::Ready(wire.poll_fill(cx))).await {
            Poll::Ready(read) => read,
            Poll::Pending => {
                let deadline = drain_due.map_or(head_due, |d| d.min(head_due));
                tokio::select! {
                    biased;
                    read = poll_fn(|cx| wire.poll_fill(cx)) => read,
                    () = tokio::time::sleep_until(deadline) => {
                        if drain_due.is_none_or(|d| head_due < d) {
                            // Part of a head (more than the empty lines allowed before
                            // one) is a stalled head; nothing is an idle client.
                            let in_head = wire.buf.iter().any(|b| !matches!(b, b'\r' | b'\n'));
                            conn.series.timed_out(if !conn.progress.any_request() || in_head {
                                ClientTimeout::Head
                            } else {
                                ClientTimeout::Idle
                            });
                            tracing::debug!(client = %conn.client, "no request within header_timeout");
                        }
                        return Err(NoHead::Closed);
                    }
                    _ = conn.shutdown.triggered(), if drain_due.is_none() => {
                        // Keep-alive clients are told `Connection: close` on their next
                        // response; one that sends nothing is closed after a grace.
                        *drain_due = Some(Instant::now() + conn.drain_grace);
                        continue;
                    }
                }
            }
        };
        match read {
            Ok(0) => return Err(NoHead::Closed),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(client = %conn.client, error = %e, "client connection ended with an error");
                return Err(NoHead::Closed);
            }
        }
    }
}

/// One request head from the front of `buf`, if complete (`max`: the listener's
/// `max_header_bytes`); the status to refuse it with otherwise.
fn parse_head(buf: &mut BytesMut, max: usize) -> Result<Option<Head>, StatusCode> {
    // Where each part is, as offsets: the buffer is split off before the values are
    // taken from it without a copy. Most heads' fields fit the array, which is small
    // enough to clear cheaply (one for all MAX_HEADERS fields is 3.2 KiB, cleared on
    // every request); a larger head's go to a Vec.
    let mut inline = [(0usize, 0usize, 0usize, 0usize); INLINE_FIELDS];
    let mut spilled = Vec::new();
    let (len, count, method, target, version) = {
        let mut fields = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut []);
        let len = match parsed.parse_with_uninit_headers(&buf[..], &mut fields) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= max => {
                return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
            }
            Err(_) => return Err(StatusCode::BAD_REQUEST),
        };
        if len > max {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        let base = buf.as_ptr() as usize;
        let (Some(method), Some(target), Some(version)) =
            (parsed.method, parsed.path, parsed.version)
        else {
            return Err(StatusCode::BAD_REQUEST);
        };
        if target.len() > MAX_TARGET {
            return Err(StatusCode::URI_TOO_LONG);
        }
        let method = Method::from_bytes(method.as_bytes()).map_err(|_| StatusCode::BAD_REQUEST)?;
        let at = target.as_ptr() as usize - base;
        if parsed.headers.len() <= INLINE_FIELDS {
            for (span, field) in inline.iter_mut().zip(parsed.headers.iter()) {
                *span = field_span(base, field);
            }
        } else {
            spilled.extend(parsed.headers.iter().map(|field| field_span(base, field)));
        }
        let version = if version == 1 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        (
            len,
            parsed.headers.len(),
            method,
            (at, at + target.len()),
            version,
        )
    };
    let head = buf.split_to(len).freeze();
    let uri = http::Uri::from_maybe_shared(head.slice(target.0..target.1))
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    // Sized for the headers the request path adds as well (forwarding headers, `Via`): a
    // map filled to its capacity grows, allocating twice and rehashing, on the next insert.
    let mut headers = header_map(count + hygiene::ADDED_REQUEST_HEADERS);
    let http11 = version == Version::HTTP_11;
    let mut keep_alive = http11;
    let mut close = false;
    let mut expect_continue = false;
    let mut upgrade = method == Method::CONNECT;
    let mut length: Option<u64> = None;
    let mut coding = None;
    let spans = if count <= INLINE_FIELDS {
        &inline[..count]
    } else {
        &spilled[..]
    };
    for &(name_start, name_end, value_start, value_end) in spans {
        let raw_name = &head[name_start..name_end];
        let name = match known_name(raw_name) {
            Some(name) => name,
            None => HeaderName::from_bytes(raw_name).map_err(|_| StatusCode::BAD_REQUEST)?,
        };
        let raw = &head[value_start..value_end];
        match name {
            header::TRANSFER_ENCODING => {
                // RFC 9112 section 6.1: HTTP/1.0 has no transfer codings.
                if !http11 {
                    return Err(StatusCode::BAD_REQUEST);
                }
                // The last coding of the last field decides.
                coding = Some(
                    raw.rsplit(|b| *b == b',')
                        .next()
                        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked")),
                );
            }
            header::CONTENT_LENGTH => {
                // One decimal number per field: a list ("5, 5"), which RFC 9110 lets a
                // recipient take as one length, is refused as the framing model refuses
                // it. A repeated field (the same value, or the request is refused) is one
                // length: the request path sees, and forwards, the first alone.
                let repeated = length.is_some();
                let digits = raw.trim_ascii();
                if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit)
                {
                    return Err(StatusCode::BAD_REQUEST);
                }
                let n = digits
                    .iter()
                    .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                if length.is_some_and(|seen| seen != n) {
                    return Err(StatusCode::BAD_REQUEST);
                }
                length = Some(n);
                if repeated {
                    continue;
                }
            }
            header::CONNECTION => {
                for token in raw.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    }
                }
            }
            header::EXPECT => expect_continue = raw.eq_ignore_ascii_case(b"100-continue"),
            header::UPGRADE => upgrade = http11,
            _ => {}
        }
        let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end))
            .map_err(|_| StatusCode::BAD_REQUEST)?;
        headers.append(name, value);
    }
    let body = match (coding, length) {
        // Both lengths, or a coding that does not end in chunked: the body's end cannot be
        // told.
        (Some(_), Some(_)) | (Some(false), None) => return Err(StatusCode::BAD_REQUEST),
        (Some(true), None) => Some(Framing::Chunked(Chunk::Size)),
        (None, Some(n)) if n > 0 => Some(Framing::Length(n)),
        (None, _) => None,
    };
    let mut request = Request::new(ClientBody::Empty);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Head {
        request,
        body,
        keep_alive: keep_alive && !close,
        expect_continue,
        upgrade,
    }))
}

/// Where the codec commits to the bytes of `data`, read as one connection's requests:
/// each offset up to which it took them (a head parsed, a step of a body decoded), and
/// whether a message ended there. It stops where it refuses, where it needs more bytes, and
/// after a protocol switch's head (what follows is no HTTP/1). [`super::framing::fuzz_scan`]
/// holds these to the framing model.
pub(super) fn taken(data: &[u8]) -> Vec<(usize, bool)> {
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    let at = |buf: &BytesMut| data.len() - buf.len();
    loop {
        let Ok(Some(head)) = parse_head(&mut buf, usize::MAX) else {
            return out;
        };
        if head.upgrade {
            out.push((at(&buf), false));
            return out;
        }
        match head.body {
            None => out.push((at(&buf), true)),
            Some(Framing::Length(n)) => {
                out.push((at(&buf), false));
                match usize::try_from(n) {
                    Ok(n) if n <= buf.len() => buf.advance(n),
                    _ => return out,
                }
                out.push((at(&buf), true));
            }
            Some(Framing::Chunked(mut state)) => {
                out.push((at(&buf), false));
                loop {
                    match step_chunked(&mut buf, state) {
                        Ok(Chunked::Next(next)) => state = next,
                        Ok(Chunked::Data(n, next)) => {
                            buf.advance(n);
                            state = next;
                        }
                        Ok(Chunked::End(_)) => break,
                        Ok(Chunked::NeedMore) | Err(_) => return out,
                    }
                    out.push((at(&buf), false));
                }
                out.push((at(&buf), true));
            }
            Some(Framing::Done | Framing::Failed) => return out,
        }
    }
}

/// The answer to a malformed head; the connection ends after it.
fn encode_refusal(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\nconnection: close\r\ncontent-length: 0\r\ndate: ");
    extend_date(out);
    out.extend_from_slice(b"\r\n\r\n");
}

/// The connection's stream while a response is written: the connection's alone, or
/// shared with the request's body, which reads from it.
enum Link<'a, S> {
    Own(&'a mut Wire<S>),
    Shared(&'a Shared<S>),
}

impl<S> Link<'_, S> {
    fn with<R>(&mut self, f: impl FnOnce(&mut Wire<S>) -> R) -> R {
        match self {
            Link::Own(wire) => f(wire),
            Link::Shared(shared) => {
                let mut reading = shared.inner.lock().unwrap_or_else(PoisonError::into_inner);
                f(&mut reading.wire)
            }
        }
    }
}

/// A request body's framing on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes left of a Content-Length body.
    Length(u64),
    /// Chunked, at this point of its grammar.
    Chunked(Chunk),
    /// Read to its end.
    Done,
    /// Failed (malformed, cut short): the connection cannot go on.
    Failed,
}

/// A request body being read, and the stream it is read from.
struct Reading<S> {
    wire: Wire<S>,
    framing: Framing,
    /// `100 Continue` is owed (the client asked for it) and this much of it was written.
    continue_at: Option<usize>,
}

/// What the request's body and the connection share while the request is served.
struct Shared<S> {
    inner: Mutex<Reading<S>>,
}

impl<S> Reading<S> {
    /// Decodes what the buffer holds: a frame (`None`: the body ended), or `None` when
    /// more bytes are needed.
    fn decode(&mut self) -> Option<Result<Option<Frame<Bytes>>, BoxError>> {
        loop {
            match self.framing {
                Framing::Done | Framing::Failed => return Some(Ok(None)),
                Framing::Length(left) => {
                    if self.wire.buf.is_empty() {
                        return None;
                    }
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(self.wire.buf.len());
                    let rest = left - n as u64;
                    self.framing = if rest == 0 {
                        Framing::Done
                    } else {
                        Framing::Length(rest)
                    };
                    return Some(Ok(Some(Frame::data(self.wire.buf.split_to(n).freeze()))));
                }
                Framing::Chunked(state) => match step_chunked(&mut self.wire.buf, state) {
                    Err(e) => {
                        self.framing = Framing::Failed;
                        return Some(Err(Box::new(e)));
                    }
                    Ok(Chunked::NeedMore) => return None,
                    Ok(Chunked::Next(next)) => self.framing = Framing::Chunked(next),
                    Ok(Chunked::Data(n, next)) => {
                        self.framing = Framing::Chunked(next);
                        return Some(Ok(Some(Frame::data(self.wire.buf.split_to(n).freeze()))));
                    }
                    Ok(Chunked::End(trailers)) => {
                        self.framing = Framing::Done;
                        return Some(Ok(trailers.map(Frame::trailers)));
                    }
                },
            }
        }
    }

    /// Reads past the rest of the body in the buffer; whether it ended there.
    fn skip_buffered(&mut self) -> bool {
        loop {
            match self.framing {
                Framing::Done => return true,
                Framing::Failed => return false,
                Framing::Length(_) | Framing::Chunked(_) => match self.decode() {
                    None | Some(Err(_)) => return false,
                    Some(Ok(_)) => {}
                },
            }
        }
    }
}

/// The body failed on the wire.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the client closed the connection before the end of the body")]
    Closed,
    #[error("reading the body: {0}")]
    Read(#[source] io::Error),
    #[error("writing 100 Continue: {0}")]
    Continue(#[source] io::Error),
}

impl<S> ClientBodySource for Shared<S>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut guard = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let reading = &mut *guard;
        if matches!(reading.framing, Framing::Done | Framing::Failed) {
            return Poll::Ready(None);
        }
        // The client waits for this before it sends the body (as hyper did, it goes when
        // the body is first read, and only if none of it is here yet).
        if let Some(at) = reading.continue_at {
            if !reading.wire.buf.is_empty() {
                reading.continue_at = None;
            } else {
                let mut at = at;
                while at < CONTINUE.len() {
                    match Pin::new(reading.wire.writer()).poll_write(cx, &CONTINUE[at..]) {
                        Poll::Ready(Ok(0)) => {
                            reading.framing = Framing::Failed;
                            let e = io::Error::from(io::ErrorKind::WriteZero);
                            return Poll::Ready(Some(Err(Box::new(BodyError::Continue(e)))));
                        }
                        Poll::Ready(Ok(n)) => at += n,
                        Poll::Ready(Err(e)) => {
                            reading.framing = Framing::Failed;
                            return Poll::Ready(Some(Err(Box::new(BodyError::Continue(e)))));
                        }
                        Poll::Pending => {
                            reading.continue_at = Some(at);
                            return Poll::Pending;
                        }
                    }
                }
                reading.continue_at = Some(at);
                match Pin::new(&mut reading.wire.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => reading.continue_at = None,
                    Poll::Ready(Err(e)) => {
                        reading.framing = Framing::Failed;
                        return Poll::Ready(Some(Err(Box::new(BodyError::Continue(e)))));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
        loop {
            if let Some(decoded) = reading.decode() {
                return Poll::Ready(decoded.transpose());
            }
            match reading.wire.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    reading.framing = Framing::Failed;
                    return Poll::Ready(Some(Err(Box::new(BodyError::Closed))));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    reading.framing = Framing::Failed;
                    return Poll::Ready(Some(Err(Box::new(BodyError::Read(e)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let reading = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        reading.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        let reading = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match reading.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// How the response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sending {
    /// This many bytes left of its Content-Length (0: no body on the wire).
    Length(u64),
    /// Chunked.
    Chunked,
    /// Until the connection closes (HTTP/1.0 clients, or no chunking possible).
    Close,
}

/// How writing a response ended.
enum Written {
    /// All of it; the connection may go on. With the clock reading the response's end was
    /// logged with, when that was taken as its last bytes were written, with no wait after
    /// it (see `write_response`).
    Complete(Option<Instant>),
    /// A protocol switch: the stream goes to the tunnel.
    Switched,
    /// The write or the response body failed: the connection ends.
    Failed,
}

/// Writes `response` to the request of `method` and `version`; `keep_alive` is cleared
/// when the response ends the connection.
async fn write_response<S>(
    link: &mut Link<'_, S>,
    response: &mut Response<ResponseBody>,
    method: &Method,
    version: Version,
    keep_alive: &mut bool,
) -> Written
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin,
{
    // Borrowed, not taken apart: a response is a few hundred bytes, copied at every move.
    let status = response.status();
    let switched = status == StatusCode::SWITCHING_PROTOCOLS
        || (method == Method::CONNECT && status.is_success());
    // The connection's buffer, taken for the response and given back after it.
    let (mut out, vectored) = link.with(|wire| {
        let out = std::mem::take(&mut wire.out.0);
        (out, wire.io.is_write_vectored())
    });
    if out.capacity() == 0 {
        out = out_buffer();
    }
    let (mut sending, trailers) = encode_head(&mut out, response, method, version, keep_alive);
    // Written: its map goes to the thread's spares for the next request's head.
    spare_header_map(std::mem::take(response.headers_mut()));
    let body = response.body_mut();
    if switched {
        *keep_alive = false;
    }
    // Body bytes that need no framing of their own are not copied behind the head: they
    // go out after it in the same (vectored) write, as nginx writes its responses.
    let mut pending = Pending {
        out,
        tail: None,
        vectored,
    };
    // A body with nothing to send on the wire is not read (as hyper did): it is dropped
    // once the head is out.
    let mut done = sending == Sending::Length(0);
    let mut failed = false;
    // Whether the write waited once the body was done: the body's end reading is then
    // older than the last bytes.
    let mut waited_after_end = false;
    let mut at = 0;
    // A connection closed right after this response: once its body is complete, its
    // last bytes wait for the end of the stream and leave with it.
    let mut end_with_last = !switched && (!*keep_alive || sending == Sending::Close);
    let result = poll_fn(|cx| loop {
        if !done && pending.len() < WRITE_AT {
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    match frame.into_data() {
                        Ok(data) => {
                            if !pending.data(&mut sending, data) {
                                // More than its Content-Length: the response is cut here.
                                failed = true;
                                done = true;
                            }
                        }
                        Err(frame) => {
                            if let (Sending::Chunked, Ok(fields)) = (sending, frame.into_trailers())
                            {
                                let out = pending.framed();
                                out.extend_from_slice(b"0\r\n");
                                encode_trailers(out, &fields, trailers.as_deref());
                                out.extend_from_slice(b"\r\n");
                                sending = Sending::Length(0);
                            }
                            done = true;
                        }
                    }
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "response body failed");
                    failed = true;
                    done = true;
                }
                Poll::Ready(None) => {
                    match sending {
                        Sending::Chunked => pending.framed().extend_from_slice(b"0\r\n\r\n"),
                        Sending::Length(0) | Sending::Close => {}
                        // Shorter than its Content-Length: the client must not take it
                        // for complete.
                        Sending::Length(_) => failed = true,
                    }
                    done = true;
                }
                Poll::Pending if pending.len() == at => return Poll::Pending,
                Poll::Pending => {}
            }
        }
        let wrote = link.with(|wire| {
            if done && end_with_last && !failed {
                end_with_last = false;
                wire.io.end_with_next_write();
            }
            while at < pending.len() {
                match pending.poll_write(wire.writer(), cx, at) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero)))
                    }
                    Poll::Ready(Ok(n)) => at += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            Pin::new(&mut wire.io).poll_flush(cx)
        });
        match wrote {
            Poll::Ready(Ok(())) => {
                pending.clear();
                at = 0;
                if done {
                    return Poll::Ready(Ok(()));
                }
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                waited_after_end |= done;
                return Poll::Pending;
            }
        }
    })
    .await;
    // Done with: finished where it is (its log written, its upstream connection back in
    // the idle store) before the buffer goes back. Its end was read as its last frame
    // came, right before the write of its last bytes: unless that write waited, the
    // connection takes the same reading for the end of the response.
    let ended = body.end().filter(|_| !waited_after_end);
    *body = ResponseBody::empty();
    // Kept for the next response unless a large body grew it.
    if pending.out.capacity() <= OUT_KEPT {
        pending.clear();
        link.with(|wire| wire.out.0 = pending.out);
    }
    match result {
        Err(e) => {
            tracing::debug!(error = %e, "writing the response failed");
            Written::Failed
        }
        Ok(()) if failed => Written::Failed,
        Ok(()) if switched => Written::Switched,
        Ok(()) => {
            if sending == Sending::Close {
                *keep_alive = false;
            }
            Written::Complete(ended.map(Instant::from_std))
        }
    }
}

/// Response bytes encoded and not yet written: `out` (the head, framing, copied data),
/// then `tail`, one piece of body data written as it came.
struct Pending {
    out: Vec<u8>,
    tail: Option<Bytes>,
    /// The stream writes several buffers at once: body data goes as `tail` rather than
    /// being copied into `out` (with one buffer per write, a tail would cost a second
    /// write).
    vectored: bool,
}

impl Pending {
    /// Bytes in all.
    fn len(&self) -> usize {
        self.out.len() + self.tail.as_ref().map_or(0, Bytes::len)
    }

    /// `out`, to append to: a tail is moved into it first, to keep the order.
    fn framed(&mut self) -> &mut Vec<u8> {
        if let Some(tail) = self.tail.take() {
            self.out.extend_from_slice(&tail);
        }
        &mut self.out
    }

    /// Adds `data` as `sending` frames it; `false` when it is longer than the
    /// Content-Length left.
    fn data(&mut self, sending: &mut Sending, data: Bytes) -> bool {
        if data.is_empty() {
            return true;
        }
        match sending {
            Sending::Length(left) => {
                let n = data.len() as u64;
                if n > *left {
                    return false;
                }
                *left -= n;
                self.unframed(data);
            }
            Sending::Chunked => {
                let mut size = [0u8; 16];
                let digits = hex(&mut size, data.len());
                let out = self.framed();
                out.extend_from_slice(digits);
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
            }
            Sending::Close => self.unframed(data),
        }
        true
    }

    /// Body data sent as it is: the tail, or copied when the stream cannot take it apart.
    fn unframed(&mut self, data: Bytes) {
        if !self.vectored {
            self.out.extend_from_slice(&data);
            return;
        }
        self.framed();
        self.tail = Some(data);
    }

    /// Writes from byte `at` on, as far as one write goes.
    fn poll_write<S: AsyncWrite + Unpin>(
        &self,
        io: &mut S,
        cx: &mut Context<'_>,
        at: usize,
    ) -> Poll<io::Result<usize>> {
        match (self.out.get(at..), &self.tail) {
            (Some(head), Some(tail)) if !head.is_empty() => {
                let bufs = [io::IoSlice::new(head), io::IoSlice::new(tail)];
                Pin::new(io).poll_write_vectored(cx, &bufs)
            }
            (Some(head), None) => Pin::new(io).poll_write(cx, head),
            (_, Some(tail)) => {
                let from = at.saturating_sub(self.out.len());
                Pin::new(io).poll_write(cx, tail.get(from..).unwrap_or_default())
            }
            (None, None) => Poll::Ready(Ok(0)),
        }
    }

    /// Everything was written.
    fn clear(&mut self) {
        self.out.clear();
        self.tail = None;
    }
}

/// `n` in decimal, in `buf`.
fn decimal(buf: &mut [u8; 20], mut n: u64) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || at == 0 {
            return &buf[at..];
        }
    }
}

/// `n` in hexadecimal, in `buf`.
fn hex(buf: &mut [u8; 16], mut n: usize) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 || at == 0 {
            return &buf[at..];
        }
    }
}

/// Trailer fields a sender may not put in trailers (RFC 9110 section 6.5.1), left out as
/// hyper did.
fn forbidden_trailer(name: &HeaderName) -> bool {
    matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::HOST
            | header::MAX_FORWARDS
            | header::SET_COOKIE
            | header::TE
            | header::TRAILER
            | header::TRANSFER_ENCODING
    )
}

/// The trailer fields the response announced in its `Trailer` field (only those are sent,
/// as hyper did).
fn encode_trailers(out: &mut Vec<u8>, fields: &HeaderMap, announced: Option<&[HeaderName]>) {
    let Some(announced) = announced else {
        return;
    };
    for (name, value) in fields {
        if announced.contains(name) && !forbidden_trailer(name) {
            out::put_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// Writes the response head (RFC 9112 sections 4 to 6, with hyper's choices: HTTP/1.0
/// clients get HTTP/1.0 and no chunking, a response without a length is chunked, a `Date`
/// is added); returns how the body is sent and the trailer fields announced.
fn encode_head(
    out: &mut Vec<u8>,
    response: &Response<ResponseBody>,
    method: &Method,
    version: Version,
    keep_alive: &mut bool,
) -> (Sending, Option<Vec<HeaderName>>) {
    let (status, headers, body) = (response.status(), response.headers(), response.body());
    let http10 = version == Version::HTTP_10;
    if !http10 && status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let informational = status.is_informational();
    let connect_ok = method == Method::CONNECT && status.is_success();
    let no_content = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let head_request = method == Method::HEAD;
    let can_chunk = !head_request && !connect_ok && !informational && !no_content;
    let can_have_length = !informational && !connect_ok && !no_content;
    let length = if body.is_end_stream() {
        None
    } else {
        Some(body.size_hint().exact())
    };
    let mut sending = None;
    if connect_ok {
        sending = Some(Sending::Length(0));
    }
    let mut wrote_date = false;
    let mut announced: Option<Vec<HeaderName>> = None;
    // What the response's `Connection` fields say, read in the one pass over its fields
    // (rather than looked up): the request path strips them from most responses.
    let mut says_close = false;
    let mut says_keep_alive = false;
    for (name, value) in headers {
        match *name {
            header::CONNECTION => {
                for token in value.as_bytes().split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    says_close |= token.eq_ignore_ascii_case(b"close");
                    says_keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            header::CONTENT_LENGTH => {
                if sending.is_some() {
                    continue;
                }
                match length {
                    Some(Some(n)) => {
                        out.extend_from_slice(b"content-length: ");
                        out.extend_from_slice(decimal(&mut [0u8; 20], n));
                        out.extend_from_slice(b"\r\n");
                        sending = Some(Sending::Length(n));
                    }
                    Some(None) => match parse_length(value.as_bytes()) {
                        Some(n) => {
                            out.extend_from_slice(b"content-length: ");
                            out.extend_from_slice(value.as_bytes());
                            out.extend_from_slice(b"\r\n");
                            sending = Some(Sending::Length(n));
                        }
                        None => continue,
                    },
                    // No body: a HEAD response keeps the length of what GET would send.
                    None if head_request => {
                        out.extend_from_slice(b"content-length: ");
                        out.extend_from_slice(value.as_bytes());
                        out.extend_from_slice(b"\r\n");
                        sending = Some(Sending::Length(0));
                    }
                    None => continue,
                }
                continue;
            }
            header::TRANSFER_ENCODING => {
                if http10 || !can_chunk || sending.is_some() {
                    continue;
                }
                out.extend_from_slice(b"transfer-encoding: ");
                out.extend_from_slice(value.as_bytes());
                let last = value
                    .as_bytes()
                    .rsplit(|b| *b == b',')
                    .next()
                    .unwrap_or(b"");
                if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    out.extend_from_slice(b", chunked");
                }
                out.extend_from_slice(b"\r\n");
                sending = Some(Sending::Chunked);
                continue;
            }
            header::TRAILER => {
                if http10 || !can_chunk {
                    continue;
                }
                if let Ok(text) = value.to_str() {
                    announced.get_or_insert_with(Vec::new).extend(
                        text.split(',')
                            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()),
                    );
                }
            }
            header::DATE => wrote_date = true,
            _ => {}
        }
        out::put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    // Keep-alive as the response has it: a `Connection: close` ends the connection; an
    // HTTP/1.0 client keeps it only if it asked and the response is not HTTP/1.0 itself.
    if says_close {
        *keep_alive = false;
    }
    let mut add_connection: Option<&[u8]> = None;
    if http10 {
        if !says_keep_alive {
            if response.version() == Version::HTTP_10 {
                *keep_alive = false;
            } else if response.version() == Version::HTTP_11 && *keep_alive {
                add_connection = Some(b"keep-alive");
            }
        }
    } else if !*keep_alive && !says_close {
        add_connection = Some(b"close");
    }
    if let Some(token) = add_connection {
        out.extend_from_slice(b"connection: ");
        out.extend_from_slice(token);
        out.extend_from_slice(b"\r\n");
    }
    let mut sending = match sending {
        Some(sending) => sending,
        None => match length {
            Some(None) if http10 || !can_chunk => Sending::Close,
            Some(None) => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Sending::Chunked
            }
            None | Some(Some(0)) => {
                if can_have_length && !head_request {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                Sending::Length(0)
            }
            Some(Some(n)) if can_have_length => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(decimal(&mut [0u8; 20], n));
                out.extend_from_slice(b"\r\n");
                Sending::Length(n)
            }
            Some(Some(_)) => Sending::Length(0),
        },
    };
    if !can_chunk {
        sending = Sending::Length(0);
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        extend_date(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if sending != Sending::Chunked {
        announced = None;
    }
    (sending, announced)
}

/// A Content-Length value: one decimal number (or a list of the same one).
fn parse_length(value: &[u8]) -> Option<u64> {
    let mut found = None;
    for part in value.split(|b| *b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if found.is_some_and(|seen| seen != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

thread_local! {
    /// The `Date` value of the current second, formatted once per second per thread.
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
}

/// Appends the current date as an HTTP date (RFC 9110 section 5.6.7).
fn extend_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == date.1.len() {
                date.1.copy_from_slice(text.as_bytes());
                date.0 = second;
            }
        }
        out.extend_from_slice(&date.1);
    });
}

/// The client side of a protocol switch, in the extensions of a request that asked for
/// one: resolves once the `101` (or a CONNECT's 2xx) was written, with the stream.
// Shared and locked only because request extensions must be `Clone`: it is taken once.
#[derive(Clone)]
pub(crate) struct ClientUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl ClientUpgrade {
    /// The client's stream after the switch; `None` when the connection ended instead.
    pub(crate) async fn stream(self) -> Option<Upgraded> {
        let receiver = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        receiver.await.ok()
    }
}

/// A stream of any of the listener's kinds (plain, TLS).
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientIo for T {}

/// A client's stream after a protocol switch: what the client sent behind its request
/// (already read) first, then the stream.
pub(crate) type Upgraded = Replayed<Box<dyn ClientIo>>;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::telemetry::Metrics;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    type Answer = Result<Response<ResponseBody>, Infallible>;

    /// Serves every connection to the returned address with the codec and `handler`;
    /// a connection parks at once whenever it is between requests with nothing buffered.
    async fn start<H, F>(max_header_bytes: usize, handler: H) -> SocketAddr
    where
        H: Fn(Request<ClientBody>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Answer> + Send + 'static,
    {
        start_parking_after(max_header_bytes, handler, Duration::ZERO)
            .await
            .0
    }

    /// Like [`start`], with connections parked once idle for `park_after`; also returns
    /// the count of parks so far, over all connections.
    async fn start_parking_after<H, F>(
        max_header_bytes: usize,
        handler: H,
        park_after: Duration,
    ) -> (SocketAddr, Arc<AtomicUsize>)
    where
        H: Fn(Request<ClientBody>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Answer> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let series = Metrics::new(None).listener("t", "http");
        let parks = Arc::new(AtomicUsize::new(0));
        let counted = parks.clone();
        tokio::spawn(async move {
            while let Ok((stream, client)) = listener.accept().await {
                let (handler, shutdown, series, parks) = (
                    handler.clone(),
                    shutdown.clone(),
                    series.clone(),
                    counted.clone(),
                );
                tokio::spawn(async move {
                    let progress = HeadProgress::default();
                    let conn = Conn {
                        max_header_bytes,
                        header_timeout: park_after.max(Duration::from_secs(5)),
                        drain_grace: Duration::from_secs(1),
                        park_after,
                        shutdown: &shutdown,
                        series: &series,
                        progress: &progress,
                        client,
                        handler,
                    };
                    let mut stream = stream;
                    let mut drain_due = None;
                    let mut due = Instant::now() + conn.header_timeout;
                    let mut written = false;
                    loop {
                        let served =
                            serve(stream, BytesMut::new(), &conn, due, &mut drain_due, written);
                        match served.await {
                            Served::Ended => return,
                            Served::Parked(mut back, next_due) => {
                                written = true;
                                parks.fetch_add(1, Ordering::Relaxed);
                                // Holding only the stream until its next bytes, as the
                                // server's connections do.
                                if poll_fn(|cx| ReadReady::poll_read_ready(&mut back, cx))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                                (stream, due) = (back, next_due);
                            }
                        }
                    }
                });
            }
        });
        (addr, parks)
    }

    /// Waits (boundedly) until `parks` counts `want`.
    async fn parked(parks: &AtomicUsize, want: usize) -> usize {
        for _ in 0..500 {
            if parks.load(Ordering::Relaxed) >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        parks.load(Ordering::Relaxed)
    }

    /// Answers with what it received: the request line, the body (read to its end) and
    /// the trailers, or the body's error.
    async fn echo(req: Request<ClientBody>) -> Answer {
        let (parts, body) = req.into_parts();
        let mut text = format!("{} {} {:?}\n", parts.method, parts.uri, parts.version);
        match body.collect().await {
            Ok(collected) => {
                let trailers = collected.trailers().cloned();
                text.push_str(&String::from_utf8_lossy(&collected.to_bytes()));
                for (name, value) in trailers.iter().flatten() {
                    text.push_str(&format!("\n{name}={}", value.to_str().unwrap()));
                }
            }
            Err(e) => text = format!("error: {e}"),
        }
        Ok(Response::new(ResponseBody::full(text)))
    }

    /// A client reading responses framed by Content-Length (or by the close).
    struct Client {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    impl Client {
        async fn connect(addr: SocketAddr) -> Client {
            Client {
                stream: TcpStream::connect(addr).await.unwrap(),
                buf: Vec::new(),
            }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).await.unwrap();
        }

        /// More bytes; `false` at the end of the stream.
        async fn fill(&mut self) -> bool {
            let mut tmp = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut tmp))
                .await
                .expect("an answer in time")
                .unwrap_or(0);
            self.buf.extend_from_slice(&tmp[..n]);
            n > 0
        }

        /// The next response head (lowercased) and body; `head_only` for a HEAD request.
        async fn response(&mut self, head_only: bool) -> (String, String) {
            let end = loop {
                if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end + 4;
                }
                assert!(self.fill().await, "closed before a response head");
            };
            let head = String::from_utf8(self.buf.drain(..end).collect())
                .unwrap()
                .to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map(|v| v.trim().parse::<usize>().unwrap());
            let length = match length {
                _ if head_only || head.starts_with("http/1.1 100") => 0,
                Some(n) => n,
                None => {
                    while self.fill().await {}
                    self.buf.len()
                }
            };
            while self.buf.len() < length {
                assert!(self.fill().await, "closed in a response body");
            }
            let body = String::from_utf8(self.buf.drain(..length).collect()).unwrap();
            (head, body)
        }

        /// Whether the server closed the connection (nothing more arrives).
        async fn closed(&mut self) -> bool {
            !self.fill().await && self.buf.is_empty()
        }
    }

    /// Serves the next connection `listener` accepts with `handler`; returns a second
    /// handle on the served socket (a duplicate of its descriptor) to read its options.
    async fn serve_one<H, F>(listener: &TcpListener, handler: H) -> std::os::fd::OwnedFd
    where
        H: Fn(Request<ClientBody>) -> F + Send + Sync + 'static,
        F: Future<Output = Answer> + Send + 'static,
    {
        use std::os::fd::AsFd;
        let (stream, client) = listener.accept().await.unwrap();
        let probe = stream.as_fd().try_clone_to_owned().unwrap();
        // As the listener serves its plain connections.
        let stream = crate::listener::ClientSocket::new(stream.into_std().unwrap());
        tokio::spawn(async move {
            let (shutdown, progress) = (Shutdown::new(), HeadProgress::default());
            let series = Metrics::new(None).listener("t", "http");
            let conn = Conn {
                max_header_bytes: 16 * 1024,
                header_timeout: Duration::from_secs(10),
                drain_grace: Duration::from_secs(1),
                park_after: Duration::from_secs(10),
                shutdown: &shutdown,
                series: &series,
                progress: &progress,
                client,
                handler,
            };
            let due = Instant::now() + conn.header_timeout;
            serve(stream, BytesMut::new(), &conn, due, &mut None, false).await;
        });
        probe
    }

    fn sends_at_once(socket: &std::os::fd::OwnedFd) -> bool {
        socket2::SockRef::from(socket).tcp_nodelay().unwrap()
    }

    #[tokio::test]
    async fn a_connection_sends_at_once_from_its_second_write_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();

        // Answered once and closed: one write, which nothing before it can hold back. Its
        // last bytes are held for the end of the stream and go out with the shutdown: the
        // client sees the response and its end although the duplicate keeps the socket
        // open (a drop alone would send neither).
        let mut client = Client::connect(addr).await;
        let socket = serve_one(&listener, echo).await;
        client
            .send(b"GET /once HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await;
        assert_eq!(client.response(false).await.1, "GET /once HTTP/1.1\n");
        assert!(client.closed().await, "no end of stream after the response");
        assert!(!sends_at_once(&socket));

        // Kept alive: the first response leaves as it is; the second is sent at once.
        let mut client = Client::connect(addr).await;
        let socket = serve_one(&listener, echo).await;
        client.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(client.response(false).await.1, "GET /1 HTTP/1.1\n");
        assert!(!sends_at_once(&socket));
        client.send(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(client.response(false).await.1, "GET /2 HTTP/1.1\n");
        assert!(sends_at_once(&socket));

        // `100 Continue`, then the response: its second write is sent at once.
        let mut client = Client::connect(addr).await;
        let socket = serve_one(&listener, echo).await;
        client
            .send(
                b"PUT /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
            )
            .await;
        assert_eq!(
            client.response(false).await.0,
            "http/1.1 100 continue\r\n\r\n"
        );
        assert!(!sends_at_once(&socket));
        client.send(b"data").await;
        assert_eq!(client.response(false).await.1, "PUT /e HTTP/1.1\ndata");
        assert!(sends_at_once(&socket));
    }

    #[tokio::test]
    async fn a_closing_connections_held_response_leaves_before_unread_bytes_reset_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A client that sends more after asking to close: those bytes are unread when the
        // connection closes, which resets it; the response's held last bytes have left
        // with the shutdown before.
        let got = Arc::new(tokio::sync::Notify::new());
        let go = Arc::new(tokio::sync::Notify::new());
        let handler = {
            let (got, go) = (got.clone(), go.clone());
            move |req| {
                let (got, go) = (got.clone(), go.clone());
                async move {
                    got.notify_one();
                    go.notified().await;
                    echo(req).await
                }
            }
        };
        let mut client = Client::connect(addr).await;
        drop(serve_one(&listener, handler).await);
        client
            .send(b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await;
        got.notified().await;
        client.send(b"GET /more HTTP/1.1\r\nHost: a\r\n\r\n").await;
        go.notify_one();
        assert_eq!(client.response(false).await.1, "GET /last HTTP/1.1\n");
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let addr = start(16 * 1024, echo).await;
        let mut c = Client::connect(addr).await;
        c.send(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nPOST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloGET /c HTTP/1.1\r\nHost: h\r\n\r\n").await;
        let (head, body) = c.response(false).await;
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
        assert!(!head.contains("connection:"), "{head}");
        assert_eq!(body, "GET /a HTTP/1.1\n");
        assert_eq!(c.response(false).await.1, "POST /b HTTP/1.1\nhello");
        assert_eq!(c.response(false).await.1, "GET /c HTTP/1.1\n");
        // Kept alive: one more, after a pause that parks the connection.
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.send(b"GET /d HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await;
        let (head, body) = c.response(false).await;
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert_eq!(body, "GET /d HTTP/1.1\n");
        assert!(c.closed().await);
    }

    /// Read buffers this thread holds for its next connections.
    fn spares() -> usize {
        spares::len(&SPARES)
    }

    #[test]
    fn a_read_buffer_goes_back_to_the_thread_once_nothing_read_into_it_is_alive() {
        assert_eq!(spares(), 0);
        // A head split from the buffer is still in use: the storage is not whole again.
        let mut buf = ReadBuffer(read_buffer());
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let head = buf.split_to(18).freeze();
        drop(buf);
        assert_eq!(spares(), 0);
        // Nothing else holds it: it goes back whole and empty, for the next connection.
        let mut buf = ReadBuffer(read_buffer());
        let at = buf.as_ptr();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        drop(buf.split_to(18).freeze());
        drop(buf);
        assert_eq!(spares(), 1);
        let again = read_buffer();
        assert_eq!((again.as_ptr(), again.len()), (at, 0));
        assert!(again.capacity() >= READ_SIZE);
        assert_eq!(spares(), 0);
        // One grown for a large head is let go.
        let mut big = ReadBuffer(BytesMut::with_capacity(8 * READ_SIZE));
        big.extend_from_slice(b"x");
        drop(big);
        assert_eq!(spares(), 0);
        assert_eq!(&head[..], b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn a_quiet_thread_keeps_fewer_spare_read_buffers() {
        let buffers: Vec<ReadBuffer> = (0..SPARE_READS + 3)
            .map(|_| ReadBuffer(read_buffer()))
            .collect();
        drop(buffers);
        assert_eq!(spares(), SPARE_READS, "no more than SPARE_READS are kept");
        settle_spares();
        assert_eq!(spares(), QUIET_READS);
    }

    /// Response buffers this thread holds for its next connections.
    fn out_spares() -> usize {
        spares::len(&SPARE_OUT)
    }

    #[test]
    fn a_response_buffer_goes_back_to_the_thread_unless_a_large_response_grew_it() {
        assert_eq!(out_spares(), 0);
        let mut out = OutBuffer(out_buffer());
        assert!(out.0.capacity() >= OUT_SIZE);
        out.0.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
        let at = out.0.as_ptr();
        drop(out);
        assert_eq!(out_spares(), 1);
        // The next connection's buffer is that one, emptied.
        let again = out_buffer();
        assert_eq!((again.as_ptr(), again.len()), (at, 0));
        assert_eq!(out_spares(), 0);
        // One that never held a response gives nothing back.
        drop(OutBuffer(Vec::new()));
        assert_eq!(out_spares(), 0);
        // One grown for a large response is let go.
        let mut big = OutBuffer(again);
        big.0.resize(8 * OUT_SIZE, b'x');
        drop(big);
        assert_eq!(out_spares(), 0);
        // No more than SPARE_OUTS are kept, and a quiet thread keeps fewer.
        let all: Vec<OutBuffer> = (0..SPARE_OUTS + 3)
            .map(|_| OutBuffer(out_buffer()))
            .collect();
        drop(all);
        assert_eq!(out_spares(), SPARE_OUTS);
        settle_spares();
        assert_eq!(out_spares(), QUIET_READS);
    }

    #[tokio::test]
    async fn parked_and_ended_connections_leave_their_buffers_to_the_next() {
        // The test's runtime has one thread: the server's connections run on it.
        let addr = start(16 * 1024, echo).await;
        let mut c = Client::connect(addr).await;
        c.send(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n").await;
        assert_eq!(c.response(false).await.1, "GET /a HTTP/1.1\n");
        let settled = |want: usize| async move {
            for _ in 0..200 {
                if spares() == want && out_spares() == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        };
        // Parked at once between requests: the buffer is back with the thread.
        assert!(
            settled(1).await,
            "a parked connection kept its read or response buffer"
        );
        c.send(b"GET /b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await;
        assert_eq!(c.response(false).await.1, "GET /b HTTP/1.1\n");
        assert!(c.closed().await);
        assert!(
            settled(1).await,
            "an ended connection kept its read or response buffer"
        );
    }

    #[tokio::test]
    async fn requests_within_the_park_delay_are_served_by_one_call_without_parking() {
        let (addr, parks) = start_parking_after(16 * 1024, echo, Duration::from_secs(600)).await;
        let mut c = Client::connect(addr).await;
        for path in ["/a", "/b", "/c"] {
            c.send(format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
                .await;
            assert_eq!(c.response(false).await.1, format!("GET {path} HTTP/1.1\n"));
            // Idle between requests, for much less than the delay.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(parks.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_park_delay_parks_and_is_served_again() {
        let (addr, parks) = start_parking_after(16 * 1024, echo, Duration::from_millis(50)).await;
        let mut c = Client::connect(addr).await;
        for (n, path) in ["/a", "/b", "/c"].into_iter().enumerate() {
            c.send(format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
                .await;
            assert_eq!(c.response(false).await.1, format!("GET {path} HTTP/1.1\n"));
            // Each idle spell parks the connection once; it is served on after it.
            assert_eq!(parked(&parks, n + 1).await, n + 1);
        }
        // A connection with part of a head buffered does not park, however long the rest
        // takes.
        c.send(b"GET /d HTTP/1.1\r\n").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(parks.load(Ordering::Relaxed), 3);
        c.send(b"Host: h\r\n\r\n").await;
        assert_eq!(c.response(false).await.1, "GET /d HTTP/1.1\n");
        assert_eq!(parked(&parks, 4).await, 4);
    }

    #[tokio::test]
    async fn chunked_request_bodies_arrive_with_their_trailers() {
        let addr = start(16 * 1024, echo).await;
        let mut c = Client::connect(addr).await;
        c.send(b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.send(b"6\r\n world\r\n0\r\nx-sum: 42\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n")
            .await;
        assert_eq!(
            c.response(false).await.1,
            "POST /up HTTP/1.1\nhello world\nx-sum=42"
        );
        assert_eq!(c.response(false).await.1, "GET /next HTTP/1.1\n");
    }

    #[tokio::test]
    async fn malformed_chunk_sizes_fail_the_body_and_end_the_connection() {
        let addr = start(16 * 1024, echo).await;
        for chunks in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffffff\r\nhello\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            // Only SP and HTAB may follow a size, as the framing model has it.
            b"5\x0c\r\nhello\r\n0\r\n\r\n",
        ] {
            let mut c = Client::connect(addr).await;
            c.send(b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await;
            c.send(chunks).await;
            c.send(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n").await;
            let (_, body) = c.response(false).await;
            assert!(
                body.starts_with("error: ") && body.contains("chunk"),
                "{body}"
            );
            assert!(c.closed().await, "{}", String::from_utf8_lossy(chunks));
        }
    }

    #[tokio::test]
    async fn expect_continue_is_answered_when_the_body_is_read() {
        let addr = start(16 * 1024, echo).await;
        let mut c = Client::connect(addr).await;
        c.send(b"PUT /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
            .await;
        let (head, body) = c.response(false).await;
        assert_eq!(head, "http/1.1 100 continue\r\n\r\n");
        assert_eq!(body, "");
        c.send(b"data").await;
        let (head, body) = c.response(false).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, "PUT /e HTTP/1.1\ndata");
    }

    #[tokio::test]
    async fn head_responses_have_a_length_and_no_body() {
        let addr = start(16 * 1024, echo).await;
        let mut c = Client::connect(addr).await;
        c.send(b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\nGET /g HTTP/1.1\r\nHost: h\r\n\r\n")
            .await;
        let (head, body) = c.response(true).await;
        assert!(head.contains("\r\ncontent-length: 17\r\n"), "{head}");
        assert_eq!(body, "");
        // The next response follows the head directly: no body bytes came between.
        assert_eq!(c.response(false).await.1, "GET /g HTTP/1.1\n");
    }

    #[tokio::test]
    async fn http10_clients_get_http10_and_keep_alive_only_when_they_ask() {
        let addr = start(16 * 1024, echo).await;
        let mut c = Client::connect(addr).await;
        c.send(b"GET /old HTTP/1.0\r\n\r\n").await;
        let (head, body) = c.response(false).await;
        assert!(head.starts_with("http/1.0 200 ok\r\n"), "{head}");
        assert_eq!(body, "GET /old HTTP/1.0\n");
        assert!(c.closed().await);

        let mut c = Client::connect(addr).await;
        c.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let (head, _) = c.response(false).await;
        assert!(head.contains("\r\nconnection: keep-alive\r\n"), "{head}");
        c.send(b"GET /b HTTP/1.0\r\n\r\n").await;
        assert_eq!(c.response(false).await.1, "GET /b HTTP/1.0\n");
        assert!(c.closed().await);

        // No transfer codings in HTTP/1.0.
        let mut c = Client::connect(addr).await;
        c.send(b"POST /c HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            .await;
        assert!(c.response(false).await.0.starts_with("http/1.1 400"));
    }

    /// Answers with the `Connection` value the request's path names (`/close`,
    /// `/keep-alive`), or none.
    async fn connection_from_path(req: Request<ClientBody>) -> Answer {
        let mut response = Response::new(ResponseBody::full("x"));
        let value = req.uri().path().trim_start_matches('/');
        if !value.is_empty() {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_str(value).unwrap());
        }
        Ok(response)
    }

    #[tokio::test]
    async fn a_connection_field_in_the_response_decides_keep_alive() {
        let addr = start(16 * 1024, connection_from_path).await;
        // A response saying `close` ends a keep-alive HTTP/1.1 connection, the field
        // written once, as it came.
        let mut c = Client::connect(addr).await;
        c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").await;
        let (head, _) = c.response(false).await;
        assert!(!head.contains("connection"), "{head}");
        c.send(b"GET /close HTTP/1.1\r\nHost: h\r\n\r\n").await;
        let (head, body) = c.response(false).await;
        assert_eq!(
            head.matches("\r\nconnection: close\r\n").count(),
            1,
            "{head}"
        );
        assert_eq!(body, "x");
        assert!(c.closed().await);

        // An HTTP/1.0 client that asked to keep the connection: a response that says
        // `keep-alive` itself gets no second one, and the connection stays.
        let mut c = Client::connect(addr).await;
        c.send(b"GET /keep-alive HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let (head, _) = c.response(false).await;
        assert_eq!(head.matches("connection: keep-alive").count(), 1, "{head}");
        c.send(b"GET /close HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let (head, _) = c.response(false).await;
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert!(!head.contains("keep-alive"), "{head}");
        assert!(c.closed().await);
    }

    #[tokio::test]
    async fn a_half_closed_client_still_gets_its_answer() {
        let addr = start(16 * 1024, echo).await;
        let mut c = Client::connect(addr).await;
        c.send(b"POST /half HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok")
            .await;
        c.stream.shutdown().await.unwrap();
        let (head, body) = c.response(false).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, "POST /half HTTP/1.1\nok");
        assert!(c.closed().await);
    }

    #[tokio::test]
    async fn malformed_and_oversized_heads_get_hypers_answers() {
        let addr = start(1024, echo).await;
        let long_value = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nx-big: {}\r\n\r\n",
            "a".repeat(2000)
        );
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            (0..=MAX_HEADERS)
                .map(|i| format!("x-{i}: v\r\n"))
                .collect::<String>()
        );
        // A head that never ends but outgrows the limit.
        let mut c = Client::connect(addr).await;
        c.send(b"GET / HTTP/1.1\r\nHost: h\r\nx-big: ").await;
        for _ in 0..40 {
            c.send(&[b'a'; 100]).await;
        }
        assert!(c.response(false).await.0.starts_with("http/1.1 431 "));
        for (bytes, status) in [
            (long_value.as_bytes(), "431"),
            (b"GET / HTTP/1.1\r\nbad header\r\n\r\n".as_slice(), "400"),
            (b"GET / HTTP/2.0\r\n\r\n".as_slice(), "400"),
            (b"GET / HTTP/1.1\r\nX: a\0b\r\n\r\n".as_slice(), "400"),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".as_slice(),
                "400",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n".as_slice(),
                "400",
            ),
            // A list of lengths, even of one length, as the framing model refuses it.
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello".as_slice(),
                "400",
            ),
        ] {
            let mut c = Client::connect(addr).await;
            c.send(bytes).await;
            let (head, _) = c.response(false).await;
            assert!(
                head.starts_with(&format!("http/1.1 {status} ")),
                "{head} for {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(60)])
            );
            assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        }
        let many_addr = start(64 * 1024, echo).await;
        let long_target = format!(
            "GET /{} HTTP/1.1\r\nHost: h\r\n\r\n",
            "t".repeat(MAX_TARGET)
        );
        let big = start(128 * 1024, echo).await;
        for (addr, bytes, status) in [
            (many_addr, many.as_bytes(), "431"),
            (big, long_target.as_bytes(), "414"),
        ] {
            let mut c = Client::connect(addr).await;
            c.send(bytes).await;
            let (head, _) = c.response(false).await;
            assert!(head.starts_with(&format!("http/1.1 {status} ")), "{head}");
        }
    }

    #[test]
    fn a_repeated_content_length_is_one_field() {
        let mut buf = BytesMut::from(
            &b"POST / HTTP/1.1\r\nContent-Length: 05\r\ncontent-length: 5\r\n\r\nhello"[..],
        );
        let head = parse_head(&mut buf, 1024).unwrap().unwrap();
        let lengths: Vec<_> = head
            .request
            .headers()
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .collect();
        assert_eq!(lengths, ["05"]);
        assert_eq!(head.body, Some(Framing::Length(5)));
        assert_eq!(&buf[..], b"hello");
        let mut buf = BytesMut::from(
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
        );
        assert_eq!(
            parse_head(&mut buf, 1024).err(),
            Some(StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn heads_with_more_fields_than_kept_inline_keep_every_field() {
        for count in [INLINE_FIELDS, INLINE_FIELDS + 1, MAX_HEADERS] {
            let fields: String = (0..count)
                .map(|i| format!("x-f{i}: value {i}\r\n"))
                .collect();
            let mut buf = BytesMut::from(format!("GET /p HTTP/1.1\r\n{fields}\r\nnext").as_bytes());
            let head = parse_head(&mut buf, 64 * 1024).unwrap().unwrap();
            let headers = head.request.headers();
            assert_eq!(headers.len(), count);
            for i in 0..count {
                assert_eq!(
                    headers[format!("x-f{i}").as_str()],
                    format!("value {i}").as_str()
                );
            }
            assert_eq!(&buf[..], b"next");
        }
    }

    #[test]
    fn chunked_response_framing() {
        let mut out = Pending {
            out: Vec::new(),
            tail: None,
            vectored: true,
        };
        let mut sending = Sending::Chunked;
        assert!(out.data(&mut sending, Bytes::from_static(&[b'x'; 26])));
        assert!(out.tail.is_none(), "chunked data is framed, in `out`");
        assert!(out.out.starts_with(b"1a\r\nxxxx"));
        assert!(out.out.ends_with(b"x\r\n"));
        let mut sending = Sending::Length(3);
        out.clear();
        assert!(out.data(&mut sending, Bytes::from_static(b"ab")));
        assert!(!out.data(&mut sending, Bytes::from_static(b"cd")));
        assert_eq!(out.len(), 2);
        assert_eq!(hex(&mut [0; 16], 0), b"0");
        assert_eq!(hex(&mut [0; 16], 0x1f2e), b"1f2e");
        assert_eq!(decimal(&mut [0; 20], 0), b"0");
        assert_eq!(decimal(&mut [0; 20], u64::MAX), b"18446744073709551615");
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("1"));
        trailers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("9"));
        trailers.insert("x-other", HeaderValue::from_static("2"));
        let mut out = Vec::new();
        let announced = [HeaderName::from_static("x-sum"), header::CONTENT_LENGTH];
        encode_trailers(&mut out, &trailers, Some(&announced));
        assert_eq!(out, b"x-sum: 1\r\n");
    }

    /// A stream that takes at most `step` bytes per write, from as many buffers as it is
    /// given when `vectored`.
    struct Trickle {
        written: Vec<u8>,
        step: usize,
        vectored: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.written.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            assert!(self.vectored, "a vectored write to a stream that has none");
            let mut left = self.step;
            for buf in bufs {
                let n = buf.len().min(left);
                self.written.extend_from_slice(&buf[..n]);
                left -= n;
            }
            Poll::Ready(Ok(self.step - left))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn body_data_after_the_head_is_written_in_order_whatever_each_write_takes() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for vectored in [true, false] {
            for step in [1, 3, 7, 4096] {
                let mut io = Trickle {
                    written: Vec::new(),
                    step,
                    vectored,
                };
                let mut pending = Pending {
                    out: b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n".to_vec(),
                    tail: None,
                    vectored: io.is_write_vectored(),
                };
                let mut sending = Sending::Length(11);
                let mut expected = pending.out.clone();
                for piece in [&b"hello"[..], b" ", b"world"] {
                    assert!(pending.data(&mut sending, Bytes::from_static(piece)));
                    expected.extend_from_slice(piece);
                }
                assert_eq!(pending.tail.is_some(), vectored);
                assert_eq!(pending.len(), expected.len());
                let mut at = 0;
                while at < pending.len() {
                    match pending.poll_write(&mut io, &mut cx, at) {
                        Poll::Ready(Ok(n)) if n > 0 => at += n,
                        other => panic!("write gave {other:?}"),
                    }
                }
                pending.clear();
                assert_eq!(pending.len(), 0);
                assert_eq!(io.written, expected, "vectored {vectored}, step {step}");
            }
        }
    }
}
