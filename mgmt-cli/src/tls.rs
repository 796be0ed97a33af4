//! `proxyctl tls ...`: the on-demand allowlist, certificates, ACME status.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use proxy_proto::v1 as pb;
use serde::Serialize;

use crate::client::{Clients, Reply};
use crate::output::{fields, Output, Table};

/// TLS commands.
#[derive(Subcommand)]
pub enum TlsCommand {
    /// The on-demand allowlist: list, add, rm.
    #[command(subcommand)]
    Allow(AllowCommand),
    /// Certificates: list, upload, rm, renew.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// ACME account, orders in progress, backoff and counters.
    Status,
}

/// Allowlist commands.
#[derive(Subcommand)]
pub enum AllowCommand {
    /// Lists the entries (config file and API).
    #[command(alias = "ls")]
    List,
    /// Allows `example.com` or `*.example.com` to get certificates on demand.
    Add {
        /// The name or `*.suffix`.
        pattern: String,
    },
    /// Removes an entry added through the API.
    #[command(alias = "delete")]
    Rm {
        /// The entry.
        pattern: String,
    },
}

/// Certificate commands.
#[derive(Subcommand)]
pub enum CertsCommand {
    /// Lists every certificate (name, issuer, expiry, source).
    #[command(alias = "ls")]
    List,
    /// Uploads a PEM chain and its key; served from the next handshake.
    Upload {
        /// PEM file: the certificate, then its intermediates.
        #[arg(long)]
        cert: PathBuf,
        /// PEM file: the private key.
        #[arg(long)]
        key: PathBuf,
        /// Stored name (default: the certificate's first DNS name).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Removes an uploaded or issued certificate.
    #[command(alias = "delete")]
    Rm {
        /// Stored name.
        name: String,
    },
    /// Orders a new certificate for an issued one now.
    Renew {
        /// Stored name.
        name: String,
    },
}

#[derive(Serialize)]
struct Cert {
    name: String,
    names: Vec<String>,
    issuer: String,
    not_after: String,
    renew_at: String,
    source: &'static str,
}

fn time(secs: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn cert(c: &pb::Certificate) -> Cert {
    let source = match pb::CertificateSource::try_from(c.source) {
        Ok(pb::CertificateSource::File) => "file",
        Ok(pb::CertificateSource::Api) => "api",
        Ok(pb::CertificateSource::Acme) => "acme",
        Ok(pb::CertificateSource::Registered) => "registered",
        _ => "",
    };
    Cert {
        name: c.name.clone(),
        names: c.names.clone(),
        issuer: c.issuer.clone(),
        not_after: time(c.not_after),
        renew_at: time(c.renew_at),
        source,
    }
}

fn table(certs: &[Cert]) -> String {
    let mut t = Table::new(&["NAME", "SOURCE", "NOT AFTER", "ISSUER"]);
    for c in certs {
        t.row(vec![
            c.name.clone(),
            c.source.into(),
            c.not_after.clone(),
            c.issuer.clone(),
        ]);
    }
    t.render()
}

/// Runs a `tls` command.
pub async fn run(cmd: TlsCommand, clients: &mut Clients, out: &Output) -> Result<()> {
    let tls = &mut clients.tls;
    match cmd {
        TlsCommand::Allow(AllowCommand::List) => {
            let r = tls
                .list_allowlist(pb::ListAllowlistRequest {})
                .await
                .reply()?;
            let value = serde_json::json!({
                "on_demand_enabled": r.on_demand_enabled,
                "config": r.config_entries,
                "api": r.api_entries,
            });
            out.show(&value, |_| {
                let mut t = Table::new(&["PATTERN", "SOURCE"]);
                for p in &r.config_entries {
                    t.row(vec![p.clone(), "config".into()]);
                }
                for p in &r.api_entries {
                    t.row(vec![p.clone(), "api".into()]);
                }
                t.render()
            })
        }
        TlsCommand::Allow(AllowCommand::Add { pattern }) => {
            let r = tls
                .add_allowlist_entry(pb::AddAllowlistEntryRequest { pattern })
                .await
                .reply()?;
            out.show(&serde_json::json!({ "pattern": r.pattern }), |_| {
                format!("allowed {:?}", r.pattern)
            })
        }
        TlsCommand::Allow(AllowCommand::Rm { pattern }) => {
            tls.remove_allowlist_entry(pb::RemoveAllowlistEntryRequest {
                pattern: pattern.clone(),
            })
            .await
            .reply()?;
            out.show(&serde_json::json!({ "removed": pattern }), |_| {
                format!("removed {pattern:?}")
            })
        }
        TlsCommand::Certs(CertsCommand::List) => {
            let r = tls
                .list_certificates(pb::ListCertificatesRequest {})
                .await
                .reply()?;
            let certs: Vec<Cert> = r.certificates.iter().map(cert).collect();
            out.show(&certs, |c| table(c))
        }
        TlsCommand::Certs(CertsCommand::Upload {
            cert: cert_file,
            key,
            name,
        }) => {
            let cert_pem = std::fs::read_to_string(&cert_file)
                .with_context(|| format!("cannot read {}", cert_file.display()))?;
            let key_pem = std::fs::read_to_string(&key)
                .with_context(|| format!("cannot read {}", key.display()))?;
            let r = tls
                .upload_certificate(pb::UploadCertificateRequest {
                    name,
                    cert_pem,
                    key_pem,
                })
                .await
                .reply()?;
            let c: Vec<Cert> = r.certificate.iter().map(cert).collect();
            out.show(&c, |c| table(c))
        }
        TlsCommand::Certs(CertsCommand::Rm { name }) => {
            tls.remove_certificate(pb::RemoveCertificateRequest { name: name.clone() })
                .await
                .reply()?;
            out.show(&serde_json::json!({ "removed": name }), |_| {
                format!("certificate {name:?} removed")
            })
        }
        TlsCommand::Certs(CertsCommand::Renew { name }) => {
            let r = tls
                .renew_certificate(pb::RenewCertificateRequest { name })
                .await
                .reply()?;
            let c: Vec<Cert> = r.certificate.iter().map(cert).collect();
            out.show(&c, |c| table(c))
        }
        TlsCommand::Status => {
            let s = tls
                .get_acme_status(pb::GetAcmeStatusRequest {})
                .await
                .reply()?;
            let value = serde_json::json!({
                "configured": s.configured,
                "directory": s.directory,
                "account_ready": s.account_ready,
                "on_demand_enabled": s.on_demand_enabled,
                "pending": s.pending,
                "backing_off": s.backing_off.iter().map(|b| serde_json::json!({"name": b.name, "remaining_seconds": b.remaining_seconds})).collect::<Vec<_>>(),
                "orders_last_hour": s.orders_last_hour,
                "orders": s.orders,
                "issued": s.issued,
                "failed": s.failed,
                "renewals": s.renewals,
                "refused_handshakes": s.refused_handshakes,
                "last_error": s.last_error,
            });
            out.show(&value, |_| {
                fields(&[
                    (
                        "acme",
                        if s.configured {
                            s.directory.clone()
                        } else {
                            "not configured".into()
                        },
                    ),
                    (
                        "account",
                        if s.account_ready {
                            "registered".into()
                        } else {
                            "not yet".into()
                        },
                    ),
                    ("on demand", s.on_demand_enabled.to_string()),
                    ("pending", s.pending.join(", ")),
                    (
                        "orders",
                        format!(
                            "{} ({} in the last hour), {} issued, {} failed",
                            s.orders, s.orders_last_hour, s.issued, s.failed
                        ),
                    ),
                    ("renewals", s.renewals.to_string()),
                    ("refused handshakes", s.refused_handshakes.to_string()),
                    ("last error", s.last_error.clone()),
                ])
            })
        }
    }
}
