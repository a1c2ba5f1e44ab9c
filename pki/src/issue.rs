//! Issuing workload certificates: the controller decides which SPIFFE ID an
//! agent may hold, the agent proves it holds a key by signing a CSR, and the
//! CA certifies that key for that ID only.

use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    PublicKeyData, SanType,
};
use rustls_pki_types::pem::SectionKind;
use rustls_pki_types::CertificateDer;
use weft_api::SpiffeId;

use crate::ca::{random_serial, MeshCa, CLOCK_SKEW};
use crate::{clock, csr, pem};

/// The default lifetime of a workload certificate (DESIGN: 24 h, renewed at
/// 50-80% of its life).
pub const DEFAULT_WORKLOAD_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// A workload certificate as issued: what the controller returns to the
/// agent and records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// The identity certified.
    pub id: SpiffeId,
    /// The chain in PEM: the leaf first, then the CA certificate.
    pub chain_pem: String,
    /// The same chain in DER.
    pub chain_der: Vec<CertificateDer<'static>>,
    /// Start of validity, seconds since the epoch (slightly before issuance,
    /// for clock skew).
    pub not_before: i64,
    /// End of validity, seconds since the epoch (never after the CA's).
    pub not_after: i64,
    /// The serial number in lowercase hex (random, 128 bits).
    pub serial: String,
}

/// A leaf's parameters before its SANs and extended key usages, with its
/// validity and serial as the issued certificate reports them.
pub(crate) struct LeafParams {
    /// What the caller completes and signs.
    pub(crate) params: CertificateParams,
    /// Start of validity, seconds since the epoch.
    pub(crate) not_before: i64,
    /// End of validity, seconds since the epoch.
    pub(crate) not_after: i64,
    /// The serial number in lowercase hex.
    pub(crate) serial_hex: String,
}

/// Why a CSR was refused or a certificate could not be issued. Refusals of
/// the request name what it asked for and what was expected (identities as
/// their URIs).
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The CSR text is not one PEM `CERTIFICATE REQUEST` block.
    #[error("CSR: {0}")]
    Pem(String),
    /// The CSR is not a valid PKCS#10 structure.
    #[error("CSR is not a valid PKCS#10 request: {0}")]
    Parse(String),
    /// The CSR's signature does not verify with its own public key.
    #[error("CSR signature does not verify (altered in transit, or not signed by the key it carries): {0}")]
    Signature(String),
    /// The CSR's key is of a kind workload certificates do not use.
    #[error("CSR key is {0}; workload keys must be ECDSA P-256, ECDSA P-384 or Ed25519")]
    UnsupportedKey(String),
    /// The CSR asks for no URI SAN. (No longer returned: such a CSR gets
    /// the identity the controller decided; kept for API stability.)
    #[error("CSR asks for no SPIFFE ID; it must ask for {expected} as its only URI SAN")]
    NoIdentity {
        /// The identity the controller decided on.
        expected: String,
    },
    /// The CSR asks for several URI SANs.
    #[error("CSR asks for {} URI SANs ({requested:?}); it must ask for {expected} only", requested.len())]
    SeveralIdentities {
        /// What the CSR asked for.
        requested: Vec<String>,
        /// The identity the controller decided on.
        expected: String,
    },
    /// The CSR asks for a name other than a URI (DNS name, IP, e-mail...).
    #[error("CSR asks for the name {name}, which the mesh CA does not issue; it must ask for {expected} as its only subjectAltName")]
    OtherName {
        /// The name asked for.
        name: String,
        /// The identity the controller decided on.
        expected: String,
    },
    /// The URI SAN is not a valid Weft SPIFFE ID.
    #[error("CSR asks for {requested:?}, which is not a valid SPIFFE ID ({reason}); expected {expected}")]
    BadIdentity {
        /// What the CSR asked for.
        requested: String,
        /// Why it is not valid.
        reason: String,
        /// The identity the controller decided on.
        expected: String,
    },
    /// The CSR asks for an identity in another trust domain.
    #[error("CSR asks for {requested}, in trust domain {found:?}, but this CA issues for {trust_domain:?} only (expected {expected})")]
    ForeignTrustDomain {
        /// What the CSR asked for.
        requested: String,
        /// The trust domain it asked for.
        found: String,
        /// The CA's trust domain.
        trust_domain: String,
        /// The identity the controller decided on.
        expected: String,
    },
    /// The CSR asks for another identity than the one decided.
    #[error("CSR asks for {requested} but this agent may only get {expected}")]
    WrongIdentity {
        /// What the CSR asked for.
        requested: String,
        /// The identity the controller decided on.
        expected: String,
    },
    /// The CSR asks to be a CA.
    #[error("CSR asks for a CA certificate (basicConstraints CA:TRUE); workloads only get leaf certificates")]
    AsksForCa,
    /// The controller asked for an identity outside the CA's trust domain.
    #[error("cannot issue {expected}: this CA issues for trust domain {trust_domain:?} only")]
    ExpectedForeignTrustDomain {
        /// The identity the controller decided on.
        expected: String,
        /// The CA's trust domain.
        trust_domain: String,
    },
    /// A zero (or sub-second) lifetime was asked for.
    #[error("workload certificate lifetime must be at least one second")]
    Lifetime,
    /// The CA itself has expired.
    #[error("the mesh CA expired at {not_after}; rotate it before issuing")]
    CaExpired {
        /// When the CA expired (RFC 3339).
        not_after: String,
    },
    /// No randomness for the serial number.
    #[error("cannot issue: no secure randomness for the serial number")]
    Random,
    /// Signing failed.
    #[error("cannot sign the certificate: {0}")]
    Sign(rcgen::Error),
}

impl MeshCa {
    /// Signs an agent's CSR for `expected`, the identity the controller has
    /// decided this agent may hold, valid for `lifetime` (e.g.
    /// [`DEFAULT_WORKLOAD_LIFETIME`]) but never past the CA's own expiry.
    ///
    /// The CSR's signature must verify, its key must be ECDSA P-256/P-384 or
    /// Ed25519, and it must ask for no subjectAltName at all or for
    /// `expected` as its only one (a URI);
    /// anything else in it (subject, key usages) is ignored: the CA decides
    /// what a workload certificate says.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        expected: &SpiffeId,
        lifetime: Duration,
    ) -> Result<IssuedCert, IssueError> {
        if expected.trust_domain() != self.trust_domain {
            return Err(IssueError::ExpectedForeignTrustDomain {
                expected: expected.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let public_key = csr::check(csr_pem, expected)?;
        self.issue(&public_key, expected, lifetime)
    }

    /// Certifies `key` as `id`: CA:false, digitalSignature, serverAuth and
    /// clientAuth, the SPIFFE URI SAN (critical, as the subject is empty).
    pub(crate) fn issue(
        &self,
        key: &impl PublicKeyData,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<IssuedCert, IssueError> {
        let mut leaf = self.leaf_params(lifetime)?;
        let uri = id.as_str().try_into().map_err(IssueError::Sign)?;
        leaf.params.subject_alt_names = vec![SanType::URI(uri)];
        leaf.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let (chain_der, chain_pem) = self.sign_leaf(&leaf.params, key)?;
        Ok(IssuedCert {
            id: id.clone(),
            chain_pem,
            chain_der,
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            serial: leaf.serial_hex,
        })
    }

    /// What every leaf this CA signs has in common (no subject, CA:false,
    /// digitalSignature, the authority key identifier, a random serial) and
    /// its validity: `lifetime` from now, backdated a little for clock skew,
    /// never outside the CA's own. Refused for a lifetime under a second or
    /// an expired CA. The caller adds the SANs and extended key usages.
    pub(crate) fn leaf_params(&self, lifetime: Duration) -> Result<LeafParams, IssueError> {
        let life = clock::seconds(lifetime);
        if life < 1 {
            return Err(IssueError::Lifetime);
        }
        let now = clock::now();
        if self.not_after <= now {
            return Err(IssueError::CaExpired {
                not_after: clock::rfc3339(self.not_after),
            });
        }
        let backdate = clock::seconds(CLOCK_SKEW).min(life / 10);
        let not_before = now.saturating_sub(backdate).max(self.not_before);
        let not_after = now.saturating_add(life).min(self.not_after);

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = clock::datetime(not_before);
        params.not_after = clock::datetime(not_after);
        let (serial, serial_hex) = random_serial().ok_or(IssueError::Random)?;
        params.serial_number = Some(serial);
        Ok(LeafParams {
            params,
            not_before,
            not_after,
            serial_hex,
        })
    }

    /// Signs `params` for `key`; returns the chain (the leaf, then this
    /// CA's certificate) in DER and in PEM.
    pub(crate) fn sign_leaf(
        &self,
        params: &CertificateParams,
        key: &impl PublicKeyData,
    ) -> Result<(Vec<CertificateDer<'static>>, String), IssueError> {
        let leaf = params
            .signed_by(key, &self.issuer)
            .map_err(IssueError::Sign)?;
        let chain_der = vec![leaf.der().clone(), self.cert_der.clone()];
        let chain_pem = chain_der
            .iter()
            .map(|c| pem::encode(SectionKind::Certificate, c))
            .collect();
        Ok((chain_der, chain_pem))
    }
}
