//! Trust bundles: the CA certificates agents accept peers from. During a CA
//! rotation a bundle holds the old and the new CA, so that certificates from
//! either verify until every agent has renewed; then the old one is removed.

use std::fmt;

use rustls::RootCertStore;
use rustls_pki_types::pem::SectionKind;
use rustls_pki_types::CertificateDer;

use crate::{pem, MeshCa};

/// Why a trust bundle (or a change to one) was refused. Blocks are counted
/// from 1 in the order they appear in the PEM text.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The text is not valid PEM.
    #[error("trust bundle: {0}")]
    Pem(String),
    /// The text holds no certificate.
    #[error("trust bundle holds no PEM certificate")]
    Empty,
    /// A block is not a certificate.
    #[error("trust bundle: PEM block {index} is a {label}, not a CERTIFICATE{hint}", hint = if *.private { " (a private key must never be put in a bundle: bundles are sent to every agent)" } else { "" })]
    NotCertificate {
        /// Which block.
        index: usize,
        /// Its PEM label.
        label: &'static str,
        /// Whether it holds private key material.
        private: bool,
    },
    /// A certificate does not parse.
    #[error("trust bundle: certificate {index} is not a valid X.509 certificate: {reason}")]
    Certificate {
        /// Which block.
        index: usize,
        /// Why it does not parse.
        reason: String,
    },
    /// A certificate is not a CA and cannot anchor workload chains.
    #[error(
        "trust bundle: certificate {index} ({subject}) is not a CA (no basicConstraints CA:TRUE)"
    )]
    NotACa {
        /// Which block.
        index: usize,
        /// Its subject, to find it.
        subject: String,
    },
    /// rustls refused a certificate as a trust anchor.
    #[error("trust bundle: certificate {index} cannot be a trust anchor: {reason}")]
    Anchor {
        /// Which block.
        index: usize,
        /// rustls's reason.
        reason: String,
    },
}

/// An ordered set of CA certificates, without duplicates: what the
/// controller pushes to agents and what they verify peers against.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrustBundle {
    certs: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("cas", &self.certs.len())
            .finish()
    }
}

impl TrustBundle {
    /// An empty bundle, to add CAs to.
    pub fn new() -> Self {
        Self::default()
    }

    /// A bundle holding the CA certificates in `pem`, in order, duplicates
    /// dropped. Refuses text with no certificate, a malformed block, a
    /// block that is not a certificate (e.g. a private key), or a
    /// certificate that is not a CA.
    pub fn from_pem(pem: &str) -> Result<Self, BundleError> {
        let mut bundle = Self::new();
        bundle.add_pem(pem)?;
        Ok(bundle)
    }

    /// Adds the CA certificates in `pem` after those already present;
    /// returns how many were new. All or nothing: on error the bundle is
    /// unchanged.
    pub fn add_pem(&mut self, pem: &str) -> Result<usize, BundleError> {
        let certs = parse(pem)?;
        Ok(certs.into_iter().filter(|c| self.insert(c.clone())).count())
    }

    /// Adds a mesh CA's certificate; returns whether it was new.
    pub fn add_ca(&mut self, ca: &MeshCa) -> bool {
        self.insert(ca.cert_der().clone())
    }

    /// Removes the certificates in `pem` (e.g. a retired CA at the end of a
    /// rotation); returns how many were present. All or nothing: on error
    /// the bundle is unchanged.
    pub fn remove_pem(&mut self, pem: &str) -> Result<usize, BundleError> {
        let gone = parse(pem)?;
        let before = self.certs.len();
        self.certs.retain(|c| !gone.contains(c));
        Ok(before - self.certs.len())
    }

    /// Removes a mesh CA's certificate; returns whether it was present.
    pub fn remove_ca(&mut self, ca: &MeshCa) -> bool {
        let before = self.certs.len();
        self.certs.retain(|c| c != ca.cert_der());
        before != self.certs.len()
    }

    /// Whether the bundle trusts this mesh CA.
    pub fn contains_ca(&self, ca: &MeshCa) -> bool {
        self.certs.contains(ca.cert_der())
    }

    /// The CA certificates in DER, in order.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// How many CAs the bundle holds.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Whether the bundle trusts no CA at all.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// The bundle as PEM, one block per CA in order: the agent's
    /// `identity.trust_bundle` file.
    pub fn to_pem(&self) -> String {
        self.certs
            .iter()
            .map(|c| pem::encode(SectionKind::Certificate, c))
            .collect()
    }

    /// The bundle as a rustls root store, e.g. for the controller's own
    /// mTLS listener.
    pub fn root_store(&self) -> Result<RootCertStore, BundleError> {
        let mut roots = RootCertStore::empty();
        for (i, cert) in self.certs.iter().enumerate() {
            roots.add(cert.clone()).map_err(|e| BundleError::Anchor {
                index: i + 1,
                reason: e.to_string(),
            })?;
        }
        Ok(roots)
    }

    fn insert(&mut self, cert: CertificateDer<'static>) -> bool {
        if self.certs.contains(&cert) {
            false
        } else {
            self.certs.push(cert);
            true
        }
    }
}

/// Every block of `text`, each checked to be a CA certificate usable as a
/// trust anchor.
fn parse(text: &str) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let blocks = pem::sections(text).map_err(BundleError::Pem)?;
    if blocks.is_empty() {
        return Err(BundleError::Empty);
    }
    let mut certs = Vec::with_capacity(blocks.len());
    for (i, (kind, der)) in blocks.into_iter().enumerate() {
        let index = i + 1;
        if kind != SectionKind::Certificate {
            return Err(BundleError::NotCertificate {
                index,
                label: pem::label(kind),
                private: pem::is_private_key(kind),
            });
        }
        let (rest, x509) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| BundleError::Certificate {
                index,
                reason: e.to_string(),
            })?;
        if !rest.is_empty() {
            return Err(BundleError::Certificate {
                index,
                reason: "trailing bytes after the certificate".to_owned(),
            });
        }
        let is_ca = matches!(x509.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca {
            return Err(BundleError::NotACa {
                index,
                subject: x509.subject().to_string(),
            });
        }
        let cert = CertificateDer::from(der);
        RootCertStore::empty()
            .add(cert.clone())
            .map_err(|e| BundleError::Anchor {
                index,
                reason: e.to_string(),
            })?;
        certs.push(cert);
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::{leaf_for, verify_with_rustls, TD};
    use crate::DEFAULT_CA_LIFETIME;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn two_cas_during_rotation_then_the_old_one_removed() {
        let old = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
        let new = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
        let (old_leaf, _) = leaf_for(&old, "default", "api", HOUR);
        let (new_leaf, _) = leaf_for(&new, "default", "api", HOUR);

        let mut bundle = TrustBundle::from_pem(&old.cert_pem()).unwrap();
        assert_eq!(bundle.add_pem(&new.cert_pem()).unwrap(), 1);
        // Both CAs are for the same trust domain: webpki must pick the
        // right one, whichever comes first.
        for b in [
            bundle.clone(),
            TrustBundle::from_pem(&format!("{}{}", new.cert_pem(), old.cert_pem())).unwrap(),
        ] {
            let roots = b.root_store().unwrap();
            verify_with_rustls(&roots, &old_leaf.chain_der).unwrap();
            verify_with_rustls(&roots, &new_leaf.chain_der).unwrap();
        }

        assert_eq!(bundle.remove_pem(&old.cert_pem()).unwrap(), 1);
        let roots = bundle.root_store().unwrap();
        let err = verify_with_rustls(&roots, &old_leaf.chain_der).unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        verify_with_rustls(&roots, &new_leaf.chain_der).unwrap();

        // The chain the old CA issued carries the old CA itself: it must not
        // make a leaf verify once its CA has left the bundle.
        assert_eq!(old_leaf.chain_der.len(), 2);
        assert_eq!(TrustBundle::from_pem(&bundle.to_pem()).unwrap(), bundle);
    }

    #[test]
    fn ordered_and_deduplicated() {
        let a = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
        let b = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
        let text = format!(
            "# mesh CAs\n{}{}{}",
            a.cert_pem(),
            b.cert_pem(),
            a.cert_pem()
        );
        let mut bundle = TrustBundle::from_pem(&text).unwrap();
        assert_eq!(bundle.len(), 2);
        assert_eq!(bundle.certs(), [a.cert_der().clone(), b.cert_der().clone()]);
        assert_eq!(bundle.to_pem(), format!("{}{}", a.cert_pem(), b.cert_pem()));
        assert!(!bundle.add_ca(&a));
        assert_eq!(bundle.add_pem(&a.cert_pem()).unwrap(), 0);
        assert!(bundle.contains_ca(&b));
        assert!(bundle.remove_ca(&a));
        assert!(!bundle.remove_ca(&a));
        assert_eq!(bundle.remove_pem(&a.cert_pem()).unwrap(), 0);
        assert_eq!(bundle.certs(), [b.cert_der().clone()]);
        assert!(!bundle.is_empty());
        assert_eq!(format!("{bundle:?}"), "TrustBundle { cas: 1 }");
    }

    #[test]
    fn refuses_garbage_and_changes_nothing() {
        let ca = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
        let mut bundle = TrustBundle::from_pem(&ca.cert_pem()).unwrap();
        let (leaf, key) = leaf_for(&ca, "default", "api", HOUR);
        let leaf_pem = pem::encode(SectionKind::Certificate, &leaf.chain_der[0]);
        let other = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
        for (text, want) in [
            ("".to_owned(), "no PEM certificate".to_owned()),
            ("hello".to_owned(), "no PEM certificate".to_owned()),
            (
                "-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n".to_owned(),
                "malformed PEM".to_owned(),
            ),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned(),
                "certificate 1 is not a valid X.509".to_owned(),
            ),
            (
                format!("{}{}", other.cert_pem(), key.key_pem()),
                "PEM block 2 is a PRIVATE KEY, not a CERTIFICATE (a private key must never"
                    .to_owned(),
            ),
            (
                format!("{}{leaf_pem}", other.cert_pem()),
                "certificate 2 () is not a CA".to_owned(),
            ),
        ] {
            let err = bundle.add_pem(&text).unwrap_err().to_string();
            assert!(err.contains(&want), "{text:?}: {err}");
            let err = TrustBundle::from_pem(&text).unwrap_err().to_string();
            assert!(err.contains(&want), "{text:?}: {err}");
            assert_eq!(bundle.len(), 1);
        }
        assert!(bundle.remove_pem("junk").is_err());
        assert_eq!(bundle.len(), 1);
    }
}
