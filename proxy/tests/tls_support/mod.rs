//! TLS test fixtures: a test CA (rcgen), TLS clients, and a real pebble ACME server with
//! pebble-challtestsrv as its DNS, started on loopback.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority for tests.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf for `names` (DNS names or IPs): (chain PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        self.leaf_with(names, |_| {})
    }

    pub fn leaf_with(
        &self,
        names: &[&str],
        adjust: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        adjust(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        roots_from_pem(&self.pem)
    }
}

pub fn roots_from_pem(pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

pub fn client_config(roots: rustls::RootCertStore, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Connects and completes a TLS handshake with `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake took over 60s"))?
}

/// `GET path` over an established stream with `Connection: close`; returns (status, body).
pub async fn get_over<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    host: &str,
    path: &str,
) -> (u16, String) {
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut buf))
        .await
        .expect("response in time");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The first certificate the server presented, as DER.
pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("peer certificates")[0]
        .as_ref()
        .to_vec()
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    crate::common::free_port()
}

/// Whether `binary` (pebble or pebble-challtestsrv, both from the Debian package `pebble`)
/// is installed; see `common::external_program` for what happens when it is not.
pub fn require(binary: &str) -> bool {
    crate::common::external_program(binary, "Debian package `pebble`").is_some()
}

/// Ports chosen for a pebble before the proxy starts (its directory URL goes in the config).
pub struct PebblePorts {
    pub acme: u16,
    pub management: u16,
    pub dns: u16,
    pub challtest_management: u16,
}

impl PebblePorts {
    pub fn pick() -> PebblePorts {
        PebblePorts {
            acme: free_port(),
            management: free_port(),
            dns: free_port(),
            challtest_management: free_port(),
        }
    }

    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme)
    }
}

/// A running pebble + pebble-challtestsrv; killed on drop.
pub struct Pebble {
    pub ports: PebblePorts,
    pub dir: tempfile::TempDir,
    /// CA that signed pebble's own HTTPS certificate (the proxy's `ca_file`).
    pub api_ca_file: PathBuf,
    api_ca: TestCa,
    pebble: Child,
    dns: Child,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.pebble.kill();
        let _ = self.dns.kill();
        let _ = self.pebble.wait();
        let _ = self.dns.wait();
    }
}

/// Writes pebble's API CA to `dir` before pebble exists, so the proxy config can name it.
pub fn api_ca(dir: &Path) -> (TestCa, PathBuf) {
    let ca = TestCa::new("pebble API test CA");
    let path = dir.join("pebble-api-ca.pem");
    std::fs::write(&path, &ca.pem).unwrap();
    (ca, path)
}

impl Pebble {
    /// Starts pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` of
    /// 127.0.0.1 (every name resolves there through pebble-challtestsrv).
    pub async fn start(
        ports: PebblePorts,
        dir: tempfile::TempDir,
        api_ca: TestCa,
        api_ca_file: PathBuf,
        http_port: u16,
        tls_port: u16,
    ) -> Pebble {
        let (cert, key) = api_ca.leaf(&["localhost", "127.0.0.1"]);
        std::fs::write(dir.path().join("api-cert.pem"), cert).unwrap();
        std::fs::write(dir.path().join("api-key.pem"), key).unwrap();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", ports.acme),
                "managementListenAddress": format!("127.0.0.1:{}", ports.management),
                "certificate": dir.path().join("api-cert.pem"),
                "privateKey": dir.path().join("api-key.pem"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        std::fs::write(dir.path().join("pebble.json"), config.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        let dns = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv6", "", "-defaultIPv4", "127.0.0.1"])
            .args(["-dns01", &format!("127.0.0.1:{}", ports.dns)])
            .args([
                "-management",
                &format!("127.0.0.1:{}", ports.challtest_management),
            ])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start pebble-challtestsrv");
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(dir.path().join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{}", ports.dns)])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start pebble");
        let p = Pebble {
            ports,
            dir,
            api_ca_file,
            api_ca,
            pebble,
            dns,
        };
        for port in [
            p.ports.acme,
            p.ports.management,
            p.ports.challtest_management,
        ] {
            let mut up = false;
            for _ in 0..200 {
                if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(up, "pebble did not listen on {port}: {}", p.log());
        }
        p
    }

    /// Everything pebble logged so far.
    pub fn log(&self) -> String {
        let out = std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default();
        let err = std::fs::read_to_string(self.dir.path().join("pebble.err")).unwrap_or_default();
        format!("{out}{err}")
    }

    /// New-order requests pebble received (its log line per `POST /order-plz`).
    pub fn order_requests(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("POST /order-plz"))
            .count()
    }

    /// The root pebble issues under (it changes on every start).
    pub async fn root_pem(&self) -> String {
        let config = client_config(self.api_ca.roots(), &[b"http/1.1"]);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.ports.management)
            .parse()
            .unwrap();
        let mut stream = tls_connect(addr, "localhost", config)
            .await
            .expect("pebble management API");
        let (status, body) = get_over(&mut stream, "localhost", "/roots/0").await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// y, m, d of a unix day number (civil calendar).
pub fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    (y, m, d)
}

/// Sets a validity of whole days relative to today (negative = in the past).
pub fn validity_days(params: &mut rcgen::CertificateParams, from: i64, to: i64) {
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / 86_400;
    let (y, m, d) = civil_from_days(today + from);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil_from_days(today + to);
    params.not_after = rcgen::date_time_ymd(y, m, d);
}
