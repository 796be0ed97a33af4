//! The `dns` discovery source against a small DNS server started by the test on
//! 127.0.0.1:0 (UDP, answers built with hickory-proto): A records with a configured port,
//! SRV records with their own ports, and a SERVFAIL that must not empty the pool.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod mgmt_support;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinEncodable};
use proxy_proto::v1 as pb;
use proxy_proto::v1::discovery_service_client::DiscoveryServiceClient;
use tokio::net::UdpSocket;

/// What the test DNS server answers.
#[derive(Clone, Default)]
struct Zone {
    /// A records of `svc.test.`.
    a: Vec<Ipv4Addr>,
    /// SRV records of `_http._tcp.svc.test.`: (target host label, port); each target
    /// `<label>.test.` resolves to 127.0.0.1.
    srv: Vec<(String, u16)>,
    /// Answer SERVFAIL to everything.
    broken: bool,
}

async fn dns_server(zone: Arc<Mutex<Zone>>) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Ok(query) = Message::from_bytes(&buf[..n]) else {
                continue;
            };
            let zone = zone.lock().unwrap().clone();
            let mut answer = Message::new();
            answer
                .set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_op_code(query.op_code())
                .set_recursion_desired(query.recursion_desired())
                .set_recursion_available(true)
                .set_authoritative(true);
            answer.add_queries(query.queries().to_vec());
            if zone.broken {
                answer.set_response_code(ResponseCode::ServFail);
            } else if let Some(q) = query.queries().first() {
                let name = q.name().to_utf8();
                match (q.query_type(), name.as_str()) {
                    (RecordType::A, "svc.test.") => {
                        for ip in &zone.a {
                            answer.add_answer(Record::from_rdata(
                                q.name().clone(),
                                1,
                                RData::A(A(*ip)),
                            ));
                        }
                    }
                    (RecordType::SRV, "_http._tcp.svc.test.") => {
                        for (label, port) in &zone.srv {
                            let target = Name::from_ascii(format!("{label}.test.")).unwrap();
                            answer.add_answer(Record::from_rdata(
                                q.name().clone(),
                                1,
                                RData::SRV(SRV::new(0, 1, *port, target)),
                            ));
                        }
                    }
                    (RecordType::A, n) if n.ends_with(".test.") => {
                        answer.add_answer(Record::from_rdata(
                            q.name().clone(),
                            1,
                            RData::A(A(Ipv4Addr::LOCALHOST)),
                        ));
                    }
                    _ => {}
                }
            }
            if let Ok(bytes) = answer.to_bytes() {
                let _ = socket.send_to(&bytes, from).await;
            }
        }
    });
    addr
}

fn members(p: &TestProxy) -> BTreeSet<String> {
    let routing = p.daemon.routing().routing();
    routing
        .pool("svc")
        .map(|r| r.upstreams().iter().map(|u| u.address.clone()).collect())
        .unwrap_or_default()
}

/// How long a discovered change may take to reach the routing table.
const SEEN_WITHIN: Duration = Duration::from_secs(20);

fn config(dns: &str) -> String {
    format!("{WEB}\n[[pools]]\nname = \"svc\"\n[pools.discovery]\n{dns}\n\n[[routes]]\nname = \"all\"\nlistener = \"web\"\npool = \"svc\"\n")
}

async fn last_error(p: &TestProxy) -> String {
    let channel = mgmt_support::unix_channel(&mgmt_support::socket_path(p)).await;
    let mut client = DiscoveryServiceClient::new(channel);
    client
        .list_sources(pb::ListSourcesRequest {})
        .await
        .unwrap()
        .into_inner()
        .sources[0]
        .last_error
        .clone()
}

#[tokio::test]
async fn a_records_follow_the_zone_and_servfail_keeps_the_last_set() {
    let zone = Arc::new(Mutex::new(Zone {
        a: vec![Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)],
        ..Zone::default()
    }));
    let server = dns_server(zone.clone()).await;
    let p = start_proxy(&config(&format!(
        "dns = {{ name = \"svc.test\", port = 8080, interval = \"200ms\", resolver = \"{server}\" }}"
    )))
    .await;
    eventually("both A records", SEEN_WITHIN, || {
        members(&p) == ["127.0.0.2:8080".to_string(), "127.0.0.3:8080".to_string()].into()
    })
    .await;

    zone.lock().unwrap().a = vec![Ipv4Addr::new(127, 0, 0, 3)];
    eventually("one A record", SEEN_WITHIN, || {
        members(&p) == ["127.0.0.3:8080".to_string()].into()
    })
    .await;

    // A broken server: the pool keeps its last set, and the error is reported.
    zone.lock().unwrap().broken = true;
    let mut reported = false;
    for _ in 0..200 {
        if !last_error(&p).await.is_empty() {
            reported = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reported, "the failed lookup is reported");
    assert_eq!(members(&p), ["127.0.0.3:8080".to_string()].into());

    // Fixed again: the next lookup is used.
    {
        let mut z = zone.lock().unwrap();
        z.broken = false;
        z.a = vec![Ipv4Addr::new(127, 0, 0, 4)];
    }
    eventually("the repaired answer", SEEN_WITHIN, || {
        members(&p) == ["127.0.0.4:8080".to_string()].into()
    })
    .await;
}

#[tokio::test]
async fn srv_records_give_ports_and_carry_traffic() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let zone = Arc::new(Mutex::new(Zone {
        srv: vec![("a".into(), a.addr.port()), ("b".into(), b.addr.port())],
        ..Zone::default()
    }));
    let server = dns_server(zone.clone()).await;
    let p = start_proxy(&config(&format!(
        "dns = {{ name = \"_http._tcp.svc.test\", interval = \"200ms\", resolver = \"{server}\" }}"
    )))
    .await;
    eventually("both SRV targets", SEEN_WITHIN, || {
        members(&p) == [a.address(), b.address()].into()
    })
    .await;
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let r = get(p.addr("web"), "example.com", "/").await;
        assert_eq!(r.status, 200);
        seen.insert(r.header("x-upstream").unwrap_or("").to_string());
    }
    assert_eq!(seen, ["a".to_string(), "b".to_string()].into());
}
