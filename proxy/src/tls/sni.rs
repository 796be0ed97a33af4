//! Reading the server name from a ClientHello without terminating TLS (`tls-passthrough`).
//!
//! The handshake records holding the ClientHello are read (and joined when the message is
//! split across several); the bytes read are returned so they can be sent to the upstream
//! unchanged.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest record accepted: a TLS record is at most 16 KiB plus its header.
const MAX_RECORD: usize = 5 + 16 * 1024;
/// Most bytes of records read to reassemble one ClientHello.
const MAX_HELLO: usize = 64 * 1024;

/// What the first bytes of a connection said.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello, with its server name if it has one (lower-case).
    ClientHello(Option<String>),
    /// Not a TLS ClientHello.
    NotTls,
}

/// Reads the first TLS record from `stream` (within `timeout`) and parses its ClientHello.
/// Returns what was read, to be forwarded, and what it said.
pub async fn peek_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> std::io::Result<(Vec<u8>, Hello)> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        loop {
            match parse(&buf) {
                Parse::Done(hello) => return Ok(hello),
                Parse::Need(n) => {
                    let want = n
                        .min(MAX_HELLO + MAX_RECORD)
                        .saturating_sub(buf.len())
                        .max(1);
                    let start = buf.len();
                    buf.resize(start + want, 0);
                    let got = stream.read(&mut buf[start..]).await?;
                    buf.truncate(start + got);
                    if got == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "connection closed before the ClientHello ended",
                        ));
                    }
                }
            }
        }
    };
    let hello = tokio::time::timeout(timeout, read).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "no ClientHello in time")
    })??;
    Ok((buf, hello))
}

enum Parse {
    Done(Hello),
    /// The record needs this many bytes in total.
    Need(usize),
}

fn parse(buf: &[u8]) -> Parse {
    // A ClientHello may be split across several handshake records (large key shares,
    // post-quantum hybrids, or a middlebox): their payloads are joined until the message
    // is complete or MAX_HELLO bytes were read.
    let mut message: Vec<u8> = Vec::new();
    let mut at = 0;
    loop {
        let record = &buf[at..];
        if record.len() < 5 {
            if !record.is_empty() && record[0] != 22 {
                return Parse::Done(Hello::NotTls);
            }
            return Parse::Need(at + 5);
        }
        if record[0] != 22 || record[1] != 3 {
            return Parse::Done(Hello::NotTls);
        }
        let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
        if len == 0 || 5 + len > MAX_RECORD {
            // Handshake records are never empty, nor over 16 KiB (RFC 8446 section 5.1).
            return Parse::Done(Hello::NotTls);
        }
        if record.len() < 5 + len {
            return Parse::Need(at + 5 + len);
        }
        let payload = &record[5..5 + len];
        at += 5 + len;
        let whole = if message.is_empty() && at == 5 + len {
            payload
        } else {
            message.extend_from_slice(payload);
            &message[..]
        };
        if whole.len() >= 4 {
            let wanted = 4
                + ((usize::from(whole[1]) << 16)
                    | (usize::from(whole[2]) << 8)
                    | usize::from(whole[3]));
            if whole.len() >= wanted || at >= MAX_HELLO {
                return Parse::Done(client_hello(whole).map_or(Hello::NotTls, Hello::ClientHello));
            }
        } else if at >= MAX_HELLO {
            return Parse::Done(Hello::NotTls);
        }
        if message.is_empty() {
            message.extend_from_slice(payload);
        }
    }
}

/// Fuzz entry point: the ClientHello parser on arbitrary bytes. It must never panic, ask
/// for more than it may read, or return a name that is not lower-case.
pub fn fuzz_client_hello(data: &[u8]) {
    match parse(data) {
        Parse::Need(n) => assert!(n > data.len() && n <= MAX_HELLO + MAX_RECORD),
        Parse::Done(Hello::ClientHello(Some(name))) => {
            assert_eq!(name, name.to_ascii_lowercase());
        }
        Parse::Done(_) => {}
    }
}

/// A cursor over a byte slice that fails instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The server name of a ClientHello handshake message (`None` inside: no SNI extension).
/// The outer `None` means the message is not a well-formed ClientHello.
fn client_hello(record: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None;
    }
    let length = r.take(3)?;
    let length =
        (usize::from(length[0]) << 16) | (usize::from(length[1]) << 8) | usize::from(length[2]);
    // A ClientHello longer than the record continues in the next one; its extensions
    // then may be cut, and whatever is here is parsed.
    let body = r.0.get(..length.min(r.0.len()))?;
    let mut r = Reader(body);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let Some(extensions) = r.vec16() else {
        return Some(None);
    };
    let mut ext = Reader(extensions);
    while !ext.0.is_empty() {
        let kind = ext.u16()?;
        let data = ext.vec16()?;
        if kind == 0 {
            let mut list = Reader(Reader(data).vec16()?);
            while !list.0.is_empty() {
                let name_type = list.u8()?;
                let name = list.vec16()?;
                if name_type == 0 {
                    let name = std::str::from_utf8(name).ok()?;
                    return Some(Some(name.trim_end_matches('.').to_ascii_lowercase()));
                }
            }
        }
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello produced by rustls for `name`.
    fn hello_bytes(name: &str) -> Vec<u8> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
        let mut conn =
            rustls::ClientConnection::new(std::sync::Arc::new(config), server_name).expect("conn");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("write");
        out
    }

    #[tokio::test]
    async fn reads_sni_from_a_real_client_hello_split_in_pieces() {
        let bytes = hello_bytes("Shop.Example.COM");
        let (mut a, mut b) = tokio::io::duplex(64);
        let sent = bytes.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in sent.chunks(7) {
                let _ = a.write_all(chunk).await;
            }
            // Keep the stream open: the parser must stop at the end of the record.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let (read, hello) = peek_client_hello(&mut b, Duration::from_secs(5))
            .await
            .expect("hello");
        assert_eq!(hello, Hello::ClientHello(Some("shop.example.com".into())));
        assert_eq!(read, bytes);
    }

    #[test]
    fn plain_http_is_not_tls() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n"),
            Parse::Done(Hello::NotTls)
        ));
    }

    /// The handshake message of `record` re-cut into records of at most `size` bytes.
    fn split_records(record: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in record[5..].chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&u16::try_from(piece.len()).expect("small").to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    #[test]
    fn a_client_hello_split_across_records_is_joined() {
        let bytes = hello_bytes("split.example");
        for size in [1, 20, 100, 200] {
            let split = split_records(&bytes, size);
            match parse(&split) {
                Parse::Done(hello) => assert_eq!(
                    hello,
                    Hello::ClientHello(Some("split.example".into())),
                    "{size}"
                ),
                Parse::Need(n) => panic!("wants {n} of {} bytes", split.len()),
            }
            for cut in 0..split.len() {
                fuzz_client_hello(&split[..cut]);
            }
        }
    }

    #[test]
    fn truncated_garbage_does_not_panic() {
        let bytes = hello_bytes("a.example");
        for cut in 0..bytes.len() {
            let mut partial = bytes[..cut].to_vec();
            if partial.len() >= 5 {
                let len = u16::try_from(partial.len() - 5).expect("small");
                partial[3..5].copy_from_slice(&len.to_be_bytes());
            }
            let _ = parse(&partial);
        }
    }
}
