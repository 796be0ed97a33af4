//! The handoff conversation on the wire.
//!
//! The child opens with the text line `HELLO <pid> frames` and ends with `READY`. Between
//! them the parent sends its offer as length-prefixed frames: the [`FRAMES`] marker, a
//! header frame (JSON: revision, socket names and kinds, data keys), one frame per data
//! value (its bytes as they are, no escaping), then the descriptors as SCM_RIGHTS on
//! one-byte messages of [`BATCH`] descriptors each. Every read goes through `recvmsg` into
//! a buffer, so a read never swallows descriptors and never costs a syscall per byte.
//!
//! Older processes spoke lines only (`SOCKETS <json>` with the data as JSON strings): a
//! child reads that form too (upgrading from an older proxyd), and a parent whose child's
//! `HELLO` does not say `frames` answers in it (going back to an older proxyd).

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// Descriptors per SCM_RIGHTS message.
const BATCH: usize = 16;
/// Longest text line accepted (`HELLO`, `READY`, and the older `SOCKETS` line).
const MAX_LINE: usize = 1 << 20;
/// Largest frame accepted (the registered routes with their certificates travel in one).
const MAX_FRAME: usize = 256 << 20;
/// Bytes asked for per read.
const READ_CHUNK: usize = 64 * 1024;
/// First bytes of a framed offer; an older parent's offer starts with `S` instead.
const FRAMES: &[u8; 4] = b"\0PXF";
/// The word a child's `HELLO` carries when it reads framed offers.
const FRAMES_WORD: &str = "frames";

/// What kind of listening socket a descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketKind {
    /// A TCP listener.
    Tcp,
    /// A unix-domain listener.
    Unix,
}

/// A named socket as it travels: name, kind, descriptor.
pub(super) type NamedSocket = (String, SocketKind, OwnedFd);

/// The header frame of a framed offer.
#[derive(Serialize, Deserialize)]
struct Header {
    revision: u64,
    sockets: Vec<(String, SocketKind)>,
    /// Keys of the data frames that follow, in order.
    data: Vec<String>,
}

/// The offer as older processes send it on one line.
#[derive(Serialize, Deserialize)]
struct LineOffer {
    revision: u64,
    sockets: Vec<(String, SocketKind)>,
    #[serde(default)]
    data: BTreeMap<String, String>,
}

/// What the child's `HELLO` said about the offer it can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OfferForm {
    /// Length-prefixed frames.
    Frames,
    /// One `SOCKETS` line (older proxyd).
    Line,
}

/// One end of the handoff connection (blocking I/O with deadlines).
pub(super) struct Conn {
    stream: UnixStream,
    /// Received bytes; `buf[start..]` are not consumed yet.
    buf: Vec<u8>,
    start: usize,
    /// Descriptors received so far, in order.
    fds: VecDeque<OwnedFd>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Conn {
    pub(super) fn new(stream: UnixStream) -> io::Result<Conn> {
        stream.set_nonblocking(false)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            start: 0,
            fds: VecDeque::new(),
        })
    }

    fn arm(&self, deadline: Instant) -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handoff deadline passed",
            ));
        }
        self.stream.set_read_timeout(Some(left))
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Receives more bytes (and any descriptors riding on them) into the buffer.
    fn fill(&mut self, deadline: Instant) -> io::Result<()> {
        self.arm(deadline)?;
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let used = self.buf.len();
        self.buf.resize(used + READ_CHUNK, 0);
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = recvmsg(
            &self.stream,
            &mut [IoSliceMut::new(&mut self.buf[used..])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        );
        let got = match received {
            Ok(got) => got,
            Err(e) => {
                self.buf.truncate(used);
                return Err(e.into());
            }
        };
        self.buf.truncate(used + got.bytes);
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                self.fds.extend(received);
            }
        }
        if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(bad("descriptors were cut off in transit"));
        }
        if got.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the handoff connection",
            ));
        }
        Ok(())
    }

    /// Consumes exactly `n` bytes.
    fn take(&mut self, n: usize, deadline: Instant) -> io::Result<Vec<u8>> {
        while self.pending().len() < n {
            self.fill(deadline)?;
        }
        let out = self.pending()[..n].to_vec();
        self.start += n;
        Ok(out)
    }

    /// The next byte, not consumed.
    fn peek(&mut self, deadline: Instant) -> io::Result<u8> {
        while self.pending().is_empty() {
            self.fill(deadline)?;
        }
        Ok(self.pending()[0])
    }

    fn read_line(&mut self, deadline: Instant) -> io::Result<String> {
        let mut scanned = 0;
        loop {
            if let Some(at) = self.pending()[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + at;
                let line = self.pending()[..end].to_vec();
                self.start += end + 1;
                return String::from_utf8(line).map_err(|_| bad("handoff line is not UTF-8"));
            }
            scanned = self.pending().len();
            if scanned > MAX_LINE {
                return Err(bad("handoff line too long"));
            }
            self.fill(deadline)?;
        }
    }

    fn read_frame(&mut self, deadline: Instant) -> io::Result<Vec<u8>> {
        let head = self.take(4, deadline)?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > MAX_FRAME {
            return Err(bad(format!("handoff frame of {len} bytes is too large")));
        }
        self.take(len, deadline)
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        self.stream.write_all(format!("{line}\n").as_bytes())
    }

    pub(super) fn send_hello(&mut self) -> io::Result<()> {
        self.write_line(&format!("HELLO {} {FRAMES_WORD}", std::process::id()))
    }

    /// Reads the child's `HELLO`: which offer form it reads.
    pub(super) fn expect_hello(&mut self, deadline: Instant) -> io::Result<OfferForm> {
        let line = self.read_line(deadline)?;
        let Some(rest) = line.strip_prefix("HELLO ") else {
            return Err(bad(format!("expected HELLO, got {line:?}")));
        };
        if rest.split_whitespace().any(|w| w == FRAMES_WORD) {
            Ok(OfferForm::Frames)
        } else {
            Ok(OfferForm::Line)
        }
    }

    pub(super) fn send_ready(&mut self) -> io::Result<()> {
        self.write_line("READY")
    }

    pub(super) fn expect_ready(&mut self, deadline: Instant) -> io::Result<()> {
        let line = self.read_line(deadline)?;
        if line == "READY" {
            Ok(())
        } else {
            Err(bad(format!("expected READY, got {line:?}")))
        }
    }

    pub(super) fn send_sockets(
        &mut self,
        form: OfferForm,
        revision: u64,
        sockets: &[NamedSocket],
        data: BTreeMap<String, String>,
    ) -> io::Result<()> {
        let names: Vec<(String, SocketKind)> =
            sockets.iter().map(|(n, k, _)| (n.clone(), *k)).collect();
        let message = match form {
            OfferForm::Frames => framed_offer(revision, names, data)?,
            OfferForm::Line => {
                let offer = LineOffer {
                    revision,
                    sockets: names,
                    data,
                };
                let json = serde_json::to_string(&offer).map_err(|e| bad(e.to_string()))?;
                format!("SOCKETS {json}\n").into_bytes()
            }
        };
        self.stream.write_all(&message)?;
        for batch in sockets.chunks(BATCH) {
            let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, _, fd)| fd.as_fd()).collect();
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(bad("descriptor batch does not fit"));
            }
            let sent = sendmsg(
                &self.stream,
                &[IoSlice::new(b"F")],
                &mut control,
                SendFlags::empty(),
            )?;
            if sent != 1 {
                return Err(bad("short write of a descriptor batch"));
            }
        }
        Ok(())
    }

    pub(super) fn receive_sockets(
        &mut self,
        deadline: Instant,
    ) -> io::Result<(u64, Vec<NamedSocket>, BTreeMap<String, String>)> {
        let (revision, names, data) = if self.peek(deadline)? == FRAMES[0] {
            let marker = self.take(FRAMES.len(), deadline)?;
            if marker != FRAMES {
                return Err(bad("unknown handoff offer"));
            }
            let header: Header = serde_json::from_slice(&self.read_frame(deadline)?)
                .map_err(|e| bad(format!("handoff header: {e}")))?;
            let mut data = BTreeMap::new();
            for key in header.data {
                let value = String::from_utf8(self.read_frame(deadline)?)
                    .map_err(|_| bad(format!("handoff data {key:?} is not UTF-8")))?;
                data.insert(key, value);
            }
            (header.revision, header.sockets, data)
        } else {
            let line = self.read_line(deadline)?;
            let json = line
                .strip_prefix("SOCKETS ")
                .ok_or_else(|| bad(format!("expected SOCKETS, got {line:?}")))?;
            let offer: LineOffer = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
            (offer.revision, offer.sockets, offer.data)
        };
        // One marker byte per descriptor batch; the descriptors ride on them.
        let batches = names.len().div_ceil(BATCH);
        let markers = self.take(batches, deadline)?;
        if markers.iter().any(|&b| b != b'F') {
            return Err(bad("expected descriptor markers"));
        }
        if self.fds.len() != names.len() {
            return Err(bad(format!(
                "expected {} descriptors, got {}",
                names.len(),
                self.fds.len()
            )));
        }
        let sockets = names
            .into_iter()
            .zip(self.fds.drain(..))
            .map(|((name, kind), fd)| (name, kind, fd))
            .collect();
        Ok((revision, sockets, data))
    }
}

/// A fuzzing entry: `data` as the bytes that arrive on a handoff connection (without
/// descriptors), read the three ways a process reads its peer: as an offer by the child,
/// as `HELLO` and as `READY` by the parent. Each read ends with a value or an error (the
/// sender closes after `data`), never a panic; an offer that is read whole names no socket,
/// since no descriptor came with it.
#[doc(hidden)]
pub fn fuzz_read(data: &[u8]) {
    fn read_with<T>(
        data: &[u8],
        read: impl FnOnce(&mut Conn, Instant) -> io::Result<T>,
    ) -> Option<T> {
        let (sender, receiver) = UnixStream::pair().expect("socketpair");
        let bytes = data.to_vec();
        let writer = std::thread::spawn(move || {
            // The reader may stop early and close: the write then fails (EPIPE, without the
            // signal, which a fuzzing harness does not ignore), as expected.
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                match rustix::net::send(&sender, rest, SendFlags::NOSIGNAL) {
                    Ok(sent) => rest = &rest[sent..],
                    Err(_) => break,
                }
            }
        });
        let mut conn = Conn::new(receiver).expect("blocking socket");
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let result = read(&mut conn, deadline);
        drop(conn);
        writer.join().expect("writer thread");
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                assert_ne!(
                    e.kind(),
                    io::ErrorKind::TimedOut,
                    "a read waited for bytes after EOF"
                );
                None
            }
        }
    }
    if let Some((_, sockets, _)) = read_with(data, |c, d| c.receive_sockets(d)) {
        assert!(sockets.is_empty(), "sockets without descriptors");
    }
    read_with(data, |c, d| c.expect_hello(d));
    read_with(data, |c, d| c.expect_ready(d));
}

/// The framed offer up to the descriptors: marker, header frame, data frames.
fn framed_offer(
    revision: u64,
    sockets: Vec<(String, SocketKind)>,
    data: BTreeMap<String, String>,
) -> io::Result<Vec<u8>> {
    let header = Header {
        revision,
        sockets,
        data: data.keys().cloned().collect(),
    };
    let header = serde_json::to_vec(&header).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::with_capacity(
        FRAMES.len() + 4 + header.len() + data.values().map(|v| 4 + v.len()).sum::<usize>(),
    );
    out.extend_from_slice(FRAMES);
    for frame in std::iter::once(header.as_slice()).chain(data.values().map(|v| v.as_bytes())) {
        if frame.len() > MAX_FRAME {
            return Err(bad(format!(
                "handoff frame of {} bytes is too large",
                frame.len()
            )));
        }
        let len = u32::try_from(frame.len()).map_err(|_| bad("handoff frame too large"))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(frame);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Conn, Conn) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (Conn::new(a).expect("conn"), Conn::new(b).expect("conn"))
    }

    fn sockets(n: usize) -> Vec<NamedSocket> {
        (0..n)
            .map(|i| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                (format!("s{i}"), SocketKind::Tcp, OwnedFd::from(l))
            })
            .collect()
    }

    fn soon() -> Instant {
        Instant::now() + std::time::Duration::from_secs(10)
    }

    #[test]
    fn a_large_framed_offer_arrives_whole_with_every_descriptor() {
        let (mut parent, mut child) = pair();
        // Bigger than the old 1 MiB line, with bytes JSON would have to escape.
        let big = "\"quoted\"\n\\".repeat(300_000);
        let data: BTreeMap<String, String> = [
            ("routes".to_string(), big.clone()),
            ("x".into(), String::new()),
        ]
        .into();
        let offered = sockets(40);
        let ports: Vec<u16> = offered
            .iter()
            .map(|(_, _, fd)| {
                std::net::TcpListener::from(fd.try_clone().expect("dup"))
                    .local_addr()
                    .expect("addr")
                    .port()
            })
            .collect();
        let sender = std::thread::spawn(move || {
            let form = parent.expect_hello(soon()).expect("hello");
            assert_eq!(form, OfferForm::Frames);
            parent.send_sockets(form, 7, &offered, data).expect("send");
            parent.expect_ready(soon()).expect("ready");
        });
        child.send_hello().expect("hello");
        let (revision, received, data) = child.receive_sockets(soon()).expect("receive");
        child.send_ready().expect("ready");
        sender.join().expect("sender");
        assert_eq!(revision, 7);
        assert_eq!(data.get("routes"), Some(&big));
        assert_eq!(data.get("x").map(String::as_str), Some(""));
        let got: Vec<u16> = received
            .into_iter()
            .map(|(_, _, fd)| {
                std::net::TcpListener::from(fd)
                    .local_addr()
                    .expect("addr")
                    .port()
            })
            .collect();
        assert_eq!(got, ports);
    }

    #[test]
    fn a_child_reads_the_line_offer_of_an_older_parent() {
        let (mut parent, mut child) = pair();
        let offered = sockets(17);
        let data: BTreeMap<String, String> = [("k".to_string(), "{\"a\":1}".to_string())].into();
        let sender = std::thread::spawn(move || {
            let _ = parent.read_line(soon()).expect("hello");
            parent
                .send_sockets(OfferForm::Line, 3, &offered, data)
                .expect("send");
        });
        child.send_hello().expect("hello");
        let (revision, received, data) = child.receive_sockets(soon()).expect("receive");
        sender.join().expect("sender");
        assert_eq!(revision, 3);
        assert_eq!(received.len(), 17);
        assert_eq!(data.get("k").map(String::as_str), Some("{\"a\":1}"));
    }

    #[test]
    fn an_older_child_gets_the_line_offer() {
        let (mut parent, mut child) = pair();
        child.write_line("HELLO 42").expect("hello");
        assert_eq!(parent.expect_hello(soon()).expect("hello"), OfferForm::Line);
    }

    #[test]
    fn a_truncated_offer_is_an_error_not_a_hang() {
        let (mut parent, mut child) = pair();
        let mut bytes = FRAMES.to_vec();
        bytes.extend_from_slice(&1000u32.to_be_bytes());
        bytes.extend_from_slice(b"{\"rev");
        parent.stream.write_all(&bytes).expect("write");
        drop(parent);
        let err = child.receive_sockets(soon()).expect_err("truncated");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
