//! The unix socket's HTTP/2 front: requests whose `:authority` is not a valid authority get
//! `localhost` instead, before the HTTP/2 server sees them.
//!
//! gRPC clients that do not special-case unix sockets (Python grpcio, grpc-java, grpcurl
//! before 1.9, Bazel) send the socket path, or its percent-encoding, as `:authority`. The
//! `h2` server validates it while decoding the request and resets the stream with
//! PROTOCOL_ERROR, with no option to relax that. On a unix socket the authority carries no
//! information (the path already names the peer), so a relay between the accepted socket
//! and the server rewrites it; everything else the server still validates, and the TCP
//! management listener and every data-path listener are not relayed at all.
//!
//! The relay keeps the bytes of every frame from the client except header blocks: a
//! HEADERS frame and its CONTINUATIONs are HPACK-decoded with `h2`'s own codec (kept in
//! step with the client's encoder), the authority is fixed, and the block is encoded again
//! for the server (kept in step with the server's decoder). The server's frames go back
//! byte for byte; only its SETTINGS are read, for the header table and frame size limits
//! the two codecs must follow. A frame the codec cannot decode closes the connection with
//! GOAWAY PROTOCOL_ERROR.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use h2::frame::{Frame, Headers, Pseudo};
use h2::Codec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::Shutdown;

/// The client connection preface (RFC 9113 section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
const PROTOCOL_ERROR: u32 = 0x1;
/// Largest header block (HEADERS plus CONTINUATIONs) relayed; the server's own limit
/// (16 KiB by default) is far below it.
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// In-memory pipe between the relay and the server.
const PIPE_BYTES: usize = 256 * 1024;

/// Starts relaying `client` and returns the end the HTTP/2 server serves. The relay runs
/// as one of `shutdown`'s services: a process that stops (after handing over to its
/// successor, say) waits until the relay has passed the server's last bytes, the answer to
/// an upgrade among them, to the client, rather than exiting with them still in the pipe.
pub(super) fn relay(client: UnixStream, shutdown: &Shutdown) -> DuplexStream {
    let (server_end, relay_end) = tokio::io::duplex(PIPE_BYTES);
    shutdown.spawn_service(async move {
        if let Err(e) = run(client, relay_end).await {
            tracing::debug!(error = %e, "management connection ended");
        }
    });
    server_end
}

async fn run(mut client: UnixStream, mut server: DuplexStream) -> io::Result<()> {
    let mut preface = [0u8; PREFACE.len()];
    let read = read_full(&mut client, &mut preface).await?;
    server.write_all(&preface[..read]).await?;
    if read < PREFACE.len() || preface != PREFACE {
        // Not HTTP/2 with prior knowledge: pass the bytes through; the server answers.
        tokio::io::copy_bidirectional(&mut client, &mut server).await?;
        return Ok(());
    }

    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = tokio::io::split(server);
    let (limits_tx, limits_rx) = mpsc::unbounded_channel();
    let (goaway_tx, goaway_rx) = mpsc::channel(1);
    let to_client = server_to_client(&mut server_rx, &mut client_tx, limits_tx, goaway_rx);
    let to_server = async move {
        let result = client_to_server(&mut client_rx, &mut server_tx, limits_rx, goaway_tx).await;
        // However the client stopped, the server sees the end of its requests and closes
        // once it has answered them, which ends the other direction.
        let _ = server_tx.shutdown().await;
        result
    };
    tokio::pin!(to_client, to_server);
    tokio::select! {
        result = &mut to_client => result,
        result = &mut to_server => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "management client stopped sending");
            }
            to_client.await
        }
    }
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
async fn read_full<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// A limit from the server's SETTINGS that the client now follows.
enum Limit {
    HeaderTableSize(usize),
    MaxFrameSize(usize),
}

/// Copies the server's frames to the client unchanged, telling the other direction about
/// the limits in the server's SETTINGS before the client can see them; writes a GOAWAY
/// from the other direction and stops when one arrives.
async fn server_to_client<R, W>(
    server: &mut R,
    client: &mut W,
    limits: mpsc::UnboundedSender<Limit>,
    mut goaway: mpsc::Receiver<Bytes>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let frame = tokio::select! {
            biased;
            Some(frame) = goaway.recv() => {
                client.write_all(&frame).await?;
                client.shutdown().await?;
                return Ok(());
            }
            frame = read_frame(server, usize::MAX) => frame?,
        };
        let Some(frame) = frame else {
            client.shutdown().await?;
            return Ok(());
        };
        if frame.kind == SETTINGS && frame.flags & ACK == 0 {
            for setting in frame.payload().chunks_exact(6) {
                let id = u16::from_be_bytes([setting[0], setting[1]]);
                let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                let value = usize::try_from(value).unwrap_or(usize::MAX);
                let limit = match id {
                    SETTINGS_HEADER_TABLE_SIZE => Limit::HeaderTableSize(value),
                    SETTINGS_MAX_FRAME_SIZE => Limit::MaxFrameSize(value),
                    _ => continue,
                };
                // The receiver only goes away when that direction has ended.
                let _ = limits.send(limit);
            }
        }
        client.write_all(&frame.bytes).await?;
    }
}

/// Copies the client's frames to the server, re-encoding header blocks with a valid
/// `:authority`. Ends when the client stops sending.
async fn client_to_server<R, W>(
    client: &mut R,
    server: &mut W,
    mut limits: mpsc::UnboundedReceiver<Limit>,
    goaway: mpsc::Sender<Bytes>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut blocks = HeaderBlocks::new();
    let mut last_stream = 0u32;
    loop {
        while let Ok(limit) = limits.try_recv() {
            blocks.apply(limit);
        }
        let Some(frame) = read_frame(client, MAX_HEADER_BLOCK).await? else {
            return Ok(());
        };
        if frame.kind != HEADERS {
            // Everything but a header block (CONTINUATION outside one included: the
            // server rejects it) goes through byte for byte.
            server.write_all(&frame.bytes).await?;
            continue;
        }
        let stream = frame.stream_id;
        let mut block = vec![frame];
        while block.last().is_some_and(|f| f.flags & END_HEADERS == 0) {
            let size: usize = block.iter().map(|f| f.bytes.len()).sum();
            match read_frame(client, MAX_HEADER_BLOCK).await? {
                Some(next)
                    if next.kind == CONTINUATION
                        && next.stream_id == stream
                        && size + next.bytes.len() <= MAX_HEADER_BLOCK =>
                {
                    block.push(next)
                }
                _ => return refuse(&goaway, last_stream).await,
            }
        }
        while let Ok(limit) = limits.try_recv() {
            blocks.apply(limit);
        }
        match blocks.reencode(&block).await {
            Some(encoded) => {
                last_stream = last_stream.max(stream);
                server.write_all(&encoded).await?;
            }
            None => return refuse(&goaway, last_stream).await,
        }
    }
}

/// Ends the connection with GOAWAY PROTOCOL_ERROR after `last_stream`.
async fn refuse(goaway: &mpsc::Sender<Bytes>, last_stream: u32) -> io::Result<()> {
    let mut frame = BytesMut::with_capacity(FRAME_HEADER_LEN + 8);
    frame.put_uint(8, 3);
    frame.put_u8(GOAWAY);
    frame.put_u8(0);
    frame.put_u32(0);
    frame.put_u32(last_stream & 0x7fff_ffff);
    frame.put_u32(PROTOCOL_ERROR);
    // The other direction writes it and closes the connection.
    let _ = goaway.send(frame.freeze()).await;
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "undecodable header block from the client",
    ))
}

/// One raw frame: its header fields and every byte of it.
struct RawFrame {
    kind: u8,
    flags: u8,
    stream_id: u32,
    bytes: Bytes,
}

impl RawFrame {
    fn payload(&self) -> &[u8] {
        &self.bytes[FRAME_HEADER_LEN..]
    }
}

/// The next frame, or `None` at the end of the stream between frames. Payloads longer
/// than `max_header_block` are refused for header blocks only; the server checks the rest.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_header_block: usize,
) -> io::Result<Option<RawFrame>> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match read_full(reader, &mut header).await? {
        0 => return Ok(None),
        FRAME_HEADER_LEN => {}
        _ => return Err(io::ErrorKind::UnexpectedEof.into()),
    }
    let len =
        (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2]);
    let kind = header[3];
    if (kind == HEADERS || kind == CONTINUATION) && len > max_header_block {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "header block too large",
        ));
    }
    let mut bytes = BytesMut::with_capacity(FRAME_HEADER_LEN + len);
    bytes.extend_from_slice(&header);
    bytes.resize(FRAME_HEADER_LEN + len, 0);
    reader.read_exact(&mut bytes[FRAME_HEADER_LEN..]).await?;
    Ok(Some(RawFrame {
        kind,
        flags: header[4],
        stream_id: u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff,
        bytes: bytes.freeze(),
    }))
}

/// The two HPACK contexts: the client's header blocks are decoded with one and encoded for
/// the server with the other, each kept in step with its peer by seeing every block.
struct HeaderBlocks {
    decoder: Codec<BlockIo, Bytes>,
    encoder: Codec<BlockIo, Bytes>,
}

impl HeaderBlocks {
    fn new() -> HeaderBlocks {
        let mut decoder = Codec::new(BlockIo::default());
        // Frame sizes are bounded while reading; the codec only sees header blocks.
        decoder.set_max_recv_frame_size(16_777_215);
        decoder.set_max_recv_header_list_size(MAX_HEADER_BLOCK);
        HeaderBlocks {
            decoder,
            encoder: Codec::new(BlockIo::default()),
        }
    }

    fn apply(&mut self, limit: Limit) {
        match limit {
            // The client's encoder may now use this much table; so must our decoder,
            // and ours towards the server must stay within it.
            Limit::HeaderTableSize(size) => {
                self.decoder.set_recv_header_table_size(size);
                self.encoder.set_send_header_table_size(size);
            }
            // Only values the protocol allows; the server refuses others itself.
            Limit::MaxFrameSize(size) if (16_384..=16_777_215).contains(&size) => {
                self.encoder.set_max_send_frame_size(size);
            }
            Limit::MaxFrameSize(_) => {}
        }
    }

    /// Decodes one header block (HEADERS and its CONTINUATIONs), fixes its `:authority`
    /// and encodes it again; `None` when the block cannot be decoded.
    async fn reencode(&mut self, block: &[RawFrame]) -> Option<Bytes> {
        let io = self.decoder.get_mut();
        for frame in block {
            io.input.extend_from_slice(&frame.bytes);
        }
        let decoded = self.decoder.next().await;
        // A block that did not decode whole leaves the decoder unusable anyway.
        self.decoder.get_mut().input.clear();
        let Some(Ok(Frame::Headers(headers))) = decoded else {
            return None;
        };
        if headers.is_over_size() {
            return None;
        }
        let headers = with_valid_authority(headers);
        self.encoder.send(Frame::Headers(headers)).await.ok()?;
        Some(std::mem::take(&mut self.encoder.get_mut().output).freeze())
    }
}

/// `headers` with `localhost` for an `:authority` that is not a valid authority, rebuilt
/// without padding or priority (the encoder would keep those flags but not their bytes).
fn with_valid_authority(headers: Headers) -> Headers {
    let stream_id = headers.stream_id();
    let end_stream = headers.is_end_stream();
    let (mut pseudo, fields) = headers.into_parts();
    let invalid = pseudo
        .authority
        .as_ref()
        .is_some_and(|authority| http::uri::Authority::try_from(&**authority).is_err());
    if invalid {
        pseudo.authority = Pseudo::request(
            http::Method::GET,
            http::Uri::from_static("http://localhost/"),
            None,
        )
        .authority;
    }
    let mut rebuilt = Headers::new(stream_id, pseudo, fields);
    if end_stream {
        rebuilt.set_end_stream();
    }
    rebuilt
}

/// In-memory I/O for the codecs: the decoder reads the block put in `input` (and fails
/// rather than wait when it wants more), the encoder writes into `output`.
#[derive(Default)]
struct BlockIo {
    input: BytesMut,
    output: BytesMut,
}

impl AsyncRead for BlockIo {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.input.is_empty() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "incomplete header block",
            )));
        }
        let n = buf.remaining().min(this.input.len());
        buf.put_slice(&this.input[..n]);
        this.input.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for BlockIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().output.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn only_an_invalid_authority_is_replaced() {
        let cases = [
            ("/run/proxy/mgmt.sock", "localhost"),
            ("%2Frun%2Fproxy%2Fmgmt.sock", "localhost"),
            ("localhost", "localhost"),
            ("example.com:8443", "example.com:8443"),
        ];
        for (sent, seen) in cases {
            let mut fields = http::HeaderMap::new();
            fields.insert("te", http::HeaderValue::from_static("trailers"));
            let fixed = with_valid_authority(headers_with_authority(sent, fields));
            assert!(fixed.is_end_headers());
            let (pseudo, fields) = fixed.into_parts();
            assert_eq!(pseudo.authority.as_deref(), Some(seen), "for {sent:?}");
            assert_eq!(pseudo.path.as_deref(), Some("/a.B/C"));
            assert_eq!(pseudo.method, Some(http::Method::POST));
            assert_eq!(fields.get("te").unwrap(), "trailers");
        }
    }

    /// A HEADERS frame as h2's decoder returns it for a request with `authority`: the block
    /// is written by hand (literals, no Huffman) and decoded like a client's.
    fn headers_with_authority(authority: &str, fields: http::HeaderMap) -> Headers {
        let mut block = BytesMut::new();
        // :method POST (static index 3), :scheme http (6), :path literal, :authority literal.
        block.put_u8(0x83);
        block.put_u8(0x86);
        literal(&mut block, 4, "/a.B/C");
        literal(&mut block, 1, authority);
        for (name, value) in &fields {
            block.put_u8(0x00);
            string(&mut block, name.as_str().as_bytes());
            string(&mut block, value.as_bytes());
        }
        let mut frame = BytesMut::new();
        frame.put_uint(block.len() as u64, 3);
        frame.put_u8(HEADERS);
        frame.put_u8(END_HEADERS);
        frame.put_u32(1);
        frame.extend_from_slice(&block);
        let mut codec: Codec<BlockIo, Bytes> = Codec::new(BlockIo::default());
        codec.get_mut().input = frame;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        match rt.block_on(codec.next()) {
            Some(Ok(Frame::Headers(h))) => h,
            other => panic!("decoded {other:?}"),
        }
    }

    /// Literal header field without indexing, name from the static table.
    fn literal(block: &mut BytesMut, name_index: u8, value: &str) {
        block.put_u8(name_index);
        string(block, value.as_bytes());
    }

    fn string(block: &mut BytesMut, bytes: &[u8]) {
        assert!(bytes.len() < 127);
        block.put_u8(bytes.len() as u8);
        block.extend_from_slice(bytes);
    }
}
