//! The gRPC channel to the zone controller: TCP, TLS with our own
//! verification (a CA pin before enrolment, the pinned CA after it), and
//! HTTP/2 from hyper under tonic's generated client. Hand-made rather than
//! tonic's transport so that the agent carries no load balancer or buffer
//! layers it does not use, and so that the pin can be checked in the
//! handshake itself.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;
use weft_api::proto::agent::v1::agent_service_client::AgentServiceClient;

use crate::tls::{provider, tls13_client, ALPN_H2};

/// The generated client over our channel.
pub type ZoneClient = AgentServiceClient<Channel>;

/// Why the zone could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("no zone address is configured")]
    NoAddress,
    #[error("connecting to the zone at {address}: {source}")]
    Tcp {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with the zone at {address}: {source}")]
    Tls {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 handshake with the zone at {address}: {source}")]
    Http2 {
        address: String,
        #[source]
        source: hyper::Error,
    },
    #[error("the zone at {address} timed out during {stage}")]
    Timeout {
        address: String,
        stage: &'static str,
    },
    #[error("controller.server_name {0:?} is not a DNS name")]
    ServerName(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// One HTTP/2 connection to the zone; requests are streams on it.
#[derive(Clone)]
pub struct Channel {
    send: SendRequest<tonic::body::Body>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel").finish_non_exhaustive()
    }
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.send.send_request(request))
    }
}

/// Connects to `address` (`host:port`) and returns a client for it; the
/// connection lives until the client and its streams are dropped or it fails.
/// Connects to the first of `addresses` (a zone's replicas) that answers;
/// the error is the last one.
pub async fn connect_any(
    addresses: &[String],
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<ZoneClient, ChannelError> {
    let mut last = None;
    for address in addresses {
        match connect(address, server_name, tls.clone(), timeout).await {
            Ok(client) => return Ok(client),
            Err(e) => {
                tracing::debug!(zone = %address, error = %e, "zone replica unreachable");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(ChannelError::NoAddress))
}

pub async fn connect(
    address: &str,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<ZoneClient, ChannelError> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| ChannelError::ServerName(server_name.to_owned()))?;
    let timed_out = |stage| ChannelError::Timeout {
        address: address.to_owned(),
        stage,
    };
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| timed_out("TCP connect"))?
        .map_err(|source| ChannelError::Tcp {
            address: address.to_owned(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio::time::timeout(timeout, TlsConnector::from(tls).connect(name, tcp))
        .await
        .map_err(|_| timed_out("TLS handshake"))?
        .map_err(|source| ChannelError::Tls {
            address: address.to_owned(),
            source,
        })?;
    let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // A zone that vanished without closing (host gone) is noticed
        // within half a minute, and the agent reconnects elsewhere.
        .keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(tls));
    let (send, connection) = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| timed_out("HTTP/2 handshake"))?
        .map_err(|source| ChannelError::Http2 {
            address: address.to_owned(),
            source,
        })?;
    let address_owned = address.to_owned();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(zone = %address_owned, error = %e, "zone connection ended");
        }
    });
    let origin = Uri::builder()
        .scheme("https")
        .authority(server_name)
        .path_and_query("/")
        .build()
        .map_err(|_| ChannelError::ServerName(server_name.to_owned()))?;
    Ok(AgentServiceClient::with_origin(Channel { send }, origin))
}

fn with_alpn(mut cfg: rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(cfg)
}

/// First contact: no client certificate; the server's chain must contain
/// the CA whose SHA-256 is `pin`, and verify against it as the only root.
pub fn pinned_config(pin: [u8; 32]) -> Result<Arc<rustls::ClientConfig>, ChannelError> {
    let provider = provider();
    let verifier = PinnedVerifier {
        pin,
        provider: provider.clone(),
    };
    let cfg = tls13_client(provider)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(with_alpn(cfg))
}

/// After enrolment: the zone's CA as the only root, and the agent's
/// control-plane certificate as the client certificate.
pub fn mtls_config(
    controller_ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ClientConfig>, ChannelError> {
    let mut roots = RootCertStore::empty();
    roots.add(controller_ca)?;
    let cfg = tls13_client(provider())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(with_alpn(cfg))
}

/// The SHA-256 of a certificate's DER, as a CA pin compares it.
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// `sha256:<hex>` of a fingerprint, for messages.
pub fn pin_string(pin: &[u8; 32]) -> String {
    let hex: String = pin.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Verifies a server chain against the pinned CA found in it.
#[derive(Debug)]
struct PinnedVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    fn inner(&self, ca: &CertificateDer<'_>) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = std::iter::once(end_entity)
            .chain(intermediates)
            .find(|c| fingerprint(c.as_ref()) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the zone's certificate chain holds no CA matching controller.ca_pin {}",
                    pin_string(&self.pin)
                ))
            })?;
        self.inner(ca)?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
