//! Request-smuggling defence below hyper.
//!
//! hyper resolves a request carrying both `Content-Length` and `Transfer-Encoding` the way
//! RFC 9112 allows (chunked wins, the length is dropped, the connection closes afterwards),
//! so the handler never sees the conflict. Like nginx we refuse such requests with 400
//! instead. [`FramingScan`] follows HTTP/1.1 message framing on the bytes the client sends,
//! notes for each request head whether it had both headers, and the handler asks
//! [`Verdicts::next_is_ambiguous`] in request order (pipelining included).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-connection verdicts, one per request head, in order.
#[derive(Debug, Default, Clone)]
pub struct Verdicts(Arc<Mutex<VecDeque<bool>>>);

impl Verdicts {
    /// Whether the next request (in arrival order) declared both body lengths.
    pub fn next_is_ambiguous(&self) -> bool {
        self.0
            .lock()
            .map(|mut q| q.pop_front().unwrap_or(false))
            .unwrap_or(false)
    }

    fn push(&self, ambiguous: bool) {
        if let Ok(mut q) = self.0.lock() {
            q.push_back(ambiguous);
        }
    }
}

/// Largest head scanned; beyond it hyper answers 431 anyway.
const MAX_HEAD: usize = 256 * 1024;

#[derive(Debug)]
enum Phase {
    /// Collecting a request head.
    Head(Vec<u8>),
    /// Skipping a body of known length.
    Fixed(u64),
    /// In a chunked body: reading a chunk-size line.
    ChunkSize(Vec<u8>),
    /// In a chunked body: skipping chunk data plus its CRLF.
    ChunkData(u64),
    /// After the last chunk: skipping trailer lines until an empty one.
    Trailers(Vec<u8>),
    /// Not HTTP/1 framing any more (upgrade, h2, or unparseable): stop scanning.
    Done,
}

/// A client stream wrapper that scans request framing as hyper reads it.
pub struct FramingScan<S> {
    inner: S,
    phase: Phase,
    verdicts: Verdicts,
}

impl<S> FramingScan<S> {
    /// Wraps `inner`; verdicts are published to `verdicts`.
    pub fn new(inner: S, verdicts: Verdicts) -> Self {
        FramingScan {
            inner,
            phase: Phase::Head(Vec::new()),
            verdicts,
        }
    }

    fn scan(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.phase {
                Phase::Done => return,
                Phase::Head(buf) => {
                    // Blank lines before a request line are allowed and ignored.
                    if buf.is_empty() {
                        let skip = data
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                        if data.starts_with(b"PRI ") {
                            self.phase = Phase::Done;
                            return;
                        }
                    }
                    let before = buf.len();
                    buf.extend_from_slice(data);
                    let search_from = before.saturating_sub(3);
                    match buf[search_from..].windows(4).position(|w| w == b"\r\n\r\n") {
                        Some(pos) => {
                            let end = search_from + pos + 4;
                            let consumed = end - before;
                            let head = std::mem::take(buf);
                            self.phase = self.after_head(&head[..end]);
                            data = &data[consumed..];
                        }
                        None => {
                            if buf.len() > MAX_HEAD {
                                self.phase = Phase::Done;
                            }
                            return;
                        }
                    }
                }
                Phase::Fixed(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.phase = Phase::Head(Vec::new());
                    }
                }
                Phase::ChunkSize(line) => match data.iter().position(|b| *b == b'\n') {
                    Some(pos) => {
                        line.extend_from_slice(&data[..pos]);
                        data = &data[pos + 1..];
                        let text = String::from_utf8_lossy(line);
                        let size = text.split(';').next().unwrap_or("").trim();
                        self.phase = match u64::from_str_radix(size, 16) {
                            Ok(0) => Phase::Trailers(Vec::new()),
                            Ok(n) => Phase::ChunkData(n.saturating_add(2)),
                            Err(_) => Phase::Done,
                        };
                    }
                    None => {
                        line.extend_from_slice(data);
                        if line.len() > 1024 {
                            self.phase = Phase::Done;
                        }
                        return;
                    }
                },
                Phase::ChunkData(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.phase = Phase::ChunkSize(Vec::new());
                    }
                }
                Phase::Trailers(line) => match data.iter().position(|b| *b == b'\n') {
                    Some(pos) => {
                        line.extend_from_slice(&data[..pos]);
                        data = &data[pos + 1..];
                        let empty = line.iter().all(|b| *b == b'\r');
                        line.clear();
                        if empty {
                            self.phase = Phase::Head(Vec::new());
                        }
                    }
                    None => {
                        line.extend_from_slice(data);
                        if line.len() > MAX_HEAD {
                            self.phase = Phase::Done;
                        }
                        return;
                    }
                },
            }
        }
    }

    /// Records the verdict for one head and says how its body is framed.
    fn after_head(&self, head: &[u8]) -> Phase {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n");
        let request_line = lines.next().unwrap_or("");
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut has_te = false;
        let mut has_cl = false;
        let mut upgrade = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let name = name.trim();
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                has_cl = true;
                length = value.split(',').next().and_then(|v| v.trim().parse().ok());
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                has_te = true;
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
            } else if name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        self.verdicts.push(has_cl && has_te);
        if upgrade || request_line.starts_with("CONNECT ") || (has_cl && has_te) {
            // Bytes after this head may not be HTTP; and an ambiguous request closes the
            // connection, so there is nothing further to scan.
            return Phase::Done;
        }
        if chunked {
            Phase::ChunkSize(Vec::new())
        } else if has_te {
            Phase::Done
        } else {
            match length {
                Some(0) | None => Phase::Head(Vec::new()),
                Some(n) => Phase::Fixed(n),
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FramingScan<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            if !matches!(this.phase, Phase::Done) {
                let filled = buf.filled()[before..].to_vec();
                this.scan(&filled);
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramingScan<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(input: &[&[u8]]) -> Vec<bool> {
        let v = Verdicts::default();
        let mut scan = FramingScan::new((), v.clone());
        for part in input {
            scan.scan(part);
        }
        let out =
            v.0.lock()
                .map(|q| q.iter().copied().collect())
                .unwrap_or_default();
        out
    }

    #[test]
    fn flags_only_the_ambiguous_head() {
        let got = verdicts(&[
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]);
        assert_eq!(got, [true]);
    }

    #[test]
    fn follows_pipelined_framing_across_reads() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 33\r\n\r\nContent-Length: 1\r\nTransfer-E\r\n\r\nPOST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /c HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n";
        // Byte by byte, the body of /a (which looks like headers) is skipped, not scanned.
        let parts: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(verdicts(&parts), [false, false, true]);
        assert_eq!(verdicts(&[stream]), [false, false, true]);
    }
}
