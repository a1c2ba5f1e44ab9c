//! The agent's side of enrolment and renewal: a key generated on the host
//! that never leaves it, and the CSR that asks the controller to certify it.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use weft_api::SpiffeId;

/// Why a workload key or its CSR could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadKeyError {
    /// Key generation failed (no secure randomness).
    #[error("cannot generate a workload key: {0}")]
    Generate(rcgen::Error),
    /// The CSR could not be encoded or signed.
    #[error("cannot make a CSR for {id}: {source}")]
    Csr {
        /// The identity the CSR was for.
        id: SpiffeId,
        /// What failed.
        source: rcgen::Error,
    },
}

/// A workload's private key (ECDSA P-256), generated on the agent's host.
/// Only CSRs made with it are sent to the controller. `Debug` does not show
/// the key.
pub struct WorkloadKey {
    key: KeyPair,
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadKey").finish_non_exhaustive()
    }
}

impl WorkloadKey {
    /// Generates a new P-256 key (at enrolment, and at each renewal so that
    /// a leaked old key stops being useful when its certificate expires).
    pub fn generate() -> Result<Self, WorkloadKeyError> {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map(|key| WorkloadKey { key })
            .map_err(WorkloadKeyError::Generate)
    }

    /// A PEM PKCS#10 CSR asking for `id` as its only subjectAltName (a URI),
    /// with an empty subject, signed with this key: what the agent sends.
    pub fn csr(&self, id: &SpiffeId) -> Result<String, WorkloadKeyError> {
        let fail = |source| WorkloadKeyError::Csr {
            id: id.clone(),
            source,
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = id.as_str().try_into().map_err(fail)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(fail)
    }

    /// A PEM PKCS#10 CSR that names nothing (empty subject, no
    /// subjectAltName), signed with this key: what an agent sends before it
    /// knows its mesh's trust domain. The CA writes the identity it decided.
    pub fn bare_csr(&self) -> Result<String, WorkloadKeyError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(WorkloadKeyError::Generate)
    }

    /// The private key in PEM (PKCS#8), for the agent to keep on its host
    /// next to the certificate (what `Identity::load` reads).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The public key as a DER SubjectPublicKeyInfo, to check that a
    /// returned certificate certifies this key.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.key.subject_public_key_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::id;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::prelude::FromDer;

    #[test]
    fn csr_asks_for_the_id_only_and_verifies() {
        let key = WorkloadKey::generate().unwrap();
        let pem = key.csr(&id("payments", "api")).unwrap();
        let der = crate::pem::single(&pem, rustls_pki_types::pem::SectionKind::Csr).unwrap();
        let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
        csr.verify_signature().unwrap();
        assert_eq!(csr.certification_request_info.subject.iter().count(), 0);
        assert_eq!(
            csr.certification_request_info.subject_pki.raw,
            key.public_key_der().as_slice()
        );
        let names: Vec<String> = csr
            .requested_extensions()
            .unwrap()
            .filter_map(|e| match e {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(s) => Some(s),
                _ => None,
            })
            .flat_map(|s| s.general_names.iter().map(|n| format!("{n:?}")))
            .collect();
        assert_eq!(
            names,
            ["URI(\"spiffe://weft.test/ns/payments/sa/api\")".to_owned()]
        );
        assert!(key.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }
}
