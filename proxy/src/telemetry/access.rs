//! Access log output: the `access` tracing events (one per request, written by
//! `http::access_log`) rendered as JSON or logfmt lines on standard output, and the rules
//! for which request headers may appear in them.

use std::fmt::Write as _;
use std::io::Write as _;

use http::header::{HeaderMap, HeaderName};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// The tracing target of access log events.
pub const TARGET: &str = "access";

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

/// Writes `access` events to standard output in the configured format.
#[derive(Debug)]
pub struct AccessLayer {
    format: AccessLogFormat,
}

impl AccessLayer {
    /// A layer writing `format` lines.
    pub fn new(format: AccessLogFormat) -> AccessLayer {
        AccessLayer { format }
    }
}

impl<S: Subscriber> Layer<S> for AccessLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET || self.format == AccessLogFormat::Off {
            return;
        }
        let mut line = Line {
            format: self.format,
            out: String::with_capacity(512),
        };
        let mut ts = String::new();
        let _ = SystemTime.format_time(&mut Writer::new(&mut ts));
        line.field("ts", Value::Str(&ts));
        event.record(&mut line);
        let mut out = line.finish();
        out.push('\n');
        // One write per line, so concurrent lines never interleave.
        let _ = std::io::stdout().lock().write_all(out.as_bytes());
    }
}

enum Value<'a> {
    Str(&'a str),
    Number(String),
    Bool(bool),
}

struct Line {
    format: AccessLogFormat,
    out: String,
}

impl Line {
    fn field(&mut self, key: &str, value: Value<'_>) {
        match self.format {
            AccessLogFormat::Json => {
                self.out.push(if self.out.is_empty() { '{' } else { ',' });
                json_string(&mut self.out, key);
                self.out.push(':');
                match value {
                    Value::Str(s) => json_string(&mut self.out, s),
                    Value::Number(n) => self.out.push_str(&n),
                    Value::Bool(b) => self.out.push_str(if b { "true" } else { "false" }),
                }
            }
            AccessLogFormat::Logfmt | AccessLogFormat::Off => {
                if !self.out.is_empty() {
                    self.out.push(' ');
                }
                self.out.push_str(key);
                self.out.push('=');
                match value {
                    Value::Str(s) => logfmt_value(&mut self.out, s),
                    Value::Number(n) => self.out.push_str(&n),
                    Value::Bool(b) => self.out.push_str(if b { "true" } else { "false" }),
                }
            }
        }
    }

    fn finish(mut self) -> String {
        if self.format == AccessLogFormat::Json {
            self.out.push('}');
        }
        self.out
    }
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field.name(), Value::Str(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field.name(), Value::Number(value.to_string()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field.name(), Value::Number(value.to_string()));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field.name(), Value::Bool(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        self.field(field.name(), Value::Str(&text));
    }
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn logfmt_value(out: &mut String, s: &str) {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if plain {
        out.push_str(s);
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

    #[test]
    fn lines_are_valid_json_and_logfmt() {
        let mut line = Line {
            format: AccessLogFormat::Json,
            out: String::new(),
        };
        line.field("path", Value::Str("/a\"b"));
        line.field("status", Value::Number("200".into()));
        line.field("complete", Value::Bool(true));
        let json: serde_json::Value = serde_json::from_str(&line.finish()).unwrap();
        assert_eq!(json["path"], "/a\"b");
        assert_eq!(json["status"], 200);

        let mut line = Line {
            format: AccessLogFormat::Logfmt,
            out: String::new(),
        };
        line.field("route", Value::Str("site"));
        line.field("error", Value::Str("connect refused"));
        line.field("host", Value::Str(""));
        assert_eq!(
            line.finish(),
            "route=site error=\"connect refused\" host=\"\""
        );
    }
}
