//! Fixtures for the registration tests: an in-process proxyd that allows registrations on
//! one port, and a channel to its management socket for the client library.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use proxy::registration::client;

use crate::common::{start_proxy, TestProxy, WEB};

/// A daemon whose registrations may use `port` only, held for `hold`, with `extra` config.
pub async fn proxy_with(port: u16, hold: &str, extra: &str) -> TestProxy {
    start_proxy(&format!(
        "{WEB}\n[registration]\nhold = \"{hold}\"\nport_range = \"{port}-{port}\"\naddress = \"127.0.0.1\"\nmax_wait = \"60s\"\nkeepalive = \"1s\"\n{extra}"
    ))
    .await
}

/// A channel to the daemon's management socket.
pub async fn channel(p: &TestProxy) -> tonic::transport::Channel {
    client::unix_channel(crate::mgmt_support::socket_path(p))
        .await
        .expect("management socket")
}

/// Whether `127.0.0.1:port` stops accepting connections within 10 s.
pub async fn port_closes(port: u16) -> bool {
    port_becomes(port, false).await
}

/// Whether `127.0.0.1:port` accepts connections within 10 s.
pub async fn port_opens(port: u16) -> bool {
    port_becomes(port, true).await
}

/// Whether `127.0.0.1:port` accepts connections (`open`) or refuses them within 10 s,
/// tried every 50 ms.
async fn port_becomes(port: u16, open: bool) -> bool {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(local(port)).await.is_ok() == open {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// `127.0.0.1:port`.
pub fn local(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}
