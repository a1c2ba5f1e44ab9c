//! Checking a workload's certificate signing request (PKCS#10) before the CA
//! certifies its key: the request must be intact, signed by the key it
//! carries, and ask either for exactly the identity the controller decided
//! or for no name at all (an agent enrolling does not know its mesh's trust
//! domain yet; the CA decides what the certificate says either way).

use rustls_pki_types::pem::SectionKind;
use weft_api::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::issue::IssueError;
use crate::pem;

/// The key kinds workload certificates may certify: what rustls verifies
/// with ring and what rcgen can write into a certificate.
const ACCEPTED_KEYS: [&rcgen::SignatureAlgorithm; 3] = [
    &rcgen::PKCS_ECDSA_P256_SHA256,
    &rcgen::PKCS_ECDSA_P384_SHA384,
    &rcgen::PKCS_ED25519,
];

/// Checks `csr_pem` and returns the public key to certify.
pub(crate) fn check(
    csr_pem: &str,
    expected: &SpiffeId,
) -> Result<rcgen::SubjectPublicKeyInfo, IssueError> {
    let der = pem::single(csr_pem, SectionKind::Csr).map_err(IssueError::Pem)?;
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| IssueError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IssueError::Parse(
            "trailing bytes after the request".to_owned(),
        ));
    }
    csr.verify_signature()
        .map_err(|e| IssueError::Signature(e.to_string()))?;

    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let describe_key = || {
        let mut s = format!("of algorithm {}", spki.algorithm.algorithm.to_id_string());
        if let Some(curve) = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
        {
            s.push_str(&format!(" with parameters {}", curve.to_id_string()));
        }
        s
    };
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|_| IssueError::UnsupportedKey(describe_key()))?;
    if !ACCEPTED_KEYS.contains(&rcgen::PublicKeyData::algorithm(&public_key)) {
        return Err(IssueError::UnsupportedKey(describe_key()));
    }

    // Every extension request (there should be one, but a request may carry
    // several): collect the URI SANs, refuse other names and CA requests.
    let mut uris = Vec::new();
    for attr in info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(request) = attr.parsed_attribute() else {
            continue;
        };
        for ext in &request.extensions {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(uri) => uris.push((*uri).to_owned()),
                            other => {
                                return Err(IssueError::OtherName {
                                    name: describe_name(other),
                                    expected: expected.to_string(),
                                })
                            }
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err(IssueError::AsksForCa)
                }
                ParsedExtension::ParseError { error } => {
                    return Err(IssueError::Parse(format!(
                        "malformed requested extension {}: {error}",
                        ext.oid.to_id_string()
                    )))
                }
                // Key usages and the like: the CA decides them.
                _ => {}
            }
        }
    }

    let uri = match uris.len() {
        // No name asked for: the CA writes the one it decided.
        0 => return Ok(public_key),
        1 => uris.remove(0),
        _ => {
            return Err(IssueError::SeveralIdentities {
                requested: uris,
                expected: expected.to_string(),
            })
        }
    };
    let requested: SpiffeId = uri.parse().map_err(|e| IssueError::BadIdentity {
        requested: uri.clone(),
        reason: format!("{e}"),
        expected: expected.to_string(),
    })?;
    if requested.trust_domain() != expected.trust_domain() {
        return Err(IssueError::ForeignTrustDomain {
            found: requested.trust_domain().to_owned(),
            requested: requested.to_string(),
            trust_domain: expected.trust_domain().to_owned(),
            expected: expected.to_string(),
        });
    }
    if requested != *expected {
        return Err(IssueError::WrongIdentity {
            requested: requested.to_string(),
            expected: expected.to_string(),
        });
    }
    Ok(public_key)
}

/// A non-URI subjectAltName, as an operator would write it.
fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(n) => format!("DNS:{n:?}"),
        GeneralName::RFC822Name(n) => format!("email:{n:?}"),
        GeneralName::IPAddress(ip) => match ip.len() {
            4 => {
                let b: [u8; 4] = [ip[0], ip[1], ip[2], ip[3]];
                format!("IP:{}", std::net::Ipv4Addr::from(b))
            }
            16 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(ip);
                format!("IP:{}", std::net::Ipv6Addr::from(b))
            }
            _ => format!("IP:{ip:02x?}"),
        },
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;
    use crate::testing::{id, san_names, TD};
    use crate::{MeshCa, WorkloadKey, DEFAULT_CA_LIFETIME};

    const HOUR: Duration = Duration::from_secs(3600);

    fn ca() -> MeshCa {
        MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap()
    }

    /// A CSR with the given SANs, signed by a fresh key of `alg`.
    fn csr_with(sans: Vec<SanType>, alg: &'static rcgen::SignatureAlgorithm) -> String {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        let key = KeyPair::generate_for(alg).unwrap();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn refuses_a_csr_for_another_identity_naming_both() {
        let key = WorkloadKey::generate().unwrap();
        let csr = key.csr(&id("default", "admin")).unwrap();
        let err = ca()
            .sign_csr(&csr, &id("default", "api"), HOUR)
            .unwrap_err();
        assert!(matches!(err, IssueError::WrongIdentity { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("spiffe://{TD}/ns/default/sa/admin"))
                && msg.contains(&format!("spiffe://{TD}/ns/default/sa/api")),
            "{msg}"
        );
    }

    #[test]
    fn refuses_a_csr_for_another_trust_domain() {
        let other = SpiffeId::new("other.test", "default", "api").unwrap();
        let csr = WorkloadKey::generate().unwrap().csr(&other).unwrap();
        let err = ca()
            .sign_csr(&csr, &id("default", "api"), HOUR)
            .unwrap_err();
        assert!(
            matches!(err, IssueError::ForeignTrustDomain { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("other.test"), "{err}");

        // The controller itself asking for a foreign identity is refused too.
        let err = ca().sign_csr(&csr, &other, HOUR).unwrap_err();
        assert!(
            matches!(err, IssueError::ExpectedForeignTrustDomain { .. }),
            "{err}"
        );
    }

    #[test]
    fn refuses_a_csr_with_a_broken_signature() {
        let csr = WorkloadKey::generate()
            .unwrap()
            .csr(&id("default", "api"))
            .unwrap();
        let mut der = pem::single(&csr, SectionKind::Csr).unwrap();
        // The last byte is inside the signature value: the structure still
        // parses, the signature no longer verifies.
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let broken = pem::encode(SectionKind::Csr, &der);
        let err = ca()
            .sign_csr(&broken, &id("default", "api"), HOUR)
            .unwrap_err();
        assert!(matches!(err, IssueError::Signature(_)), "{err}");

        // A byte flipped in the signed part (here: inside the public key or
        // the SAN) fails too, whether as a parse or a signature error.
        let mut der = pem::single(&csr, SectionKind::Csr).unwrap();
        der[40] ^= 0x01;
        let broken = pem::encode(SectionKind::Csr, &der);
        let err = ca()
            .sign_csr(&broken, &id("default", "api"), HOUR)
            .unwrap_err();
        assert!(
            matches!(
                err,
                IssueError::Signature(_) | IssueError::Parse(_) | IssueError::UnsupportedKey(_)
            ),
            "{err}"
        );
    }

    #[test]
    fn refuses_garbage() {
        let expected = id("default", "api");
        let ca = ca();
        for (text, want) in [
            ("", "no PEM CERTIFICATE REQUEST"),
            ("hello", "no PEM CERTIFICATE REQUEST"),
            (
                "-----BEGIN CERTIFICATE REQUEST-----\n%%%%\n-----END CERTIFICATE REQUEST-----\n",
                "malformed PEM",
            ),
            (
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                "not a valid PKCS#10",
            ),
        ] {
            let err = ca.sign_csr(text, &expected, HOUR).unwrap_err();
            assert!(err.to_string().contains(want), "{text:?}: {err}");
        }
        // A certificate is not a CSR.
        let err = ca.sign_csr(&ca.cert_pem(), &expected, HOUR).unwrap_err();
        assert!(err.to_string().contains("found CERTIFICATE"), "{err}");
    }

    #[test]
    fn refuses_two_uri_sans() {
        let expected = id("default", "api");
        let csr = csr_with(
            vec![
                uri(expected.as_str()),
                uri(&format!("spiffe://{TD}/ns/kube-system/sa/admin")),
            ],
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        let err = ca().sign_csr(&csr, &expected, HOUR).unwrap_err();
        assert!(
            matches!(err, IssueError::SeveralIdentities { ref requested, .. } if requested.len() == 2),
            "{err}"
        );
        assert!(err.to_string().contains("kube-system"), "{err}");
    }

    #[test]
    fn refuses_other_names_no_name_bad_ids_and_ca_requests() {
        let expected = id("default", "api");
        let ca = ca();
        let p256 = &rcgen::PKCS_ECDSA_P256_SHA256;

        let csr = csr_with(
            vec![
                uri(expected.as_str()),
                SanType::DnsName("api.example.com".try_into().unwrap()),
            ],
            p256,
        );
        let err = ca.sign_csr(&csr, &expected, HOUR).unwrap_err();
        assert!(err.to_string().contains("DNS:\"api.example.com\""), "{err}");

        let csr = csr_with(
            vec![
                uri(expected.as_str()),
                SanType::IpAddress([10, 0, 0, 1].into()),
            ],
            p256,
        );
        let err = ca.sign_csr(&csr, &expected, HOUR).unwrap_err();
        assert!(err.to_string().contains("IP:10.0.0.1"), "{err}");

        // A CSR naming nothing gets the identity the controller decided.
        let csr = csr_with(vec![], p256);
        let issued = ca.sign_csr(&csr, &expected, HOUR).unwrap();
        assert_eq!(issued.id, expected);
        assert_eq!(
            san_names(&issued.chain_der[0]),
            [format!("URI({:?})", expected.as_str())]
        );
        crate::verify::chain_to(&[ca.cert_der().clone()], &issued.chain_der).unwrap();

        let csr = csr_with(vec![uri(&format!("spiffe://{TD}/ns/default"))], p256);
        let err = ca.sign_csr(&csr, &expected, HOUR).unwrap_err();
        assert!(matches!(err, IssueError::BadIdentity { .. }), "{err}");

        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![uri(expected.as_str())];
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let err = ca.sign_csr(&csr, &expected, HOUR).unwrap_err();
        assert!(matches!(err, IssueError::AsksForCa), "{err}");
    }

    #[test]
    fn accepts_p384_and_ed25519_keys() {
        let expected = id("default", "api");
        let ca = ca();
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let csr = csr_with(vec![uri(expected.as_str())], alg);
            let issued = ca.sign_csr(&csr, &expected, HOUR).unwrap();
            crate::verify::chain_to(&[ca.cert_der().clone()], &issued.chain_der).unwrap();
        }
    }
}
