//! A mesh's certificate authority: built in (generated and stored by the
//! controller) or provided (an operator's CA certificate and key). Either way
//! it is checked on load so that it can only be used if the certificates it
//! issues will verify at the agents.

use std::fmt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::SectionKind;
use rustls_pki_types::CertificateDer;
use weft_api::SpiffeId;
use x509_parser::extensions::GeneralName;

use crate::{clock, pem, verify};

/// How long a generated (built-in) CA is valid unless the controller says
/// otherwise: long enough that rotation is a planned event, not a surprise.
pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// How far the start of a certificate's validity is put in the past, so that
/// a peer whose clock runs a little behind the CA's still accepts it. Leaves
/// are backdated by at most a tenth of their lifetime, so that short-lived
/// certificates are not renewed the moment they arrive.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Why a CA could not be generated or loaded. Each refusal names what is
/// wrong with the certificate or key and why it matters.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The trust domain is not one a SPIFFE ID can carry.
    #[error("trust domain {0:?} is invalid: it must be non-empty, at most 255 characters of lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    /// A zero (or sub-second) lifetime was asked for.
    #[error("CA lifetime must be at least one second")]
    Lifetime,
    /// Key generation or self-signing failed.
    #[error("cannot generate the CA: {0}")]
    Generate(rcgen::Error),
    /// No randomness for the serial number.
    #[error("cannot generate the CA: no secure randomness for the serial number")]
    Random,
    /// The certificate PEM or DER is not readable.
    #[error("CA certificate: {0}")]
    Certificate(String),
    /// The certificate may not sign other certificates.
    #[error(
        "CA certificate is not a CA: {0}; workload certificates signed with it would not verify"
    )]
    NotACa(String),
    /// The certificate has expired.
    #[error("CA certificate expired at {not_after}; nothing it signs would verify")]
    Expired {
        /// When it expired (RFC 3339).
        not_after: String,
    },
    /// The certificate is not valid yet (beyond the allowed clock skew).
    #[error("CA certificate is not valid before {not_before}; check this host's clock or the certificate")]
    NotYetValid {
        /// When it becomes valid (RFC 3339).
        not_before: String,
    },
    /// The key PEM is not a usable private key.
    #[error("CA key: {0}")]
    Key(String),
    /// The key is not the certificate's.
    #[error("CA key does not match the CA certificate's public key; certificates signed with it would not chain to the CA")]
    KeyMismatch,
    /// The certificate names another trust domain in its SPIFFE URI SAN.
    #[error("CA certificate is for trust domain {found:?} (URI SAN {uri:?}), not {expected:?}")]
    TrustDomainMismatch {
        /// The trust domain in the certificate.
        found: String,
        /// The mesh's trust domain.
        expected: String,
        /// The URI SAN it was read from.
        uri: String,
    },
    /// A test certificate issued with this CA does not verify.
    #[error("CA cannot issue workload certificates that verify: {0}")]
    Unusable(String),
}

/// A CA's certificate and private key in PEM, as the controller stores them.
/// `Debug` does not show the key.
#[derive(Clone, PartialEq, Eq)]
pub struct CaPem {
    /// The CA certificate (`CERTIFICATE`).
    pub cert_pem: String,
    /// The CA private key (PKCS#8 `PRIVATE KEY`).
    pub key_pem: String,
}

impl fmt::Debug for CaPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaPem")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// A mesh's certificate authority: signs workload certificates for the
/// identities the controller has decided. `Debug` does not show the key.
pub struct MeshCa {
    pub(crate) trust_domain: String,
    pub(crate) issuer: Issuer<'static, KeyPair>,
    pub(crate) cert_der: CertificateDer<'static>,
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
}

impl fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    /// Generates a built-in CA for `trust_domain`: an ECDSA P-256 key and a
    /// self-signed certificate (CA:true, path length 0, keyCertSign and
    /// cRLSign, URI SAN `spiffe://<trust_domain>`) valid from a little before
    /// now (see [`CLOCK_SKEW`]) for `lifetime` (e.g. [`DEFAULT_CA_LIFETIME`]).
    pub fn generate(trust_domain: &str, lifetime: Duration) -> Result<Self, CaError> {
        check_trust_domain(trust_domain)?;
        let life = clock::seconds(lifetime);
        if life < 1 {
            return Err(CaError::Lifetime);
        }
        let now = clock::now();
        let not_before = now.saturating_sub(clock::seconds(CLOCK_SKEW));
        let not_after = now.saturating_add(life).min(clock::MAX_X509_TIME);

        let (serial, serial_hex) = random_serial().ok_or(CaError::Random)?;
        let mut params = CertificateParams::default();
        // The serial number in the subject tells CA generations apart: a
        // leaf whose CA has been rotated out of the bundle then fails as
        // "unknown issuer", not as a bad signature from a same-named CA.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Weft");
        dn.push(DnType::CommonName, format!("{trust_domain} mesh CA"));
        let serial_value = serial_hex.try_into().map_err(CaError::Generate)?;
        dn.push(
            DnType::CustomDnType(vec![2, 5, 4, 5]),
            DnValue::PrintableString(serial_value),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let uri = format!("spiffe://{trust_domain}")
            .try_into()
            .map_err(CaError::Generate)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.not_before = clock::datetime(not_before);
        params.not_after = clock::datetime(not_after);
        params.serial_number = Some(serial);

        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Generate)?;
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        Ok(MeshCa {
            trust_domain: trust_domain.to_owned(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            not_before,
            not_after,
        })
    }

    /// Loads a CA from its certificate and PKCS#8 key in PEM: a stored
    /// built-in CA, or an operator's "provided" CA. Refuses a certificate
    /// that is not a CA, is out of date, does not match the key, names
    /// another trust domain in a SPIFFE URI SAN, or whose test issuance does
    /// not verify with webpki (what agents use).
    pub fn from_pem(cert_pem: &str, key_pem: &str, trust_domain: &str) -> Result<Self, CaError> {
        check_trust_domain(trust_domain)?;
        let der = pem::single(cert_pem, SectionKind::Certificate).map_err(CaError::Certificate)?;
        let (rest, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CaError::Certificate(format!("not a valid X.509 certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(CaError::Certificate(
                "trailing bytes after the certificate".to_owned(),
            ));
        }

        match x509.basic_constraints() {
            Err(e) => {
                return Err(CaError::Certificate(format!(
                    "malformed basicConstraints: {e}"
                )))
            }
            Ok(None) => {
                return Err(CaError::NotACa(
                    "it has no basicConstraints extension".to_owned(),
                ))
            }
            Ok(Some(bc)) if !bc.value.ca => {
                return Err(CaError::NotACa(
                    "its basicConstraints say CA:FALSE".to_owned(),
                ))
            }
            Ok(Some(_)) => {}
        }
        match x509.key_usage() {
            Err(e) => return Err(CaError::Certificate(format!("malformed keyUsage: {e}"))),
            Ok(Some(ku)) if !ku.value.key_cert_sign() => {
                return Err(CaError::NotACa(
                    "its keyUsage does not include keyCertSign".to_owned(),
                ))
            }
            Ok(_) => {}
        }

        let not_before = x509.validity().not_before.timestamp();
        let not_after = x509.validity().not_after.timestamp();
        let now = clock::now();
        if not_after <= now {
            return Err(CaError::Expired {
                not_after: clock::rfc3339(not_after),
            });
        }
        if not_before > now.saturating_add(clock::seconds(CLOCK_SKEW)) {
            return Err(CaError::NotYetValid {
                not_before: clock::rfc3339(not_before),
            });
        }

        let san = x509
            .subject_alternative_name()
            .map_err(|e| CaError::Certificate(format!("malformed subjectAltName: {e}")))?;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            if let GeneralName::URI(uri) = name {
                if let Some(rest) = uri.strip_prefix("spiffe://") {
                    let found = rest.split('/').next().unwrap_or_default();
                    if found != trust_domain {
                        return Err(CaError::TrustDomainMismatch {
                            found: found.to_owned(),
                            expected: trust_domain.to_owned(),
                            uri: (*uri).to_owned(),
                        });
                    }
                }
            }
        }

        // rcgen re-encodes the subject as the issuer name of what it signs;
        // it supports one attribute per RDN only.
        if x509.subject().iter().any(|rdn| rdn.iter().count() != 1) {
            return Err(CaError::Certificate(
                "its subject has an empty or multi-valued RDN, which cannot be used as an issuer name"
                    .to_owned(),
            ));
        }

        let key = private_key(key_pem)?;
        if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(CaError::KeyMismatch);
        }

        let cert_der = CertificateDer::from(der);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| CaError::Certificate(format!("cannot be used as an issuer: {e}")))?;
        let ca = MeshCa {
            trust_domain: trust_domain.to_owned(),
            issuer,
            cert_der,
            not_before,
            not_after,
        };
        ca.probe()?;
        Ok(ca)
    }

    /// Issues a short-lived certificate for a throwaway key and verifies it
    /// as agents will, so that a CA whose certificates would be refused
    /// (e.g. a subject rcgen re-encodes differently, name constraints that
    /// exclude the mesh) is refused at load time instead.
    fn probe(&self) -> Result<(), CaError> {
        let unusable = CaError::Unusable;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| unusable(e.to_string()))?;
        let id = SpiffeId::new(&self.trust_domain, "weft-system", "ca-probe")
            .map_err(|e| unusable(e.to_string()))?;
        let issued = self
            .issue(&key, &id, Duration::from_secs(60))
            .map_err(|e| unusable(e.to_string()))?;
        verify::chain_to(std::slice::from_ref(&self.cert_der), &issued.chain_der).map_err(unusable)
    }

    /// The trust domain this CA issues identities in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// When the CA certificate becomes valid (seconds since the epoch).
    pub fn not_before(&self) -> i64 {
        self.not_before
    }

    /// When the CA certificate expires (seconds since the epoch): no leaf
    /// outlives it, so the controller rotates the CA well before.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// The CA certificate in DER, e.g. for a rustls root store.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate in PEM: what goes into trust bundles.
    pub fn cert_pem(&self) -> String {
        pem::encode(SectionKind::Certificate, &self.cert_der)
    }

    /// The certificate and private key in PEM, for the controller's store;
    /// [`MeshCa::from_pem`] loads them back.
    pub fn to_pem(&self) -> CaPem {
        CaPem {
            cert_pem: self.cert_pem(),
            key_pem: self.issuer.key().serialize_pem(),
        }
    }
}

/// Checks a trust domain with the same rules as a SPIFFE ID's.
fn check_trust_domain(trust_domain: &str) -> Result<(), CaError> {
    // The namespace and service account are valid, so any refusal is the
    // trust domain's.
    SpiffeId::new(trust_domain, "ns", "sa")
        .map(|_| ())
        .map_err(|_| CaError::TrustDomain(trust_domain.to_owned()))
}

/// Reads the one PKCS#8 private key in `key_pem`.
fn private_key(key_pem: &str) -> Result<KeyPair, CaError> {
    let blocks = pem::sections(key_pem).map_err(CaError::Key)?;
    let mut keys = blocks.iter().filter(|(kind, _)| pem::is_private_key(*kind));
    let (kind, der) = keys
        .next()
        .ok_or_else(|| CaError::Key("no PEM private key found".to_owned()))?;
    if keys.next().is_some() {
        return Err(CaError::Key(
            "more than one private key; give only the CA's".to_owned(),
        ));
    }
    if *kind != SectionKind::PrivateKey {
        return Err(CaError::Key(format!(
            "a {} block is not supported; convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt`",
            pem::label(*kind)
        )));
    }
    KeyPair::try_from(der.as_slice())
        .map_err(|e| CaError::Key(format!("not a usable PKCS#8 private key: {e}")))
}

/// A random positive 128-bit serial number and its lowercase hex form.
/// `None` if the system has no secure randomness.
pub(crate) fn random_serial() -> Option<(SerialNumber, String)> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .ok()?;
    // Positive (top bit clear) and always 16 bytes long (next bit set).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Some((SerialNumber::from_slice(&bytes), hex))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{leaf_for, san_names, TD};

    #[test]
    fn generated_ca_has_the_promised_shape() {
        let ca = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        let bc = x509.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        assert_eq!(
            san_names(ca.cert_der()),
            [format!("URI(\"spiffe://{TD}\")")]
        );
        assert!(
            x509.subject().to_string().contains(TD),
            "{}",
            x509.subject()
        );
        // Each generation has its own subject.
        let again = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
        let (_, again) = x509_parser::parse_x509_certificate(again.cert_der()).unwrap();
        assert_ne!(x509.subject().as_raw(), again.subject().as_raw());
        assert_eq!(
            x509.public_key()
                .algorithm
                .parameters
                .as_ref()
                .map(|p| p.as_oid().unwrap().to_id_string()),
            Some("1.2.840.10045.3.1.7".to_owned()),
            "P-256"
        );
        let now = clock::now();
        let lifetime = clock::seconds(DEFAULT_CA_LIFETIME);
        assert!((ca.not_after() - (now + lifetime)).abs() <= 5);
        assert_eq!(x509.validity().not_after.timestamp(), ca.not_after());
        assert_eq!(x509.validity().not_before.timestamp(), ca.not_before());
        assert!(ca.not_before() < now);
        assert!(format!("{ca:?}").contains(TD));
        assert!(!format!("{:?}", ca.to_pem()).contains("PRIVATE KEY"));
    }

    #[test]
    fn refuses_bad_trust_domains_and_lifetimes() {
        for bad in ["", "Upper.case", "a/b", "spiffe://x", "sp ace"] {
            let err = MeshCa::generate(bad, DEFAULT_CA_LIFETIME).unwrap_err();
            assert!(matches!(err, CaError::TrustDomain(_)), "{bad}: {err}");
        }
        let err = MeshCa::generate(TD, Duration::from_millis(500)).unwrap_err();
        assert!(matches!(err, CaError::Lifetime), "{err}");
    }

    #[test]
    fn stored_ca_loads_back_and_keeps_issuing_for_the_same_bundle() {
        let ca = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
        let stored = ca.to_pem();
        let loaded = MeshCa::from_pem(&stored.cert_pem, &stored.key_pem, TD).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert_eq!(loaded.not_after(), ca.not_after());
        // A leaf from the reloaded CA verifies against the original's cert.
        let (issued, _) = leaf_for(&loaded, "default", "api", Duration::from_secs(3600));
        verify::chain_to(&[ca.cert_der().clone()], &issued.chain_der).unwrap();
    }

    fn ca_params(is_ca: IsCa) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = is_ca;
        params
    }

    #[test]
    fn refuses_a_provided_cert_that_is_not_a_ca() {
        let key = KeyPair::generate().unwrap();
        let cert = ca_params(IsCa::NoCa).self_signed(&key).unwrap();
        let err = MeshCa::from_pem(&cert.pem(), &key.serialize_pem(), TD).unwrap_err();
        assert!(matches!(err, CaError::NotACa(_)), "{err}");
        assert!(err.to_string().contains("no basicConstraints"), "{err}");

        let cert = ca_params(IsCa::ExplicitNoCa).self_signed(&key).unwrap();
        let err = MeshCa::from_pem(&cert.pem(), &key.serialize_pem(), TD).unwrap_err();
        assert!(err.to_string().contains("CA:FALSE"), "{err}");

        let mut params = ca_params(IsCa::Ca(BasicConstraints::Unconstrained));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        let err = MeshCa::from_pem(&cert.pem(), &key.serialize_pem(), TD).unwrap_err();
        assert!(err.to_string().contains("keyCertSign"), "{err}");
    }

    #[test]
    fn refuses_an_expired_or_future_provided_ca() {
        let key = KeyPair::generate().unwrap();
        let mut params = ca_params(IsCa::Ca(BasicConstraints::Unconstrained));
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        let err = MeshCa::from_pem(&cert.pem(), &key.serialize_pem(), TD).unwrap_err();
        assert!(matches!(err, CaError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("2021-01-01T00:00:00Z"), "{err}");

        params.not_before = rcgen::date_time_ymd(3000, 1, 1);
        params.not_after = rcgen::date_time_ymd(3001, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        let err = MeshCa::from_pem(&cert.pem(), &key.serialize_pem(), TD).unwrap_err();
        assert!(matches!(err, CaError::NotYetValid { .. }), "{err}");
    }

    #[test]
    fn refuses_a_provided_ca_with_the_wrong_key() {
        let ca = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
        let other = KeyPair::generate().unwrap().serialize_pem();
        let err = MeshCa::from_pem(&ca.cert_pem(), &other, TD).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch), "{err}");

        // Key problems are named as such.
        let err = MeshCa::from_pem(&ca.cert_pem(), "not a key", TD).unwrap_err();
        assert!(matches!(err, CaError::Key(_)), "{err}");
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
        let err = MeshCa::from_pem(&ca.cert_pem(), sec1, TD).unwrap_err();
        assert!(err.to_string().contains("openssl pkcs8"), "{err}");
        let err = MeshCa::from_pem(&ca.cert_pem(), &ca.cert_pem(), TD).unwrap_err();
        assert!(err.to_string().contains("no PEM private key"), "{err}");
    }

    #[test]
    fn refuses_a_provided_ca_for_another_trust_domain() {
        let ca = MeshCa::generate("other.test", DEFAULT_CA_LIFETIME).unwrap();
        let stored = ca.to_pem();
        let err = MeshCa::from_pem(&stored.cert_pem, &stored.key_pem, TD).unwrap_err();
        match &err {
            CaError::TrustDomainMismatch {
                found, expected, ..
            } => assert_eq!((found.as_str(), expected.as_str()), ("other.test", TD)),
            _ => panic!("{err}"),
        }
    }

    #[test]
    fn accepts_a_provided_ca_without_spiffe_san() {
        // An operator's CA from another PKI: CA:true, no SPIFFE SAN.
        let key = KeyPair::generate().unwrap();
        let mut params = ca_params(IsCa::Ca(BasicConstraints::Unconstrained));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Example Corp");
        let cert = params.self_signed(&key).unwrap();
        let ca = MeshCa::from_pem(&cert.pem(), &key.serialize_pem(), TD).unwrap();
        let (issued, _) = leaf_for(&ca, "default", "api", Duration::from_secs(3600));
        verify::chain_to(&[cert.der().clone()], &issued.chain_der).unwrap();
    }

    #[test]
    fn refuses_garbage_certificates() {
        let key = KeyPair::generate().unwrap().serialize_pem();
        for (pem, why) in [
            ("", "no PEM CERTIFICATE"),
            ("garbage", "no PEM CERTIFICATE"),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "not a valid X.509",
            ),
        ] {
            let err = MeshCa::from_pem(pem, &key, TD).unwrap_err();
            assert!(err.to_string().contains(why), "{pem:?}: {err}");
        }
        let ca = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
        let two = format!("{}{}", ca.cert_pem(), ca.cert_pem());
        let err = MeshCa::from_pem(&two, &ca.to_pem().key_pem, TD).unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
    }

    #[test]
    fn serials_are_random_positive_and_fixed_length() {
        let (_, a) = random_serial().unwrap();
        let (_, b) = random_serial().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        let first = u8::from_str_radix(&a[..2], 16).unwrap();
        assert!(first & 0x80 == 0 && first & 0x40 != 0);
    }
}
