//! `tls-passthrough` listeners read the server name from a ClientHello even when the client
//! splits it across several TLS records.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::start_proxy;

#[tokio::test]
async fn a_client_hello_split_across_records_is_routed_by_its_name() {
    // A real ClientHello for Shop.Example.test (from OpenSSL), re-cut into 64-byte records.
    let hello = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus/client_hello/split-records"),
    )
    .unwrap();
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let want = hello.len();
    let received = tokio::spawn(async move {
        let (mut s, _) = backend.accept().await.unwrap();
        let mut got = vec![0u8; want];
        s.read_exact(&mut got).await.unwrap();
        got
    });
    let config = format!(
        "[[listeners]]\nname = \"edge\"\nprotocol = \"tls-passthrough\"\naddress = \"127.0.0.1:0\"\n\n\
         [[pools]]\nname = \"shop\"\nupstreams = [\"{backend_addr}\"]\n\n\
         [[tcp_routes]]\nname = \"shop\"\nlistener = \"edge\"\npool = \"shop\"\nsni = \"shop.example.test\"\n"
    );
    let proxy = start_proxy(&config).await;
    let mut client = TcpStream::connect(proxy.addr("edge")).await.unwrap();
    client.write_all(&hello).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), received)
        .await
        .expect("the upstream got the ClientHello")
        .unwrap();
    assert_eq!(got, hello, "forwarded byte for byte");
}
