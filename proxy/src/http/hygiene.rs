//! Proxy hygiene: request framing checks, hop-by-hop headers, forwarding headers.

use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

/// How many headers a forwarded request may gain here: `Host` (from the target's
/// authority), the four forwarding headers and `Via`.
pub const ADDED_REQUEST_HEADERS: usize = 6;

/// How many names [`HOP_BY_HOP`] has.
const HOP_BY_HOP_COUNT: usize = 8;
/// Headers that describe one connection, not the message, and are never forwarded; in
/// the order of the first [`Known`] names.
static HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// A header the request path looks for. The first [`HOP_BY_HOP_COUNT`] are the
/// hop-by-hop headers, in the order of [`HOP_BY_HOP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// `Connection`.
    Connection,
    /// `Keep-Alive`.
    KeepAlive,
    /// `Proxy-Connection`.
    ProxyConnection,
    /// `Proxy-Authenticate`.
    ProxyAuthenticate,
    /// `Proxy-Authorization`.
    ProxyAuthorization,
    /// `TE`.
    Te,
    /// `Trailer`.
    Trailer,
    /// `Transfer-Encoding`.
    TransferEncoding,
    /// `Upgrade`.
    Upgrade,
    /// `Via`.
    Via,
    /// `Forwarded`.
    Forwarded,
    /// `X-Forwarded-For`.
    XForwardedFor,
    /// `Content-Length`.
    ContentLength,
    /// `Content-Type`.
    ContentType,
}

impl Known {
    /// Which one `name` is, told by its length and bytes: a name is compared with the
    /// few known ones of its length.
    fn of(name: &HeaderName) -> Option<Known> {
        let s = name.as_str();
        Some(match (s.len(), s) {
            (2, "te") => Known::Te,
            (3, "via") => Known::Via,
            (7, "trailer") => Known::Trailer,
            (7, "upgrade") => Known::Upgrade,
            (9, "forwarded") => Known::Forwarded,
            (10, "connection") => Known::Connection,
            (10, "keep-alive") => Known::KeepAlive,
            (12, "content-type") => Known::ContentType,
            (14, "content-length") => Known::ContentLength,
            (15, "x-forwarded-for") => Known::XForwardedFor,
            (16, "proxy-connection") => Known::ProxyConnection,
            (17, "transfer-encoding") => Known::TransferEncoding,
            (18, "proxy-authenticate") => Known::ProxyAuthenticate,
            (19, "proxy-authorization") => Known::ProxyAuthorization,
            _ => return None,
        })
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

/// Which [`Known`] headers a message carries, from one pass over its names. A lookup of
/// a header that is not there costs a hash and a probe like any other, and most messages
/// carry few of these: the request path looks up only those found here. Taken before a
/// message's headers are removed (see [`strip_hop_by_hop`]), it may name some that are
/// gone, never one that is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Present(u16);

impl Present {
    /// Every one may be there: each is looked up.
    pub const ALL: Present = Present(u16::MAX);

    /// The known headers among those of `headers`.
    pub fn of(headers: &HeaderMap) -> Present {
        let mut bits = 0;
        for name in headers.keys() {
            if let Some(known) = Known::of(name) {
                bits |= known.bit();
            }
        }
        Present(bits)
    }

    /// Whether `known` may be there.
    pub fn has(self, known: Known) -> bool {
        self.0 & known.bit() != 0
    }

    /// Whether any hop-by-hop header, `Upgrade` included, may be there.
    fn any_hop_by_hop(self) -> bool {
        self.0 & ((1 << HOP_BY_HOP_COUNT) - 1) != 0 || self.has(Known::Upgrade)
    }
}

// Named once: a header looked up or inserted by a `&str` name is parsed (and a name the
// `http` crate does not know is allocated) on every call.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Refuses requests whose body length is ambiguous (request-smuggling defence).
pub fn check_framing(headers: &HeaderMap) -> Result<(), &'static str> {
    let has_te = headers.contains_key(header::TRANSFER_ENCODING);
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        if has_te {
            return Err("both Content-Length and Transfer-Encoding");
        }
        let first = parse_length(first).ok_or("invalid Content-Length")?;
        for other in lengths {
            if parse_length(other) != Some(first) {
                return Err("conflicting Content-Length headers");
            }
        }
    }
    if has_te {
        // Only "chunked" as the final coding frames a request body.
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(|v| v.trim().to_ascii_lowercase());
        if last.as_deref() != Some("chunked") {
            return Err("Transfer-Encoding must end with chunked");
        }
    }
    Ok(())
}

/// Headers that frame a message or describe one connection: a request header whose name
/// only differs from one of these by `_` in place of `-` is refused, because CGI, WSGI
/// and similar servers map both to the same variable (a known smuggling vector).
const LOOKALIKE_TARGETS: [&str; 10] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Refuses header names that read as a framing or hop-by-hop header once `_` is taken
/// as `-` (`Transfer_Encoding`, `content_length`), without being that header.
pub fn check_header_names(headers: &HeaderMap) -> Result<(), &'static str> {
    for name in headers.keys() {
        let name = name.as_str();
        if !name.contains('_') {
            continue;
        }
        let lookalike = LOOKALIKE_TARGETS.iter().any(|target| {
            target.len() == name.len()
                && target
                    .bytes()
                    .zip(name.bytes())
                    .all(|(t, n)| t == n || (t == b'-' && n == b'_'))
        });
        if lookalike {
            return Err("header name with '_' in place of '-' of a framing or hop-by-hop header");
        }
    }
    Ok(())
}

/// Checks the request's authority (RFC 9112 section 3.2): at most one `Host` header, and
/// it and any authority in the target must be a valid `host[:port]` without user info.
/// Gives the `Host` header, if there is one (see [`request_host_of`]).
pub fn check_host<'h>(
    uri: &http::Uri,
    headers: &'h HeaderMap,
) -> Result<Option<&'h HeaderValue>, &'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if let Some(host) = host {
        if hosts.next().is_some() {
            return Err("more than one Host header");
        }
        // Empty is allowed: RFC 9112 asks for it when the target has no authority.
        if !host.is_empty() && !valid_authority(host.as_bytes()) {
            return Err("Host is not a valid host[:port]");
        }
    }
    if let Some(authority) = uri.authority() {
        if !valid_authority(authority.as_str().as_bytes()) {
            return Err("the request target's authority is not a valid host[:port]");
        }
    }
    Ok(host)
}

/// `host [ ":" port ]` as RFC 3986 defines it, without user info: a bracketed IPv6
/// address or a reg-name / IPv4 address, and a decimal port up to 65535.
pub fn valid_authority(value: &[u8]) -> bool {
    let (host_ok, rest) = if let Some(inner) = value.strip_prefix(b"[") {
        let Some(end) = inner.iter().position(|b| *b == b']') else {
            return false;
        };
        let literal = &inner[..end];
        let ok = !literal.is_empty()
            && literal
                .iter()
                .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.');
        (ok, &inner[end + 1..])
    } else {
        match reg_name_end(value) {
            Some(0) | None => return false,
            Some(end) => (true, &value[end..]),
        }
    };
    if !host_ok {
        return false;
    }
    match rest.split_first() {
        None => true,
        // Empty, or up to five digits that make a number up to 65535.
        Some((b':', port)) if port.len() <= 5 => {
            let mut number = 0u32;
            for &digit in port {
                if !digit.is_ascii_digit() {
                    return false;
                }
                number = number * 10 + u32::from(digit - b'0');
            }
            number <= u32::from(u16::MAX)
        }
        Some(_) => false,
    }
}

/// The bytes a reg-name holds as themselves (RFC 3986 unreserved and sub-delims), by
/// value: one load per byte of every request's `Host`, where searching the punctuation
/// list cost a dozen comparisons for each `.`.
static REG_NAME_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let punctuation = b"-._~!$&'()*+,;=";
    let mut i = 0;
    while i < punctuation.len() {
        table[punctuation[i] as usize] = true;
        i += 1;
    }
    table
};

/// Where the RFC 3986 reg-name (unreserved, sub-delims and percent-encoded octets) at the
/// start of `value` ends: at its end or at a `:`; `None` when a byte before that is not
/// part of one. One pass: every request's `Host` is checked.
fn reg_name_end(value: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < value.len() {
        let b = value[i];
        if b == b':' {
            break;
        }
        if b == b'%' {
            let hex = value.get(i + 1..i + 3);
            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return None;
            }
            i += 3;
            continue;
        }
        if !REG_NAME_BYTE[usize::from(b)] {
            return None;
        }
        i += 1;
    }
    Some(i)
}

/// The length of `value` as an RFC 7230 quoted-string.
fn quoted_len(value: &str) -> usize {
    2 + value.len() + value.bytes().filter(|b| matches!(b, b'"' | b'\\')).count()
}

/// Appends `value` as an RFC 7230 quoted-string to `out`. The text between the characters
/// to escape is copied as a whole (a host has none: one copy), not char by char.
fn push_quoted(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    let mut rest = value.as_bytes();
    while let Some(at) = rest.iter().position(|b| *b == b'"' || *b == b'\\') {
        out.extend_from_slice(&rest[..at]);
        out.push(b'\\');
        out.push(rest[at]);
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

fn parse_length(value: &HeaderValue) -> Option<u64> {
    let s = value.to_str().ok()?;
    // Some clients repeat the value inside one header: "5, 5".
    let mut parts = s.split(',').map(str::trim);
    let first = parts.next()?;
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = first.parse().ok()?;
    parts.all(|p| p == first).then_some(n)
}

/// The declared request body length, if any (after [`check_framing`] passed).
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(parse_length)
}

/// Whether the request asks to switch protocols (WebSocket and friends).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// Whether a `Connection` token is the name of one of [`HOP_BY_HOP`] (in any case).
fn names_hop_by_hop(token: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| {
        let h = h.as_str().as_bytes();
        h.len() == token.len() && h.eq_ignore_ascii_case(token)
    })
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers, including every header named by `Connection`. With
/// `upgrade`, keeps `Upgrade` and sets `Connection: upgrade` so the tunnel can be set up.
/// `present` tells which are there: a removal by name costs a hash and a probe, and most
/// messages carry none of them, or only `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool, present: Present) {
    if present.any_hop_by_hop() {
        // Names in `Connection` that are hop-by-hop anyway go below; of the others only
        // those naming a header of this message are removed (`close` names none, as a
        // rule). The tokens are the ones `connection_tokens` gives, split in one loop over
        // the bytes: most messages name only `keep-alive` or `close`, and the iterator
        // chain cost several hundred instructions for that one token.
        let mut named: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            // A value that is not visible ASCII names nothing, as in `connection_tokens`.
            let Ok(value) = value.to_str() else {
                continue;
            };
            for token in value.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.is_empty() || names_hop_by_hop(token) {
                    continue;
                }
                // Looked for among the message's own names rather than parsed into a name
                // and looked up: a token such as `close` names no field as a rule, and its
                // parse would allocate a copy of it first.
                if let Some(name) = headers
                    .keys()
                    .find(|name| name.as_str().as_bytes().eq_ignore_ascii_case(token))
                {
                    named.push(name.clone());
                }
            }
        }
        for name in named {
            if !(upgrade && name == header::UPGRADE) {
                headers.remove(&name);
            }
        }
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            if present.0 & (1 << i) != 0 {
                headers.remove(name);
            }
        }
        if !upgrade && present.has(Known::Upgrade) {
            headers.remove(header::UPGRADE);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Marks a request whose client takes trailers (`TE: trailers`), so an HTTP/2 upstream
/// gets `te: trailers`, the one `TE` value HTTP/2 allows (RFC 9113 section 8.2.2).
#[derive(Debug, Clone, Copy)]
pub struct TeTrailers;

/// Whether the request's `TE` names `trailers` (gRPC clients always send it).
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// Whether the request is a gRPC call (`content-type: application/grpc`, `+proto`, ...).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The `grpc-timeout` of a request: 1 to 8 digits and a unit (H, M, S, m, u, n).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = headers.get(GRPC_TIMEOUT)?.as_bytes();
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n.saturating_mul(3600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Turns a request made for an HTTP/1.1 upstream into one for HTTP/2: the `Host` header
/// becomes `:authority` (`fallback` when there is none), `:scheme` is `https` over TLS,
/// and `te: trailers` is passed when the client sent it. Done once: a request sent again
/// is already converted.
pub fn to_h2_request<B>(req: &mut http::Request<B>, tls: bool, fallback: &str) {
    if req.version() == Version::HTTP_2 {
        return;
    }
    let authority = req
        .headers_mut()
        .remove(header::HOST)
        .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
        .or_else(|| http::uri::Authority::try_from(fallback).ok())
        .unwrap_or_else(|| http::uri::Authority::from_static("localhost"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(if tls {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    });
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        req.uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_2;
    if req.extensions().get::<TeTrailers>().is_some() {
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A client address as the forwarding headers show it, rendered once per connection, or
/// shared with a recent connection of the same client (see [`RECENT`]).
#[derive(Debug)]
pub struct ForwardedClient {
    ip: IpAddr,
    /// The address alone: `X-Forwarded-For` when the request has none.
    address: HeaderValue,
    /// An IPv6 address, which `Forwarded` quotes and brackets (RFC 7239).
    v6: bool,
    /// What the connection's requests were given last (see [`Rendered`]).
    last: Mutex<Option<Rendered>>,
}

/// `X-Forwarded-Host` and `Forwarded` (for a request without a prior hop's `Forwarded`)
/// for one host and scheme. The requests of a keep-alive connection nearly always name
/// the same host, so the values are made once and shared (a reference count each) rather
/// than built, copied and validated per request; and so are they by the next connections
/// of the same client on the same thread ([`RECENT`]). Own copies: a share of a request's
/// `Host` would keep that request's whole read buffer alive as long as they are kept.
#[derive(Debug, Clone)]
struct Rendered {
    proto: &'static str,
    /// The host it was made for, which is also the `X-Forwarded-Host` value.
    host: Option<HeaderValue>,
    forwarded: Option<HeaderValue>,
}

impl Rendered {
    fn is_for(&self, proto: &'static str, host: Option<&str>) -> bool {
        self.proto == proto
            && self.host.as_ref().map(HeaderValue::as_bytes) == host.map(str::as_bytes)
    }

    fn values(&self) -> (Option<HeaderValue>, Option<HeaderValue>) {
        (self.host.clone(), self.forwarded.clone())
    }
}

/// Clients a thread rendered the forwarding headers for lately.
const RECENT_CLIENTS: usize = 4;

/// A client a thread rendered for lately: its address, and what its last request was given.
struct Recent {
    ip: IpAddr,
    address: HeaderValue,
    rendered: Option<Rendered>,
}

/// The last [`RECENT_CLIENTS`] clients whose connections this thread served, oldest
/// replaced first. A client's next connection shares their rendered address and, for the
/// same host and scheme, their `X-Forwarded-Host` and `Forwarded` values: a browser opens
/// several connections at once, and behind a load balancer or a CDN nearly every
/// connection comes from one of a few addresses. Rendering them for a connection's first
/// request cost about 950 instructions (callgrind, a new connection per request: the
/// address as text, the `Forwarded` value built and checked, the host copied, three
/// allocations).
struct RecentClients {
    clients: [Option<Recent>; RECENT_CLIENTS],
    /// Where the next new client goes.
    next: usize,
}

impl RecentClients {
    /// The entry of `ip`; where there is none, a new one with `address` (its text) in the
    /// place of the oldest.
    fn entry(&mut self, ip: IpAddr, address: impl FnOnce() -> HeaderValue) -> &mut Recent {
        let known = self
            .clients
            .iter()
            .position(|recent| recent.as_ref().is_some_and(|recent| recent.ip == ip));
        let at = known.unwrap_or_else(|| {
            let at = self.next;
            self.next = (at + 1) % RECENT_CLIENTS;
            self.clients[at] = None;
            at
        });
        self.clients[at].get_or_insert_with(|| Recent {
            ip,
            address: address(),
            rendered: None,
        })
    }
}

thread_local! {
    static RECENT: RefCell<RecentClients> = const {
        RefCell::new(RecentClients {
            clients: [const { None }; RECENT_CLIENTS],
            next: 0,
        })
    };
}

/// `f` on this thread's recent clients; `None` where the thread has them no longer (its
/// exit).
fn with_recent<T>(f: impl FnOnce(&mut RecentClients) -> T) -> Option<T> {
    RECENT
        .try_with(|recent| recent.try_borrow_mut().ok().map(|mut r| f(&mut r)))
        .ok()
        .flatten()
}

impl ForwardedClient {
    /// Renders `client`, or shares its text with a recent connection of the same client.
    pub fn new(client: IpAddr) -> ForwardedClient {
        let (address, rendered) = with_recent(|recent| {
            let known = recent.entry(client, || ip_value(client));
            (known.address.clone(), known.rendered.clone())
        })
        .unwrap_or_else(|| (ip_value(client), None));
        ForwardedClient {
            ip: client,
            address,
            v6: client.is_ipv6(),
            last: Mutex::new(rendered),
        }
    }

    /// The length of this hop's `for=` parameter (see [`Self::push_for`]).
    fn for_len(&self) -> usize {
        "for=".len() + self.address.len() + if self.v6 { 4 } else { 0 }
    }

    /// Appends `for=` and the address, quoted and bracketed for IPv6 (RFC 7239; an
    /// address has nothing to escape).
    fn push_for(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"for=");
        if self.v6 {
            out.extend_from_slice(b"\"[");
            out.extend_from_slice(self.address.as_bytes());
            out.extend_from_slice(b"]\"");
        } else {
            out.extend_from_slice(self.address.as_bytes());
        }
    }

    /// `X-Forwarded-Host` and `Forwarded` for a request to `host` that carries no
    /// `Forwarded` of its own: the values the connection's last request was given, or a
    /// recent connection's of the same client, while host and scheme are the same.
    fn rendered(
        &self,
        proto: &'static str,
        host: Option<&RequestHost>,
    ) -> (Option<HeaderValue>, Option<HeaderValue>) {
        let text = host.map(RequestHost::as_str);
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = last.as_ref().filter(|r| r.is_for(proto, text)) {
            return r.values();
        }
        let fresh = || Rendered {
            proto,
            host: text.and_then(|t| HeaderValue::from_str(t).ok()),
            forwarded: forwarded_value(None, self, text, proto),
        };
        let rendered = with_recent(|recent| {
            let known = recent.entry(self.ip, || self.address.clone());
            match known.rendered.as_ref().filter(|r| r.is_for(proto, text)) {
                Some(shared) => shared.clone(),
                None => known.rendered.insert(fresh()).clone(),
            }
        })
        .unwrap_or_else(fresh);
        let rendered = last.insert(rendered);
        rendered.values()
    }
}

/// `client` as a header value, written on the stack (an IPv4 address, the common case,
/// digit by digit: this runs for every accepted connection, and the formatting machinery
/// costs several times as much) and kept in one block with its reference count, which
/// every request of the connection shares for its `X-Forwarded-For`. A header value
/// copied from a slice is shared through a second block, made at its first share (a
/// connection's first request): two allocations per connection and a compare-and-swap,
/// where this makes one.
fn ip_value(client: IpAddr) -> HeaderValue {
    let mut address = AddressText {
        text: [0; ADDRESS_TEXT],
        len: 0,
    };
    match client {
        IpAddr::V4(v4) => {
            let mut len = 0;
            let mut push = |b: u8| {
                address.text[len] = b;
                len += 1;
            };
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    push(b'.');
                }
                if octet >= 100 {
                    push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    push(b'0' + octet / 10 % 10);
                }
                push(b'0' + octet % 10);
            }
            address.len = len as u8;
        }
        IpAddr::V6(v6) => {
            let mut rest = &mut address.text[..];
            // The longest IPv6 text fits: this does not fail.
            if std::io::Write::write_fmt(&mut rest, format_args!("{v6}")).is_err() {
                return HeaderValue::from_static("unknown");
            }
            address.len = (ADDRESS_TEXT - rest.len()) as u8;
        }
    }
    // An IP address is always a valid header value.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(address))
        .unwrap_or(HeaderValue::from_static("unknown"))
}

/// The longest text of an IP address: an IPv6 address with an IPv4 tail,
/// `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`.
const ADDRESS_TEXT: usize = 45;

/// A client address's text, held in the block a header value shares (see [`ip_value`]).
struct AddressText {
    text: [u8; ADDRESS_TEXT],
    len: u8,
}

impl AsRef<[u8]> for AddressText {
    fn as_ref(&self) -> &[u8] {
        &self.text[..usize::from(self.len)]
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`, and sets `X-Forwarded-Proto`
/// and `X-Forwarded-Host`. `present` tells which prior values there may be.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    client: &ForwardedClient,
    proto: &'static str,
    host: Option<&RequestHost>,
    present: Present,
) {
    let prior_xff = if present.has(Known::XForwardedFor) {
        headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok())
    } else {
        None
    };
    let xff = match prior_xff {
        Some(prior) if !prior.trim().is_empty() => {
            let address = client.address.to_str().unwrap_or_default();
            let mut value = String::with_capacity(prior.len() + 2 + address.len());
            value.push_str(prior);
            value.push_str(", ");
            value.push_str(address);
            HeaderValue::try_from(value).ok()
        }
        _ => Some(client.address.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    let prior = if present.has(Known::Forwarded) {
        headers
            .get(header::FORWARDED)
            .and_then(|v| v.to_str().ok())
            .filter(|prior| !prior.trim().is_empty())
    } else {
        None
    };
    let (forwarded_host, forwarded) = match prior {
        None => client.rendered(proto, host),
        Some(prior) => (
            host.and_then(RequestHost::to_header_value),
            forwarded_value(Some(prior), client, host.map(RequestHost::as_str), proto),
        ),
    };
    if let Some(v) = forwarded_host {
        headers.insert(X_FORWARDED_HOST, v);
    }
    if let Some(v) = forwarded {
        headers.insert(header::FORWARDED, v);
    }
}

/// The `Forwarded` value: `prior`, then this hop's element (RFC 7239).
fn forwarded_value(
    prior: Option<&str>,
    client: &ForwardedClient,
    host: Option<&str>,
    proto: &'static str,
) -> Option<HeaderValue> {
    // The exact length: a vector filled to its capacity becomes a header value without
    // another allocation. Bytes, not a `String`: the value's bytes are checked once, as a
    // header value, and not as UTF-8 before that.
    let mut forwarded = Vec::with_capacity(
        prior.map_or(0, |p| p.len() + 2)
            + client.for_len()
            + host.map_or(0, |h| ";host=".len() + quoted_len(h))
            + ";proto=".len()
            + proto.len(),
    );
    if let Some(prior) = prior {
        forwarded.extend_from_slice(prior.as_bytes());
        forwarded.extend_from_slice(b", ");
    }
    client.push_for(&mut forwarded);
    if let Some(host) = host {
        forwarded.extend_from_slice(b";host=");
        push_quoted(&mut forwarded, host);
    }
    forwarded.extend_from_slice(b";proto=");
    forwarded.extend_from_slice(proto.as_bytes());
    HeaderValue::try_from(forwarded).ok()
}

/// Appends this proxy to `Via` for a message received as `version`; `present` tells
/// whether there may be a prior value.
pub fn add_via(headers: &mut HeaderMap, version: Version, present: Present) {
    // Checked once, at compile time: a `from_static` of a value chosen at run time
    // checks its bytes on every call.
    const VIA_09: HeaderValue = HeaderValue::from_static("0.9 proxyd");
    const VIA_10: HeaderValue = HeaderValue::from_static("1.0 proxyd");
    const VIA_11: HeaderValue = HeaderValue::from_static("1.1 proxyd");
    const VIA_2: HeaderValue = HeaderValue::from_static("2.0 proxyd");
    const VIA_3: HeaderValue = HeaderValue::from_static("3.0 proxyd");
    let ours = match version {
        Version::HTTP_09 => VIA_09,
        Version::HTTP_10 => VIA_10,
        Version::HTTP_2 => VIA_2,
        Version::HTTP_3 => VIA_3,
        _ => VIA_11,
    };
    let prior = if present.has(Known::Via) {
        headers.get(header::VIA).and_then(|v| v.to_str().ok())
    } else {
        None
    };
    let value = match prior {
        Some(prior) if !prior.trim().is_empty() => {
            let ours = ours.to_str().unwrap_or_default();
            HeaderValue::try_from(format!("{prior}, {ours}")).ok()
        }
        _ => Some(ours),
    };
    if let Some(v) = value {
        headers.insert(header::VIA, v);
    }
}

/// A request's host as routing and the forwarding headers see it: lower-cased, without
/// port or trailing dot.
///
/// Taken from the `Host` header, as it usually is, it is a share of that header's value
/// (reference-counted, not copied) and a range within it, so a request whose host is
/// already lower-case needs no allocation for it, neither here nor for `X-Forwarded-Host`.
#[derive(Debug, Clone)]
pub struct RequestHost {
    /// The value the host was found in: the request's own, or a lower-cased copy.
    value: HeaderValue,
    /// Where the host is in `value`.
    range: std::ops::Range<usize>,
}

impl RequestHost {
    /// The host.
    pub fn as_str(&self) -> &str {
        // Only ever made from visible ASCII (see `request_host`); "" is not reached. The
        // header value's own check of its bytes (a few instructions each) rather than a
        // UTF-8 validation of the range, twice per request.
        self.value
            .to_str()
            .ok()
            .and_then(|text| text.get(self.range.clone()))
            .unwrap_or_default()
    }

    /// The host as a header value of its own (`X-Forwarded-Host`): the value it came from
    /// when that holds nothing else.
    pub fn to_header_value(&self) -> Option<HeaderValue> {
        if self.range.start == 0 && self.range.end == self.value.len() {
            Some(self.value.clone())
        } else {
            HeaderValue::from_str(self.as_str()).ok()
        }
    }
}

/// The request's host: the URI authority (HTTP/2, absolute-form) or the `Host` header,
/// lower-cased and without port.
pub fn request_host(uri: &http::Uri, headers: &HeaderMap) -> Option<RequestHost> {
    request_host_of(uri, headers.get(header::HOST))
}

/// [`request_host`] with the `Host` header already looked up.
pub fn request_host_of(uri: &http::Uri, host_header: Option<&HeaderValue>) -> Option<RequestHost> {
    if let Some(host) = uri.host() {
        return lowered(host.trim_end_matches('.'));
    }
    let value = host_header?;
    let text = value.to_str().ok()?;
    let range = host_range(text);
    let host = &text[range.clone()];
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        return lowered(host);
    }
    (!range.is_empty()).then(|| RequestHost {
        value: value.clone(),
        range,
    })
}

/// A lower-cased copy of `host`, if it is not empty.
fn lowered(host: &str) -> Option<RequestHost> {
    if host.is_empty() {
        return None;
    }
    let value = HeaderValue::from_str(&host.to_ascii_lowercase()).ok()?;
    Some(RequestHost {
        range: 0..value.len(),
        value,
    })
}

/// Where the host is in a `Host` value: without port, brackets or trailing dots.
fn host_range(text: &str) -> std::ops::Range<usize> {
    let (start, end) = if let Some(rest) = text.strip_prefix('[') {
        // [v6]:port
        (1, 1 + rest.find(']').unwrap_or(rest.len()))
    } else {
        // The last ':' by a byte loop: a `Host` is a few dozen bytes, shorter than what
        // the `str` searcher's set-up and `memrchr` cost.
        let bytes = text.as_bytes();
        match bytes.iter().rposition(|b| *b == b':') {
            Some(colon) if bytes[colon + 1..].iter().all(u8::is_ascii_digit) => (0, colon),
            _ => (0, text.len()),
        }
    };
    let end = start + text[start..end].trim_end_matches('.').len();
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RFC 7230 quoted-string holding `value`.
    fn quoted(value: &str) -> String {
        let mut out = Vec::with_capacity(value.len() + 2);
        push_quoted(&mut out, value);
        String::from_utf8(out).expect("quoting keeps UTF-8")
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn framing() {
        assert!(check_framing(&headers(&[
            ("content-length", "5"),
            ("transfer-encoding", "chunked")
        ]))
        .is_err());
        assert!(check_framing(&headers(&[
            ("content-length", "5"),
            ("content-length", "6")
        ]))
        .is_err());
        assert!(check_framing(&headers(&[
            ("content-length", "5"),
            ("content-length", "5")
        ]))
        .is_ok());
        assert!(check_framing(&headers(&[("content-length", "5, 6")])).is_err());
        assert!(check_framing(&headers(&[("content-length", "+5")])).is_err());
        assert!(check_framing(&headers(&[("transfer-encoding", "gzip")])).is_err());
        assert!(check_framing(&headers(&[("transfer-encoding", "gzip, chunked")])).is_ok());
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        let present = Present::of(&h);
        strip_hop_by_hop(&mut h, false, present);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn every_hop_by_hop_header_goes_with_all_its_values() {
        let all = [
            ("connection", "close"),
            ("connection", "X-Secret, Upgrade, Close"),
            ("close", "named by the token"),
            ("x-secret", "1"),
            ("x-secret", "2"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-authenticate", "Basic"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ];
        let mut h = headers(&all);
        let present = Present::of(&h);
        strip_hop_by_hop(&mut h, false, present);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);

        // A tunnel keeps Upgrade, and says so in the one Connection it sends.
        let mut h = headers(&all);
        let present = Present::of(&h);
        strip_hop_by_hop(&mut h, true, present);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["connection", "upgrade", "x-kept"]);
        assert_eq!(h.get_all("connection").iter().count(), 1);
        assert_eq!(h["connection"], "upgrade");

        // Nothing hop-by-hop: nothing changes.
        let mut h = headers(&[("x-kept", "yes"), ("accept", "*/*")]);
        let present = Present::of(&h);
        strip_hop_by_hop(&mut h, false, present);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn prior_via_and_forwarding_values_are_extended_unless_connection_names_them() {
        let client = ForwardedClient::new("192.0.2.7".parse().expect("ip"));
        for (pairs, via, forwarded, xff) in [
            (
                vec![("accept", "*/*")],
                "1.1 proxyd",
                "for=192.0.2.7;proto=http",
                "192.0.2.7",
            ),
            (
                vec![
                    ("VIA", "1.0 a"),
                    ("Forwarded", "for=10.0.0.1"),
                    ("X-Forwarded-For", "10.0.0.1"),
                ],
                "1.0 a, 1.1 proxyd",
                "for=10.0.0.1, for=192.0.2.7;proto=http",
                "10.0.0.1, 192.0.2.7",
            ),
            // Named by Connection: they go, and the next hop sees only this one's.
            (
                vec![
                    ("connection", "via, forwarded, x-forwarded-for"),
                    ("via", "1.0 a"),
                    ("forwarded", "for=10.0.0.1"),
                    ("x-forwarded-for", "10.0.0.1"),
                ],
                "1.1 proxyd",
                "for=192.0.2.7;proto=http",
                "192.0.2.7",
            ),
        ] {
            let mut h = headers(&pairs);
            let present = Present::of(&h);
            strip_hop_by_hop(&mut h, false, present);
            add_forwarding(&mut h, &client, "http", None, present);
            add_via(&mut h, Version::HTTP_11, present);
            assert_eq!(h["via"], via, "{pairs:?}");
            assert_eq!(h["forwarded"], forwarded, "{pairs:?}");
            assert_eq!(h["x-forwarded-for"], xff, "{pairs:?}");
            assert_eq!(h.get_all("via").iter().count(), 1, "{pairs:?}");
        }
    }

    #[test]
    fn present_headers_are_the_ones_a_lookup_finds() {
        let known = [
            (Known::Connection, "Connection"),
            (Known::KeepAlive, "keep-alive"),
            (Known::ProxyConnection, "Proxy-Connection"),
            (Known::ProxyAuthenticate, "proxy-authenticate"),
            (Known::ProxyAuthorization, "Proxy-Authorization"),
            (Known::Te, "TE"),
            (Known::Trailer, "trailer"),
            (Known::TransferEncoding, "Transfer-Encoding"),
            (Known::Upgrade, "upgrade"),
            (Known::Via, "VIA"),
            (Known::Forwarded, "forwarded"),
            (Known::XForwardedFor, "X-Forwarded-For"),
            (Known::ContentLength, "content-length"),
            (Known::ContentType, "Content-Type"),
        ];
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(Known::of(name).map(|k| k as usize), Some(i), "{name}");
        }
        let others = [
            ("accept", "*/*"),
            ("x-via", "1"),
            ("host", "a"),
            ("te-x", "1"),
        ];
        // Each known one alone, with others around it, and all of them at once.
        let mut sets: Vec<Vec<(&str, &str)>> = known
            .iter()
            .map(|(_, name)| {
                let mut set = others.to_vec();
                set.push((name, "1"));
                set
            })
            .collect();
        sets.push(known.iter().map(|(_, name)| (*name, "1")).collect());
        sets.push(others.to_vec());
        for set in sets {
            let h = headers(&set);
            let present = Present::of(&h);
            for (known, name) in known {
                assert_eq!(present.has(known), h.contains_key(name), "{set:?} {name}");
            }
        }
        for (known, _) in known {
            assert!(Present::ALL.has(known));
        }
    }

    #[test]
    fn client_addresses_are_written_as_the_standard_library_writes_them() {
        for octets in [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [10, 9, 99, 100],
            [255, 200, 101, 110],
        ] {
            let ip = IpAddr::from(octets);
            assert_eq!(ip_value(ip), ip.to_string().as_str());
        }
        for a in 0..=255u8 {
            let ip = IpAddr::from([a, a.wrapping_mul(7), a.wrapping_add(13), 255 - a]);
            assert_eq!(ip_value(ip), ip.to_string().as_str());
        }
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        assert_eq!(ip_value(v6), "2001:db8::1");
        let for_of = |client: &ForwardedClient| {
            let mut out = Vec::new();
            client.push_for(&mut out);
            assert_eq!(out.len(), client.for_len());
            String::from_utf8(out).expect("an address is ASCII")
        };
        let client = ForwardedClient::new("192.0.2.60".parse().expect("ip"));
        assert_eq!(client.address, "192.0.2.60");
        assert_eq!(for_of(&client), "for=192.0.2.60");
        let client = ForwardedClient::new(v6);
        assert_eq!(client.address, "2001:db8::1");
        assert_eq!(for_of(&client), "for=\"[2001:db8::1]\"");
        // The longest texts of each family.
        for longest in [
            "255.255.255.255",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let client = ForwardedClient::new(longest.parse().expect("ip"));
            assert_eq!(client.address, longest);
            // Shared by each request: the same text.
            assert_eq!(client.address.clone(), longest);
        }
    }

    #[test]
    fn forwarding_headers_append() {
        let mut h = headers(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("via", "1.1 edge"),
            ("host", "Example.com:8080"),
        ]);
        let host = request_host(&http::Uri::from_static("/"), &h);
        let present = Present::of(&h);
        strip_hop_by_hop(&mut h, false, present);
        add_forwarding(
            &mut h,
            &ForwardedClient::new("127.0.0.1".parse().expect("ip")),
            "http",
            host.as_ref(),
            present,
        );
        add_via(&mut h, Version::HTTP_11, present);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.1;host=\"example.com\";proto=http"
        );
        assert_eq!(h["via"], "1.1 edge, 1.1 proxyd");
    }

    #[test]
    fn a_clients_next_connections_on_a_thread_share_what_was_rendered_for_it() {
        let uri = http::Uri::from_static("/");
        let render = |client: &ForwardedClient, host: &str| {
            let mut h = headers(&[("host", host)]);
            let request_host = request_host(&uri, &h);
            let present = Present::of(&h);
            add_forwarding(&mut h, client, "http", request_host.as_ref(), present);
            h
        };
        // One block: the value was shared, not made again.
        let shared = |a: &HeaderMap, b: &HeaderMap, name: &str| {
            a[name].as_bytes().as_ptr() == b[name].as_bytes().as_ptr()
        };
        let ip: IpAddr = "198.51.100.1".parse().expect("ip");
        let first = render(&ForwardedClient::new(ip), "a.example:8080");
        let second = render(&ForwardedClient::new(ip), "a.example:8080");
        assert_eq!(
            second["forwarded"],
            "for=198.51.100.1;host=\"a.example\";proto=http"
        );
        assert_eq!(second["x-forwarded-host"], "a.example");
        assert_eq!(second["x-forwarded-for"], "198.51.100.1");
        for name in ["forwarded", "x-forwarded-host", "x-forwarded-for"] {
            assert!(shared(&first, &second, name), "{name}");
        }

        // Another client gets its own.
        let other = render(
            &ForwardedClient::new("198.51.100.2".parse().expect("ip")),
            "a.example:8080",
        );
        assert_eq!(
            other["forwarded"],
            "for=198.51.100.2;host=\"a.example\";proto=http"
        );
        assert_eq!(other["x-forwarded-for"], "198.51.100.2");
        assert!(!shared(&first, &other, "forwarded"));

        // Another host of the first client: made anew, then shared.
        let b = render(&ForwardedClient::new(ip), "b.example");
        assert_eq!(
            b["forwarded"],
            "for=198.51.100.1;host=\"b.example\";proto=http"
        );
        assert_eq!(b["x-forwarded-host"], "b.example");
        assert!(!shared(&first, &b, "forwarded"));
        assert!(shared(&first, &b, "x-forwarded-for"));
        let b_again = render(&ForwardedClient::new(ip), "b.example");
        assert!(shared(&b, &b_again, "forwarded"));
        assert!(shared(&b, &b_again, "x-forwarded-host"));

        // After as many other clients as the thread keeps, the first is forgotten: its
        // values are made anew, with the same text.
        for i in 0..RECENT_CLIENTS {
            ForwardedClient::new(IpAddr::from([198, 51, 100, 10 + i as u8]));
        }
        let forgotten = render(&ForwardedClient::new(ip), "b.example");
        assert_eq!(forgotten["forwarded"], b["forwarded"]);
        assert_eq!(forgotten["x-forwarded-for"], "198.51.100.1");
        assert!(!shared(&b, &forgotten, "forwarded"));
        assert!(!shared(&b, &forgotten, "x-forwarded-for"));
    }

    #[test]
    fn each_request_of_a_connection_gets_the_forwarding_headers_of_its_own_host() {
        let client = ForwardedClient::new("192.0.2.7".parse().expect("ip"));
        let uri = http::Uri::from_static("/");
        // The first request renders for itself, the second on keeps what it rendered
        // while host and scheme stay; any change renders anew.
        for (request_headers, proto, forwarded_host, forwarded) in [
            (
                vec![("host", "a.example")],
                "http",
                Some("a.example"),
                "for=192.0.2.7;host=\"a.example\";proto=http",
            ),
            (
                vec![("host", "a.example:8080")],
                "http",
                Some("a.example"),
                "for=192.0.2.7;host=\"a.example\";proto=http",
            ),
            (
                vec![("host", "A.example")],
                "http",
                Some("a.example"),
                "for=192.0.2.7;host=\"a.example\";proto=http",
            ),
            (
                vec![("host", "b.example")],
                "http",
                Some("b.example"),
                "for=192.0.2.7;host=\"b.example\";proto=http",
            ),
            (
                vec![("host", "b.example")],
                "https",
                Some("b.example"),
                "for=192.0.2.7;host=\"b.example\";proto=https",
            ),
            (vec![], "https", None, "for=192.0.2.7;proto=https"),
            (
                vec![("host", "b.example")],
                "https",
                Some("b.example"),
                "for=192.0.2.7;host=\"b.example\";proto=https",
            ),
            // A prior hop's Forwarded is kept in front, whatever was rendered before.
            (
                vec![("host", "b.example"), ("forwarded", "for=10.0.0.1")],
                "https",
                Some("b.example"),
                "for=10.0.0.1, for=192.0.2.7;host=\"b.example\";proto=https",
            ),
            (
                vec![("host", "b.example")],
                "https",
                Some("b.example"),
                "for=192.0.2.7;host=\"b.example\";proto=https",
            ),
        ] {
            let mut h = headers(&request_headers);
            let host = request_host(&uri, &h);
            let present = Present::of(&h);
            strip_hop_by_hop(&mut h, false, present);
            add_forwarding(&mut h, &client, proto, host.as_ref(), present);
            let context = format!("{request_headers:?} {proto}");
            assert_eq!(
                h.get("x-forwarded-host").map(|v| v.to_str().expect("text")),
                forwarded_host,
                "{context}"
            );
            assert_eq!(h["forwarded"], forwarded, "{context}");
            assert_eq!(h.get_all("forwarded").iter().count(), 1, "{context}");
            assert_eq!(h["x-forwarded-for"], "192.0.2.7", "{context}");
            assert_eq!(h["x-forwarded-proto"], proto, "{context}");
        }
    }

    #[test]
    fn authorities() {
        for good in [
            "example.com",
            "example.com:8080",
            "EXAMPLE.com:",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "xn--bcher-kva.example",
            "a%20b",
            "a%41:80",
            "example.com:65535",
        ] {
            assert!(valid_authority(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "x\", for=6.6.6.6;host=\"y",
            "a b",
            "a\tb",
            "user@example.com",
            "example.com:http",
            "example.com:65536",
            "example.com:123456",
            "example.com:80:80",
            "[::1",
            "[]",
            "[::1]x",
            "a/b",
            "%zz",
            "a%2:80",
            "a%2",
            ":80",
            "example.com:8a",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn lookalike_header_names() {
        assert!(check_header_names(&headers(&[("transfer_encoding", "chunked")])).is_err());
        assert!(check_header_names(&headers(&[("content_length", "5")])).is_err());
        assert!(check_header_names(&headers(&[("keep_alive", "1")])).is_err());
        assert!(check_header_names(&headers(&[("x_forwarded_for", "1")])).is_ok());
        assert!(check_header_names(&headers(&[("content-length", "5")])).is_ok());
    }

    #[test]
    fn forwarded_parameters_are_quoted() {
        let mut h = headers(&[("host", "a\"b\\c")]);
        let host = request_host(&http::Uri::from_static("/"), &h);
        add_forwarding(
            &mut h,
            &ForwardedClient::new("::1".parse().expect("ip")),
            "https",
            host.as_ref(),
            Present::ALL,
        );
        assert_eq!(
            h["forwarded"],
            "for=\"[::1]\";host=\"a\\\"b\\\\c\";proto=https"
        );
    }

    #[test]
    fn grpc_timeouts() {
        use std::time::Duration;
        let t = |v: &str| grpc_timeout(&headers(&[("grpc-timeout", v)]));
        assert_eq!(t("100m"), Some(Duration::from_millis(100)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("5u"), Some(Duration::from_micros(5)));
        assert_eq!(t("123456789m"), None, "at most 8 digits");
        assert_eq!(t("m"), None);
        assert_eq!(t("10x"), None);
        assert_eq!(t("-1S"), None);
    }

    #[test]
    fn h2_requests_carry_authority_scheme_and_te_trailers() {
        let mut req = http::Request::get("/pkg.Svc/Call?x=1")
            .header("host", "api.example:8443")
            .header("content-type", "application/grpc")
            .body(())
            .expect("request");
        req.extensions_mut().insert(TeTrailers);
        to_h2_request(&mut req, true, "10.0.0.1:9000");
        assert_eq!(req.uri(), "https://api.example:8443/pkg.Svc/Call?x=1");
        assert_eq!(req.version(), Version::HTTP_2);
        assert!(req.headers().get("host").is_none());
        assert_eq!(req.headers()["te"], "trailers");
        let mut bare = http::Request::get("/").body(()).expect("request");
        to_h2_request(&mut bare, false, "10.0.0.1:9000");
        assert_eq!(bare.uri(), "http://10.0.0.1:9000/");
        assert!(bare.headers().get("te").is_none());
        assert!(accepts_trailers(&headers(&[("te", "gzip, trailers")])));
        assert!(!accepts_trailers(&headers(&[("te", "gzip")])));
    }

    #[test]
    fn host_parsing() {
        let uri: http::Uri = "/x".parse().expect("uri");
        let host = |value: &str| {
            request_host(&uri, &headers(&[("host", value)])).map(|h| h.as_str().to_string())
        };
        assert_eq!(host("Example.COM:8080").as_deref(), Some("example.com"));
        assert_eq!(host("example.com.:8080").as_deref(), Some("example.com"));
        assert_eq!(host("example.com").as_deref(), Some("example.com"));
        assert_eq!(host("[::1]:80").as_deref(), Some("::1"));
        assert_eq!(host("[::1]").as_deref(), Some("::1"));
        assert_eq!(host("[::1").as_deref(), Some("::1"));
        assert_eq!(host(":80"), None);
        assert_eq!(host("."), None);
        assert_eq!(host(""), None);
        assert!(request_host(&uri, &headers(&[])).is_none());
        let absolute: http::Uri = "http://API.example.:81/x".parse().expect("uri");
        let from_target = request_host(&absolute, &headers(&[("host", "other")]));
        assert_eq!(
            from_target.as_ref().map(RequestHost::as_str),
            Some("api.example")
        );
    }

    #[test]
    fn forwarded_host_is_the_host_alone() {
        let uri = http::Uri::from_static("/");
        for (value, forwarded_host) in [
            ("example.com", "example.com"),
            ("example.com:8080", "example.com"),
            ("Example.com", "example.com"),
            ("[2001:db8::1]:443", "2001:db8::1"),
        ] {
            let host = request_host(&uri, &headers(&[("host", value)])).expect(value);
            assert_eq!(
                host.to_header_value().expect(value),
                forwarded_host,
                "{value}"
            );
        }
    }

    #[test]
    fn quoted_lengths_are_exact() {
        for value in ["", "example.com", "a\"b\\c", "\"\"", "[::1]"] {
            assert_eq!(quoted_len(value), quoted(value).len(), "{value}");
        }
    }

    #[test]
    fn quoting_escapes_every_quote_and_backslash_and_nothing_else() {
        for (value, expected) in [
            ("", r#""""#),
            ("example.com", r#""example.com""#),
            ("a\"b\\c", r#""a\"b\\c""#),
            ("\"\"", r#""\"\"""#),
            ("\\", r#""\\""#),
            ("x\"", r#""x\"""#),
            ("é\"ü", r#""é\"ü""#),
        ] {
            assert_eq!(quoted(value), expected, "{value}");
        }
    }
}
