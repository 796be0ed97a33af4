//! Hostile request framing and authorities, sent byte for byte over raw sockets, against an
//! upstream that parses what reaches it strictly and records every request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the recording upstream parsed it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

#[derive(Default)]
struct Record {
    requests: Vec<Seen>,
    /// Requests whose framing a strict HTTP/1.1 parser finds ambiguous or invalid.
    violations: Vec<String>,
}

/// A raw HTTP/1.1 upstream: parses each request strictly (CRLF only, one framing header,
/// `Transfer-Encoding` exactly `chunked`, no look-alike framing header names, strict
/// chunks), records it and answers `200` with an empty body.
struct Recorder {
    addr: std::net::SocketAddr,
    record: Arc<Mutex<Record>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    fn requests(&self) -> Vec<Seen> {
        self.record.lock().unwrap().requests.clone()
    }

    fn violations(&self) -> Vec<String> {
        self.record.lock().unwrap().violations.clone()
    }
}

async fn recorder() -> Recorder {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = Arc::new(Mutex::new(Record::default()));
    let shared = record.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let record = shared.clone();
            tokio::spawn(async move {
                let mut conn = StrictConn {
                    stream,
                    buf: Vec::new(),
                };
                loop {
                    match conn.next_request().await {
                        Ok(Some(seen)) => {
                            record.lock().unwrap().requests.push(seen);
                            if conn
                                .stream
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Ok(None) => return,
                        // A request the proxy abandoned half way is no framing fault.
                        Err(cut) if cut.starts_with(CUT) => return,
                        Err(violation) => {
                            record.lock().unwrap().violations.push(violation);
                            return;
                        }
                    }
                }
            });
        }
    });
    Recorder { addr, record, task }
}

/// Prefix of the errors that mean the connection ended mid-message.
const CUT: &str = "cut short";

struct StrictConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl StrictConn {
    /// More bytes; `false` at end of stream.
    async fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(20), self.stream.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
            _ => false,
        }
    }

    async fn take(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            if !self.fill().await {
                return Err(format!("{CUT}: body"));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn line(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.len() < 2 || line[line.len() - 2] != b'\r' {
                    return Err(format!("bare LF: {:?}", String::from_utf8_lossy(&line)));
                }
                return Ok(line[..line.len() - 2].to_vec());
            }
            if !self.fill().await {
                return Err(format!("{CUT}: line"));
            }
        }
    }

    async fn next_request(&mut self) -> Result<Option<Seen>, String> {
        if self.buf.is_empty() && !self.fill().await {
            return Ok(None);
        }
        let request_line = String::from_utf8(self.line().await?).map_err(|e| e.to_string())?;
        let parts: Vec<&str> = request_line.split(' ').collect();
        if parts.len() != 3 || parts[2] != "HTTP/1.1" {
            return Err(format!("request line {request_line:?}"));
        }
        let path = parts[1].to_string();
        let mut headers = Vec::new();
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                break;
            }
            let text = String::from_utf8(line).map_err(|e| format!("{path}: {e}"))?;
            let (name, value) = text
                .split_once(':')
                .ok_or_else(|| format!("{path}: header line without colon {text:?}"))?;
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
            {
                return Err(format!("{path}: header name {name:?}"));
            }
            if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                return Err(format!("{path}: control byte in {name}"));
            }
            let folded = name.to_ascii_lowercase().replace('_', "-");
            if folded != name.to_ascii_lowercase()
                && [
                    "content-length",
                    "transfer-encoding",
                    "connection",
                    "te",
                    "upgrade",
                ]
                .contains(&folded.as_str())
            {
                return Err(format!("{path}: look-alike framing header {name:?}"));
            }
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let lengths: Vec<&String> = headers
            .iter()
            .filter(|(k, _)| k == "content-length")
            .map(|(_, v)| v)
            .collect();
        let codings: Vec<&String> = headers
            .iter()
            .filter(|(k, _)| k == "transfer-encoding")
            .map(|(_, v)| v)
            .collect();
        if lengths.len() > 1 || codings.len() > 1 || (!lengths.is_empty() && !codings.is_empty()) {
            return Err(format!("{path}: ambiguous framing {lengths:?} {codings:?}"));
        }
        let body = if let Some(coding) = codings.first() {
            if coding.as_str() != "chunked" {
                return Err(format!("{path}: Transfer-Encoding {coding:?}"));
            }
            let mut body = Vec::new();
            loop {
                let line = String::from_utf8(self.line().await?).map_err(|e| e.to_string())?;
                if line.is_empty() || !line.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!("{path}: chunk size line {line:?}"));
                }
                let size = usize::from_str_radix(&line, 16).map_err(|e| format!("{path}: {e}"))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    while !self.line().await?.is_empty() {}
                    break;
                }
                body.extend(self.take(size).await?);
                if !self.line().await?.is_empty() {
                    return Err(format!("{path}: chunk data longer than its size"));
                }
            }
            body
        } else if let Some(length) = lengths.first() {
            if length.is_empty() || !length.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("{path}: Content-Length {length:?}"));
            }
            let n: usize = length.parse().map_err(|e| format!("{path}: {e}"))?;
            self.take(n).await?
        } else {
            Vec::new()
        };
        Ok(Some(Seen {
            path,
            headers,
            body,
        }))
    }
}

/// A proxy whose listener `web` sends everything to `up`, with a body limit so that huge
/// declared lengths are answered quickly.
async fn proxy_to_recorder(up: &Recorder) -> TestProxy {
    start_proxy(&format!(
        "[[listeners]]\nname=\"web\"\nprotocol=\"http\"\naddress=\"127.0.0.1:0\"\nmax_body_bytes=1000000\n\
         [[pools]]\nname=\"p\"\nupstreams=[\"{}\"]\n\
         [[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"p\"\n",
        up.addr
    ))
    .await
}

/// Sends `bytes` and collects the status of every response until the proxy closes the
/// connection (or stays silent for a while, as it may wait for a body that never comes).
async fn statuses(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u16> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&tmp[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&buf);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12).and_then(|s| s.parse().ok()))
        .collect()
}

/// One mutated request: its header lines (each with its own line ending) and body.
struct Mutation {
    label: String,
    headers: String,
    body: String,
    /// Both a length and a coding are declared (under any spelling): must be refused.
    both: bool,
}

fn mutations() -> Vec<Mutation> {
    let chunked_body = "5\r\nhello\r\n0\r\n\r\n";
    let te_names = [
        "Transfer-Encoding",
        "transfer-encoding",
        "TRANSFER-ENCODING",
        "Transfer_Encoding",
        "transfer_encoding",
        "Transfer-Encoding ",
        "Transfer-Encoding\t",
        " Transfer-Encoding",
        "Transfer-Encoding\x00",
        "Transfer\x0bEncoding",
    ];
    let te_values = [
        "chunked",
        "Chunked",
        "CHUNKED",
        " chunked",
        "\tchunked",
        "chunked ",
        "chunked\t",
        "chunked, identity",
        "identity, chunked",
        "gzip, chunked",
        "chunked, chunked",
        ",chunked",
        "xchunked",
        "chunkedx",
        "chunk",
        "\"chunked\"",
        "chunked\x00",
        "chu\x00nked",
        "chunked\x0b",
        "chunked\x7f",
        "\x0cchunked",
        "ch\u{00fc}nked",
        "identity",
        "",
    ];
    let cl_values = [
        "5",
        "05",
        "0000005",
        "+5",
        "-5",
        " 5",
        "5 ",
        "5, 5",
        "5,5",
        "5, 6",
        "0x5",
        "5.0",
        "1e1",
        "5\x00",
        "99999999999999999999999",
        "18446744073709551616",
        "1000001",
        "",
    ];
    let mut out = Vec::new();
    for name in te_names {
        for value in te_values {
            out.push(Mutation {
                label: format!("TE {name:?}: {value:?}"),
                headers: format!("{name}: {value}\r\n"),
                body: chunked_body.into(),
                both: false,
            });
            out.push(Mutation {
                label: format!("CL.TE {name:?}: {value:?}"),
                headers: format!("Content-Length: 5\r\n{name}: {value}\r\n"),
                body: chunked_body.into(),
                both: true,
            });
        }
        out.push(Mutation {
            label: format!("TE.CL {name:?}"),
            headers: format!("{name}: chunked\r\nContent-Length: 5\r\n"),
            body: chunked_body.into(),
            both: true,
        });
        out.push(Mutation {
            label: format!("TE.CL_ {name:?}"),
            headers: format!("{name}: chunked\r\nContent_Length: 5\r\n"),
            body: chunked_body.into(),
            both: true,
        });
    }
    for value in cl_values {
        out.push(Mutation {
            label: format!("CL {value:?}"),
            headers: format!("Content-Length: {value}\r\n"),
            body: "hello".into(),
            both: false,
        });
        out.push(Mutation {
            label: format!("CL dup {value:?}"),
            headers: format!("Content-Length: 5\r\nContent-Length: {value}\r\n"),
            body: "hello".into(),
            both: false,
        });
        out.push(Mutation {
            label: format!("TE.CL {value:?}"),
            headers: format!("Transfer-Encoding: chunked\r\nContent-Length: {value}\r\n"),
            body: chunked_body.into(),
            both: true,
        });
    }
    // Duplicated and folded codings.
    for (label, headers, both) in [
        (
            "TE twice",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            false,
        ),
        (
            "TE chunked then identity",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            false,
        ),
        (
            "TE identity then chunked",
            "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
            false,
        ),
        ("TE obs-fold", "Transfer-Encoding:\r\n chunked\r\n", false),
        (
            "TE obs-fold with CL",
            "Content-Length: 5\r\nTransfer-Encoding: identity\r\n chunked\r\n",
            true,
        ),
        ("CL obs-fold", "Content-Length:\r\n 5\r\n", false),
        ("TE bare LF", "Transfer-Encoding: chunked\n", false),
        (
            "CL.TE bare LF",
            "Content-Length: 5\nTransfer-Encoding: chunked\n",
            true,
        ),
        (
            "CL.TE bare CR",
            "Content-Length: 5\rTransfer-Encoding: chunked\r\n",
            true,
        ),
        (
            "TE NUL line",
            "X: a\x00\r\nTransfer-Encoding: chunked\r\n",
            false,
        ),
        (
            "TE in header value only",
            "X: y\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            true,
        ),
        (
            "CL_ and TE_",
            "Content_Length: 5\r\nTransfer_Encoding: chunked\r\n",
            true,
        ),
        (
            "CL with TE_",
            "Content-Length: 5\r\nTransfer_Encoding: chunked\r\n",
            true,
        ),
        (
            "TE with CL_",
            "Transfer-Encoding: chunked\r\nContent_Length: 5\r\n",
            true,
        ),
    ] {
        out.push(Mutation {
            label: label.into(),
            headers: headers.into(),
            body: chunked_body.into(),
            both,
        });
    }
    // Chunk extensions and invalid chunk sizes.
    for body in [
        "5;ext=1\r\nhello\r\n0\r\n\r\n",
        "5;ext=\"a\\\"b\"\r\nhello\r\n0\r\n\r\n",
        "5 \r\nhello\r\n0\r\n\r\n",
        "5\t;x\r\nhello\r\n0\r\n\r\n",
        " 5\r\nhello\r\n0\r\n\r\n",
        "0x5\r\nhello\r\n0\r\n\r\n",
        "-5\r\nhello\r\n0\r\n\r\n",
        "+5\r\nhello\r\n0\r\n\r\n",
        "5\nhello\n0\n\n",
        "5\rhello\r\n0\r\n\r\n",
        "5;x\nhello\r\n0\r\n\r\n",
        "ffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        "0000000000000000005\r\nhello\r\n0\r\n\r\n",
        "5\r\nhelloXX0\r\n\r\n",
        "5\r\nhell\r\n0\r\n\r\n",
        "3\r\nhello\r\n0\r\n\r\n",
        "g\r\nhello\r\n0\r\n\r\n",
        "5\r\nhello\r\n0\r\nContent-Length: 7\r\n\r\n",
        "5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n",
        "5\r\nhello\r\n0\r\n",
        "5\r\nhello\r\n0\n\n",
        "5\x00\r\nhello\r\n0\r\n\r\n",
    ] {
        out.push(Mutation {
            label: format!("chunks {body:?}"),
            headers: "Transfer-Encoding: chunked\r\n".into(),
            body: body.into(),
            both: false,
        });
    }
    out
}

/// The hidden-corpus property: whatever the client sends, nothing reaches the upstream with
/// ambiguous framing, a request declaring two lengths (under any spelling) reaches nothing,
/// and a refused request takes nothing smuggled behind it along.
#[tokio::test]
async fn mutated_framing_never_reaches_the_upstream_ambiguously() {
    let up = recorder().await;
    let p = proxy_to_recorder(&up).await;
    let web = p.addr("web");
    let cases = mutations();
    let mut results = Vec::new();
    for batch in cases.chunks(32).enumerate() {
        let (b, batch) = batch;
        let mut tasks = Vec::new();
        for (j, m) in batch.iter().enumerate() {
            let i = b * 32 + j;
            let bytes = format!(
                "POST /m{i} HTTP/1.1\r\nHost: h\r\n{}\r\n{}GET /s{i} HTTP/1.1\r\nHost: h\r\n\r\nGET /e{i} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
                m.headers, m.body
            );
            tasks.push(tokio::spawn(async move {
                (i, statuses(web, bytes.as_bytes()).await)
            }));
        }
        for t in tasks {
            results.push(t.await.unwrap());
        }
    }
    let violations = up.violations();
    assert!(
        violations.is_empty(),
        "ambiguous requests reached the upstream: {violations:#?}"
    );
    let seen = up.requests();
    let reached = |path: &str| seen.iter().any(|s| s.path == path);
    let mut refused = 0;
    for (i, got) in results {
        let m = &cases[i];
        assert!(!got.is_empty(), "{}: no answer at all", m.label);
        if m.both {
            assert_eq!(got[0], 400, "{}: {got:?}", m.label);
            assert!(
                !reached(&format!("/m{i}")) && !reached(&format!("/s{i}")),
                "{}: forwarded",
                m.label
            );
        }
        if got[0] == 400 {
            refused += 1;
            assert_eq!(got.len(), 1, "{}: served after a refusal: {got:?}", m.label);
            assert!(
                !reached(&format!("/s{i}")) && !reached(&format!("/e{i}")),
                "{}: a request behind a refused one was forwarded",
                m.label
            );
        }
        // What was forwarded carries exactly the body the proxy framed.
        if let Some(s) = seen.iter().find(|s| s.path == format!("/m{i}")) {
            if m.body.starts_with("5\r\nhello\r\n0\r\n") || m.body == "hello" {
                assert_eq!(s.body, b"hello", "{}", m.label);
            }
        }
    }
    // Sanity: the corpus exercises both outcomes.
    assert!(refused > 50, "only {refused} refused");
    assert!(seen.len() > 50, "only {} forwarded", seen.len());
}

/// A head ending in bare LFs (which hyper accepts) with both lengths: the scanner used to
/// look only for CRLF CRLF and let it through as chunked.
#[tokio::test]
async fn bare_lf_head_with_both_lengths_is_refused() {
    let up = recorder().await;
    let p = proxy_to_recorder(&up).await;
    let got = statuses(
        p.addr("web"),
        b"POST /x HTTP/1.1\nHost: h\nContent-Length: 3\nTransfer-Encoding: chunked\n\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
    )
    .await;
    assert_eq!(got, [400]);
    assert!(up.requests().is_empty(), "{:?}", up.requests());
}

/// Several requests on one connection, the ambiguous one in the middle: only it is
/// refused, the one before is served, nothing after it is read.
#[tokio::test]
async fn the_refusal_belongs_to_the_ambiguous_request() {
    let up = recorder().await;
    let p = proxy_to_recorder(&up).await;
    let got = statuses(
        p.addr("web"),
        b"GET /a HTTP/1.1\nHost: h\n\nPOST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nPOST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\nGET /d HTTP/1.1\r\nHost: h\r\n\r\n",
    )
    .await;
    assert_eq!(got, [200, 200, 400]);
    let paths: Vec<String> = up.requests().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/a", "/b"]);
}

/// An upgrade request the upstream does not accept ends the connection, so the bytes behind
/// it (which the scanner no longer follows) are never read as requests.
#[tokio::test]
async fn a_refused_upgrade_closes_the_connection() {
    let up = recorder().await;
    let p = proxy_to_recorder(&up).await;
    let got = statuses(
        p.addr("web"),
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nPOST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(got, [200]);
    let paths: Vec<String> = up.requests().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/ws"]);
}

#[tokio::test]
async fn underscore_framing_headers_are_refused() {
    let up = recorder().await;
    let p = proxy_to_recorder(&up).await;
    for name in [
        "Transfer_Encoding",
        "Content_Length",
        "content_length",
        "Keep_Alive",
        "Proxy_Connection",
    ] {
        let got = statuses(
            p.addr("web"),
            format!("GET /x HTTP/1.1\r\nHost: h\r\n{name}: 5\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(got, [400], "{name}");
    }
    assert!(up.requests().is_empty());
    // Other names with underscores pass.
    let got = statuses(
        p.addr("web"),
        b"GET /ok HTTP/1.1\r\nHost: h\r\nX_Custom_Header: 1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got, [200]);
}

#[tokio::test]
async fn two_host_headers_are_refused() {
    let up = recorder().await;
    let p = proxy_to_recorder(&up).await;
    let got = statuses(
        p.addr("web"),
        b"GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got, [400]);
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn invalid_hosts_are_refused() {
    let up = recorder().await;
    let p = proxy_to_recorder(&up).await;
    for host in [
        "x\", for=6.6.6.6;host=\"y",
        "a b",
        "user@example.com",
        "example.com:http",
        "example.com:70000",
        "exa\"mple.com",
        "[::1",
        "a/b",
    ] {
        let got = statuses(
            p.addr("web"),
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(got, [400], "{host:?}");
    }
    let got = statuses(
        p.addr("web"),
        b"GET http://user@a.example/x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got, [400], "user info in the target");
    assert!(up.requests().is_empty(), "{:?}", up.requests());
}

fn header<'a>(seen: &'a Seen, name: &str) -> Vec<&'a str> {
    seen.headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[tokio::test]
async fn absolute_form_authority_replaces_host() {
    let up = recorder().await;
    let p = proxy_to_recorder(&up).await;
    let got = statuses(
        p.addr("web"),
        b"GET http://right.example:8080/x HTTP/1.1\r\nHost: wrong.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got, [200]);
    let seen = up.requests();
    assert_eq!(header(&seen[0], "host"), ["right.example:8080"]);
    assert_eq!(header(&seen[0], "x-forwarded-host"), ["right.example"]);
    assert_eq!(seen[0].path, "/x");
}

/// RFC 7239 parsing of one `Forwarded` element: its `for` values.
fn forwarded_for(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=').expect("pair");
        let name = name
            .trim_start_matches([';', ',', ' '])
            .to_ascii_lowercase();
        let (val, after) = if let Some(q) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &q[end..])
        } else {
            let end = after.find([';', ',']).unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        if name == "for" {
            out.push(val);
        }
        rest = after;
    }
    out
}

#[tokio::test]
async fn forwarded_cannot_be_forged_through_host() {
    let up = recorder().await;
    let p = proxy_to_recorder(&up).await;
    // Commas, semicolons and equals signs are valid in a reg-name; quoted, they stay inside
    // the host parameter.
    let got = statuses(
        p.addr("web"),
        b"GET /x HTTP/1.1\r\nHost: a,for=6.6.6.6;by=x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got, [200]);
    let seen = up.requests();
    let forwarded = header(&seen[0], "forwarded");
    assert_eq!(forwarded.len(), 1);
    assert_eq!(forwarded_for(forwarded[0]), ["127.0.0.1"], "{forwarded:?}");
}

/// HTTP/2: `:authority` wins over a differing Host, user info is refused, and two Host
/// fields are refused, as for HTTP/1.
#[tokio::test]
async fn http2_authority_follows_the_host_rules() {
    let up = recorder().await;
    let p = proxy_to_recorder(&up).await;
    let stream = TcpStream::connect(p.addr("web")).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let empty = http_body_util::Empty::<bytes::Bytes>::new;
    let req = http::Request::get("http://right.example/h2")
        .header("host", "wrong.example")
        .body(empty())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let req = http::Request::get("http://right.example/two")
        .header("host", "right.example")
        .header("host", "other.example")
        .body(empty())
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 400);
    let req = http::Request::get("http://user@right.example/userinfo")
        .body(empty())
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 400);
    let seen = up.requests();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/h2"]);
    assert_eq!(header(&seen[0], "host"), ["right.example"]);
}

/// `nc -N` and some health checkers send a request and shut their write side down; the
/// answer must still come.
#[tokio::test]
async fn half_closed_client_gets_an_answer() {
    let up = recorder().await;
    let p = proxy_to_recorder(&up).await;
    let mut stream = TcpStream::connect(p.addr("web")).await.unwrap();
    stream
        .write_all(b"GET /half HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buf))
        .await
        .expect("closed after the answer")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert_eq!(up.requests().len(), 1);
}

/// hyper parses a head again only once it sees an end-of-head sequence: a refused head
/// that arrives in pieces, with nothing behind it, must still be answered (not left to
/// the header timeout).
#[tokio::test]
async fn a_refused_head_arriving_in_pieces_is_answered() {
    let up = recorder().await;
    let p = proxy_to_recorder(&up).await;
    for head in [
        &b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
        b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /c HTTP/1.1\nHost: h\nTransfer-Encoding: chunked\nContent-Length: 5\n\n",
        b"POST /d HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(p.addr("web")).await.unwrap();
        for piece in head.chunks(7) {
            stream.write_all(piece).await.unwrap();
            stream.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
            .await
            .expect("answered and closed before the header timeout")
            .unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
    }
    assert!(up.requests().is_empty());
}
