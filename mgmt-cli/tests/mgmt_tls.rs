//! `proxyctl --addr ... --ca-file [--cert --key]` against a real proxyd (in-process) whose
//! TCP management listener runs TLS (`server.mgmt_tls`) with certificates made here by a
//! test CA (rcgen).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Output;

const PROXYCTL: &str = env!("CARGO_BIN_EXE_proxyctl");

/// A certificate authority that signs leaves for the listener and for clients.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// (chain PEM, key PEM) for `names`, usable as a server or a client certificate.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

struct Daemon {
    daemon: proxy::Daemon,
    _state: tempfile::TempDir,
}

/// A daemon whose TCP management listener uses `cert`/`key` (and `client_ca` if given).
async fn start(files: &Path, client_ca: Option<&Path>) -> Daemon {
    let state = tempfile::tempdir().unwrap();
    let client_ca = client_ca
        .map(|p| format!(", client_ca = \"{}\"", p.display()))
        .unwrap_or_default();
    let text = format!(
        "[server]\nstate_dir = \"{}\"\nadmin_listen = \"\"\nmgmt_listen = \"127.0.0.1:0\"\n\
         mgmt_token_file = \"{}\"\n\
         mgmt_tls = {{ cert = \"{}\", key = \"{}\"{client_ca} }}\n\
         [[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:0\"\n",
        state.path().display(),
        files.join("token").display(),
        files.join("cert.pem").display(),
        files.join("key.pem").display(),
    );
    let config = proxy::Config::parse(&text, "test.toml").expect("valid config");
    let daemon = proxy::Daemon::start(config).await.expect("daemon starts");
    Daemon {
        daemon,
        _state: state,
    }
}

impl Daemon {
    fn addr(&self) -> String {
        self.daemon
            .mgmt_address()
            .expect("TCP listener")
            .to_string()
    }
}

async fn proxyctl(args: &[&str]) -> Output {
    tokio::process::Command::new(PROXYCTL)
        .args(args)
        .output()
        .await
        .expect("run proxyctl")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The listener's CA, its certificate for 127.0.0.1 and localhost, and the token, in `dir`.
fn listener_files(dir: &Path) -> Ca {
    let ca = Ca::new("listener CA");
    let (cert, key) = ca.leaf(&["127.0.0.1", "localhost"]);
    write(dir, "ca.pem", &ca.pem);
    write(dir, "cert.pem", &cert);
    write(dir, "key.pem", &key);
    write(dir, "token", "t0ken\n");
    ca
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxyctl_speaks_tls_with_the_token() {
    let files = tempfile::tempdir().unwrap();
    let dir = files.path();
    listener_files(dir);
    let d = start(dir, None).await;
    let addr = d.addr();
    let token = dir.join("token").display().to_string();
    let ca = dir.join("ca.pem").display().to_string();

    let out = proxyctl(&[
        "--addr",
        &addr,
        "--token-file",
        &token,
        "--ca-file",
        &ca,
        "status",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    // A write goes through too, and is read back over the same kind of connection.
    let out = proxyctl(&[
        "--addr",
        &addr,
        "--token-file",
        &token,
        "--ca-file",
        &ca,
        "pools",
        "add",
        "p",
        "--upstream",
        "127.0.0.1:9",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = proxyctl(&[
        "--addr",
        &addr,
        "--token-file",
        &token,
        "--ca-file",
        &ca,
        "pools",
        "list",
    ])
    .await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains('p'),
        "{}",
        stderr(&out)
    );

    // By name: the certificate's DNS name, reached through --server-name.
    let out = proxyctl(&[
        "--addr",
        &addr,
        "--token-file",
        &token,
        "--ca-file",
        &ca,
        "--server-name",
        "localhost",
        "status",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    // TLS without the token: refused by the token check, as on plaintext.
    let out = proxyctl(&["--addr", &addr, "--ca-file", &ca, "status"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("UNAUTHENTICATED"), "{}", stderr(&out));

    // Plaintext to the TLS port: no answer.
    let out = proxyctl(&["--addr", &addr, "--token-file", &token, "status"]).await;
    assert!(!out.status.success(), "plaintext must fail");

    // A CA that did not sign the listener's certificate: the client refuses it.
    let stranger = Ca::new("stranger CA");
    let wrong_ca = write(dir, "wrong-ca.pem", &stranger.pem)
        .display()
        .to_string();
    let out = proxyctl(&[
        "--addr",
        &addr,
        "--token-file",
        &token,
        "--ca-file",
        &wrong_ca,
        "status",
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("UnknownIssuer") || stderr(&out).contains("certificate"),
        "{}",
        stderr(&out)
    );

    // A name the certificate does not carry: refused as well.
    let out = proxyctl(&[
        "--addr",
        &addr,
        "--token-file",
        &token,
        "--ca-file",
        &ca,
        "--server-name",
        "other.test",
        "status",
    ])
    .await;
    assert!(!out.status.success(), "wrong name must fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxyctl_presents_a_client_certificate_when_the_listener_requires_one() {
    let files = tempfile::tempdir().unwrap();
    let dir = files.path();
    listener_files(dir);
    let clients = Ca::new("clients CA");
    let client_ca = write(dir, "clients.pem", &clients.pem);
    let (cert, key) = clients.leaf(&["operator"]);
    let cert = write(dir, "operator.pem", &cert).display().to_string();
    let key = write(dir, "operator-key.pem", &key).display().to_string();
    let outsider = Ca::new("outsider CA");
    let (other_cert, other_key) = outsider.leaf(&["intruder"]);
    let other_cert = write(dir, "intruder.pem", &other_cert)
        .display()
        .to_string();
    let other_key = write(dir, "intruder-key.pem", &other_key)
        .display()
        .to_string();
    let d = start(dir, Some(&client_ca)).await;
    let addr = d.addr();
    let token = dir.join("token").display().to_string();
    let ca = dir.join("ca.pem").display().to_string();

    let out = proxyctl(&[
        "--addr",
        &addr,
        "--token-file",
        &token,
        "--ca-file",
        &ca,
        "status",
    ])
    .await;
    assert!(!out.status.success(), "no client certificate must fail");

    let out = proxyctl(&[
        "--addr",
        &addr,
        "--token-file",
        &token,
        "--ca-file",
        &ca,
        "--cert",
        &other_cert,
        "--key",
        &other_key,
        "status",
    ])
    .await;
    assert!(
        !out.status.success(),
        "a certificate from another CA must fail"
    );

    let out = proxyctl(&[
        "--addr",
        &addr,
        "--token-file",
        &token,
        "--ca-file",
        &ca,
        "--cert",
        &cert,
        "--key",
        &key,
        "status",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    // --cert without --key, or without --ca-file, is a usage error.
    let out = proxyctl(&["--addr", &addr, "--ca-file", &ca, "--cert", &cert, "status"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--key"), "{}", stderr(&out));
    let out = proxyctl(&["--addr", &addr, "--cert", &cert, "--key", &key, "status"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--ca-file"), "{}", stderr(&out));
}
