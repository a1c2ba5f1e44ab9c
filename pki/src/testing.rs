//! Helpers shared by the unit tests.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, UnixTime};
use weft_api::SpiffeId;

use crate::{IssuedCert, MeshCa, WorkloadKey};

/// The trust domain of the tests' meshes.
pub(crate) const TD: &str = "weft.test";

/// `spiffe://weft.test/ns/<ns>/sa/<sa>`.
pub(crate) fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

/// Enrols a fresh workload key with `ca` the way an agent does.
pub(crate) fn leaf_for(
    ca: &MeshCa,
    ns: &str,
    sa: &str,
    lifetime: Duration,
) -> (IssuedCert, WorkloadKey) {
    let key = WorkloadKey::generate().unwrap();
    let id = SpiffeId::new(ca.trust_domain(), ns, sa).unwrap();
    let issued = ca.sign_csr(&key.csr(&id).unwrap(), &id, lifetime).unwrap();
    (issued, key)
}

/// Verifies `chain` as node-agent/src/tls.rs does, in both directions:
/// `verify_server_cert_signed_by_trust_anchor` (the client's check of the
/// server) and `WebPkiClientVerifier` (the server's check of the client).
/// The error is rustls's, in Debug form.
pub(crate) fn verify_with_rustls(
    roots: &RootCertStore,
    chain: &[CertificateDer<'static>],
) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let now = UnixTime::now();
    let parsed = ParsedCertificate::try_from(&chain[0]).map_err(|e| format!("{e:?}"))?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        &chain[1..],
        now,
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| format!("server: {e:?}"))?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider)
        .build()
        .unwrap()
        .verify_client_cert(&chain[0], &chain[1..], now)
        .map_err(|e| format!("client: {e:?}"))?;
    Ok(())
}

/// The subject alternative names of a certificate (DER), each as its
/// `Debug` form (`URI("spiffe://...")`), for comparing in assertions.
pub(crate) fn san_names(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect()
}
