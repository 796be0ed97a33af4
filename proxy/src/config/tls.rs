//! The `[tls]` section: static certificate files, the ACME account settings and the
//! on-demand policy. Parsed here, used by [`crate::tls`].

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Doc};

/// The ACME challenge types the proxy can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AcmeChallenge {
    /// `http-01`: answered by every `http` listener under `/.well-known/acme-challenge/`.
    Http01,
    /// `tls-alpn-01`: answered in the TLS acceptor of `https` and `tls` listeners.
    TlsAlpn01,
}

impl AcmeChallenge {
    /// The config and ACME name.
    pub fn as_str(self) -> &'static str {
        match self {
            AcmeChallenge::Http01 => "http-01",
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// One `[[tls.certificates]]` entry: a PEM chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// PEM file with the certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[tls.acme]`: where and how certificates are ordered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// Directory URL of the ACME server.
    pub directory: String,
    /// Account contacts (`mailto:` URLs).
    pub contact: Vec<String>,
    /// Extra root certificate (PEM) trusted for the ACME server itself; `None`: the system roots.
    pub ca_file: Option<PathBuf>,
    /// Challenge types offered, in order of preference.
    pub challenges: Vec<AcmeChallenge>,
    /// How often the renewal task looks for certificates past two thirds of their lifetime.
    pub renew_check_interval: Duration,
}

/// `[tls.on_demand]`: which names may get a certificate on their first handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDemandConfig {
    /// Whether unknown names may get certificates at all.
    pub enabled: bool,
    /// Allowed names: `example.com` or `*.example.com` (one label or more). Route hosts are
    /// allowed too.
    pub allow: Vec<String>,
    /// URL asked `GET ask?domain=NAME` for names the list does not allow; 200 allows.
    pub ask: Option<String>,
    /// Most new orders in any hour, over all names.
    pub max_orders_per_hour: u32,
    /// Most new orders in any hour for one name.
    pub max_orders_per_name_per_hour: u32,
}

impl Default for OnDemandConfig {
    fn default() -> Self {
        OnDemandConfig {
            enabled: false,
            allow: Vec::new(),
            ask: None,
            max_orders_per_hour: 30,
            max_orders_per_name_per_hour: 3,
        }
    }
}

/// The `[tls]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// `[[tls.certificates]]`.
    pub certificates: Vec<CertificateFiles>,
    /// `[tls.acme]`, if certificates are ordered.
    pub acme: Option<AcmeConfig>,
    /// `[tls.on_demand]`.
    pub on_demand: OnDemandConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    #[serde(default)]
    certificates: Vec<Spanned<RawCertificate>>,
    acme: Option<Spanned<RawAcme>>,
    on_demand: Option<Spanned<RawOnDemand>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: String,
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcme {
    directory: String,
    #[serde(default)]
    contact: Vec<String>,
    ca_file: Option<String>,
    challenges: Option<Vec<String>>,
    renew_check_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOnDemand {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    allow: Vec<String>,
    ask: Option<String>,
    max_orders_per_hour: Option<u32>,
    max_orders_per_name_per_hour: Option<u32>,
}

/// Checks an allowlist entry: `example.com` or `*.example.com`, lower-cased.
pub fn normalise_allow_entry(entry: &str) -> Result<String, String> {
    let entry = entry.trim().trim_end_matches('.').to_ascii_lowercase();
    let bare = entry.strip_prefix("*.").unwrap_or(&entry);
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if bare.is_empty() || bare.len() > 253 || !bare.split('.').all(valid_label) {
        return Err(format!(
            "{entry:?} is not a domain name (expected example.com or *.example.com)"
        ));
    }
    Ok(entry)
}

impl Doc<'_> {
    pub(super) fn build_tls(&self, raw: Option<Spanned<RawTls>>) -> Result<TlsConfig, ConfigError> {
        let Some(raw) = raw else {
            return Ok(TlsConfig::default());
        };
        let raw = raw.into_inner();
        let mut certificates = Vec::new();
        for (index, spanned) in raw.certificates.into_iter().enumerate() {
            let span = spanned.span();
            let c = spanned.into_inner();
            let prefix = format!("tls.certificates[{index}]");
            if c.cert.trim().is_empty() {
                return Err(self.field_error(&span, &prefix, "cert", "must name a PEM file"));
            }
            if c.key.trim().is_empty() {
                return Err(self.field_error(&span, &prefix, "key", "must name a PEM file"));
            }
            certificates.push(CertificateFiles {
                cert: c.cert.into(),
                key: c.key.into(),
            });
        }
        let acme = match raw.acme {
            None => None,
            Some(s) => {
                let span = s.span();
                Some(self.build_acme(s.into_inner(), &span)?)
            }
        };
        let on_demand = match raw.on_demand {
            None => OnDemandConfig::default(),
            Some(s) => {
                let span = s.span();
                let on_demand = self.build_on_demand(s.into_inner(), &span)?;
                if on_demand.enabled && acme.is_none() {
                    return Err(self.field_error(
                        &span,
                        "tls.on_demand",
                        "enabled",
                        "needs a [tls.acme] section",
                    ));
                }
                on_demand
            }
        };
        Ok(TlsConfig {
            certificates,
            acme,
            on_demand,
        })
    }

    fn build_acme(&self, raw: RawAcme, span: &Range<usize>) -> Result<AcmeConfig, ConfigError> {
        let prefix = "tls.acme";
        if !raw.directory.starts_with("https://") {
            return Err(self.field_error(
                span,
                prefix,
                "directory",
                format!("{:?} must be an https:// URL", raw.directory),
            ));
        }
        for (i, c) in raw.contact.iter().enumerate() {
            if !c.starts_with("mailto:") || c.len() <= "mailto:".len() {
                return Err(self.field_error(
                    span,
                    prefix,
                    "contact",
                    format!("contact[{i}] {c:?} must be a mailto: URL"),
                ));
            }
        }
        let challenges = match raw.challenges {
            None => vec![AcmeChallenge::Http01, AcmeChallenge::TlsAlpn01],
            Some(list) => {
                let mut out = Vec::new();
                for name in &list {
                    let c = match name.as_str() {
                        "http-01" => AcmeChallenge::Http01,
                        "tls-alpn-01" => AcmeChallenge::TlsAlpn01,
                        other => {
                            return Err(self.field_error(
                                span,
                                prefix,
                                "challenges",
                                format!(
                                    "unknown challenge {other:?}, expected http-01 or tls-alpn-01"
                                ),
                            ))
                        }
                    };
                    if !out.contains(&c) {
                        out.push(c);
                    }
                }
                if out.is_empty() {
                    return Err(self.field_error(
                        span,
                        prefix,
                        "challenges",
                        "must name at least one challenge",
                    ));
                }
                out
            }
        };
        let renew_check_interval = self.duration(
            &raw.renew_check_interval,
            Duration::from_secs(3600),
            span,
            prefix,
            "renew_check_interval",
        )?;
        if renew_check_interval.is_zero() {
            return Err(self.field_error(span, prefix, "renew_check_interval", "must be positive"));
        }
        Ok(AcmeConfig {
            directory: raw.directory,
            contact: raw.contact,
            ca_file: raw.ca_file.filter(|f| !f.is_empty()).map(PathBuf::from),
            challenges,
            renew_check_interval,
        })
    }

    fn build_on_demand(
        &self,
        raw: RawOnDemand,
        span: &Range<usize>,
    ) -> Result<OnDemandConfig, ConfigError> {
        let prefix = "tls.on_demand";
        let mut allow = Vec::new();
        for (i, entry) in raw.allow.iter().enumerate() {
            let entry = normalise_allow_entry(entry)
                .map_err(|r| self.field_error(span, prefix, "allow", format!("allow[{i}]: {r}")))?;
            allow.push(entry);
        }
        let ask = match raw.ask.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => {
                if !url.starts_with("http://") || url.parse::<http::Uri>().is_err() {
                    return Err(self.field_error(
                        span,
                        prefix,
                        "ask",
                        format!("{url:?} must be an http:// URL"),
                    ));
                }
                Some(url.to_string())
            }
        };
        let defaults = OnDemandConfig::default();
        let max_orders_per_hour = raw
            .max_orders_per_hour
            .unwrap_or(defaults.max_orders_per_hour);
        if max_orders_per_hour == 0 {
            return Err(self.field_error(
                span,
                prefix,
                "max_orders_per_hour",
                "must be at least 1",
            ));
        }
        let max_orders_per_name_per_hour = raw
            .max_orders_per_name_per_hour
            .unwrap_or(defaults.max_orders_per_name_per_hour);
        if max_orders_per_name_per_hour == 0 {
            return Err(self.field_error(
                span,
                prefix,
                "max_orders_per_name_per_hour",
                "must be at least 1",
            ));
        }
        Ok(OnDemandConfig {
            enabled: raw.enabled,
            allow,
            ask,
            max_orders_per_hour,
            max_orders_per_name_per_hour,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn err(text: &str) -> String {
        match Config::parse(text, "t.toml") {
            Ok(_) => panic!("accepted an invalid config"),
            Err(e) => e.to_string(),
        }
    }

    const ACME: &str = "[tls.acme]\ndirectory = \"https://127.0.0.1:14000/dir\"\n";

    #[test]
    fn full_tls_section_parses() {
        let text = format!(
            "[[tls.certificates]]\ncert = \"a.pem\"\nkey = \"a.key\"\n\n{ACME}contact = [\"mailto:ops@example.com\"]\nchallenges = [\"tls-alpn-01\"]\n\n[tls.on_demand]\nenabled = true\nallow = [\"Example.com\", \"*.customers.example.com\"]\nask = \"http://127.0.0.1:9/ask\"\nmax_orders_per_hour = 5\n"
        );
        let config = Config::parse(&text, "t.toml").expect("valid");
        assert_eq!(config.tls.certificates.len(), 1);
        assert_eq!(
            config.tls.on_demand.allow,
            ["example.com", "*.customers.example.com"]
        );
        assert_eq!(config.tls.on_demand.max_orders_per_hour, 5);
        let acme = config.tls.acme.expect("acme");
        assert_eq!(acme.challenges, [super::AcmeChallenge::TlsAlpn01]);
    }

    #[test]
    fn on_demand_needs_acme() {
        let e = err("[tls.on_demand]\nenabled = true\n");
        assert!(
            e.starts_with("t.toml:2: tls.on_demand.enabled: needs a [tls.acme]"),
            "{e}"
        );
    }

    #[test]
    fn bad_allow_entry_names_the_field() {
        let e = err(&format!(
            "{ACME}\n[tls.on_demand]\nenabled = true\nallow = [\"ok.example\", \"bad name\"]\n"
        ));
        assert!(
            e.starts_with("t.toml:6: tls.on_demand.allow: allow[1]"),
            "{e}"
        );
    }

    #[test]
    fn unknown_challenge_and_plain_directory_are_refused() {
        let e = err("[tls.acme]\ndirectory = \"https://x/dir\"\nchallenges = [\"dns-01\"]\n");
        assert!(
            e.starts_with("t.toml:3: tls.acme.challenges: unknown challenge"),
            "{e}"
        );
        let e = err("[tls.acme]\ndirectory = \"http://x/dir\"\n");
        assert!(e.starts_with("t.toml:2: tls.acme.directory:"), "{e}");
    }

    #[test]
    fn unknown_key_in_tls_is_refused() {
        let e = err("[[tls.certificates]]\ncert = \"a\"\nkey = \"b\"\nchain = \"c\"\n");
        assert!(e.contains("chain"), "{e}");
    }
}
