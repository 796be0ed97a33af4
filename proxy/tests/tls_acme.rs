//! On-demand certificates against a real pebble ACME server (Debian `pebble`, started by
//! each test on loopback with pebble-challtestsrv resolving every name to 127.0.0.1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod tls_support;

use std::time::Duration;

use common::{pool, scrape_metrics, start_proxy_in, upstream, TestProxy};
use tls_support::{
    api_ca, client_config, get_over, require, roots_from_pem, tls_connect, Pebble, PebblePorts,
};

/// Starts a proxy (http + https listeners, a route for `a.example.test`, on-demand for
/// `a.example.test` and `*.ok.example.test`) and a pebble validating on its listeners.
async fn setup(challenges: &str, extra: &str) -> (TestProxy, Pebble, common::Upstream) {
    let on_demand = format!(
        "{extra}\n\n[tls.on_demand]\nenabled = true\nallow = [\"a.example.test\", \"*.ok.example.test\"]\nmax_orders_per_hour = 50\n"
    );
    setup_with(challenges, &on_demand, "").await
}

/// The proxy and pebble of [`setup`] with `tail` after the `challenges` line (more
/// `[tls.acme]` keys, then further sections) and `server` as the `[server]` section
/// (empty: the test default).
async fn setup_with(
    challenges: &str,
    tail: &str,
    server: &str,
) -> (TestProxy, Pebble, common::Upstream) {
    let state = tempfile::tempdir().unwrap();
    let pebble_dir = tempfile::tempdir().unwrap();
    let ports = PebblePorts::pick();
    let (ca, ca_file) = api_ca(pebble_dir.path());
    let app = upstream("app").await;
    let config = format!(
        r#"{server}
[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:0"

[[listeners]]
name = "secure"
protocol = "https"
address = "127.0.0.1:0"

{pool}
[[routes]]
name = "app"
listener = "secure"
pool = "app"

[tls.acme]
directory = "{directory}"
ca_file = "{ca_file}"
contact = ["mailto:ops@example.test"]
challenges = [{challenges}]
{tail}"#,
        pool = pool("app", &[&app]),
        directory = ports.directory(),
        ca_file = ca_file.display(),
    );
    let proxy = start_proxy_in(state, &config).await;
    let pebble = Pebble::start(
        ports,
        pebble_dir,
        ca,
        ca_file,
        proxy.addr("web").port(),
        proxy.addr("secure").port(),
    )
    .await;
    (proxy, pebble, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allowed_name_gets_a_certificate_and_others_never_cause_an_order() {
    if !require("pebble") || !require("pebble-challtestsrv") {
        return;
    }
    let (proxy, pebble, app) = setup("\"http-01\"", "").await;
    let roots = roots_from_pem(&pebble.root_pem().await);
    let client = client_config(roots.clone(), &[b"http/1.1"]);

    let mut stream = tls_connect(proxy.addr("secure"), "a.example.test", client.clone())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "handshake for an allowed name: {e}\npebble log:\n{}",
                pebble.log()
            )
        });
    let (status, body) = get_over(&mut stream, "a.example.test", "/hello").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"upstream\":\"app\""), "{body}");
    assert!(body.contains("\"x-forwarded-proto\":[\"https\"]"), "{body}");
    assert_eq!(app.hits(), 1);
    assert_eq!(proxy.daemon.tls().orders_created(), 1);
    assert_eq!(pebble.order_requests(), 1, "{}", pebble.log());

    // Not on the list: refused during the handshake, and pebble hears nothing about it.
    let refused_before = proxy.daemon.tls().refused_handshakes();
    let err = tls_connect(proxy.addr("secure"), "evil.example.test", client.clone()).await;
    assert!(
        err.is_err(),
        "a name off the allowlist must not complete a handshake"
    );
    assert_eq!(proxy.daemon.tls().refused_handshakes(), refused_before + 1);
    assert_eq!(proxy.daemon.tls().orders_created(), 1);
    assert_eq!(pebble.order_requests(), 1);
    assert!(
        !pebble.log().contains("evil.example.test"),
        "pebble heard of the refused name"
    );

    // The bare suffix of a wildcard entry is not covered either.
    assert!(
        tls_connect(proxy.addr("secure"), "ok.example.test", client.clone())
            .await
            .is_err()
    );
    assert_eq!(pebble.order_requests(), 1);

    // A second handshake for the issued name needs no order.
    let again = tls_connect(proxy.addr("secure"), "a.example.test", client).await;
    assert!(again.is_ok());
    assert_eq!(pebble.order_requests(), 1);
    proxy.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_parallel_first_handshakes_share_one_order_and_a_restart_orders_nothing() {
    if !require("pebble") || !require("pebble-challtestsrv") {
        return;
    }
    let (proxy, pebble, _app) = setup("\"http-01\"", "").await;
    let roots = roots_from_pem(&pebble.root_pem().await);
    let client = client_config(roots, &[b"http/1.1"]);
    let addr = proxy.addr("secure");
    let handshakes: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                tls_connect(addr, "burst.ok.example.test", client)
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    for h in handshakes {
        h.await
            .unwrap()
            .unwrap_or_else(|e| panic!("parallel handshake failed: {e}\n{}", pebble.log()));
    }
    assert_eq!(proxy.daemon.tls().orders_created(), 1);
    assert_eq!(pebble.order_requests(), 1, "{}", pebble.log());

    // Restart on the same state directory: the certificate comes from SQLite.
    let TestProxy { daemon, dir } = proxy;
    let config = daemon.config().clone();
    daemon.stop().await;
    let restarted = proxy::Daemon::start(config).await.expect("restart");
    let stream = tls_connect(
        restarted.listener_address("secure").unwrap(),
        "burst.ok.example.test",
        client,
    )
    .await;
    assert!(
        stream.is_ok(),
        "stored certificate served after restart: {:?}",
        stream.err()
    );
    assert_eq!(restarted.tls().orders_created(), 0);
    assert_eq!(pebble.order_requests(), 1);
    let info = restarted.tls().certificates();
    assert!(
        info.iter()
            .any(|c| c.name == "burst.ok.example.test" && c.source == proxy::tls::CertSource::Acme),
        "{info:?}"
    );
    // The database holds private keys: owner-only.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(proxy::state::database_path(dir.path()))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "proxy.db mode {mode:o}");
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_alpn_01_is_answered_in_the_acceptor() {
    if !require("pebble") || !require("pebble-challtestsrv") {
        return;
    }
    let (proxy, pebble, _app) = setup("\"tls-alpn-01\"", "").await;
    let roots = roots_from_pem(&pebble.root_pem().await);
    let client = client_config(roots, &[b"http/1.1"]);
    let mut stream = tls_connect(proxy.addr("secure"), "alpn.ok.example.test", client)
        .await
        .unwrap_or_else(|e| panic!("handshake: {e}\n{}", pebble.log()));
    let (status, _) = get_over(&mut stream, "alpn.ok.example.test", "/").await;
    assert_eq!(status, 200);
    let log = pebble.log();
    assert!(log.contains("set VALID by completed challenge"), "{log}");
    assert!(
        !log.contains("validate w/ HTTP"),
        "pebble validated over HTTP:\n{log}"
    );
    proxy.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificate_past_two_thirds_of_its_life_is_renewed_in_the_background() {
    if !require("pebble") || !require("pebble-challtestsrv") {
        return;
    }
    // An issued certificate whose renewal time has passed, stored before the proxy starts.
    let old_ca = tls_support::TestCa::new("expiring issuer");
    let (cert, key) = old_ca.leaf_with(&["renew.ok.example.test"], |p| {
        tls_support::validity_days(p, -10, 1)
    });
    // Create the schema with a daemon, then put the row in with plain SQLite.
    let bootstrap = start_proxy_in(tempfile::tempdir().unwrap(), common::WEB).await;
    let TestProxy { daemon, dir } = bootstrap;
    daemon.stop().await;
    let conn = rusqlite::Connection::open(proxy::state::database_path(dir.path())).unwrap();
    conn.execute(
        "INSERT INTO tls_certificates (name, source, cert_pem, key_pem, updated_at) VALUES (?1, 'acme', ?2, ?3, 0)",
        rusqlite::params!["renew.ok.example.test", cert, key],
    )
    .unwrap();
    drop(conn);

    // Pebble first (the proxy's ports are fixed in advance), so the renewal task finds it.
    let pebble_dir = tempfile::tempdir().unwrap();
    let ports = PebblePorts::pick();
    let (web, secure) = (tls_support::free_port(), tls_support::free_port());
    let (ca, ca_file) = api_ca(pebble_dir.path());
    let directory = ports.directory();
    let pebble = Pebble::start(ports, pebble_dir, ca, ca_file.clone(), web, secure).await;
    let pebble_client = client_config(roots_from_pem(&pebble.root_pem().await), &[]);
    let config = format!(
        r#"
[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:{web}"

[[listeners]]
name = "secure"
protocol = "https"
address = "127.0.0.1:{secure}"

[tls.acme]
directory = "{directory}"
ca_file = "{}"
renew_check_interval = "1s"

[tls.on_demand]
enabled = true
allow = ["*.ok.example.test"]
"#,
        ca_file.display()
    );
    let proxy = start_proxy_in(dir, &config).await;
    let mut renewed = false;
    for _ in 0..120 {
        if tls_connect(
            proxy.addr("secure"),
            "renew.ok.example.test",
            pebble_client.clone(),
        )
        .await
        .is_ok()
        {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        renewed,
        "the renewed certificate (from pebble) is served\n{}",
        pebble.log()
    );
    assert_eq!(pebble.order_requests(), 1);
    let status = proxy.daemon.tls().status();
    assert!(
        status.acme.as_ref().is_some_and(|a| a.renewals >= 1),
        "{status:?}"
    );
    proxy.daemon.stop().await;
}

/// An `ask` endpoint on 127.0.0.1: 200 for `domain=` one of `allowed`, 403 otherwise.
/// Returns its URL, the domains it was asked about, and the accept loop (abort = stopped).
async fn ask_server(
    allowed: &'static [&'static str],
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    tokio::task::JoinHandle<()>,
) {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ask", listener.local_addr().unwrap());
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = asked.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let domain = req
                        .uri()
                        .query()
                        .and_then(|q| q.strip_prefix("domain="))
                        .unwrap_or("")
                        .to_string();
                    let status = if allowed.contains(&domain.as_str()) {
                        200
                    } else {
                        403
                    };
                    seen.lock().unwrap().push(domain);
                    async move {
                        hyper::Response::builder()
                            .status(status)
                            .body(http_body_util::Empty::<bytes::Bytes>::new())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, asked, task)
}

fn refused_on_metrics(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("proxy_tls_handshakes_refused_total "))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ask_endpoint_decides_new_names_and_its_outage_only_blocks_new_names() {
    if !require("pebble") || !require("pebble-challtestsrv") {
        return;
    }
    let (ask, asked, ask_task) = ask_server(&["yes.example.test"]).await;
    // No allow entries and no route host: every name is up to `ask`.
    let (proxy, pebble, _app) = setup_with(
        "\"http-01\"",
        &format!("\n[tls.on_demand]\nenabled = true\nask = \"{ask}\"\n"),
        "[server]\nstate_dir = \"{state}\"\nadmin_listen = \"127.0.0.1:0\"\n",
    )
    .await;
    let admin = proxy.daemon.admin_address().expect("admin listener");
    assert_eq!(refused_on_metrics(&scrape_metrics(admin).await), Some(0));
    let client = client_config(roots_from_pem(&pebble.root_pem().await), &[b"http/1.1"]);

    // `ask` says 200: a certificate from pebble, and the request is routed.
    let mut stream = tls_connect(proxy.addr("secure"), "yes.example.test", client.clone())
        .await
        .unwrap_or_else(|e| panic!("handshake for an asked-yes name: {e}\n{}", pebble.log()));
    let (status, body) = get_over(&mut stream, "yes.example.test", "/").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(pebble.order_requests(), 1, "{}", pebble.log());

    // `ask` says 403: refused, and pebble never hears of the name.
    let denied = tls_connect(proxy.addr("secure"), "no.example.test", client.clone()).await;
    assert!(denied.is_err(), "a name ask refused completed a handshake");
    assert_eq!(pebble.order_requests(), 1);
    assert!(
        !pebble.log().contains("no.example.test"),
        "{}",
        pebble.log()
    );
    assert_eq!(
        *asked.lock().unwrap(),
        ["yes.example.test", "no.example.test"]
    );
    assert_eq!(proxy.daemon.tls().orders_created(), 1);

    // `ask` down: a new name fails closed without an order; the issued one still works.
    ask_task.abort();
    let _ = ask_task.await;
    let new = tls_connect(proxy.addr("secure"), "new.example.test", client.clone()).await;
    assert!(new.is_err(), "a new name got through while ask was down");
    let mut again = tls_connect(proxy.addr("secure"), "yes.example.test", client)
        .await
        .expect("an issued name does not need ask");
    let (status, _) = get_over(&mut again, "yes.example.test", "/").await;
    assert_eq!(status, 200);
    assert_eq!(pebble.order_requests(), 1);
    assert!(!pebble.log().contains("new.example.test"));
    assert_eq!(asked.lock().unwrap().len(), 2, "ask answered while stopped");

    // Both refusals are on /metrics (and in the status counter).
    assert_eq!(proxy.daemon.tls().refused_handshakes(), 2);
    let metrics = scrape_metrics(admin).await;
    assert_eq!(refused_on_metrics(&metrics), Some(2));
    // One order, for the name `ask` allowed; the refused names never reached the CA.
    assert!(
        metrics
            .lines()
            .any(|l| l == "proxy_acme_orders_total{result=\"issued\"} 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("acme"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The failed series exists from the start, at zero.
    assert!(metrics
        .lines()
        .any(|l| l == "proxy_acme_orders_total{result=\"failed\"} 0"));
}
