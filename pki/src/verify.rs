//! Verifying a chain the way agents do (rustls with webpki, ring), for both
//! directions of an HBONE tunnel.

use std::sync::Arc;

use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, UnixTime};

/// Checks that `chain` (leaf first) verifies against `anchors` now, as a
/// server certificate and as a client certificate.
pub(crate) fn chain_to(
    anchors: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
) -> Result<(), String> {
    let mut roots = RootCertStore::empty();
    for anchor in anchors {
        roots
            .add(anchor.clone())
            .map_err(|e| format!("trust anchor: {e}"))?;
    }
    let (leaf, intermediates) = chain.split_first().ok_or("empty chain")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let now = UnixTime::now();
    let parsed = ParsedCertificate::try_from(leaf).map_err(|e| format!("leaf: {e}"))?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        intermediates,
        now,
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| format!("as a server certificate: {e}"))?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("client verifier: {e}"))?
        .verify_client_cert(leaf, intermediates, now)
        .map_err(|e| format!("as a client certificate: {e}"))?;
    Ok(())
}
