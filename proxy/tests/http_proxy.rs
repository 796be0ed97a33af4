//! HTTP proxying end to end: routing, hygiene, errors, timeouts, upgrades, balancing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A proxy whose listener `web` sends every request to pool `p` = [`up`].
async fn proxy_to(up: &Upstream) -> TestProxy {
    start_proxy(&format!(
        "{WEB}{}[[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"p\"\n",
        pool("p", &[up])
    ))
    .await
}

#[tokio::test]
async fn v1_to_v2_migration_routes_by_host_and_path() {
    let v1 = upstream("v1").await;
    let v2 = upstream("v2").await;
    let config = format!(
        "{WEB}{}{}
[[routes]]
name = \"site\"
listener = \"web\"
host = \"example.com\"
pool = \"v1\"

[[routes]]
name = \"docs-on-v2\"
listener = \"web\"
host = \"example.com\"
path_prefix = \"/docs\"
pool = \"v2\"

[[routes]]
name = \"pricing-on-v2\"
listener = \"web\"
host = \"example.com\"
path = \"/pricing\"
pool = \"v2\"

[[routes]]
name = \"wild\"
listener = \"web\"
host = \"*.example.com\"
pool = \"v2\"
",
        pool("v1", &[&v1]),
        pool("v2", &[&v2])
    );
    let p = start_proxy(&config).await;
    let web = p.addr("web");
    let cases = [
        ("example.com", "/", "v1"),
        ("example.com", "/about", "v1"),
        ("example.com", "/docs", "v2"),
        ("example.com", "/docs/intro", "v2"),
        ("example.com", "/pricing", "v2"),
        ("example.com", "/pricing/old", "v1"),
        ("EXAMPLE.com:80", "/docs/x", "v2"),
        ("shop.example.com", "/", "v2"),
    ];
    for (host, path, want) in cases {
        let r = get(web, host, path).await;
        assert_eq!(r.status, 200, "{host}{path}: {}", r.text());
        assert_eq!(r.json()["upstream"], want, "{host}{path}");
    }
    let r = get(web, "other.org", "/").await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("no route"), "{}", r.text());
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let up = upstream("up").await;
    let p = proxy_to(&up).await;
    let r = raw(
        p.addr("web"),
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close, x-remove-me\r\nX-Remove-Me: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Keep: 1\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    let headers = &r.json()["headers"];
    for gone in [
        "x-remove-me",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} was forwarded: {headers}"
        );
    }
    assert_eq!(headers["x-keep"][0], "1");
    // The upstream's own hop-by-hop headers do not reach the client.
    assert_eq!(r.header("x-internal"), None);
    assert_eq!(r.header("keep-alive"), None);
    assert_eq!(r.header("x-upstream"), Some("up"));
}

#[tokio::test]
async fn forwarding_headers_and_via_are_set() {
    let up = upstream("up").await;
    let p = proxy_to(&up).await;
    let r = raw(
        p.addr("web"),
        b"GET /x HTTP/1.1\r\nHost: Example.com\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nVia: 1.1 edge\r\nConnection: close\r\n\r\n",
    )
    .await;
    let h = &r.json()["headers"];
    assert_eq!(h["x-forwarded-for"][0], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(h["x-forwarded-host"][0], "example.com");
    assert_eq!(
        h["forwarded"][0],
        "for=127.0.0.1;host=\"example.com\";proto=http"
    );
    assert_eq!(h["via"][0], "1.1 edge, 1.1 proxyd");
    assert_eq!(
        h["host"][0], "Example.com",
        "the client's Host is preserved"
    );
    assert_eq!(r.header("via"), Some("1.1 proxyd"));
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused() {
    let up = upstream("up").await;
    let p = proxy_to(&up).await;
    let r = raw(
        p.addr("web"),
        b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(up.hits(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn conflicting_content_lengths_are_refused() {
    let up = upstream("up").await;
    let p = proxy_to(&up).await;
    let r = raw(
        p.addr("web"),
        b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    )
    .await;
    assert_eq!(r.status, 400);
    let r = raw(
        p.addr("web"),
        b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\nhello!",
    )
    .await;
    assert_eq!(r.status, 400);
    let r = raw(p.addr("web"), b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n").await;
    assert_eq!(r.status, 400, "bad chunk size");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn path_is_forwarded_without_normalisation() {
    let up = upstream("up").await;
    let p = proxy_to(&up).await;
    let r = get(p.addr("web"), "h", "/a/../b/./c//d%2F%2e?q=1&q=2").await;
    assert_eq!(r.json()["uri"], "/a/../b/./c//d%2F%2e?q=1&q=2");
}

#[tokio::test]
async fn strip_prefix_removes_the_matched_prefix_only() {
    let up = upstream("up").await;
    let p = start_proxy(&format!(
        "{WEB}{}[[routes]]\nname=\"r\"\nlistener=\"web\"\npath_prefix=\"/api\"\nstrip_prefix=true\npool=\"p\"\n",
        pool("p", &[&up])
    ))
    .await;
    assert_eq!(
        get(p.addr("web"), "h", "/api/users?x=1").await.json()["uri"],
        "/users?x=1"
    );
    assert_eq!(get(p.addr("web"), "h", "/api").await.json()["uri"], "/");
}

#[tokio::test]
async fn upstream_errors_say_who_failed() {
    let up = upstream("up").await;
    let dead = dead_address();
    let config = format!(
        "{WEB}{}
[[pools]]
name = \"dead\"
upstreams = [\"{dead}\"]

[[pools]]
name = \"empty\"

[[pools]]
name = \"slow\"
upstreams = [\"{}\"]
response_timeout = \"300ms\"

[[routes]]
name = \"ok\"
listener = \"web\"
path_prefix = \"/ok\"
pool = \"p\"

[[routes]]
name = \"dead\"
listener = \"web\"
path_prefix = \"/dead\"
pool = \"dead\"

[[routes]]
name = \"empty\"
listener = \"web\"
path_prefix = \"/empty\"
pool = \"empty\"

[[routes]]
name = \"slow\"
listener = \"web\"
path_prefix = \"/slow\"
pool = \"slow\"
",
        pool("p", &[&up]),
        up.address()
    );
    let p = start_proxy(&config).await;
    let web = p.addr("web");
    assert_eq!(get(web, "h", "/ok").await.status, 200);
    let r = get(web, "h", "/dead").await;
    assert_eq!(r.status, 502);
    assert!(r.text().contains("refused"), "{}", r.text());
    assert_eq!(get(web, "h", "/empty").await.status, 503);
    let r = get(web, "h", "/slow/5000").await;
    assert_eq!(r.status, 504);
    assert_eq!(get(web, "h", "/nothing-here").await.status, 404);
}

#[tokio::test]
async fn connect_timeout_gives_504() {
    // A listener whose backlog is full never completes new handshakes.
    let blackhole =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    blackhole
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    blackhole.listen(0).unwrap();
    let addr = blackhole.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    let p = start_proxy(&format!(
        "{WEB}[[pools]]\nname=\"p\"\nupstreams=[\"{addr}\"]\nconnect_timeout=\"200ms\"\n[[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"p\"\n"
    ))
    .await;
    let r = get(p.addr("web"), "h", "/").await;
    assert_eq!(r.status, 504, "{}", r.text());
}

#[tokio::test]
async fn no_healthy_upstream_gives_503_and_recovery_is_seen() {
    let up = upstream("up").await;
    let config = format!(
        "{WEB}[[pools]]\nname=\"p\"\nupstreams=[\"{}\"]\n[pools.health]\npath=\"/status/500\"\ninterval=\"100ms\"\ntimeout=\"1s\"\n[[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"p\"\n",
        up.address()
    );
    let p = start_proxy(&config).await;
    // The check answers 500, so the upstream is taken out within a few intervals.
    let mut status = 0;
    for _ in 0..100 {
        status = get(p.addr("web"), "h", "/").await.status;
        if status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 503);
}

#[tokio::test]
async fn ordered_pool_fails_over_and_round_robin_spreads() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let dead = dead_address();
    let config = format!(
        "{WEB}[[pools]]\nname=\"ordered\"\nbalance=\"ordered\"\nupstreams=[\"{dead}\", \"{}\", \"{}\"]\n{}[[routes]]\nname=\"o\"\nlistener=\"web\"\npath_prefix=\"/o\"\npool=\"ordered\"\n[[routes]]\nname=\"rr\"\nlistener=\"web\"\npath_prefix=\"/rr\"\npool=\"rr\"\n",
        a.address(),
        b.address(),
        pool("rr", &[&a, &b]),
    );
    let p = start_proxy(&config).await;
    for _ in 0..4 {
        let r = get(p.addr("web"), "h", "/o").await;
        assert_eq!(r.status, 200, "the dead first upstream is skipped");
        assert_eq!(r.json()["upstream"], "a");
    }
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..10 {
        let r = get(p.addr("web"), "h", "/rr").await;
        *seen
            .entry(r.json()["upstream"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.get("a"), Some(&5));
    assert_eq!(seen.get("b"), Some(&5));
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let up = upstream("up").await;
    let p = proxy_to(&up).await;
    for _ in 0..20 {
        assert_eq!(get(p.addr("web"), "h", "/").await.status, 200);
    }
    assert_eq!(up.hits(), 20);
    // Each worker thread keeps its own upstream connections: at most one each here.
    let workers = proxy::workers::Workers::get(0).unwrap().len();
    let connections = up.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=workers).contains(&connections),
        "{connections} upstream connections for 20 sequential requests and {workers} workers"
    );
}

#[tokio::test]
async fn header_and_body_limits() {
    let up = upstream("up").await;
    let p = start_proxy(&format!(
        "[[listeners]]\nname=\"web\"\nprotocol=\"http\"\naddress=\"127.0.0.1:0\"\nmax_header_bytes=8192\nmax_body_bytes=1000\n{}[[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"p\"\n",
        pool("p", &[&up])
    ))
    .await;
    let big = "a".repeat(20_000);
    let r = raw(
        p.addr("web"),
        format!("GET / HTTP/1.1\r\nHost: h\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 431);
    let body = "b".repeat(2000);
    let r = raw(
        p.addr("web"),
        format!("POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 2000\r\nConnection: close\r\n\r\n{body}").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 413);
    // A chunked body is cut off at the limit while streaming.
    let r = raw(
        p.addr("web"),
        format!("POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n7d0\r\n{body}\r\n0\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.text());
    let small = "c".repeat(900);
    let r = raw(
        p.addr("web"),
        format!("POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 900\r\nConnection: close\r\n\r\n{small}").as_bytes(),
    )
    .await;
    assert_eq!((r.status, r.text()), (200, "900".to_string()));
}

#[tokio::test]
async fn header_read_timeout_closes_slow_clients() {
    let up = upstream("up").await;
    let p = start_proxy(&format!(
        "[[listeners]]\nname=\"web\"\nprotocol=\"http\"\naddress=\"127.0.0.1:0\"\nheader_timeout=\"300ms\"\n{}[[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"p\"\n",
        pool("p", &[&up])
    ))
    .await;
    let mut s = TcpStream::connect(p.addr("web")).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n").await.unwrap();
    let mut buf = Vec::new();
    // The proxy gives up on the head and closes; nothing is forwarded.
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection was not closed");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let up = upstream("up").await;
    let p = start_proxy(&format!(
        "[[listeners]]\nname=\"web\"\nprotocol=\"http\"\naddress=\"127.0.0.1:0\"\nidle_timeout=\"300ms\"\n{}[[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"p\"\n",
        pool("p", &[&up])
    ))
    .await;
    let mut s = TcpStream::connect(p.addr("web")).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s).await;
    assert_eq!(r.status, 200);
    // Keep-alive connection now idle: closed by the proxy.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    let up = upstream("up").await;
    let p = proxy_to(&up).await;
    let mut s = TcpStream::connect(p.addr("web")).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s).await;
    assert_eq!(r.status, 101);
    assert_eq!(r.header("upgrade"), Some("echo"));
    for msg in [&b"hello"[..], b"through the tunnel"] {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
    }
}

#[tokio::test]
async fn http2_cleartext_clients_are_served() {
    let up = upstream("up").await;
    let p = start_proxy(&format!(
        "{WEB}{}[[routes]]\nname=\"r\"\nlistener=\"web\"\nhost=\"example.com\"\npool=\"p\"\n",
        pool("p", &[&up])
    ))
    .await;
    let stream = TcpStream::connect(p.addr("web")).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("http://example.com/h2")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["headers"]["host"][0], "example.com");
    assert_eq!(json["headers"]["via"][0], "2.0 proxyd");
}

/// An HTTP/1.1 upstream that holds every response until `together` requests are waiting
/// at once: it answers only requests that are in flight at the same time.
async fn gathering_upstream(
    together: usize,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gate = std::sync::Arc::new(tokio::sync::Barrier::new(together));
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let gate = gate.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let gate = gate.clone();
                    async move {
                        gate.wait().await;
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"together")),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

/// The streams of one HTTP/2 connection run in its task, and still concurrently: the
/// upstream answers none of them until all are in flight at once. The server also
/// announces its stream limit (nginx's 128).
#[tokio::test]
async fn http2_streams_of_one_connection_are_in_flight_together() {
    const STREAMS: usize = 24;
    let (up, _up_task) = gathering_upstream(STREAMS).await;
    let p = start_proxy(&format!(
        "{WEB}[[pools]]\nname = \"p\"\nupstreams = [\"{up}\"]\n[[routes]]\nname=\"r\"\nlistener=\"web\"\npool=\"p\"\n"
    ))
    .await;
    let stream = TcpStream::connect(p.addr("web")).await.unwrap();
    let (client, mut conn) = h2::client::handshake(stream).await.unwrap();
    let mut client = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            r = client.ready() => r.unwrap(),
            r = &mut conn => panic!("connection ended: {r:?}"),
        }
    })
    .await
    .unwrap();
    // The server's SETTINGS (read by the connection) carry its stream limit.
    tokio::time::timeout(Duration::from_secs(10), async {
        while conn.max_concurrent_send_streams() == usize::MAX {
            tokio::select! {
                r = &mut conn => panic!("connection ended: {r:?}"),
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    })
    .await
    .expect("the server's SETTINGS arrived");
    assert_eq!(conn.max_concurrent_send_streams(), 128);
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut responses = Vec::new();
    for i in 0..STREAMS {
        let req = http::Request::get(format!("http://example.com/together/{i}"))
            .body(())
            .unwrap();
        client = client.ready().await.unwrap();
        let (response, _) = client.send_request(req, true).unwrap();
        responses.push(response);
    }
    let mut bodies = Vec::new();
    for response in responses {
        let response = tokio::time::timeout(Duration::from_secs(20), response)
            .await
            .expect("every stream answered once all were in flight")
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        bodies.push(got);
    }
    assert!(bodies.iter().all(|b| b == b"together"), "{bodies:?}");
}

/// Large and small answers on one HTTP/2 connection at once all arrive whole: writes the
/// connection holds back while it works (see `http::streams`) are let out complete and in
/// order, small answers grouped and large ones past the hold.
#[tokio::test]
async fn http2_large_and_small_answers_on_one_connection_arrive_whole() {
    use http_body_util::BodyExt;
    let up = upstream("up").await;
    let p = proxy_to(&up).await;
    let stream = TcpStream::connect(p.addr("web")).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut calls = Vec::new();
    for i in 0..40usize {
        let mut sender = sender.clone();
        calls.push(tokio::spawn(async move {
            let path = if i % 8 == 0 {
                format!("/stream/{}", 300_000 + i)
            } else {
                format!("/small/{i}")
            };
            let req = http::Request::get(format!("http://example.com{path}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (i, path, body)
        }));
    }
    for call in calls {
        let (i, path, body) = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .unwrap()
            .unwrap();
        if i % 8 == 0 {
            assert_eq!(body.len(), 300_000 + i, "{path}");
            assert!(body.iter().all(|&b| b == b'x'), "{path}");
        } else {
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["uri"], path.as_str());
        }
    }
}

/// A draining proxy finishes an HTTP/2 request in flight, as it does HTTP/1 ones.
#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_http2_streams() {
    let up = upstream("up").await;
    let p = proxy_to(&up).await;
    let web = p.addr("web");
    let stream = TcpStream::connect(web).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("http://example.com/slow/700")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let slow = tokio::spawn(sender.send_request(req));
    // Wait until the request reached the upstream, then stop.
    up.until_hits(1).await;
    assert_eq!(up.hits(), 1);
    let stop = tokio::spawn(p.daemon.stop());
    let resp = slow.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200, "the in-flight stream completed");
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"up");
    stop.await.unwrap();
    assert!(TcpStream::connect(web).await.is_err());
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let up = upstream("up").await;
    let p = proxy_to(&up).await;
    let web = p.addr("web");
    let held = tokio::spawn(async move { get(web, "h", "/hold").await });
    up.until_hits(1).await;
    let stop = tokio::spawn(p.daemon.stop());
    // The drain waits for the request: answered only now, it still completes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !stop.is_finished(),
        "the drain ended with a request in flight"
    );
    up.release();
    let r = held.await.unwrap();
    assert_eq!(r.status, 200, "the in-flight request completed");
    stop.await.unwrap();
    // After stop, nothing accepts on the listener.
    assert!(TcpStream::connect(web).await.is_err());
}

/// Each worker's accept loop counts for the drain until it stops, as a connection does: a
/// drain cannot end between a loop's accepting a connection and that connection's task
/// starting (the process would end with the connection in hand, unanswered).
/// A connection accepted before the drain began has sent nothing yet: it waits for its
/// first bytes (with a timer and a watch for the drain) rather than reading them at once,
/// and gets the drain's grace to send its request, which is answered and told to close;
/// one that sends nothing is closed after the grace.
#[tokio::test]
async fn connections_silent_when_the_drain_begins_get_a_grace_for_their_first_request() {
    let up = upstream("up").await;
    let proxy = start_proxy(&on_workers(1, &up, "")).await;
    let web = proxy.addr("web");
    let signal = proxy.daemon.shutdown_signal().clone();
    let within = Duration::from_secs(10);
    // The worker's accept loop, then the two connections, accepted and waiting.
    eventually("one accept loop", within, || signal.in_flight() == 1).await;
    let mut late = TcpStream::connect(web).await.unwrap();
    let mut silent = TcpStream::connect(web).await.unwrap();
    eventually("both connections accepted", within, || {
        signal.in_flight() == 3
    })
    .await;
    let stop = tokio::spawn(proxy.daemon.stop());
    eventually("the drain to begin", within, || signal.is_triggered()).await;
    assert_eq!(
        exchange(&mut late, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").await,
        Ok((200, true)),
        "a request sent within the grace is answered, told to close"
    );
    // The grace is 2 s; `header_timeout` (10 s) would close it too, later.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(6), silent.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a connection that sends nothing is closed after the grace: {read:?}"
    );
    tokio::time::timeout(Duration::from_secs(20), stop)
        .await
        .expect("the drain ended")
        .unwrap();
}

#[tokio::test]
async fn accept_loops_count_for_the_drain_until_they_stop() {
    let up = upstream("up").await;
    let proxy = start_proxy(&on_workers(2, &up, "")).await;
    let web = proxy.addr("web");
    let mut client = TcpStream::connect(web).await.unwrap();
    assert_eq!(
        exchange(
            &mut client,
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        .await,
        Ok((200, true))
    );
    drop(client);
    let signal = proxy.daemon.shutdown_signal().clone();
    // The one connection is over; what remains are the two workers' accept loops.
    eventually(
        "one accept loop per worker counted",
        Duration::from_secs(10),
        || signal.in_flight() == 2,
    )
    .await;
    // Stopped, the loops let go and the drain ends.
    tokio::time::timeout(Duration::from_secs(20), proxy.daemon.stop())
        .await
        .expect("the drain ended");
    assert!(signal.is_triggered());
    assert_eq!(signal.in_flight(), 0);
}

/// A connection that ends with its response (the client asked, or HTTP/1.0) ends with
/// the whole response and then a plain end of stream: the client reads to the end
/// without a reset, whichever way the socket is closed.
#[tokio::test]
async fn a_connection_that_ends_with_its_response_ends_after_all_of_it() {
    let up = upstream("up").await;
    let p = proxy_to(&up).await;
    for request in [
        &b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"[..],
        b"GET /b HTTP/1.0\r\nHost: h\r\n\r\n",
    ] {
        let mut client = TcpStream::connect(p.addr("web")).await.unwrap();
        client.write_all(request).await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut response))
            .await
            .expect("the connection ends after its response")
            .expect("a plain end of stream, no reset");
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1."), "{text}");
        assert!(head.contains(" 200 "), "{text}");
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("a length");
        assert_eq!(body.len(), length, "the whole body: {text}");
    }
}
