//! A raw HBONE client (TLS 1.3 + HTTP/2 CONNECT, or another method) that
//! presents whatever certificate a scenario hands it, including ones no
//! agent would use: a foreign CA's, an expired one, none at all. It reports
//! how far it got. Also raw TLS sessions that send arbitrary bytes, and the
//! bytes of a ClientHello, for scenarios that feed agents bad input.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http::Method;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, SignatureScheme};

use crate::pki::IdentityFiles;

/// How far one CONNECT attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The TLS handshake or the HTTP/2 connection failed: the agent did
    /// not accept us as a peer.
    Refused(String),
    /// The CONNECT stream was reset before an answer.
    Reset(String),
    /// The CONNECT was answered with this non-200 status.
    Status(u16),
    /// 200: the payload went through, and this came back before EOF.
    Connected(Vec<u8>),
}

/// Accepts a server chain that leads to the trust bundle, whatever names
/// it carries (agents prove SPIFFE IDs, not DNS names).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // The chain is checked before the name, so this means the chain is good.
            Err(TlsError::InvalidCertificate(CertificateError::NotValidForName))
            | Err(TlsError::InvalidCertificate(CertificateError::NotValidForNameContext {
                ..
            })) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A TLS 1.3 client config presenting `identity` and trusting its bundle, ALPN h2.
pub fn client_config(identity: &IdentityFiles) -> Result<Arc<rustls::ClientConfig>> {
    let chain = CertificateDer::pem_file_iter(&identity.cert)
        .with_context(|| format!("reading {}", identity.cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&identity.key)
        .with_context(|| format!("reading {}", identity.key.display()))?;
    let mut config = builder(&identity.trust_bundle)?
        .with_client_auth_cert(chain, key)
        .context("client certificate and key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Like [`client_config`], but presenting no client certificate at all.
pub fn client_config_without_certificate(trust_bundle: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut config = builder(trust_bundle)?.with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn builder(
    trust_bundle: &Path,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(trust_bundle)
        .with_context(|| format!("reading {}", trust_bundle.display()))?
    {
        roots.add(ca?).context("adding a trust anchor")?;
    }
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier))))
}

/// The first TLS records a client with `config` sends to `agent`: its
/// ClientHello, for tests that send part of one.
pub fn client_hello(config: Arc<rustls::ClientConfig>, agent: SocketAddr) -> Result<Vec<u8>> {
    let mut conn = rustls::ClientConnection::new(config, ServerName::IpAddress(agent.ip().into()))?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

/// How a raw TLS session with an agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    /// The handshake failed, as the client saw it.
    HandshakeFailed(String),
    /// The handshake completed and the bytes went out; then the agent ended
    /// the session. `answer` is what it sent first (decrypted), `end` how
    /// the session ended: `eof`, or the read error.
    Ended { answer: Vec<u8>, end: String },
}

/// Opens a TLS session to `agent` with `config`, sends `bytes` inside it
/// (then half-closes unless `keep_open`), and reads until the agent ends
/// the session. An error if the agent neither answers nor closes within
/// `timeout`. Runs in the calling thread's network namespace.
pub fn tls_session(
    config: Arc<rustls::ClientConfig>,
    agent: SocketAddr,
    bytes: &[u8],
    keep_open: bool,
    timeout: Duration,
) -> Result<Session> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let session = async {
            let tcp = tokio::net::TcpStream::connect(agent)
                .await
                .with_context(|| format!("TCP connect to {agent}"))?;
            let name = ServerName::IpAddress(agent.ip().into());
            let mut tls = match tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
            {
                Ok(tls) => tls,
                Err(e) => return Ok(Session::HandshakeFailed(e.to_string())),
            };
            let mut answer = Vec::new();
            if let Err(e) = tls.write_all(bytes).await {
                return Ok(Session::Ended {
                    answer,
                    end: format!("write: {e}"),
                });
            }
            if !keep_open {
                let _ = tls.flush().await;
                let _ = tls.get_mut().0.shutdown().await;
            }
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) => {
                        return Ok(Session::Ended {
                            answer,
                            end: "eof".into(),
                        })
                    }
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                    Err(e) => {
                        return Ok(Session::Ended {
                            answer,
                            end: e.to_string(),
                        })
                    }
                }
            }
        };
        tokio::time::timeout(timeout, session)
            .await
            .map_err(|_| anyhow!("the TLS session with {agent} was still open after {timeout:?}"))?
    })
}

/// Opens an HBONE tunnel to the agent at `agent` presenting `identity`,
/// sends `CONNECT authority`, and on 200 sends `payload`, half-closes and
/// collects the answer until EOF. Runs in the calling thread (and so in
/// its network namespace); `timeout` bounds the whole attempt.
pub fn attempt(
    identity: &IdentityFiles,
    agent: SocketAddr,
    authority: &str,
    payload: &[u8],
    timeout: Duration,
) -> Result<Attempt> {
    request(
        identity,
        agent,
        Method::CONNECT,
        authority,
        payload,
        timeout,
    )
}

/// Like [`attempt`] with another method: `target` is the CONNECT authority,
/// or for other methods an absolute URI (`http://ip:port/path`).
pub fn request(
    identity: &IdentityFiles,
    agent: SocketAddr,
    method: Method,
    target: &str,
    payload: &[u8],
    timeout: Duration,
) -> Result<Attempt> {
    let config = client_config(identity)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::time::timeout(timeout, run(config, agent, method.clone(), target, payload))
            .await
            .map_err(|_| {
                anyhow!("HBONE {method} {target} to {agent} took longer than {timeout:?}")
            })?
    })
}

async fn run(
    config: Arc<rustls::ClientConfig>,
    agent: SocketAddr,
    method: Method,
    target: &str,
    payload: &[u8],
) -> Result<Attempt> {
    let tcp = match tokio::net::TcpStream::connect(agent).await {
        Ok(tcp) => tcp,
        // An agent at its connection limit resets at once; the reset can
        // reach us while connect() is still returning.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Ok(Attempt::Refused(format!("TCP connect: {e}")))
        }
        Err(e) => return Err(e).with_context(|| format!("TCP connect to {agent}")),
    };
    tcp.set_nodelay(true)?;
    let name = ServerName::IpAddress(agent.ip().into());
    let tls = match tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => return Ok(Attempt::Refused(format!("TLS handshake: {e}"))),
    };
    let (mut send, conn) = match h2::client::handshake(tls).await {
        Ok(pair) => pair,
        Err(e) => return Ok(Attempt::Refused(format!("HTTP/2 handshake: {e}"))),
    };
    let driver = tokio::spawn(conn);
    let outcome = send_request(&mut send, method, target, payload).await;
    driver.abort();
    Ok(outcome)
}

fn classify(what: &str, e: h2::Error) -> Attempt {
    if e.is_reset() && !e.is_go_away() {
        Attempt::Reset(format!("{what}: {e}"))
    } else {
        Attempt::Refused(format!("{what}: {e}"))
    }
}

async fn send_request(
    send: &mut h2::client::SendRequest<Bytes>,
    method: Method,
    target: &str,
    payload: &[u8],
) -> Attempt {
    let send = match send.clone().ready().await {
        Ok(s) => s,
        Err(e) => return classify("waiting to send CONNECT", e),
    };
    let mut send = send;
    let request = match http::Request::builder()
        .method(method.clone())
        .uri(target)
        .body(())
    {
        Ok(r) => r,
        Err(e) => return Attempt::Refused(format!("bad target {target:?}: {e}")),
    };
    let (response, mut body_tx) = match send.send_request(request, false) {
        Ok(pair) => pair,
        Err(e) => return classify(&format!("sending {method}"), e),
    };
    let response = match response.await {
        Ok(r) => r,
        Err(e) => return classify(&format!("{method} answer"), e),
    };
    if response.status() != http::StatusCode::OK {
        return Attempt::Status(response.status().as_u16());
    }
    if let Err(e) = body_tx.send_data(Bytes::copy_from_slice(payload), true) {
        return classify("sending data", e);
    }
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(bytes) => {
                let _ = body.flow_control().release_capacity(bytes.len());
                got.extend_from_slice(&bytes);
            }
            Err(e) => return classify(&format!("reading data after {} bytes", got.len()), e),
        }
    }
    Attempt::Connected(got)
}

/// What [`exchange`] does on an HBONE stream once its CONNECT is answered.
#[derive(Debug, Clone, Copy, Default)]
pub struct Exchange<'a> {
    /// Extra CONNECT request headers.
    pub headers: &'a [(&'a str, &'a str)],
    /// Sent once the CONNECT is answered; empty sends nothing (a client of
    /// a server-first protocol, waiting for the greeting).
    pub send: &'a [u8],
    /// Half-close after sending.
    pub half_close: bool,
    /// Stop reading once what came back contains this; empty reads to EOF.
    pub until: &'a [u8],
}

/// Like [`attempt`], with control over the stream: extra CONNECT headers,
/// whether to half-close, and when to stop reading (see [`Exchange`]), so
/// that a scenario can speak a protocol through the tunnel as a peer agent
/// would, or differently.
pub fn exchange(
    identity: &IdentityFiles,
    agent: SocketAddr,
    authority: &str,
    x: Exchange<'_>,
    timeout: Duration,
) -> Result<Attempt> {
    let config = client_config(identity)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::time::timeout(timeout, exchange_async(config, agent, authority, x))
            .await
            .map_err(|_| {
                anyhow!("HBONE exchange with {authority} via {agent} took longer than {timeout:?}")
            })?
    })
}

async fn exchange_async(
    config: Arc<rustls::ClientConfig>,
    agent: SocketAddr,
    authority: &str,
    x: Exchange<'_>,
) -> Result<Attempt> {
    let tcp = tokio::net::TcpStream::connect(agent)
        .await
        .with_context(|| format!("TCP connect to {agent}"))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::IpAddress(agent.ip().into());
    let tls = match tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => return Ok(Attempt::Refused(format!("TLS handshake: {e}"))),
    };
    let (send, conn) = match h2::client::handshake(tls).await {
        Ok(pair) => pair,
        Err(e) => return Ok(Attempt::Refused(format!("HTTP/2 handshake: {e}"))),
    };
    let driver = tokio::spawn(conn);
    let outcome = async {
        let mut send = match send.ready().await {
            Ok(s) => s,
            Err(e) => return classify("waiting to send CONNECT", e),
        };
        let mut request = http::Request::builder()
            .method(Method::CONNECT)
            .uri(authority);
        for (name, value) in x.headers {
            request = request.header(*name, *value);
        }
        let request = match request.body(()) {
            Ok(r) => r,
            Err(e) => return Attempt::Refused(format!("bad CONNECT {authority:?}: {e}")),
        };
        let (response, mut body_tx) = match send.send_request(request, false) {
            Ok(pair) => pair,
            Err(e) => return classify("sending CONNECT", e),
        };
        let response = match response.await {
            Ok(r) => r,
            Err(e) => return classify("CONNECT answer", e),
        };
        if response.status() != http::StatusCode::OK {
            return Attempt::Status(response.status().as_u16());
        }
        if !x.send.is_empty() || x.half_close {
            if let Err(e) = body_tx.send_data(Bytes::copy_from_slice(x.send), x.half_close) {
                return classify("sending data", e);
            }
        }
        let mut body = response.into_body();
        let mut got = Vec::new();
        while x.until.is_empty() || !got.windows(x.until.len()).any(|w| w == x.until) {
            match body.data().await {
                None => break,
                Some(Ok(bytes)) => {
                    let _ = body.flow_control().release_capacity(bytes.len());
                    got.extend_from_slice(&bytes);
                }
                Some(Err(e)) => {
                    return classify(&format!("reading data after {} bytes", got.len()), e)
                }
            }
        }
        Attempt::Connected(got)
    }
    .await;
    driver.abort();
    Ok(outcome)
}

/// The end-entity certificate (DER) that the agent at `agent` presents to a
/// client holding `identity`. Runs in the calling thread's namespace.
pub fn peer_certificate(
    identity: &IdentityFiles,
    agent: SocketAddr,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let config = client_config(identity)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let handshake = async {
            let tcp = tokio::net::TcpStream::connect(agent)
                .await
                .with_context(|| format!("TCP connect to {agent}"))?;
            let name = ServerName::IpAddress(agent.ip().into());
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS handshake with {agent}"))?;
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .context("the agent presented no certificate")?;
            Ok(leaf.as_ref().to_vec())
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| anyhow!("no TLS handshake with {agent} within {timeout:?}"))?
    })
}

/// The first certificate (DER) of a PEM file, e.g. a leaf an agent loads.
pub fn first_certificate(pem: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(pem).with_context(|| format!("reading {}", pem.display()))?;
    let cert = CertificateDer::pem_slice_iter(&bytes)
        .next()
        .with_context(|| format!("{} holds no certificate", pem.display()))??;
    Ok(cert.as_ref().to_vec())
}
