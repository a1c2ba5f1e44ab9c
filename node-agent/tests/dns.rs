//! The DNS proxy on real UDP and TCP sockets: mesh names answered from the
//! view, unknown mesh names refused, other names forwarded to a small
//! upstream on 127.0.0.1, failures turned into SERVFAIL, malformed packets
//! answered FORMERR or dropped, and every outcome counted.

mod zone;

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use weft_agent::dns::Dns;
use weft_agent::metrics::Metrics;
use weft_agent::view::{self, MeshView};

const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).unwrap(), rtype));
    m.to_vec().unwrap()
}

/// A resolver that answers every A query with 192.0.2.7, over UDP and TCP.
async fn upstream() -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    fn answer(packet: &[u8]) -> Vec<u8> {
        let q = Message::from_vec(packet).unwrap();
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        let query = q.queries[0].clone();
        r.add_answer(Record::from_rdata(
            query.name().clone(),
            60,
            RData::A(A(UPSTREAM_ANSWER)),
        ));
        r.add_query(query);
        r.to_vec().unwrap()
    }
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&answer(&buf[..n]), from).await;
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            let mut len = [0u8; 2];
            if s.read_exact(&mut len).await.is_err() {
                continue;
            }
            let mut p = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if s.read_exact(&mut p).await.is_err() {
                continue;
            }
            let a = answer(&p);
            let _ = s.write_all(&(a.len() as u16).to_be_bytes()).await;
            let _ = s.write_all(&a).await;
        }
    });
    addr
}

struct Proxy {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    client: UdpSocket,
}

impl Proxy {
    async fn start(upstreams: Vec<SocketAddr>) -> Proxy {
        let bundle = zone::Ca::new("mesh").pem();
        let view = MeshView::from_update(&zone::update("v1", &bundle)).unwrap();
        let metrics = Arc::new(Metrics::new());
        let dns = Dns::new(view::shared(view), metrics.clone(), upstreams);
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        tokio::spawn(dns.clone().serve_udp(udp));
        tokio::spawn(dns.serve_tcp(tcp));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        Proxy {
            addr,
            metrics,
            client,
        }
    }

    async fn udp(&self, packet: &[u8]) -> Message {
        self.client.send(packet).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), self.client.recv(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        Message::from_vec(&buf[..n]).unwrap()
    }

    async fn tcp(&self, packets: &[Vec<u8>]) -> Vec<Message> {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        let mut out = Vec::new();
        for p in packets {
            s.write_all(&(p.len() as u16).to_be_bytes()).await.unwrap();
            s.write_all(p).await.unwrap();
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.unwrap();
            let mut a = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut a).await.unwrap();
            out.push(Message::from_vec(&a).unwrap());
        }
        out
    }

    fn count(&self, result: &str) -> u64 {
        let text = self.metrics.encode();
        let line = format!("weft_dns_queries_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&line))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0)
    }
}

fn a_records(m: &Message) -> Vec<(Ipv4Addr, u32)> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((a.0, r.ttl)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn answers_mesh_names_and_forwards_the_rest() {
    let proxy = Proxy::start(vec![upstream().await]).await;
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    for (i, name) in [
        "api.mesh.",
        "api.default.mesh.",
        "api.default.zone-a.mesh.",
        "API.Default.Mesh.",
    ]
    .into_iter()
    .enumerate()
    {
        let r = proxy.udp(&query(100 + i as u16, name, RecordType::A)).await;
        assert_eq!(r.metadata.id, 100 + i as u16);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(a_records(&r), vec![(vip, 5)], "{name}");
    }
    // AAAA for a known name: no error, no answer.
    let r = proxy.udp(&query(7, "api.mesh.", RecordType::AAAA)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    // An unknown mesh name does not exist.
    let r = proxy
        .udp(&query(8, "nope.default.mesh.", RecordType::A))
        .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    // Anything else goes upstream.
    let r = proxy.udp(&query(9, "example.com.", RecordType::A)).await;
    assert_eq!(r.metadata.id, 9);
    assert_eq!(a_records(&r), vec![(UPSTREAM_ANSWER, 60)]);

    // The same over TCP, several queries on one connection.
    let answers = proxy
        .tcp(&[
            query(20, "api.mesh.", RecordType::A),
            query(21, "example.org.", RecordType::A),
        ])
        .await;
    assert_eq!(a_records(&answers[0]), vec![(vip, 5)]);
    assert_eq!(a_records(&answers[1]), vec![(UPSTREAM_ANSWER, 60)]);

    assert_eq!(proxy.count("mesh"), 5);
    assert_eq!(proxy.count("nodata"), 1);
    assert_eq!(proxy.count("nxdomain"), 1);
    assert_eq!(proxy.count("forwarded"), 2);
}

#[tokio::test]
async fn failures_and_malformed_packets() {
    // An upstream port where nothing listens: the query fails, SERVFAIL.
    let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let proxy = Proxy::start(vec![dead_addr]).await;
    let r = proxy.udp(&query(1, "example.com.", RecordType::A)).await;
    assert_eq!(r.metadata.id, 1);
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);

    // A header followed by garbage: FORMERR, with the query's ID.
    let mut garbage = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    garbage.extend_from_slice(&[0xff; 9]);
    let r = proxy.udp(&garbage).await;
    assert_eq!(r.metadata.id, 0x1234);
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);

    // Too short to carry an ID: dropped; the next query is still answered.
    proxy.client.send(&[1, 2, 3]).await.unwrap();
    let r = proxy.udp(&query(2, "api.mesh.", RecordType::A)).await;
    assert_eq!(r.metadata.id, 2);

    assert_eq!(proxy.count("servfail"), 1);
    assert_eq!(proxy.count("formerr"), 1);
    assert_eq!(proxy.count("dropped"), 1);
}
