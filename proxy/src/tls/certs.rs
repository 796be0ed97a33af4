//! Certificates in memory: parsed from PEM, indexed by name (exact, then wildcard), and
//! handed to rustls by [`CertResolver`] without a lock.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::TlsError;

/// Where a certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertSource {
    /// `[[tls.certificates]]` in the config file.
    File,
    /// Uploaded through the management API.
    Api,
    /// Issued by the ACME server.
    Acme,
    /// Brought by a registered service; in memory only, gone with its route.
    Registered,
}

impl CertSource {
    /// The name used in the store and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            CertSource::File => "file",
            CertSource::Api => "api",
            CertSource::Acme => "acme",
            CertSource::Registered => "registered",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<CertSource> {
        match s {
            "file" => Some(CertSource::File),
            "api" => Some(CertSource::Api),
            "acme" => Some(CertSource::Acme),
            _ => None,
        }
    }
}

/// What the API reports about a certificate (never the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The name it is stored under (its first DNS name, or the ACME order's name).
    pub name: String,
    /// Every DNS name it covers.
    pub names: Vec<String>,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// Start of validity, seconds since the epoch.
    pub not_before: i64,
    /// End of validity, seconds since the epoch.
    pub not_after: i64,
    /// Where it came from.
    pub source: CertSource,
}

impl CertInfo {
    /// When two thirds of its lifetime have passed: renewal is due from then on.
    pub fn renew_at(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before) * 2 / 3
    }
}

/// A usable certificate: the chain with its signing key, and what it says about itself.
pub struct CertEntry {
    /// For rustls.
    pub certified: Arc<CertifiedKey>,
    /// For reports and renewal.
    pub info: CertInfo,
}

impl fmt::Debug for CertEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertEntry")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Seconds since the epoch, now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl CertEntry {
    /// Parses a PEM chain (leaf first) and its key; checks that they belong together.
    /// `name` is the stored name; empty means the first DNS name of the certificate.
    pub fn from_pem(
        name: &str,
        cert_pem: &str,
        key_pem: &str,
        source: CertSource,
        provider: &CryptoProvider,
    ) -> Result<CertEntry, TlsError> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::Certificate(format!("certificate PEM: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::Certificate(
                "certificate PEM holds no CERTIFICATE block".into(),
            ));
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Certificate(format!("private key PEM: {e}")))?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Certificate(format!("private key: {e}")))?;
        let (names, issuer, not_before, not_after) = describe(leaf)?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|e| {
            TlsError::Certificate(format!("the key does not belong to the certificate: {e}"))
        })?;
        let name = if name.is_empty() {
            names
                .first()
                .cloned()
                .ok_or_else(|| TlsError::Certificate("the certificate names no DNS name".into()))?
        } else {
            name.to_ascii_lowercase()
        };
        Ok(CertEntry {
            certified: Arc::new(certified),
            info: CertInfo {
                name,
                names,
                issuer,
                not_before,
                not_after,
                source,
            },
        })
    }
}

/// Whether a certificate for `names` is presented for `host` (a name or `*.suffix`), by
/// the same rules as [`CertCache::lookup`]: the exact name, or a wildcard whose suffix ends
/// the host.
pub fn covers(names: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    names.iter().any(|n| {
        n == &host
            || n.strip_prefix('*')
                .is_some_and(|suffix| host.len() > suffix.len() && host.ends_with(suffix))
    })
}

/// DNS names (SANs, else the CN), issuer, validity of a DER certificate.
fn describe(der: &CertificateDer<'_>) -> Result<(Vec<String>, String, i64, i64), TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| TlsError::Certificate(format!("certificate: {e}")))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        if let Some(cn) = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
        {
            names.push(cn.to_ascii_lowercase());
        }
    }
    let validity = cert.validity();
    Ok((
        names,
        cert.issuer().to_string(),
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// The certificates by name, rebuilt on every change and read without locks.
#[derive(Default)]
struct CertTable {
    by_name: HashMap<String, Arc<CertEntry>>,
    /// Keyed by the suffix including its leading dot: `*.example.com` -> `.example.com`.
    wildcard: HashMap<String, Arc<CertEntry>>,
    /// For clients that send no SNI: the first file certificate.
    fallback: Option<Arc<CertEntry>>,
}

/// Every certificate the listeners can present, by stored name.
pub struct CertCache {
    entries: Mutex<HashMap<String, Arc<CertEntry>>>,
    /// File certificates in config order (the first is the no-SNI fallback).
    file_order: Mutex<Vec<String>>,
    table: ArcSwap<CertTable>,
}

impl fmt::Debug for CertCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertCache")
            .field("names", &self.table.load().by_name.len())
            .finish()
    }
}

impl Default for CertCache {
    fn default() -> Self {
        CertCache::new()
    }
}

impl CertCache {
    /// An empty cache.
    pub fn new() -> CertCache {
        CertCache {
            entries: Mutex::new(HashMap::new()),
            file_order: Mutex::new(Vec::new()),
            table: ArcSwap::from_pointee(CertTable::default()),
        }
    }

    /// Adds or replaces the certificate stored under its name.
    pub fn insert(&self, entry: Arc<CertEntry>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entry.info.source == CertSource::File {
            let mut order = self.file_order.lock().unwrap_or_else(|p| p.into_inner());
            if !order.contains(&entry.info.name) {
                order.push(entry.info.name.clone());
            }
        }
        entries.insert(entry.info.name.clone(), entry);
        self.publish(&entries);
    }

    /// Removes the certificate stored under `name`; returns it.
    pub fn remove(&self, name: &str) -> Option<Arc<CertEntry>> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let removed = entries.remove(name);
        if removed.is_some() {
            self.publish(&entries);
        }
        removed
    }

    /// The certificate stored under `name`.
    pub fn stored(&self, name: &str) -> Option<Arc<CertEntry>> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Every certificate, by stored name.
    pub fn all(&self) -> Vec<Arc<CertEntry>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = entries.values().cloned().collect();
        all.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        all
    }

    /// The certificate presented for `server_name` (lower-case): exact, then the longest
    /// wildcard; `None` asks for the no-SNI fallback.
    pub fn lookup(&self, server_name: Option<&str>) -> Option<Arc<CertEntry>> {
        let table = self.table.load();
        match server_name {
            Some(name) => table.by_name.get(name).cloned().or_else(|| {
                name.match_indices('.')
                    .find_map(|(i, _)| table.wildcard.get(&name[i..]).cloned())
            }),
            None => table.fallback.clone(),
        }
    }

    fn publish(&self, entries: &HashMap<String, Arc<CertEntry>>) {
        let mut table = CertTable::default();
        // Static certificates win over issued ones for the same name, and a newer
        // certificate over an older one of the same kind.
        let rank = |e: &CertEntry| (e.info.source != CertSource::Acme, e.info.not_after);
        let mut sorted: Vec<&Arc<CertEntry>> = entries.values().collect();
        sorted.sort_by_key(|e| rank(e));
        for entry in sorted {
            for n in &entry.info.names {
                match n.strip_prefix('*') {
                    Some(suffix) => table.wildcard.insert(suffix.to_string(), entry.clone()),
                    None => table.by_name.insert(n.clone(), entry.clone()),
                };
            }
        }
        let order = self.file_order.lock().unwrap_or_else(|p| p.into_inner());
        table.fallback = order.iter().find_map(|n| entries.get(n).cloned());
        self.table.store(Arc::new(table));
    }
}

/// The rustls resolver of every terminating listener: the SNI's certificate from the cache.
/// The acceptor has already made sure one exists (or refused the handshake).
#[derive(Debug)]
pub struct CertResolver {
    pub(super) cache: Arc<CertCache>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(str::to_ascii_lowercase);
        self.cache
            .lookup(name.as_deref())
            .map(|e| e.certified.clone())
    }
}

/// A resolver that always presents one certificate (the TLS-ALPN-01 answer).
#[derive(Debug)]
pub(super) struct OneCert(pub Arc<CertifiedKey>);

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn provider() -> CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    #[test]
    fn covers_follows_the_lookup_rules() {
        let names = vec!["api.example.com".to_string(), "*.apps.example".to_string()];
        assert!(covers(&names, "API.example.com"));
        assert!(covers(&names, "x.apps.example"));
        assert!(covers(&names, "*.apps.example"));
        assert!(!covers(&names, "apps.example"));
        assert!(!covers(&names, "www.example.com"));
        assert!(!covers(&names, "example.com"));
    }

    #[test]
    fn exact_beats_wildcard_and_fallback_is_the_first_file_cert() {
        let cache = CertCache::new();
        let (c, k) = self_signed(&["*.example.com"]);
        cache.insert(Arc::new(
            CertEntry::from_pem("", &c, &k, CertSource::File, &provider()).expect("wild"),
        ));
        let (c, k) = self_signed(&["a.example.com"]);
        cache.insert(Arc::new(
            CertEntry::from_pem("", &c, &k, CertSource::Api, &provider()).expect("exact"),
        ));
        assert_eq!(
            cache.lookup(Some("a.example.com")).expect("a").info.name,
            "a.example.com"
        );
        assert_eq!(
            cache.lookup(Some("b.example.com")).expect("b").info.name,
            "*.example.com"
        );
        assert_eq!(
            cache
                .lookup(Some("x.b.example.com"))
                .expect("deeper")
                .info
                .name,
            "*.example.com"
        );
        assert!(cache.lookup(Some("example.org")).is_none());
        assert_eq!(
            cache.lookup(None).expect("fallback").info.name,
            "*.example.com"
        );
        cache.remove("a.example.com");
        assert_eq!(
            cache.lookup(Some("a.example.com")).expect("a").info.name,
            "*.example.com"
        );
    }

    #[test]
    fn mismatched_key_is_refused() {
        let (c, _) = self_signed(&["a.example.com"]);
        let (_, k) = self_signed(&["b.example.com"]);
        let e =
            CertEntry::from_pem("", &c, &k, CertSource::Api, &provider()).expect_err("mismatch");
        assert!(e.to_string().contains("does not belong"), "{e}");
        let e = CertEntry::from_pem("", "garbage", &k, CertSource::Api, &provider())
            .expect_err("no cert");
        assert!(e.to_string().contains("CERTIFICATE"), "{e}");
    }

    #[test]
    fn renewal_is_due_after_two_thirds() {
        let info = CertInfo {
            name: "a".into(),
            names: vec![],
            issuer: String::new(),
            not_before: 0,
            not_after: 90,
            source: CertSource::Acme,
        };
        assert_eq!(info.renew_at(), 60);
    }
}
