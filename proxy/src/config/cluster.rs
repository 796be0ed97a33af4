//! The `[cluster]` section: this host's name in the fleet and the etcd cluster the fleet
//! shares its API-owned objects through. Parsed here, used by [`crate::cluster`].

use std::ops::Range;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Doc};

/// `[cluster]`: fleet mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's name in the fleet (default: the host name).
    pub node_name: String,
    /// The etcd cluster.
    pub etcd: EtcdConfig,
}

/// `[cluster] etcd = { ... }`: where the fleet's objects live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://host:2379` or `https://...`).
    pub endpoints: Vec<String>,
    /// Key prefix of this fleet, without a trailing '/': `/proxy/prod`.
    pub prefix: String,
    /// TLS to etcd (`https://` endpoints).
    pub tls: Option<EtcdTls>,
}

/// TLS settings of the etcd connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM CA certificate that signed etcd's server certificates.
    pub ca_file: PathBuf,
    /// Client certificate and key (PEM), when etcd asks for one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    node_name: Option<String>,
    etcd: RawEtcd,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    #[serde(default)]
    endpoints: Vec<String>,
    prefix: String,
    #[serde(default)]
    ca_file: String,
    #[serde(default)]
    cert: String,
    #[serde(default)]
    key: String,
}

/// The host name, from the kernel.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

impl Doc<'_> {
    pub(super) fn build_cluster(
        &self,
        raw: Option<Spanned<RawCluster>>,
    ) -> Result<Option<ClusterConfig>, ConfigError> {
        let Some(raw) = raw else {
            return Ok(None);
        };
        let span = raw.span();
        let raw = raw.into_inner();
        let prefix = "cluster";
        let node_name = match raw.node_name {
            Some(name) => name,
            None => host_name().ok_or_else(|| {
                self.field_error(
                    &span,
                    prefix,
                    "node_name",
                    "the host name cannot be read; set node_name",
                )
            })?,
        };
        crate::state::check_name(&node_name)
            .map_err(|reason| self.field_error(&span, prefix, "node_name", reason))?;
        let etcd = self.build_cluster_etcd(raw.etcd, &span)?;
        Ok(Some(ClusterConfig { node_name, etcd }))
    }

    fn build_cluster_etcd(
        &self,
        raw: RawEtcd,
        span: &Range<usize>,
    ) -> Result<EtcdConfig, ConfigError> {
        // `etcd = { ... }` inline: errors point at its line; a `[cluster.etcd]` table (as
        // the NixOS module writes it): at the key's own line.
        let etcd_line = self.line_of_key(span, "etcd");
        let inline = self
            .text
            .lines()
            .nth(etcd_line.saturating_sub(1))
            .is_some_and(|l| l.trim_start().starts_with("etcd"));
        let bad = |key: &str, reason: String| {
            let line = if inline {
                etcd_line
            } else {
                self.line_of_key(span, key)
            };
            self.error(line, format!("cluster.etcd.{key}"), reason)
        };
        if raw.endpoints.is_empty() {
            return Err(bad("endpoints", "must name at least one endpoint".into()));
        }
        for endpoint in &raw.endpoints {
            let uri = endpoint.parse::<http::Uri>().ok();
            let valid = uri.as_ref().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http") | Some("https"))
                    && u.authority().is_some()
                    && u.path() == "/"
            });
            if !valid {
                return Err(bad(
                    "endpoints",
                    format!("{endpoint:?} is not a URL such as http://10.0.0.5:2379"),
                ));
            }
        }
        let https = raw.endpoints.iter().filter(|e| e.starts_with("https://"));
        let https = https.count();
        if https != 0 && https != raw.endpoints.len() {
            return Err(bad(
                "endpoints",
                "mix of http:// and https:// endpoints; use one scheme".into(),
            ));
        }
        let trimmed = raw.prefix.trim_end_matches('/');
        if !raw.prefix.starts_with('/') || trimmed.is_empty() {
            return Err(bad(
                "prefix",
                format!(
                    "{:?} must start with '/' and name a directory, e.g. /proxy/prod",
                    raw.prefix
                ),
            ));
        }
        if trimmed.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                "prefix",
                format!("{:?} must not contain spaces", raw.prefix),
            ));
        }
        let tls = match (
            raw.ca_file.is_empty(),
            raw.cert.is_empty(),
            raw.key.is_empty(),
        ) {
            (true, true, true) => None,
            (false, true, true) => Some(EtcdTls {
                ca_file: PathBuf::from(raw.ca_file),
                identity: None,
            }),
            (false, false, false) => Some(EtcdTls {
                ca_file: PathBuf::from(raw.ca_file),
                identity: Some((PathBuf::from(raw.cert), PathBuf::from(raw.key))),
            }),
            (true, _, _) => {
                return Err(bad(
                    "ca_file",
                    "a client certificate needs ca_file (the CA of etcd's server certificates)"
                        .into(),
                ))
            }
            (false, false, true) => {
                return Err(bad("key", "cert is set, so key must be set too".into()))
            }
            (false, true, false) => {
                return Err(bad("cert", "key is set, so cert must be set too".into()))
            }
        };
        match (&tls, https > 0) {
            (Some(_), false) => {
                return Err(bad(
                    "ca_file",
                    "TLS settings need https:// endpoints".into(),
                ))
            }
            (None, true) => {
                return Err(bad(
                    "ca_file",
                    "https:// endpoints need ca_file (the CA of etcd's server certificates)".into(),
                ))
            }
            _ => {}
        }
        Ok(EtcdConfig {
            endpoints: raw.endpoints,
            prefix: trimmed.to_string(),
            tls,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::config::Config;

    const WEB: &str =
        "[[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:0\"\n";

    fn parse(cluster: &str) -> Result<Config, String> {
        Config::parse(&format!("{WEB}\n{cluster}"), "t.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn without_the_section_there_is_no_cluster() {
        assert_eq!(parse("").unwrap().cluster, None);
    }

    #[test]
    fn a_full_section_is_read() {
        let c = parse(
            "[cluster]\nnode_name = \"edge-1\"\netcd = { endpoints = [\"https://10.0.0.5:2379\", \"https://10.0.0.6:2379\"], prefix = \"/proxy/prod/\", ca_file = \"/etc/etcd/ca.pem\", cert = \"/etc/etcd/c.pem\", key = \"/etc/etcd/k.pem\" }\n",
        )
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(c.node_name, "edge-1");
        assert_eq!(c.etcd.prefix, "/proxy/prod");
        assert_eq!(c.etcd.endpoints.len(), 2);
        let tls = c.etcd.tls.unwrap();
        assert_eq!(tls.ca_file.to_str(), Some("/etc/etcd/ca.pem"));
        assert!(tls.identity.is_some());
    }

    #[test]
    fn node_name_defaults_to_the_host_name() {
        let c = parse(
            "[cluster]\netcd = { endpoints = [\"http://127.0.0.1:2379\"], prefix = \"/p\" }\n",
        )
        .unwrap()
        .cluster
        .unwrap();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(c.node_name, host.trim());
        assert_eq!(c.etcd.tls, None);
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let line = 6; // WEB is 4 lines, then an empty line, then [cluster]
        let cases = [
            (
                "[cluster]\netcd = { endpoints = [], prefix = \"/p\" }\n",
                line + 1,
                "cluster.etcd.endpoints: must name at least one endpoint",
            ),
            (
                "[cluster]\netcd = { endpoints = [\"10.0.0.5:2379\"], prefix = \"/p\" }\n",
                line + 1,
                "cluster.etcd.endpoints: \"10.0.0.5:2379\" is not a URL",
            ),
            (
                "[cluster]\n\netcd = { endpoints = [\"http://a:1\"], prefix = \"p\" }\n",
                line + 2,
                "cluster.etcd.prefix: \"p\" must start with '/'",
            ),
            (
                "[cluster]\netcd = { endpoints = [\"http://a:1\"], prefix = \"/\" }\n",
                line + 1,
                "cluster.etcd.prefix:",
            ),
            (
                "[cluster]\nnode_name = \"edge 1\"\netcd = { endpoints = [\"http://a:1\"], prefix = \"/p\" }\n",
                line + 1,
                "cluster.node_name:",
            ),
            (
                "[cluster]\netcd = { endpoints = [\"https://a:1\"], prefix = \"/p\", ca_file = \"/ca\", cert = \"/c\" }\n",
                line + 1,
                "cluster.etcd.key: cert is set",
            ),
            (
                "[cluster]\netcd = { endpoints = [\"https://a:1\"], prefix = \"/p\" }\n",
                line + 1,
                "cluster.etcd.ca_file: https:// endpoints need ca_file",
            ),
            (
                "[cluster]\netcd = { endpoints = [\"http://a:1\"], prefix = \"/p\", ca_file = \"/ca\" }\n",
                line + 1,
                "cluster.etcd.ca_file: TLS settings need https://",
            ),
            (
                "[cluster]\netcd = { endpoints = [\"http://a:1\", \"https://b:1\"], prefix = \"/p\", ca_file = \"/ca\" }\n",
                line + 1,
                "cluster.etcd.endpoints: mix of http:// and https://",
            ),
        ];
        for (text, line, want) in cases {
            let err = parse(text).unwrap_err();
            let expected = format!("t.toml:{line}: {want}");
            assert!(
                err.starts_with(&expected),
                "{text}\n got: {err}\nwant: {expected}"
            );
        }
        // The same section as the NixOS module renders it: a `[cluster.etcd]` table.
        let err = parse(
            "[cluster]\nnode_name = \"a\"\n\n[cluster.etcd]\nendpoints = [\"http://a:1\"]\nprefix = \"p\"\n",
        )
        .unwrap_err();
        assert!(
            err.starts_with(&format!("t.toml:{}: cluster.etcd.prefix:", line + 5)),
            "{err}"
        );
        // An unknown key is refused by name.
        let err = parse(
            "[cluster]\netcd = { endpoints = [\"http://a:1\"], prefix = \"/p\", user = \"x\" }\n",
        )
        .unwrap_err();
        assert!(err.contains("user"), "{err}");
        let err = parse("[cluster]\nnode_name = \"a\"\n").unwrap_err();
        assert!(err.contains("etcd"), "{err}");
    }
}
