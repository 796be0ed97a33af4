//! The read-only status page on the admin listener (`/ui/`), against a real daemon with
//! routes, pools (one upstream down), certificates (one expiring soon), a failing discovery
//! source, a live registration with its own certificate and a held one:
//!
//! - the JSON document (`/ui/api/status`) reports each of them and its state, and no key
//!   material, token or header value appears in it;
//! - headless Chromium renders the page: the DOM, after the page's own polls, shows the
//!   same objects and states, and a screenshot is saved (`PROXY_UPDATE_SCREENSHOT=1` writes
//!   it to docs/status-page.png, the picture in the README);
//! - the listener takes no writes, and `server.admin_ui = false` turns the page off.
//!
//! Chromium (Debian package `chromium`) is required under `./scripts/test`; run by hand
//! without it, the browser test is skipped with a message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;
mod registration_support;
mod tls_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use proxy::registration::client::{self, Announce};
use registration_support::channel;
use tls_support::{validity_days, TestCa};

/// A secret that must never reach the page: sent as a header value and as a hook argument.
const SECRET: &str = "s3cr3t-t0ken-never-shown";

struct Scene {
    proxy: TestProxy,
    admin: SocketAddr,
    dead: String,
    /// The private keys given to the daemon (file and registration).
    keys: Vec<String>,
    _shop: Upstream,
    _billing: Upstream,
    _live: client::Lease,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the daemon and brings every object into its state (upstream checked down,
/// one registration live, one released and so held).
async fn scene(admin_ui: bool) -> Scene {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("Example Test CA");
    let (www_cert, www_key) = ca.leaf_with(&["www.example.com"], |p| validity_days(p, -10, 80));
    let (old_cert, old_key) = ca.leaf_with(&["legacy.example.com"], |p| validity_days(p, -80, 9));
    let (reg_cert, reg_key) =
        ca.leaf_with(&["inventory.example.com"], |p| validity_days(p, -1, 60));
    let www = (
        write(dir.path(), "www.pem", &www_cert),
        write(dir.path(), "www.key", &www_key),
    );
    let old = (
        write(dir.path(), "legacy.pem", &old_cert),
        write(dir.path(), "legacy.key", &old_key),
    );
    let shop = upstream("shop").await;
    let billing = upstream("billing").await;
    let dead = dead_address();
    let port = free_port();
    let config = format!(
        r#"[server]
state_dir = "{{state}}"
admin_listen = "127.0.0.1:0"
admin_ui = {admin_ui}

[[listeners]]
name = "web"
protocol = "http"
address = "127.0.0.1:0"

[[listeners]]
name = "secure"
protocol = "https"
address = "127.0.0.1:0"

[[pools]]
name = "shop"
upstreams = ["{shop}"]

[[pools]]
name = "billing"
upstreams = ["{billing}", "{dead}"]
[pools.health]
path = "/"
interval = "100ms"
timeout = "1s"

[[pools]]
name = "search"
[pools.discovery]
exec = {{ command = ["/bin/sh", "-c", "echo 'catalog unreachable' >&2; exit 3", "--token={SECRET}"], interval = "1s", timeout = "5s" }}

[[routes]]
name = "shop"
listener = "web"
host = "shop.example.com"
pool = "shop"

[[routes]]
name = "billing-api"
listener = "web"
host = "billing.example.com"
path_prefix = "/api"
pool = "billing"

[[routes]]
name = "www"
listener = "secure"
pool = "shop"

[[tls.certificates]]
cert = "{}"
key = "{}"

[[tls.certificates]]
cert = "{}"
key = "{}"

[registration]
hold = "10m"
port_range = "{port}-{port}"
address = "127.0.0.1"
keepalive = "1s"
"#,
        www.0.display(),
        www.1.display(),
        old.0.display(),
        old.1.display(),
        shop = shop.address(),
        billing = billing.address(),
    );
    let proxy = start_proxy_in(dir, &config).await;
    let admin = proxy.daemon.admin_address().expect("admin listener");

    let announce = |name: &str, prefix: &str| Announce {
        endpoint: shop.address(),
        port: u32::from(port),
        path_prefix: prefix.into(),
        name: name.into(),
        tls_certificate_pem: reg_cert.clone(),
        tls_private_key_pem: reg_key.clone(),
        ..Default::default()
    };
    let live = client::register(
        channel(&proxy).await,
        announce("inventory", "/inventory"),
        None,
    )
    .await
    .expect("register inventory");
    let gone = client::register(channel(&proxy).await, announce("orders", "/orders"), None)
        .await
        .expect("register orders");
    gone.release().await;

    // Traffic with a secret header value, on two routes.
    let web = proxy.addr("web");
    for _ in 0..5 {
        let request = format!(
            "GET /cart HTTP/1.1\r\nHost: shop.example.com\r\nAuthorization: Bearer {SECRET}\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(raw(web, request.as_bytes()).await.status, 200);
    }
    assert_eq!(
        get(web, "billing.example.com", "/api/invoices")
            .await
            .status,
        200
    );

    let scene = Scene {
        proxy,
        admin,
        dead,
        keys: vec![www_key, old_key, reg_key],
        _shop: shop,
        _billing: billing,
        _live: live,
    };
    // The health check marks the dead upstream down; the hook fails at once.
    if admin_ui {
        for _ in 0..100 {
            let doc = status(admin).await;
            let down = upstream_of(&doc, "billing", &scene.dead)["health"] == "down";
            let failing = doc["discovery"][0]["ok"] == false;
            if down && failing {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    scene
}

async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> RawResponse {
    raw(
        admin,
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
}

async fn status(admin: SocketAddr) -> serde_json::Value {
    let r = admin_request(admin, "GET", "/ui/api/status").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.json()
}

fn named<'a>(list: &'a serde_json::Value, key: &str, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .and_then(|items| items.iter().find(|i| i[key] == name))
        .unwrap_or_else(|| panic!("no {key} = {name:?} in {list:#}"))
}

fn upstream_of<'a>(doc: &'a serde_json::Value, pool: &str, address: &str) -> &'a serde_json::Value {
    named(
        &named(&doc["pools"], "name", pool)["upstreams"],
        "address",
        address,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_document_reports_every_object_and_its_state_and_no_secret() {
    let s = scene(true).await;
    // The rates are sampled in the background: wait until the traffic shows in them.
    let mut r = admin_request(s.admin, "GET", "/ui/api/status").await;
    for _ in 0..100 {
        let shop = named(&r.json()["routes"], "name", "shop").clone();
        if shop["requests_per_s"]
            .as_array()
            .is_some_and(|rates| rates.iter().any(|v| v.as_f64() > Some(0.0)))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        r = admin_request(s.admin, "GET", "/ui/api/status").await;
    }
    let text = r.text();
    let doc = r.json();

    let daemon = &doc["daemon"];
    assert_eq!(daemon["pid"], std::process::id());
    assert_eq!(daemon["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(daemon["draining"], false);
    assert!(daemon["revision"].as_u64().unwrap() >= 1, "{daemon}");

    let web = named(&doc["listeners"], "name", "web");
    assert_eq!(web["protocol"], "http");
    assert_eq!(web["address"], s.proxy.addr("web").to_string());
    assert_eq!(
        named(&doc["listeners"], "name", "secure")["protocol"],
        "https"
    );

    let shop = named(&doc["routes"], "name", "shop");
    assert_eq!(
        (&shop["host"], &shop["path"], &shop["pool"], &shop["source"]),
        (
            &"shop.example.com".into(),
            &"/".into(),
            &"shop".into(),
            &"file".into()
        )
    );
    assert_eq!(shop["requests"], 5);
    assert_eq!(shop["errors"], 0);
    assert!(
        shop["requests_per_s"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.as_f64().unwrap() > 0.0),
        "the route's rate shows its traffic: {shop}"
    );
    let billing_route = named(&doc["routes"], "name", "billing-api");
    assert_eq!(billing_route["path"], "/api");
    assert_eq!(billing_route["requests"], 1);
    assert_eq!(billing_route["pool_down"], false);

    // The registrations' routes: /inventory live, /orders held.
    let registered: Vec<&serde_json::Value> = doc["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["source"] == "registration")
        .collect();
    assert_eq!(registered.len(), 2, "{:#}", doc["routes"]);
    let orders = registered.iter().find(|r| r["path"] == "/orders").unwrap();
    assert_eq!(orders["held"], true);
    let inventory = registered
        .iter()
        .find(|r| r["path"] == "/inventory")
        .unwrap();
    assert_eq!(inventory["held"], false);

    let billing = named(&doc["pools"], "name", "billing");
    assert_eq!(billing["health_check"], "GET /");
    assert_eq!(billing["available"], 1);
    assert_eq!(upstream_of(&doc, "billing", &s.dead)["health"], "down");
    let good = upstream_of(&doc, "billing", &s._billing.address());
    assert_eq!(
        (&good["health"], &good["state"], &good["origin"]),
        (&"healthy".into(), &"active".into(), &"static".into())
    );
    assert_eq!(
        upstream_of(&doc, "shop", &s._shop.address())["health"],
        "up"
    );
    let search = named(&doc["pools"], "name", "search");
    assert_eq!(search["available"], 0);
    // The registration pool holds the live instance.
    let live_pool = named(&doc["pools"], "name", inventory["pool"].as_str().unwrap());
    assert_eq!(live_pool["source"], "registration");
    assert_eq!(
        live_pool["upstreams"][0]["origin"]
            .as_str()
            .unwrap()
            .split('/')
            .next(),
        Some("registration")
    );

    let www = named(&doc["certificates"], "name", "www.example.com");
    assert_eq!(www["source"], "file");
    assert!(
        www["issuer"].as_str().unwrap().contains("Example Test CA"),
        "{www}"
    );
    assert!(
        (78..=80).contains(&www["days_left"].as_i64().unwrap()),
        "{www}"
    );
    let legacy = named(&doc["certificates"], "name", "legacy.example.com");
    assert!(legacy["days_left"].as_i64().unwrap() < 14, "{legacy}");
    let registered_cert = doc["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["source"] == "registered")
        .expect("the registration's certificate is listed");
    assert_eq!(registered_cert["names"][0], "inventory.example.com");

    let source = named(&doc["discovery"], "pool", "search");
    assert_eq!(
        (&source["kind"], &source["ok"]),
        (&"exec".into(), &false.into())
    );
    assert_eq!(source["target"], "/bin/sh");
    assert!(
        source["last_error"]
            .as_str()
            .unwrap()
            .contains("catalog unreachable"),
        "{source}"
    );

    let registration = named(&doc["registrations"], "name", "inventory");
    assert_eq!(registration["tls"], true);
    assert_eq!(registration["endpoint"], s._shop.address());
    assert_eq!(doc["registrations"].as_array().unwrap().len(), 1);
    let held = doc["registered_routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["held_until_unix_ms"].as_u64().unwrap() > 0)
        .expect("a held route");
    assert_eq!(held["instances"], 0);

    // Problems: the down upstream, the empty pool, the certificate, the source, the hold.
    let problems: Vec<(String, String, String)> = doc["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let field = |k: &str| p[k].as_str().unwrap().to_owned();
            (field("severity"), field("kind"), field("subject"))
        })
        .collect();
    let has = |severity: &str, kind: &str, subject: &str| {
        assert!(
            problems
                .iter()
                .any(|p| p.0 == severity && p.1 == kind && p.2.contains(subject)),
            "no {severity} {kind} {subject} in {problems:?}"
        );
    };
    has("error", "upstream", &format!("billing/{}", s.dead));
    has("error", "pool", "search");
    has("warning", "certificate", "legacy.example.com");
    has("error", "discovery", "search");
    has("warning", "route", "/orders");
    assert!(
        !problems
            .iter()
            .any(|p| p.2.contains("www.example.com") || p.2 == "shop"),
        "healthy objects are no problem: {problems:?}"
    );

    // No key material, token or header value anywhere in the answer.
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    for key in &s.keys {
        let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(
            !text.contains(&body[..40]),
            "a private key appears in the status document"
        );
    }
    assert!(
        !text.contains(SECRET),
        "the token appears in the status document"
    );
    assert!(
        !text.contains("Bearer"),
        "a header value appears in the status document"
    );
    s.proxy.daemon.stop().await;
}

#[tokio::test]
async fn the_admin_listener_stays_read_only_and_the_page_can_be_turned_off() {
    let s = scene(true).await;
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for path in ["/ui/api/status", "/ui/", "/metrics"] {
            let r = admin_request(s.admin, method, path).await;
            assert_eq!(r.status, 405, "{method} {path}");
            assert_eq!(r.header("allow"), Some("GET, HEAD"));
        }
    }
    let page = admin_request(s.admin, "GET", "/ui/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let html = page.text();
    // Everything it loads is its own: no other origin is named.
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );
    for asset in ["/ui/status.js", "/ui/status.css"] {
        let r = admin_request(s.admin, "GET", asset).await;
        assert_eq!(r.status, 200, "{asset}");
        let text = r.text();
        assert!(
            !text.contains("https://") && !text.contains("//cdn"),
            "{asset} loads nothing from elsewhere"
        );
    }
    // The script sends nothing but GETs.
    let script = admin_request(s.admin, "GET", "/ui/status.js").await.text();
    assert!(
        !script.contains("method:") && !script.contains("XMLHttpRequest"),
        "{script}"
    );
    assert_eq!(
        admin_request(s.admin, "GET", "/ui")
            .await
            .header("location"),
        Some("/ui/")
    );
    assert_eq!(
        admin_request(s.admin, "GET", "/ui/nothing").await.status,
        404
    );
    s.proxy.daemon.stop().await;

    let off = scene(false).await;
    for path in ["/ui/", "/ui/api/status", "/ui/status.js"] {
        assert_eq!(
            admin_request(off.admin, "GET", path).await.status,
            404,
            "{path}"
        );
    }
    assert_eq!(
        admin_request(off.admin, "GET", "/metrics").await.status,
        200
    );
    off.proxy.daemon.stop().await;
}

/// The Chromium binary, or `None` (skip) when run by hand without it.
fn chromium() -> Option<PathBuf> {
    external_program("chromium", "Debian package chromium")
}

/// Runs headless Chromium on `url` with `args`; the page's timers run on virtual time, so
/// its polls happen within the budget without waiting for them in real time.
async fn run_chromium(browser: &Path, profile: &Path, args: &[String], url: &str) -> Vec<u8> {
    let mut command = tokio::process::Command::new(browser);
    command
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--hide-scrollbars",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("chromium finished within two minutes")
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The opening tag of the first element carrying `attribute` (e.g. `data-route="shop"`).
fn tag_with<'a>(dom: &'a str, attribute: &str) -> &'a str {
    let at = dom
        .find(attribute)
        .unwrap_or_else(|| panic!("no element with {attribute} in the rendered page:\n{dom}"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap();
    &dom[start..=end]
}

/// The text of the element whose opening tag is `tag`, up to the next `</tr>` or `</li>`.
fn row_after<'a>(dom: &'a str, tag: &str) -> &'a str {
    let start = dom.find(tag).unwrap();
    let rest = &dom[start..];
    let end = ["</tr>", "</li>"]
        .iter()
        .filter_map(|e| rest.find(e))
        .min()
        .unwrap_or(rest.len());
    &rest[..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_the_objects_their_states_and_the_problems() {
    let Some(browser) = chromium() else {
        return;
    };
    let s = scene(true).await;
    let url = format!("http://{}/ui/", s.admin);
    // Steady traffic while the page is open, so the rates and sparklines have something.
    let web = s.proxy.addr("web");
    let traffic = tokio::spawn(async move {
        for i in 0u64.. {
            let _ = get(web, "shop.example.com", "/cart").await;
            if i % 3 == 0 {
                let _ = get(web, "billing.example.com", "/api/invoices").await;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    // Let a few samples of that traffic be taken before the page is opened.
    tokio::time::sleep(proxy::telemetry::history::SAMPLE_EVERY * 2 + Duration::from_secs(1)).await;

    let profile = tempfile::tempdir().unwrap();
    let dom = run_chromium(&browser, profile.path(), &["--dump-dom".into()], &url).await;
    let dom = String::from_utf8(dom).unwrap();

    // The page polled the document and rendered it (not the empty skeleton).
    let body = tag_with(&dom, "data-loaded=");
    assert!(body.contains("data-loaded=\"1\""), "{body}");
    let polls: u32 = body
        .split("data-polls=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(polls >= 2, "the page polls by itself: {body}");
    assert!(
        dom.contains(&format!(">{}<", std::process::id())),
        "the pid is shown"
    );

    // Listeners, routes with their source, pools with each upstream's state.
    tag_with(&dom, "data-listener=\"web\"");
    tag_with(&dom, "data-listener=\"secure\"");
    let shop = tag_with(&dom, "data-route=\"shop\"");
    assert!(
        shop.contains("data-source=\"file\"") && shop.contains("data-pool-down=\"false\""),
        "{shop}"
    );
    let shop_row = row_after(&dom, shop);
    assert!(
        shop_row.contains("shop.example.com") && shop_row.contains("<svg"),
        "route row with host and sparkline: {shop_row}"
    );
    assert!(
        !shop_row.contains(">0/s<"),
        "the route's rate shows its traffic: {shop_row}"
    );
    let held = tag_with(&dom, "data-held=\"true\"");
    assert!(held.contains("data-source=\"registration\""), "{held}");
    assert!(
        held.contains("class=\"warning\""),
        "a held route stands out: {held}"
    );

    let dead = tag_with(&dom, &format!("data-upstream=\"{}\"", s.dead));
    assert!(
        dead.contains("data-health=\"down\"") && dead.contains("class=\"error\""),
        "{dead}"
    );
    let good = tag_with(&dom, &format!("data-upstream=\"{}\"", s._billing.address()));
    assert!(
        good.contains("data-health=\"healthy\"") && !good.contains("class=\"error\""),
        "{good}"
    );
    let search = tag_with(&dom, "data-pool=\"search\"");
    assert!(
        search.contains("error"),
        "a pool with no upstream stands out: {search}"
    );

    // Certificates: the one expiring within 14 days is flagged, the other is not.
    let legacy = tag_with(&dom, "data-certificate=\"legacy.example.com\"");
    assert!(legacy.contains("class=\"warning\""), "{legacy}");
    assert!(
        row_after(&dom, legacy).contains("Example Test CA"),
        "issuer shown"
    );
    let www = tag_with(&dom, "data-certificate=\"www.example.com\"");
    assert!(!www.contains("warning") && !www.contains("error"), "{www}");

    // The failing source, the registration, and the problem list.
    let source = tag_with(&dom, "data-source-pool=\"search\"");
    assert!(
        source.contains("data-ok=\"false\"") && source.contains("class=\"error\""),
        "{source}"
    );
    assert!(row_after(&dom, source).contains("catalog unreachable"));
    let registration = tag_with(&dom, "data-registration=");
    assert!(
        row_after(&dom, registration).contains("inventory"),
        "registration listed"
    );
    let problem = tag_with(&dom, &format!("data-subject=\"billing/{}\"", s.dead));
    assert!(problem.contains("class=\"error\""), "{problem}");
    tag_with(&dom, "data-subject=\"legacy.example.com\"");
    assert!(!dom.contains(SECRET) && !dom.contains("PRIVATE KEY"));

    // The screenshot the README shows.
    let shot = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map_or_else(std::env::temp_dir, PathBuf::from)
        .join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &browser,
        profile.path(),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1360,2000".into(),
        ],
        &url,
    )
    .await;
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(
        png.len() > 20_000,
        "a rendered page, not a blank one ({} bytes)",
        png.len()
    );
    if std::env::var_os("PROXY_UPDATE_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/status-page.png");
        std::fs::write(&docs, &png).unwrap();
        eprintln!("wrote {}", docs.display());
    }
    eprintln!("screenshot: {}", shot.display());
    traffic.abort();
    s.proxy.daemon.stop().await;
}
