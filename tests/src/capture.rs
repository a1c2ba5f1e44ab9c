//! Recording what crosses an interface, with an AF_PACKET socket opened
//! inside the host's namespace, and searching the TCP payloads: for a
//! plaintext marker, and for well-formed TLS records.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};

use crate::http::find;
use crate::netns::Netns;

/// One captured IPv4 TCP segment.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Source address and port.
    pub src: SocketAddrV4,
    /// Destination address and port.
    pub dst: SocketAddrV4,
    /// Sequence number.
    pub seq: u32,
    /// Whether SYN was set.
    pub syn: bool,
    /// The TCP payload.
    pub payload: Vec<u8>,
}

/// A capture in progress on one interface.
pub struct Capture {
    stop: Arc<AtomicBool>,
    worker: JoinHandle<Result<(Vec<Vec<u8>>, u32)>>,
}

impl Capture {
    /// Starts capturing every frame on `ifname` inside `ns`; returns once
    /// the socket is bound, so nothing sent afterwards is missed.
    pub fn start(ns: &Netns, ifname: &str) -> Result<Capture> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let ifname = ifname.to_owned();
        let flag = stop.clone();
        let worker = ns.spawn(move || {
            let sock = match open_packet_socket(&ifname) {
                Ok(sock) => {
                    let _ = ready_tx.send(Ok(()));
                    sock
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return Err(e);
                }
            };
            record(&sock, &flag)
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Capture { stop, worker }),
            Ok(Err(e)) => bail!("capture on {}: {e}", ns.name()),
            Err(_) => bail!("capture thread in {} died before it was ready", ns.name()),
        }
    }

    /// Stops capturing and returns the TCP segments seen.
    pub fn finish(self) -> Result<Captured> {
        self.stop.store(true, Ordering::Relaxed);
        let (frames, dropped) = self
            .worker
            .join()
            .map_err(|_| anyhow!("capture thread panicked"))??;
        let segments = frames.iter().filter_map(|f| parse_frame(f)).collect();
        Ok(Captured {
            frames: frames.len(),
            dropped,
            segments,
        })
    }
}

struct PacketSocket(libc::c_int);

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: the fd is owned by this value and closed once.
        unsafe { libc::close(self.0) };
    }
}

fn open_packet_socket(ifname: &str) -> Result<PacketSocket> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the fd is owned by PacketSocket.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto as libc::c_int,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    let sock = PacketSocket(fd);
    let cname = std::ffi::CString::new(ifname)?;
    // SAFETY: cname is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        bail!("no interface {ifname} in this namespace");
    }
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: addr is a properly initialised sockaddr_ll of size len.
    if unsafe { libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len) } != 0 {
        return Err(std::io::Error::last_os_error()).context("bind(AF_PACKET)");
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    let tlen = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: timeout is a valid timeval of size tlen.
    if unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const _ as *const _,
            tlen,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO");
    }
    // Room for bursts while the thread copies frames out (root may force it).
    let size: libc::c_int = 64 << 20;
    let slen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: size is a valid c_int of size slen.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const _ as *const _,
            slen,
        )
    };
    Ok(sock)
}

/// Frames the kernel dropped because the socket's queue was full
/// (`PACKET_STATISTICS`, which also resets the count).
fn drops(sock: &PacketSocket) -> Result<u32> {
    #[repr(C)]
    #[derive(Default)]
    struct TpacketStats {
        packets: u32,
        drops: u32,
    }
    const PACKET_STATISTICS: libc::c_int = 6;
    let mut stats = TpacketStats::default();
    let mut len = std::mem::size_of::<TpacketStats>() as libc::socklen_t;
    // SAFETY: stats is a valid, writable tpacket_stats of size len.
    let rc = unsafe {
        libc::getsockopt(
            sock.0,
            libc::SOL_PACKET,
            PACKET_STATISTICS,
            &mut stats as *mut _ as *mut _,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("PACKET_STATISTICS");
    }
    Ok(stats.drops)
}

fn record(sock: &PacketSocket, stop: &AtomicBool) -> Result<(Vec<Vec<u8>>, u32)> {
    // Generic segmentation offload can hand over frames far above the MTU.
    let mut buf = vec![0u8; 256 * 1024];
    let mut frames = Vec::new();
    loop {
        // Once asked to stop, drain what is queued (frames are queued as
        // they cross, so everything sent before the stop is there) and end.
        let stopping = stop.load(Ordering::Relaxed);
        let flags = if stopping { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::recv(sock.0, buf.as_mut_ptr() as *mut _, buf.len(), flags) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut if stopping => break,
                std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::Interrupted => continue,
                _ => return Err(err).context("recv(AF_PACKET)"),
            }
        }
        frames.push(buf[..n as usize].to_vec());
        if frames.len() > 1_000_000 {
            bail!("capture overflow: more than a million frames");
        }
    }
    Ok((frames, drops(sock)?))
}

/// Parses an Ethernet frame holding IPv4 TCP.
pub fn parse_frame(frame: &[u8]) -> Option<Segment> {
    if frame.len() < 14 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    // With segmentation offload the IP total length may be 0 or stale: trust the frame then.
    let end = if total >= ihl && total <= ip.len() {
        total
    } else {
        ip.len()
    };
    let tcp = ip.get(ihl..end)?;
    let offset = usize::from(tcp.get(12)? >> 4) * 4;
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    Some(Segment {
        src: SocketAddrV4::new(addr(12), u16::from_be_bytes([tcp[0], tcp[1]])),
        dst: SocketAddrV4::new(addr(16), u16::from_be_bytes([tcp[2], tcp[3]])),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        syn: tcp[13] & 0x02 != 0,
        payload: tcp.get(offset..)?.to_vec(),
    })
}

/// What a capture saw.
#[derive(Debug, Clone)]
pub struct Captured {
    /// Frames of any kind.
    pub frames: usize,
    /// Frames the kernel dropped before the capture could read them.
    pub dropped: u32,
    /// The IPv4 TCP segments among them.
    pub segments: Vec<Segment>,
}

/// One direction of one TCP connection, reassembled.
#[derive(Debug, Clone, Default)]
pub struct Stream {
    /// Whether the SYN was captured, i.e. the stream is complete from its start.
    pub from_start: bool,
    /// The payload bytes in sequence order.
    pub data: Vec<u8>,
}

/// Counts of TLS records found in streams.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSummary {
    /// Records by content type (22 handshake, 23 application data, ...).
    pub records: BTreeMap<u8, usize>,
    /// Payload bytes of application-data records.
    pub app_data_bytes: usize,
    /// Streams (from their start) whose bytes did not parse as TLS records.
    pub malformed: Vec<String>,
}

impl Captured {
    /// Total TCP payload bytes seen.
    pub fn payload_bytes(&self) -> usize {
        self.segments.iter().map(|s| s.payload.len()).sum()
    }

    /// Whether `needle` appears in any segment or in any reassembled stream.
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.segments
            .iter()
            .any(|s| find(&s.payload, needle).is_some())
            || self
                .streams()
                .values()
                .any(|s| find(&s.data, needle).is_some())
    }

    /// The TCP ports that carried payload (both ends of each connection).
    pub fn payload_ports(&self) -> std::collections::BTreeSet<u16> {
        self.segments
            .iter()
            .filter(|s| !s.payload.is_empty())
            .flat_map(|s| [s.src.port(), s.dst.port()])
            .collect()
    }

    /// Each direction of each connection, reassembled by sequence number.
    pub fn streams(&self) -> BTreeMap<(SocketAddrV4, SocketAddrV4), Stream> {
        let mut by_flow: BTreeMap<(SocketAddrV4, SocketAddrV4), Vec<&Segment>> = BTreeMap::new();
        for s in &self.segments {
            by_flow.entry((s.src, s.dst)).or_default().push(s);
        }
        by_flow
            .into_iter()
            .map(|(flow, segs)| (flow, reassemble(&segs)))
            .collect()
    }

    /// Parses every stream that touches `port` and was captured from its
    /// start as a sequence of TLS records.
    pub fn tls_on_port(&self, port: u16) -> TlsSummary {
        let mut summary = TlsSummary::default();
        for ((src, dst), stream) in self.streams() {
            if (src.port() != port && dst.port() != port) || !stream.from_start {
                continue;
            }
            let mut rest = stream.data.as_slice();
            while !rest.is_empty() {
                if rest.len() < 5 || !(20..=24).contains(&rest[0]) || rest[1] != 3 {
                    summary.malformed.push(format!(
                        "{src} -> {dst}: {} bytes not TLS: {:02x?}",
                        rest.len(),
                        &rest[..rest.len().min(8)]
                    ));
                    break;
                }
                let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
                *summary.records.entry(rest[0]).or_default() += 1;
                if rest[0] == 23 {
                    summary.app_data_bytes += len;
                }
                // A record cut by the end of the capture is fine.
                rest = rest.get(5 + len..).unwrap_or_default();
            }
        }
        summary
    }
}

fn reassemble(segs: &[&Segment]) -> Stream {
    let syn = segs.iter().find(|s| s.syn);
    let base = match syn {
        Some(s) => s.seq.wrapping_add(1),
        None => segs.first().map(|s| s.seq).unwrap_or_default(),
    };
    let mut parts: Vec<(u32, &[u8])> = segs
        .iter()
        .filter(|s| !s.payload.is_empty())
        .map(|s| (s.seq.wrapping_sub(base), s.payload.as_slice()))
        .collect();
    parts.sort_by_key(|(off, _)| *off);
    let mut data = Vec::new();
    for (off, payload) in parts {
        let off = off as usize;
        let end = off + payload.len();
        if end <= data.len() {
            continue; // a retransmission of what we have
        }
        if off > data.len() {
            if off - data.len() > 64 << 20 {
                continue; // not plausibly this stream: a reused port pair
            }
            data.resize(off, 0); // a gap: the capture missed a segment
        }
        data.extend_from_slice(&payload[data.len() - off..]);
    }
    Stream {
        from_start: syn.is_some(),
        data,
    }
}
