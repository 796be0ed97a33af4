//! Fleet mode: this host stores and serves the fleet's TLS objects ([`TlsSink`]).
//!
//! The sync task hands over the fleet's whole TLS set after each applied change. The
//! differences from the stored rows are written in one transaction on the state writer,
//! then served: changed certificates are loaded into the cache, removed ones leave it,
//! and the policy takes the fleet's allowlist. The config file wins on its host: an
//! allowlist pattern it lists, or a certificate stored under the name of one of its
//! certificate files, is reported as shadowed and not taken.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::certs::{CertEntry, CertSource};
use super::store::{FleetRows, StoredCert};
use super::Tls;
use crate::cluster::{CertOrigin, Cluster, Excluded, Kind, TlsObjects, TlsReport, TlsSink};

impl Tls {
    /// From now on API writes, issued certificates, the ACME account and order counts go
    /// to the fleet through `cluster`.
    pub fn join_fleet(&self, cluster: Cluster) {
        self.store.join_fleet(cluster);
    }

    async fn apply_fleet(&self, objects: TlsObjects) -> TlsReport {
        // Most fleet changes are pools and routes: an unchanged TLS set costs a comparison.
        if let Some((applied, report)) = self
            .fleet_applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            if *applied == objects {
                return report.clone();
            }
        }
        let applying = objects.clone();
        let (report, stored) = self.store_and_serve(objects).await;
        // Not stored: the next apply tries again even if nothing changed.
        *self.fleet_applied.lock().unwrap_or_else(|p| p.into_inner()) =
            stored.then(|| (applying, report.clone()));
        report
    }

    /// Returns what was left out, and whether the tables hold the set now.
    async fn store_and_serve(&self, objects: TlsObjects) -> (TlsReport, bool) {
        let mut report = TlsReport::default();
        let shadowed = |kind, name: &str, reason: &str| Excluded {
            kind,
            name: name.to_string(),
            reason: reason.to_string(),
        };
        let config_allow = self.policy.config_entries();
        let mut allow = BTreeSet::new();
        for pattern in objects.allow {
            if config_allow.contains(&pattern) {
                report.shadowed.push(shadowed(
                    Kind::Allow,
                    &pattern,
                    "listed in this host's config file",
                ));
            } else {
                allow.insert(pattern);
            }
        }
        let mut wanted: BTreeMap<String, StoredCert> = BTreeMap::new();
        for cert in objects.certificates {
            if self
                .certs
                .stored(&cert.name)
                .is_some_and(|e| e.info.source == CertSource::File)
            {
                report.shadowed.push(shadowed(
                    Kind::Certificate,
                    &cert.name,
                    "a certificate file of this host's config has this name",
                ));
                continue;
            }
            let source = match cert.origin {
                CertOrigin::Uploaded => CertSource::Api,
                CertOrigin::Issued => CertSource::Acme,
            };
            wanted.insert(
                cert.name.clone(),
                StoredCert {
                    name: cert.name,
                    source,
                    cert_pem: cert.cert_pem,
                    key_pem: cert.key_pem,
                },
            );
        }
        let accounts: BTreeMap<String, String> = objects.accounts.into_iter().collect();

        let (stored, stored_allow, stored_accounts) = match (
            self.store.certificates().await,
            self.store.allowlist().await,
            self.store.accounts().await,
        ) {
            (Ok(c), Ok(a), Ok(acc)) => (c, a, acc),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                tracing::error!(error = %e, "could not read the TLS tables to apply the fleet's TLS objects");
                return (report, false);
            }
        };
        let mut rows = FleetRows::default();
        let stored: BTreeMap<String, StoredCert> =
            stored.into_iter().map(|c| (c.name.clone(), c)).collect();
        rows.removed = stored
            .keys()
            .filter(|name| !wanted.contains_key(*name))
            .cloned()
            .collect();
        for (name, cert) in &wanted {
            let same = stored.get(name).is_some_and(|s| {
                s.source == cert.source && s.cert_pem == cert.cert_pem && s.key_pem == cert.key_pem
            });
            if !same {
                rows.put.push(cert.clone());
            }
        }
        if stored_allow.into_iter().collect::<BTreeSet<_>>() != allow {
            rows.allow = Some(allow.clone());
        }
        if stored_accounts != accounts {
            rows.accounts = Some(accounts);
        }
        let mut stored = true;
        if !rows.is_empty() {
            if let Err(e) = self.store.replace_fleet_rows(rows).await {
                // Served anyway: the fleet has them; the next apply stores them again.
                tracing::error!(error = %e, "could not store the fleet's TLS objects");
                stored = false;
            }
        }
        // Serve exactly the wanted certificates: the cache is compared with them, not with
        // the tables (it may hold a certificate issued here before its write came back).
        for (name, cert) in wanted.iter() {
            let served = self.certs.stored(name);
            if served.is_some_and(|e| e.info.source == cert.source && same_leaf(&e, &cert.cert_pem))
            {
                continue;
            }
            match CertEntry::from_pem(
                name,
                &cert.cert_pem,
                &cert.key_pem,
                cert.source,
                &self.provider,
            ) {
                Ok(entry) => self.certs.insert(Arc::new(entry)),
                Err(e) => report.skipped.push(Excluded {
                    kind: Kind::Certificate,
                    name: name.clone(),
                    reason: format!("unusable certificate: {e}"),
                }),
            }
        }
        for entry in self.certs.all() {
            let fleet_owned = matches!(entry.info.source, CertSource::Api | CertSource::Acme);
            if fleet_owned && !wanted.contains_key(&entry.info.name) {
                self.certs.remove(&entry.info.name);
            }
        }
        self.policy.set_api_entries(allow);
        (report, stored)
    }
}

/// Whether `entry` presents the leaf certificate of `cert_pem`.
fn same_leaf(entry: &CertEntry, cert_pem: &str) -> bool {
    let leaf = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).next();
    match (leaf, entry.certified.cert.first()) {
        (Some(Ok(leaf)), Some(served)) => &leaf == served,
        _ => false,
    }
}

impl TlsSink for Tls {
    fn apply(&self, objects: TlsObjects) -> BoxFuture<'_, TlsReport> {
        Box::pin(self.apply_fleet(objects))
    }
}
