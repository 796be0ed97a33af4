//! Registrations on a configured listener never take a declared route's traffic, and a
//! registered route whose hold ran out answers 503, not 404.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;
mod registration_support;

use common::*;
use proxy::registration::client::{self, Announce};
use registration_support::{channel, local};

/// A daemon with listener `web` on `port` (which registrations may join), a declared
/// catch-all route `site` to `site_up` on it, and registrations held for `hold`.
async fn proxy_on(port: u16, site_up: &Upstream, hold: &str) -> TestProxy {
    start_proxy(&format!(
        "[[listeners]]\nname = \"web\"\nprotocol = \"http\"\naddress = \"127.0.0.1:{port}\"\n\
         [registration]\nhold = \"{hold}\"\nport_range = \"{port}-{port}\"\naddress = \"127.0.0.1\"\nmax_wait = \"60s\"\nkeepalive = \"1s\"\n\
         {}\
         [[routes]]\nname = \"site\"\nlistener = \"web\"\npool = \"site\"\n",
        pool("site", &[site_up])
    ))
    .await
}

fn announce(endpoint: &str, port: u16, prefix: &str) -> Announce {
    Announce {
        endpoint: endpoint.into(),
        port: u32::from(port),
        path_prefix: prefix.into(),
        name: "svc".into(),
        ..Default::default()
    }
}

/// `registered:svc...` sorts before `site`: by name alone the registration would win the
/// tie on the same host and path.
#[tokio::test]
async fn a_registration_never_shadows_a_declared_route() {
    let port = free_port();
    let site = upstream("site").await;
    let svc = upstream("svc").await;
    let p = proxy_on(port, &site, "5s").await;
    let lease = client::register(channel(&p).await, announce(&svc.address(), port, "/"), None)
        .await
        .expect("register");
    let r = get(local(port), "any.example", "/x").await;
    assert_eq!(r.header("x-upstream"), Some("site"), "{}", r.text());
    // A more specific registered prefix still gets its own traffic.
    let lease_api = client::register(
        channel(&p).await,
        announce(&svc.address(), port, "/api"),
        None,
    )
    .await
    .expect("register /api");
    let r = get(local(port), "any.example", "/api/v1").await;
    assert_eq!(r.header("x-upstream"), Some("svc"), "{}", r.text());
    drop((lease, lease_api));
}

#[tokio::test]
async fn an_expired_registration_answers_503_not_another_route() {
    let port = free_port();
    let site = upstream("site").await;
    let svc = upstream("svc").await;
    let p = proxy_on(port, &site, "300ms").await;
    let lease = client::register(
        channel(&p).await,
        announce(&svc.address(), port, "/svc"),
        None,
    )
    .await
    .expect("register");
    assert_eq!(
        get(local(port), "h", "/svc/a").await.header("x-upstream"),
        Some("svc")
    );
    lease.release().await;
    // Well past the hold: the route's clients are told the service is unavailable rather
    // than being served by the catch-all route (or getting 404).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    for _ in 0..3 {
        let r = get(local(port), "h", "/svc/a").await;
        assert_eq!(r.status, 503, "{} {:?}", r.text(), r.header("x-upstream"));
    }
    assert_eq!(
        get(local(port), "h", "/other").await.header("x-upstream"),
        Some("site")
    );
    // A service that comes back is served again.
    let _back = client::register(
        channel(&p).await,
        announce(&svc.address(), port, "/svc"),
        None,
    )
    .await
    .expect("register again");
    assert_eq!(
        get(local(port), "h", "/svc/b").await.header("x-upstream"),
        Some("svc")
    );
}
