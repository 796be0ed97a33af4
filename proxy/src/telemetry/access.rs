//! Access log output: lines (one per request, built by `http::access_log`) rendered as
//! JSON or logfmt and written to standard output off the request path, and the rules for
//! which request headers may appear in them.
//!
//! # Buffering
//!
//! A request appends its line to a buffer of its own thread (a worker's requests all
//! append to the same one; the lock on it is only ever contended by the writer taking the
//! buffer away). A writer thread of its own takes every buffer and writes it to standard
//! output every [`FLUSH_INTERVAL`], or sooner when a buffer holds [`FLUSH_BYTES`]. A line
//! is appended whole, and buffers are written one at a time under one lock, so lines
//! never interleave. [`flush`] writes everything appended so far; the daemon calls it when
//! it stops (after a drain, an upgrade's hand-over or a signal).
//!
//! When the output cannot keep up (a stalled pipe or journal) and a thread's buffer
//! already holds [`MAX_PENDING_BYTES`], further lines of that thread are dropped and
//! counted (`proxy_access_log_dropped_total`) instead of waiting: a slow log consumer
//! must not hold back traffic.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName};

/// How often buffered lines are written at the latest.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A buffer this full wakes the writer before the interval is over.
pub const FLUSH_BYTES: usize = 64 * 1024;
/// A thread's lines not yet taken by the writer; beyond it, lines are dropped and counted.
pub const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;
/// The most room the writer keeps in its spare buffer between flushes (see [`Output`]).
const SPARE_BYTES: usize = 16 * FLUSH_BYTES;

/// How access log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// `key=value` pairs, values quoted when needed.
    Logfmt,
    /// No access log.
    Off,
}

impl AccessLogFormat {
    /// Parses the config value.
    pub fn parse(s: &str) -> Option<AccessLogFormat> {
        match s {
            "json" => Some(AccessLogFormat::Json),
            "logfmt" => Some(AccessLogFormat::Logfmt),
            "off" => Some(AccessLogFormat::Off),
            _ => None,
        }
    }
}

/// Headers whose values are never written, whatever the configuration says.
pub const ALWAYS_REDACTED: [HeaderName; 4] = [
    http::header::AUTHORIZATION,
    http::header::PROXY_AUTHORIZATION,
    http::header::COOKIE,
    http::header::SET_COOKIE,
];

/// What stands in for a redacted header value.
pub const REDACTED: &str = "[redacted]";

/// Which request headers the access log shows, and which of those it hides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderPolicy {
    /// Request headers to include (`[telemetry] log_headers`).
    pub log: Vec<HeaderName>,
    /// Extra headers whose values are replaced by `[redacted]` (`[telemetry] redact_headers`).
    pub redact: Vec<HeaderName>,
}

impl HeaderPolicy {
    /// Whether `name`'s value must never be written.
    pub fn is_redacted(&self, name: &HeaderName) -> bool {
        ALWAYS_REDACTED.contains(name) || self.redact.contains(name)
    }

    /// The configured headers of a request as `name=value; name=value`, or `None` when no
    /// header is configured (the common case costs nothing).
    pub fn render(&self, headers: &HeaderMap) -> Option<String> {
        if self.log.is_empty() {
            return None;
        }
        let mut out = String::new();
        for name in &self.log {
            for value in headers.get_all(name) {
                if !out.is_empty() {
                    out.push_str("; ");
                }
                out.push_str(name.as_str());
                out.push('=');
                if self.is_redacted(name) {
                    out.push_str(REDACTED);
                } else {
                    out.push_str(&String::from_utf8_lossy(value.as_bytes()));
                }
            }
        }
        Some(out)
    }
}

/// One thread's lines waiting for the writer.
#[derive(Default)]
struct Pending {
    lines: Mutex<Vec<u8>>,
}

/// Where lines go, and the buffer the writer hands to the next thread it takes lines from.
///
/// A thread's buffer is swapped for the spare rather than for an empty one: a buffer
/// starting empty after every flush grows again by doubling, copying what it holds each
/// time, on the thread that serves requests (at a new connection per request, about two
/// bytes copied for every byte logged). Each thread gets back a buffer the size its lines
/// needed before, so lines are copied once, into it.
struct Output {
    to: Box<dyn Write + Send>,
    spare: Vec<u8>,
}

/// The output side: buffers of every thread that wrote a line, and where they go.
pub struct Sink {
    /// Tells this sink's thread buffers from those of an earlier one (tests make several).
    id: u64,
    format: AccessLogFormat,
    threads: Mutex<Vec<Arc<Pending>>>,
    /// Held while buffers are taken and written, so whole buffers go out one at a time.
    output: Mutex<Output>,
    dropped: AtomicU64,
    writer: OnceLock<std::thread::Thread>,
    max_pending: usize,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("format", &self.format)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// This thread's buffer and the id of the sink it is registered with (on the thread's
    /// first line).
    static PENDING: RefCell<Option<(u64, Arc<Pending>)>> = const { RefCell::new(None) };
}

static SINK_IDS: AtomicU64 = AtomicU64::new(1);

static SINK: OnceLock<Arc<Sink>> = OnceLock::new();

/// Sends access lines in `format` to standard output from now on (once per process; the
/// first call decides). `Off` installs nothing.
pub fn install(format: AccessLogFormat) -> std::io::Result<()> {
    if format == AccessLogFormat::Off || SINK.get().is_some() {
        return Ok(());
    }
    let sink = Sink::start(format, Box::new(std::io::stdout()), MAX_PENDING_BYTES)?;
    let _ = SINK.set(sink);
    Ok(())
}

/// Appends one line to the process' access log, if one is installed (see [`Sink::record`]).
pub fn record(fields: impl FnOnce(&mut Line<'_>)) {
    if let Some(sink) = SINK.get() {
        sink.record(fields);
    }
}

/// Writes every line appended so far (blocking until written); the daemon calls it when
/// it stops.
pub fn flush() {
    if let Some(sink) = SINK.get() {
        sink.flush();
    }
}

/// Lines dropped so far because the output did not keep up.
pub fn dropped() -> u64 {
    SINK.get().map_or(0, |sink| sink.dropped())
}

impl Sink {
    /// A sink writing `format` lines to `output` from a thread of its own, holding at most
    /// `max_pending` bytes per thread while the output is behind.
    pub fn start(
        format: AccessLogFormat,
        output: Box<dyn Write + Send>,
        max_pending: usize,
    ) -> std::io::Result<Arc<Sink>> {
        Sink::start_every(format, output, max_pending, FLUSH_INTERVAL)
    }

    /// [`Sink::start`] with the writer waking every `interval` rather than every
    /// [`FLUSH_INTERVAL`] (tests that flush by themselves).
    fn start_every(
        format: AccessLogFormat,
        output: Box<dyn Write + Send>,
        max_pending: usize,
        interval: Duration,
    ) -> std::io::Result<Arc<Sink>> {
        let sink = Arc::new(Sink {
            id: SINK_IDS.fetch_add(1, Ordering::Relaxed),
            format,
            threads: Mutex::new(Vec::new()),
            output: Mutex::new(Output {
                to: output,
                spare: Vec::new(),
            }),
            dropped: AtomicU64::new(0),
            writer: OnceLock::new(),
            max_pending,
        });
        // The thread holds the sink weakly: a sink dropped (in tests) ends it.
        let weak = Arc::downgrade(&sink);
        let writer = std::thread::Builder::new()
            .name("proxyd-access-log".into())
            .spawn(move || loop {
                std::thread::park_timeout(interval);
                match weak.upgrade() {
                    Some(sink) => sink.flush(),
                    None => return,
                }
            })?;
        let _ = sink.writer.set(writer.thread().clone());
        Ok(sink)
    }

    /// Appends one line, built by `fields`, to this thread's buffer; drops it (and counts
    /// it) when the buffer is full because the output is behind.
    pub fn record(self: &Arc<Self>, fields: impl FnOnce(&mut Line<'_>)) {
        let pending = PENDING.try_with(|slot| {
            let mut slot = slot.borrow_mut();
            match &*slot {
                Some((id, p)) if *id == self.id => p.clone(),
                _ => {
                    let p = Arc::new(Pending::default());
                    self.threads
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(p.clone());
                    *slot = Some((self.id, p.clone()));
                    p
                }
            }
        });
        // Only while the thread itself is being torn down is there no buffer to append to.
        let Ok(pending) = pending else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut lines = pending.lines.lock().unwrap_or_else(PoisonError::into_inner);
        let before = lines.len();
        if before >= self.max_pending {
            drop(lines);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut line = Line {
            format: self.format,
            out: &mut lines,
            first: true,
        };
        line.key("ts");
        push_timestamp(
            line.out,
            std::time::SystemTime::now(),
            self.format == AccessLogFormat::Json,
        );
        fields(&mut line);
        line.finish();
        let after = lines.len();
        drop(lines);
        if before < FLUSH_BYTES && after >= FLUSH_BYTES {
            if let Some(writer) = self.writer.get() {
                writer.unpark();
            }
        }
    }

    /// Writes every buffered line, one thread's buffer after the other.
    pub fn flush(&self) {
        let mut output = self.output.lock().unwrap_or_else(PoisonError::into_inner);
        let output = &mut *output;
        let threads: Vec<Arc<Pending>> = {
            let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
            let all = threads.clone();
            // A thread that ended dropped its handle: once drained below, it is forgotten.
            threads.retain(|p| Arc::strong_count(p) > 2);
            all
        };
        for pending in &threads {
            {
                let mut lines = pending.lines.lock().unwrap_or_else(PoisonError::into_inner);
                if lines.is_empty() {
                    continue;
                }
                std::mem::swap(&mut *lines, &mut output.spare);
            }
            // A failed write loses these lines, as a full buffer would: nothing to retry into.
            let _ = output.to.write_all(&output.spare);
            output.spare.clear();
        }
        // After a burst (a stalled output lets a buffer reach `max_pending`), the room is
        // given back rather than kept for good.
        if output.spare.capacity() > SPARE_BYTES {
            output.spare = Vec::new();
        }
        let _ = output.to.flush();
    }

    /// Lines dropped so far because the output did not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// One access line being built: fields in order, rendered in the sink's format.
pub struct Line<'a> {
    format: AccessLogFormat,
    out: &'a mut Vec<u8>,
    first: bool,
}

impl Line<'_> {
    /// Starts a field; `key` is one of the fixed field names, which need no escaping.
    fn key(&mut self, key: &str) {
        match self.format {
            AccessLogFormat::Json => {
                self.out.push(if self.first { b'{' } else { b',' });
                self.out.push(b'"');
                self.out.extend_from_slice(key.as_bytes());
                self.out.extend_from_slice(b"\":");
            }
            AccessLogFormat::Logfmt | AccessLogFormat::Off => {
                if !self.first {
                    self.out.push(b' ');
                }
                self.out.extend_from_slice(key.as_bytes());
                self.out.push(b'=');
            }
        }
        self.first = false;
    }

    /// A text field.
    pub fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        match self.format {
            AccessLogFormat::Json => json_string(self.out, value),
            AccessLogFormat::Logfmt | AccessLogFormat::Off => logfmt_value(self.out, value),
        }
    }

    /// A field written with `Display`, for values that never need quotes or escapes
    /// (addresses, timestamps).
    pub fn plain(&mut self, key: &str, value: impl std::fmt::Display) {
        self.key(key);
        match self.format {
            AccessLogFormat::Json => {
                let _ = write!(self.out, "\"{value}\"");
            }
            AccessLogFormat::Logfmt | AccessLogFormat::Off => {
                let _ = write!(self.out, "{value}");
            }
        }
    }

    /// A socket address field (the client's).
    pub fn address(&mut self, key: &str, value: std::net::SocketAddr) {
        let std::net::SocketAddr::V4(v4) = value else {
            return self.plain(key, value);
        };
        self.key(key);
        let json = self.format == AccessLogFormat::Json;
        if json {
            self.out.push(b'"');
        }
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                self.out.push(b'.');
            }
            push_digits(self.out, u64::from(octet), 1);
        }
        self.out.push(b':');
        push_digits(self.out, u64::from(v4.port()), 1);
        if json {
            self.out.push(b'"');
        }
    }

    /// A number field.
    pub fn u64(&mut self, key: &str, value: u64) {
        self.key(key);
        push_digits(self.out, value, 1);
    }

    /// A true/false field.
    pub fn bool(&mut self, key: &str, value: bool) {
        self.key(key);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    fn finish(&mut self) {
        if self.format == AccessLogFormat::Json {
            if self.first {
                self.out.push(b'{');
            }
            self.out.push(b'}');
        }
        self.out.push(b'\n');
    }
}

/// Appends `n` in decimal, zero-padded to at least `width` digits (no formatting machinery:
/// this runs several times per request).
fn push_digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    while n > 0 || digits.len() - start < width.max(1) {
        start -= 1;
        // A digit: below 10.
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits[start..]);
}

thread_local! {
    /// The last whole second rendered (`2026-11-30T03:01:36`), reused by every line of it.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Appends `now` as RFC 3339 with microseconds in UTC, in quotes when `quoted`.
fn push_timestamp(out: &mut Vec<u8>, now: std::time::SystemTime, quoted: bool) {
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let second = since.as_secs();
    if quoted {
        out.push(b'"');
    }
    let cached = SECOND.try_with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != second {
            let whole = std::time::UNIX_EPOCH + Duration::from_secs(second);
            // `...T03:01:36Z` without its `Z`.
            let mut text = humantime::format_rfc3339_seconds(whole).to_string();
            text.pop();
            *cache = (second, text);
        }
        out.extend_from_slice(cache.1.as_bytes());
    });
    if cached.is_err() {
        let text = humantime::format_rfc3339_seconds(now).to_string();
        out.extend_from_slice(text.trim_end_matches('Z').as_bytes());
    }
    out.push(b'.');
    push_digits(out, u64::from(since.subsec_micros()), 6);
    out.push(b'Z');
    if quoted {
        out.push(b'"');
    }
}

fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut plain = 0;
    while let Some(offset) = bytes[plain..]
        .iter()
        .position(|&b| b < 0x20 || b == b'"' || b == b'\\')
    {
        let i = plain + offset;
        out.extend_from_slice(&bytes[plain..i]);
        match bytes[i] {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        plain = i + 1;
    }
    out.extend_from_slice(&bytes[plain..]);
    out.push(b'"');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn logfmt_value(out: &mut Vec<u8>, s: &str) {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_graphic() && c != b'"' && c != b'=' && c != b'\\');
    if plain {
        out.extend_from_slice(s.as_bytes());
    } else {
        json_string(out, s);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_even_when_asked_for() {
        let policy = HeaderPolicy {
            log: vec![
                http::header::USER_AGENT,
                http::header::AUTHORIZATION,
                HeaderName::from_static("x-api-key"),
            ],
            redact: vec![HeaderName::from_static("x-api-key")],
        };
        let mut headers = HeaderMap::new();
        headers.insert(http::header::USER_AGENT, "curl/8".parse().unwrap());
        headers.insert(
            http::header::AUTHORIZATION,
            "Bearer s3cret".parse().unwrap(),
        );
        headers.insert("x-api-key", "k3y".parse().unwrap());
        let rendered = policy.render(&headers).unwrap();
        assert_eq!(
            rendered,
            "user-agent=curl/8; authorization=[redacted]; x-api-key=[redacted]"
        );
        assert_eq!(HeaderPolicy::default().render(&headers), None);
    }

    fn line(format: AccessLogFormat, fields: impl FnOnce(&mut Line<'_>)) -> String {
        let mut out = Vec::new();
        let mut line = Line {
            format,
            out: &mut out,
            first: true,
        };
        fields(&mut line);
        line.finish();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_are_valid_json_and_logfmt() {
        let json = line(AccessLogFormat::Json, |l| {
            l.str("path", "/a\"b\\c\n\u{1}é");
            l.u64("status", 200);
            l.bool("complete", true);
            l.plain("client", "127.0.0.1:5");
        });
        assert!(json.ends_with("}\n"), "{json}");
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["path"], "/a\"b\\c\n\u{1}é");
        assert_eq!(parsed["status"], 200);
        assert_eq!(parsed["complete"], true);
        assert_eq!(parsed["client"], "127.0.0.1:5");

        let logfmt = line(AccessLogFormat::Logfmt, |l| {
            l.str("route", "site");
            l.str("error", "connect refused");
            l.str("host", "");
            l.u64("status", 502);
        });
        assert_eq!(
            logfmt,
            "route=site error=\"connect refused\" host=\"\" status=502\n"
        );
    }

    #[test]
    fn numbers_times_and_addresses_are_rendered_without_the_formatting_machinery() {
        let digits = |n, width| {
            let mut out = Vec::new();
            push_digits(&mut out, n, width);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(digits(0, 1), "0");
        assert_eq!(digits(7, 6), "000007");
        assert_eq!(digits(1_234_567, 1), "1234567");
        assert_eq!(digits(u64::MAX, 1), u64::MAX.to_string());
        let base = std::time::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        for offset_us in [0, 1, 999_999, 1_000_000, 86_400_123_456] {
            let at = base + Duration::from_micros(offset_us);
            let mut out = Vec::new();
            push_timestamp(&mut out, at, false);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                humantime::format_rfc3339_micros(at).to_string()
            );
        }
        let json = line(AccessLogFormat::Json, |l| {
            l.address("v4", "10.0.0.7:50644".parse().unwrap());
            l.address("v6", "[::1]:443".parse().unwrap());
        });
        assert_eq!(json, "{\"v4\":\"10.0.0.7:50644\",\"v6\":\"[::1]:443\"}\n");
        let logfmt = line(AccessLogFormat::Logfmt, |l| {
            l.address("client", "127.0.0.1:5".parse().unwrap())
        });
        assert_eq!(logfmt, "client=127.0.0.1:5\n");
    }

    /// An output that takes nothing until told to, as a full pipe would.
    struct Stalled {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.open;
            let mut open = open.lock().unwrap();
            while !*open {
                open = opened.wait(open).unwrap();
            }
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_drops_and_counts_lines_and_keeps_the_rest_whole() {
        let open = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let written = Arc::new(Mutex::new(Vec::new()));
        let output = Stalled {
            open: open.clone(),
            written: written.clone(),
        };
        // Room for a few lines only, so the stall fills it at once.
        let sink = Sink::start(AccessLogFormat::Json, Box::new(output), 2048).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        sink.record(|l| {
                            l.u64("thread", t);
                            l.u64("i", i);
                            l.str("path", &"x".repeat(100));
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Nothing waited for the output, and what did not fit was counted.
        assert!(sink.dropped() > 0);
        *open.0.lock().unwrap() = true;
        open.1.notify_all();
        sink.flush();
        let written = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        assert!(!lines.is_empty());
        for line in &lines {
            let json: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(json["path"].as_str().map(str::len), Some(100));
        }
        assert_eq!(lines.len() as u64 + sink.dropped(), 4 * 500);
    }

    /// The room of this thread's buffer with `sink` (after its first line).
    fn own_capacity() -> usize {
        PENDING.with(|slot| {
            let slot = slot.borrow();
            let (_, pending) = slot.as_ref().expect("a line was recorded on this thread");
            let room = pending.lines.lock().unwrap().capacity();
            room
        })
    }

    #[test]
    fn a_flushed_buffer_comes_back_with_its_room() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new((Mutex::new(true), std::sync::Condvar::new()));
        let output = Stalled {
            open,
            written: written.clone(),
        };
        // Only the flushes below: a timed one in between would swap buffers of its own.
        let hour = Duration::from_secs(3600);
        let sink = Sink::start_every(
            AccessLogFormat::Json,
            Box::new(output),
            MAX_PENDING_BYTES,
            hour,
        )
        .unwrap();
        let batch = |from: u64| {
            for i in from..from + 200 {
                sink.record(|l| l.u64("i", i));
            }
        };
        batch(0);
        let first = own_capacity();
        sink.flush();
        batch(200);
        sink.flush();
        // The buffer the first batch grew was the writer's spare until the second flush
        // handed it back: this thread starts its next lines with that room.
        assert!(own_capacity() >= first, "{} < {first}", own_capacity());
        batch(400);
        sink.flush();
        let written = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        let numbers: Vec<u64> = written
            .lines()
            .map(|line| {
                let json: serde_json::Value = serde_json::from_str(line).unwrap();
                json["i"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(numbers, (0..600).collect::<Vec<_>>());
    }

    #[test]
    fn every_line_is_written_by_flush_in_order_per_thread() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new((Mutex::new(true), std::sync::Condvar::new()));
        let output = Stalled {
            open,
            written: written.clone(),
        };
        let sink =
            Sink::start(AccessLogFormat::Logfmt, Box::new(output), MAX_PENDING_BYTES).unwrap();
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        sink.record(|l| {
                            l.u64("thread", t);
                            l.u64("i", i);
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        sink.flush();
        assert_eq!(sink.dropped(), 0);
        let written = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        let mut next = [0u64; 3];
        for line in written.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            assert_eq!(fields.len(), 3, "{line}");
            assert!(fields[0].starts_with("ts="), "{line}");
            let t: usize = fields[1].strip_prefix("thread=").unwrap().parse().unwrap();
            let i: u64 = fields[2].strip_prefix("i=").unwrap().parse().unwrap();
            assert_eq!(i, next[t], "{line}");
            next[t] += 1;
        }
        assert_eq!(next, [2000; 3]);
    }
}
