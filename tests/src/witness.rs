//! A TLS server of the suite's own that only records who connects: the
//! SPIFFE ID in each client certificate. Put where the mesh expects a peer
//! agent, it proves from the receiving side which certificate an agent
//! presents for each workload (in TLS 1.3 the client certificate is
//! encrypted on the wire, so capturing packets cannot show it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::netns::Netns;

/// A running witness; stops when dropped.
pub struct TlsWitness {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

/// The URI SAN of a DER certificate.
fn spiffe_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
        _ => None,
    })
}

impl TlsWitness {
    /// Listens on `addr` inside `ns`, presenting the key and chain in
    /// `identity_pem` and requiring client certificates that chain to
    /// `bundle_pem`.
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        identity_pem: &str,
        bundle_pem: &str,
    ) -> Result<Self> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(identity_pem.as_bytes())
                .collect::<Result<_, _>>()
                .context("witness chain")?;
        let key = PrivateKeyDer::from_pem_slice(identity_pem.as_bytes()).context("witness key")?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
            roots.add(ca.context("witness bundle")?)?;
        }
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots)).build()?;
        let mut config =
            rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let config = Arc::new(config);
        let listener = ns.enter(move || Ok(TcpListener::bind(addr)?))?;
        listener.set_nonblocking(true)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((tcp, _)) = listener.accept() else {
                    // Polling, so that Drop can stop the loop.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let (config, seen) = (config.clone(), seen2.clone());
                std::thread::spawn(move || {
                    let _ = tcp.set_nonblocking(false);
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                    let Ok(conn) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    // Reading drives the handshake to its end.
                    let mut buf = [0u8; 64];
                    let _ = tls.read(&mut buf);
                    if let Some(id) = tls
                        .conn
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| spiffe_id(c))
                    {
                        seen.lock().unwrap_or_else(|p| p.into_inner()).push(id);
                    }
                    let _ = tls.flush();
                });
            }
        });
        Ok(TlsWitness { addr, seen, stop })
    }

    /// Every SPIFFE ID seen so far, in order.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for TlsWitness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
