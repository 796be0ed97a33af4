//! The handoff conversation on the wire: newline-terminated text lines, and descriptors
//! sent as SCM_RIGHTS on one-byte messages (so a line read never swallows them).

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
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
/// Longest line accepted.
const MAX_LINE: usize = 1 << 20;

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

#[derive(Serialize, Deserialize)]
struct Offer {
    revision: u64,
    sockets: Vec<(String, SocketKind)>,
    /// Extra state by key (absent from older processes).
    #[serde(default)]
    data: BTreeMap<String, String>,
}

/// One end of the handoff connection (blocking I/O with deadlines).
pub(super) struct Conn {
    stream: UnixStream,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Conn {
    pub(super) fn new(stream: UnixStream) -> io::Result<Conn> {
        stream.set_nonblocking(false)?;
        Ok(Conn { stream })
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

    fn read_line(&mut self, deadline: Instant) -> io::Result<String> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            self.arm(deadline)?;
            match self.stream.read(&mut byte)? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the handoff connection",
                    ))
                }
                _ if byte[0] == b'\n' => break,
                _ => line.push(byte[0]),
            }
            if line.len() > MAX_LINE {
                return Err(bad("handoff line too long"));
            }
        }
        String::from_utf8(line).map_err(|_| bad("handoff line is not UTF-8"))
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        self.stream.write_all(line.as_bytes())?;
        self.stream.write_all(b"\n")
    }

    pub(super) fn send_hello(&mut self) -> io::Result<()> {
        self.write_line(&format!("HELLO {}", std::process::id()))
    }

    pub(super) fn expect_hello(&mut self, deadline: Instant) -> io::Result<()> {
        let line = self.read_line(deadline)?;
        if line.starts_with("HELLO ") {
            Ok(())
        } else {
            Err(bad(format!("expected HELLO, got {line:?}")))
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
        revision: u64,
        sockets: &[NamedSocket],
        data: BTreeMap<String, String>,
    ) -> io::Result<()> {
        let offer = Offer {
            revision,
            sockets: sockets.iter().map(|(n, k, _)| (n.clone(), *k)).collect(),
            data,
        };
        let json = serde_json::to_string(&offer).map_err(|e| bad(e.to_string()))?;
        self.write_line(&format!("SOCKETS {json}"))?;
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
        let line = self.read_line(deadline)?;
        let json = line
            .strip_prefix("SOCKETS ")
            .ok_or_else(|| bad(format!("expected SOCKETS, got {line:?}")))?;
        let offer: Offer = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let mut fds: Vec<OwnedFd> = Vec::with_capacity(offer.sockets.len());
        while fds.len() < offer.sockets.len() {
            self.arm(deadline)?;
            let mut byte = [0u8; 1];
            let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(BATCH))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let got = recvmsg(
                &self.stream,
                &mut [IoSliceMut::new(&mut byte)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            if got.bytes == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed before sending every socket",
                ));
            }
            let before = fds.len();
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = message {
                    fds.extend(received);
                }
            }
            if fds.len() == before {
                return Err(bad("a descriptor message carried no descriptors"));
            }
        }
        if fds.len() != offer.sockets.len() {
            return Err(bad(format!(
                "expected {} descriptors, got {}",
                offer.sockets.len(),
                fds.len()
            )));
        }
        let sockets = offer
            .sockets
            .into_iter()
            .zip(fds)
            .map(|((name, kind), fd)| (name, kind, fd))
            .collect();
        Ok((offer.revision, sockets, offer.data))
    }
}
