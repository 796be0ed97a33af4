//! TlsService over the real management socket: allowlist, certificate upload (served from
//! the next handshake, kept across restarts), removal, and the errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;
mod tls_support;

use proxy_proto::v1 as pb;
use proxy_proto::v1::tls_service_client::TlsServiceClient;
use tonic::Code;

use common::{start_proxy_in, TestProxy};
use tls_support::{client_config, tls_connect, TestCa};

const CONFIG: &str = r#"
[[listeners]]
name = "secure"
protocol = "https"
address = "127.0.0.1:0"

[tls.acme]
directory = "https://127.0.0.1:9/dir"

[tls.on_demand]
enabled = true
allow = ["fixed.example.test"]
"#;

#[tokio::test]
async fn allowlist_and_uploaded_certificates_through_the_api() {
    let proxy = start_proxy_in(tempfile::tempdir().unwrap(), CONFIG).await;
    let mut tls =
        TlsServiceClient::new(mgmt_support::unix_channel(&mgmt_support::socket_path(&proxy)).await);

    // Allowlist: config entries are read-only, API entries are normalised and stored.
    let added = tls
        .add_allowlist_entry(pb::AddAllowlistEntryRequest {
            pattern: "*.Shop.Example.test".into(),
        })
        .await
        .unwrap();
    assert_eq!(added.into_inner().pattern, "*.shop.example.test");
    let bad = tls
        .add_allowlist_entry(pb::AddAllowlistEntryRequest {
            pattern: "not a name".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("pattern:"), "{}", bad.message());
    let fixed = tls
        .remove_allowlist_entry(pb::RemoveAllowlistEntryRequest {
            pattern: "fixed.example.test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(fixed.code(), Code::FailedPrecondition);
    let list = tls
        .list_allowlist(pb::ListAllowlistRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.config_entries, ["fixed.example.test"]);
    assert_eq!(list.api_entries, ["*.shop.example.test"]);

    // Upload: served from the next handshake.
    let ca = TestCa::new("upload CA");
    let (cert, key) = ca.leaf(&["up.example.test"]);
    let (_, other_key) = ca.leaf(&["other.example.test"]);
    let mismatch = tls
        .upload_certificate(pb::UploadCertificateRequest {
            name: String::new(),
            cert_pem: cert.clone(),
            key_pem: other_key,
        })
        .await
        .unwrap_err();
    assert_eq!(
        mismatch.code(),
        Code::InvalidArgument,
        "{}",
        mismatch.message()
    );
    let uploaded = tls
        .upload_certificate(pb::UploadCertificateRequest {
            name: String::new(),
            cert_pem: cert,
            key_pem: key,
        })
        .await
        .unwrap()
        .into_inner()
        .certificate
        .unwrap();
    assert_eq!(uploaded.name, "up.example.test");
    assert_eq!(uploaded.source, pb::CertificateSource::Api as i32);
    let client = client_config(ca.roots(), &[]);
    assert!(
        tls_connect(proxy.addr("secure"), "up.example.test", client.clone())
            .await
            .is_ok()
    );

    // Renewal is for issued certificates only; unknown names are NOT_FOUND.
    let renew = tls
        .renew_certificate(pb::RenewCertificateRequest {
            name: "up.example.test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(renew.code(), Code::InvalidArgument);
    let missing = tls
        .remove_certificate(pb::RemoveCertificateRequest {
            name: "nope.example.test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let status = tls
        .get_acme_status(pb::GetAcmeStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        status.configured && status.on_demand_enabled && !status.account_ready,
        "{status:?}"
    );

    // Both survive a restart.
    let TestProxy { daemon, dir } = proxy;
    daemon.stop().await;
    let proxy = start_proxy_in(dir, CONFIG).await;
    let mut tls =
        TlsServiceClient::new(mgmt_support::unix_channel(&mgmt_support::socket_path(&proxy)).await);
    let list = tls
        .list_allowlist(pb::ListAllowlistRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.api_entries, ["*.shop.example.test"]);
    assert!(
        tls_connect(proxy.addr("secure"), "up.example.test", client.clone())
            .await
            .is_ok()
    );

    // Removed: the next handshake for the name is refused (it is not on the allowlist).
    tls.remove_certificate(pb::RemoveCertificateRequest {
        name: "up.example.test".into(),
    })
    .await
    .unwrap();
    assert!(tls
        .list_certificates(pb::ListCertificatesRequest {})
        .await
        .unwrap()
        .into_inner()
        .certificates
        .is_empty());
    assert!(tls_connect(proxy.addr("secure"), "up.example.test", client)
        .await
        .is_err());
    proxy.daemon.stop().await;
}

#[tokio::test]
async fn tls_rows_are_written_by_the_state_writer_and_stop_with_it() {
    let proxy = start_proxy_in(tempfile::tempdir().unwrap(), CONFIG).await;
    let mut tls =
        TlsServiceClient::new(mgmt_support::unix_channel(&mgmt_support::socket_path(&proxy)).await);
    let state = proxy.daemon.state();
    let start = state.snapshot().revision;

    // Each write takes the next revision, like any batch; one that changes nothing does not.
    let allow = |pattern: &str| pb::AddAllowlistEntryRequest {
        pattern: pattern.into(),
    };
    tls.add_allowlist_entry(allow("a.example.test"))
        .await
        .unwrap();
    assert_eq!(state.snapshot().revision, start + 1);
    tls.add_allowlist_entry(allow("a.example.test"))
        .await
        .unwrap();
    assert_eq!(state.snapshot().revision, start + 1);
    let ca = TestCa::new("revision CA");
    let (cert, key) = ca.leaf(&["rev.example.test"]);
    tls.upload_certificate(pb::UploadCertificateRequest {
        name: String::new(),
        cert_pem: cert,
        key_pem: key,
    })
    .await
    .unwrap();
    assert_eq!(state.snapshot().revision, start + 2);
    tls.remove_certificate(pb::RemoveCertificateRequest {
        name: "rev.example.test".into(),
    })
    .await
    .unwrap();
    assert_eq!(state.snapshot().revision, start + 3);

    // Once the writer closes (as for a handoff), this process writes no TLS row either.
    state.close().await;
    let (cert, key) = ca.leaf(&["late.example.test"]);
    let late = tls
        .upload_certificate(pb::UploadCertificateRequest {
            name: String::new(),
            cert_pem: cert,
            key_pem: key,
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::Unavailable, "{}", late.message());
    let late = tls
        .add_allowlist_entry(allow("late.example.test"))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::Unavailable, "{}", late.message());
    let db = rusqlite::Connection::open(proxy.dir.path().join("proxy.db")).unwrap();
    let rows: i64 = db
        .query_row(
            "SELECT (SELECT count(*) FROM tls_certificates) + (SELECT count(*) FROM tls_allowlist WHERE pattern = 'late.example.test')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 0, "a TLS row was written after the writer closed");
    let stored: i64 = db
        .query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(
        stored as u64,
        start + 3,
        "the stored revision counts the TLS writes"
    );
    // Not served either: the upload failed as a whole.
    let client = client_config(ca.roots(), &[]);
    assert!(
        tls_connect(proxy.addr("secure"), "late.example.test", client)
            .await
            .is_err()
    );
}
