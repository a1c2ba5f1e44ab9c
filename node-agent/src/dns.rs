//! The DNS proxy (UDP and TCP, 127.0.0.1:15053 by default): answers mesh
//! service names with their virtual IPs from the view in force, says
//! NXDOMAIN for unknown names under `.mesh`, and forwards everything else to
//! the host's resolvers. With `redirect.dns` the host's DNS is sent here, so
//! `curl http://api.mesh/` resolves to a virtual IP that capture then
//! tunnels.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::view::{NameLookup, SharedView};

/// TTL of mesh answers: short, so a changed virtual IP is picked up soon.
pub const MESH_TTL: u32 = 5;
/// Forwarded queries in flight at once; past it, SERVFAIL at once.
const MAX_IN_FLIGHT: usize = 256;
/// TCP clients served at once.
const MAX_TCP_CLIENTS: usize = 64;
/// How long an upstream may take to answer, each.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client may take to send a query.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The largest UDP DNS message (EDNS allows up to 64 KiB).
const MAX_UDP: usize = 65_535;

/// Where queries for other names go, read from /etc/resolv.conf when the
/// config names none.
pub fn upstreams(configured: &[SocketAddr]) -> Vec<SocketAddr> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|s| parse_resolv_conf(&s))
        .unwrap_or_default()
}

/// The `nameserver` lines of a resolv.conf, on port 53.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        // A scoped IPv6 address (fe80::1%eth0) is not usable from here.
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// What the proxy does with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered here, with the bytes to send and the metric result.
    Answer(Vec<u8>, &'static str),
    /// Not a mesh name: forward the query as it came.
    Forward { id: u16, op_code: OpCode },
    /// Not worth an answer (too short to carry an ID, or not a query).
    Drop,
}

/// The proxy, shared by its UDP and TCP servers.
pub struct Dns {
    view: SharedView,
    metrics: Arc<Metrics>,
    upstreams: Vec<SocketAddr>,
    in_flight: Arc<Semaphore>,
}

impl Dns {
    /// A proxy answering from `view` and forwarding to `upstreams`.
    pub fn new(view: SharedView, metrics: Arc<Metrics>, upstreams: Vec<SocketAddr>) -> Arc<Self> {
        Arc::new(Dns {
            view,
            metrics,
            upstreams,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    /// Decides how to answer `packet`, from the view in force.
    pub fn handle(&self, packet: &[u8]) -> Outcome {
        let request = match Message::from_vec(packet) {
            Ok(m) => m,
            Err(_) if packet.len() >= 12 => {
                let id = u16::from_be_bytes([packet[0], packet[1]]);
                if packet[2] & 0x80 != 0 {
                    return Outcome::Drop;
                }
                let reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
                return Outcome::Answer(encode(&reply), "formerr");
            }
            Err(_) => return Outcome::Drop,
        };
        let meta = request.metadata;
        if meta.message_type != MessageType::Query {
            return Outcome::Drop;
        }
        let mut reply = Message::response(meta.id, meta.op_code);
        reply.metadata.recursion_desired = meta.recursion_desired;
        reply.metadata.recursion_available = true;
        if meta.op_code != OpCode::Query || request.queries.len() != 1 {
            reply.metadata.response_code = if meta.op_code == OpCode::Query {
                ResponseCode::FormErr
            } else {
                ResponseCode::NotImp
            };
            return Outcome::Answer(encode(&reply), "formerr");
        }
        let query = &request.queries[0];
        let name = query.name().to_ascii();
        let vip = match self.view.load().lookup(&name) {
            NameLookup::NotMesh => {
                return Outcome::Forward {
                    id: meta.id,
                    op_code: meta.op_code,
                }
            }
            NameLookup::UnknownMeshName => None,
            NameLookup::Service(ip) => Some(ip),
        };
        reply.add_query(query.clone());
        reply.metadata.authoritative = true;
        let Some(vip) = vip else {
            reply.metadata.response_code = ResponseCode::NXDomain;
            return Outcome::Answer(encode(&reply), "nxdomain");
        };
        let rdata = match (query.query_class(), query.query_type(), vip) {
            (DNSClass::IN, RecordType::A, IpAddr::V4(v4)) => Some(RData::A(A(v4))),
            (DNSClass::IN, RecordType::AAAA, IpAddr::V6(v6)) => Some(RData::AAAA(AAAA(v6))),
            _ => None,
        };
        let result = match rdata {
            Some(rdata) => {
                reply.add_answer(Record::from_rdata(query.name().clone(), MESH_TTL, rdata));
                "mesh"
            }
            // The name exists, with no record of this type.
            None => "nodata",
        };
        Outcome::Answer(encode(&reply), result)
    }

    /// Serves a workload's UDP and TCP sockets until `drain` begins (the
    /// agent stops, or a node-mode workload is unenrolled), which closes
    /// them.
    pub async fn serve_until(
        self: Arc<Self>,
        udp: UdpSocket,
        tcp: TcpListener,
        drain: crate::drain::Drain,
    ) {
        tokio::select! {
            _ = self.clone().serve_udp(udp) => {}
            _ = self.serve_tcp(tcp) => {}
            _ = drain.signaled() => {}
        }
    }

    /// Serves queries on a UDP socket until the process ends.
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let mut buf = vec![0u8; MAX_UDP];
        loop {
            let (n, client) = match socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    debug!(error = %e, "DNS receive failed");
                    continue;
                }
            };
            let packet = &buf[..n];
            match self.handle(packet) {
                Outcome::Answer(bytes, result) => {
                    self.metrics.dns_query(result);
                    let _ = socket.send_to(&bytes, client).await;
                }
                Outcome::Drop => self.metrics.dns_query("dropped"),
                Outcome::Forward { id, op_code } => {
                    let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                        self.metrics.dns_query("servfail");
                        warn!("too many DNS queries in flight, answering SERVFAIL");
                        let _ = socket.send_to(&servfail(id, op_code), client).await;
                        continue;
                    };
                    let this = self.clone();
                    let socket = socket.clone();
                    let packet = packet.to_vec();
                    tokio::spawn(async move {
                        let answer = this.forward_udp(&packet).await;
                        let bytes = this.forwarded(answer, id, op_code);
                        let _ = socket.send_to(&bytes, client).await;
                        drop(permit);
                    });
                }
            }
        }
    }

    /// Counts a forwarded query and turns a failure into SERVFAIL.
    fn forwarded(&self, answer: Option<Vec<u8>>, id: u16, op_code: OpCode) -> Vec<u8> {
        match answer {
            Some(bytes) => {
                self.metrics.dns_query("forwarded");
                bytes
            }
            None => {
                self.metrics.dns_query("servfail");
                servfail(id, op_code)
            }
        }
    }

    async fn forward_udp(&self, packet: &[u8]) -> Option<Vec<u8>> {
        for upstream in &self.upstreams {
            match tokio::time::timeout(UPSTREAM_TIMEOUT, udp_exchange(*upstream, packet)).await {
                Ok(Ok(answer)) => return Some(answer),
                Ok(Err(e)) => debug!(%upstream, error = %e, "DNS upstream failed"),
                Err(_) => debug!(%upstream, "DNS upstream timed out"),
            }
        }
        None
    }

    async fn forward_tcp(&self, packet: &[u8]) -> Option<Vec<u8>> {
        for upstream in &self.upstreams {
            match tokio::time::timeout(UPSTREAM_TIMEOUT, tcp_exchange(*upstream, packet)).await {
                Ok(Ok(answer)) => return Some(answer),
                Ok(Err(e)) => debug!(%upstream, error = %e, "DNS upstream (TCP) failed"),
                Err(_) => debug!(%upstream, "DNS upstream (TCP) timed out"),
            }
        }
        None
    }

    /// Serves DNS over TCP until the process ends.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let clients = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = clients.clone().try_acquire_owned() else {
                debug!(%remote, "too many DNS TCP clients, closing");
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.tcp_client(tcp).await {
                    debug!(%remote, error = %e, "DNS TCP client ended");
                }
                drop(permit);
            });
        }
    }

    async fn tcp_client(&self, mut tcp: TcpStream) -> std::io::Result<()> {
        loop {
            let packet = match tokio::time::timeout(TCP_IDLE, read_frame(&mut tcp)).await {
                Ok(Ok(Some(p))) => p,
                Ok(Ok(None)) | Err(_) => return Ok(()),
                Ok(Err(e)) => return Err(e),
            };
            let bytes = match self.handle(&packet) {
                Outcome::Answer(bytes, result) => {
                    self.metrics.dns_query(result);
                    bytes
                }
                Outcome::Drop => {
                    self.metrics.dns_query("dropped");
                    return Ok(());
                }
                Outcome::Forward { id, op_code } => {
                    let answer = self.forward_tcp(&packet).await;
                    self.forwarded(answer, id, op_code)
                }
            };
            write_frame(&mut tcp, &bytes).await?;
        }
    }
}

fn encode(message: &Message) -> Vec<u8> {
    // Encoding a message built here from parsed parts cannot fail but for
    // a name past the limits, which parsing already refused.
    message.to_vec().unwrap_or_default()
}

fn servfail(id: u16, op_code: OpCode) -> Vec<u8> {
    encode(&Message::error_msg(id, op_code, ResponseCode::ServFail))
}

/// One UDP query and its answer (matched by ID), from an unbound socket.
async fn udp_exchange(upstream: SocketAddr, packet: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(packet).await?;
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let n = socket.recv(&mut buf).await?;
        // A stray datagram with another ID is not the answer.
        if n >= 2 && buf[..2] == packet[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp_exchange(upstream: SocketAddr, packet: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(upstream).await?;
    write_frame(&mut tcp, packet).await?;
    read_frame(&mut tcp)
        .await?
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no answer"))
}

/// Reads one length-prefixed DNS message; `None` at a clean end of stream.
async fn read_frame(tcp: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match tcp.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut packet = vec![0u8; usize::from(u16::from_be_bytes(len))];
    tcp.read_exact(&mut packet).await?;
    Ok(Some(packet))
}

async fn write_frame(tcp: &mut TcpStream, packet: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(packet.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "message too long"))?;
    let mut frame = Vec::with_capacity(packet.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(packet);
    tcp.write_all(&frame).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameservers_from_resolv_conf() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver ::1\n\
                    nameserver fe80::1%eth0\nnameserver\noptions ndots:5\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
