//! The `[telemetry]` section: access log format and headers, `[telemetry.otlp]` export.
//! Parsed here, used by [`crate::telemetry`].

use std::time::Duration;

use http::header::HeaderName;
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Doc};
use crate::telemetry::{AccessLogFormat, HeaderPolicy, OtlpConfig, TelemetryConfig};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    access_log: Option<String>,
    #[serde(default)]
    include_query: bool,
    #[serde(default)]
    log_headers: Vec<String>,
    #[serde(default)]
    redact_headers: Vec<String>,
    otlp: Option<Spanned<RawOtlp>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOtlp {
    endpoint: String,
    interval: Option<String>,
    timeout: Option<String>,
    service_name: Option<String>,
}

impl Doc<'_> {
    pub(super) fn build_telemetry(
        &self,
        raw: Option<Spanned<RawTelemetry>>,
    ) -> Result<TelemetryConfig, ConfigError> {
        let Some(raw) = raw else {
            return Ok(TelemetryConfig::default());
        };
        let span = raw.span();
        let raw = raw.into_inner();
        let prefix = "telemetry";
        let access_log = match raw.access_log.as_deref() {
            None => AccessLogFormat::default(),
            Some(s) => AccessLogFormat::parse(s).ok_or_else(|| {
                self.field_error(
                    &span,
                    prefix,
                    "access_log",
                    format!("unknown format {s:?}, expected json, logfmt or off"),
                )
            })?,
        };
        let header_list = |key: &str, names: Vec<String>| -> Result<Vec<HeaderName>, ConfigError> {
            names
                .iter()
                .map(|n| {
                    HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                        self.field_error(&span, prefix, key, format!("{n:?} is not a header name"))
                    })
                })
                .collect()
        };
        let headers = HeaderPolicy {
            log: header_list("log_headers", raw.log_headers)?,
            redact: header_list("redact_headers", raw.redact_headers)?,
        };
        let otlp = match raw.otlp {
            None => None,
            Some(s) => {
                let span = s.span();
                Some(self.build_otlp(s.into_inner(), &span)?)
            }
        };
        Ok(TelemetryConfig {
            access_log,
            include_query: raw.include_query,
            headers,
            otlp,
        })
    }

    fn build_otlp(
        &self,
        raw: RawOtlp,
        span: &std::ops::Range<usize>,
    ) -> Result<OtlpConfig, ConfigError> {
        let prefix = "telemetry.otlp";
        let endpoint = raw.endpoint.trim().to_string();
        let valid = match endpoint.parse::<http::Uri>() {
            Ok(uri) => {
                matches!(uri.scheme_str(), Some("http") | Some("https"))
                    && uri.authority().is_some()
            }
            Err(_) => false,
        };
        if !valid {
            return Err(self.field_error(
                span,
                prefix,
                "endpoint",
                format!(
                    "invalid endpoint {endpoint:?}, expected a URL such as http://127.0.0.1:4317"
                ),
            ));
        }
        let interval = self.duration(
            &raw.interval,
            Duration::from_secs(5),
            span,
            prefix,
            "interval",
        )?;
        if interval.is_zero() {
            return Err(self.field_error(span, prefix, "interval", "must be positive"));
        }
        let timeout = self.duration(
            &raw.timeout,
            Duration::from_secs(10),
            span,
            prefix,
            "timeout",
        )?;
        if timeout.is_zero() {
            return Err(self.field_error(span, prefix, "timeout", "must be positive"));
        }
        let service_name = raw.service_name.unwrap_or_else(|| "proxyd".into());
        if service_name.trim().is_empty() {
            return Err(self.field_error(span, prefix, "service_name", "must not be empty"));
        }
        Ok(OtlpConfig {
            endpoint,
            interval,
            timeout,
            service_name,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::config::Config;
    use crate::telemetry::AccessLogFormat;

    fn err(text: &str) -> String {
        match Config::parse(text, "t.toml") {
            Ok(_) => panic!("accepted an invalid config"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn full_section_parses() {
        let config = Config::parse(
            "[telemetry]\naccess_log = \"logfmt\"\ninclude_query = true\nlog_headers = [\"User-Agent\"]\nredact_headers = [\"x-api-key\"]\n\n[telemetry.otlp]\nendpoint = \"http://127.0.0.1:4317\"\ninterval = \"1s\"\n",
            "t.toml",
        )
        .expect("valid");
        let t = &config.telemetry;
        assert_eq!(t.access_log, AccessLogFormat::Logfmt);
        assert!(t.include_query);
        assert_eq!(t.headers.log[0].as_str(), "user-agent");
        let otlp = t.otlp.as_ref().expect("otlp");
        assert_eq!(otlp.interval, std::time::Duration::from_secs(1));
        assert_eq!(otlp.service_name, "proxyd");
    }

    #[test]
    fn bad_values_name_line_and_field() {
        let e = err("[telemetry]\naccess_log = \"xml\"\n");
        assert!(
            e.starts_with("t.toml:2: telemetry.access_log: unknown format"),
            "{e}"
        );
        let e = err("[telemetry]\ninclude_query = false\nredact_headers = [\"bad header\"]\n");
        assert!(e.starts_with("t.toml:3: telemetry.redact_headers: "), "{e}");
        let e = err("[telemetry]\n\n[telemetry.otlp]\nendpoint = \"127.0.0.1:4317\"\n");
        assert!(
            e.starts_with("t.toml:4: telemetry.otlp.endpoint: invalid endpoint"),
            "{e}"
        );
        let e = err("[telemetry.otlp]\nendpoint = \"http://127.0.0.1:4317\"\ninterval = \"0s\"\n");
        assert!(
            e.starts_with("t.toml:3: telemetry.otlp.interval: must be positive"),
            "{e}"
        );
        let e = err("[telemetry]\nformat = \"json\"\n");
        assert!(e.starts_with("t.toml:2: format: unknown field"), "{e}");
    }
}
