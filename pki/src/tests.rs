//! End-to-end tests: an agent's key and CSR, the CA's certificate, and the
//! checks agents and their peers make on it.

use std::path::PathBuf;
use std::time::Duration;

use rustls::RootCertStore;
use weft_api::SpiffeId;
use x509_parser::extensions::GeneralName;

use crate::testing::{id, leaf_for, verify_with_rustls, TD};
use crate::{
    clock, renewal_at, IssueError, MeshCa, TrustBundle, WorkloadKey, DEFAULT_CA_LIFETIME,
    DEFAULT_WORKLOAD_LIFETIME,
};

fn roots_of(ca: &MeshCa) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    roots
}

#[test]
fn an_agents_csr_becomes_a_chain_rustls_verifies_both_ways() {
    let ca = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let expected = id("payments", "api");
    let csr = key.csr(&expected).unwrap();
    let issued = ca
        .sign_csr(&csr, &expected, DEFAULT_WORKLOAD_LIFETIME)
        .unwrap();
    assert_eq!(issued.id, expected);

    // Verified as a server certificate and as a client certificate.
    verify_with_rustls(&roots_of(&ca), &issued.chain_der).unwrap();
    // And not against another CA of the same trust domain.
    let other = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
    let err = verify_with_rustls(&roots_of(&other), &issued.chain_der).unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");

    // The PEM chain is the DER chain: leaf, then the CA.
    let from_pem: Vec<_> =
        rustls_pki_types::pem::PemObject::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<Vec<rustls_pki_types::CertificateDer<'static>>, _>>()
            .unwrap();
    assert_eq!(from_pem, issued.chain_der);
    assert_eq!(&issued.chain_der[1], ca.cert_der());

    let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain_der[0]).unwrap();
    // The one URI SAN parses as the expected SPIFFE ID.
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "SAN must be critical with an empty subject");
    let uris: Vec<SpiffeId> = san
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.parse().unwrap(),
            other => panic!("unexpected SAN {other:?}"),
        })
        .collect();
    assert_eq!(uris, std::slice::from_ref(&expected));
    // The agent's own reading of it agrees.
    assert_eq!(
        weft_agent::tls::spiffe_id_of(&issued.chain_der[0]).unwrap(),
        expected
    );

    // A leaf for the agent's key, usable for TLS both ways, nothing more.
    assert_eq!(leaf.public_key().raw, key.public_key_der().as_slice());
    let bc = leaf.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    assert_eq!(leaf.subject().iter().count(), 0);
    assert_eq!(leaf.raw_serial_as_string().replace(':', ""), issued.serial);
    assert_eq!(leaf.validity().not_before.timestamp(), issued.not_before);
    assert_eq!(leaf.validity().not_after.timestamp(), issued.not_after);

    // Each issuance gets its own serial.
    let again = ca
        .sign_csr(&csr, &expected, DEFAULT_WORKLOAD_LIFETIME)
        .unwrap();
    assert_ne!(again.serial, issued.serial);
}

#[test]
fn lifetime_is_respected_and_capped_by_the_ca() {
    let ca = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
    let before = clock::now();
    let (issued, _) = leaf_for(&ca, "default", "api", Duration::from_secs(3600));
    let after = clock::now();
    assert!(
        issued.not_after >= before + 3600 && issued.not_after <= after + 3600,
        "{issued:?}"
    );
    // Backdated for clock skew: five minutes for a long-lived certificate.
    assert!(
        issued.not_before >= before - 300 && issued.not_before <= after - 300,
        "{issued:?}"
    );

    // A CA that expires in two hours never issues past its own expiry.
    let short = MeshCa::generate(TD, Duration::from_secs(2 * 3600)).unwrap();
    let (issued, _) = leaf_for(&short, "default", "api", DEFAULT_WORKLOAD_LIFETIME);
    assert_eq!(issued.not_after, short.not_after());
    verify_with_rustls(&roots_of(&short), &issued.chain_der).unwrap();

    // No zero lifetime; no issuing from an expired CA.
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr(&id("default", "api")).unwrap();
    let err = ca
        .sign_csr(&csr, &id("default", "api"), Duration::ZERO)
        .unwrap_err();
    assert!(matches!(err, IssueError::Lifetime), "{err}");
    let mut expired = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
    expired.not_after = clock::now() - 1;
    let err = expired
        .sign_csr(&csr, &id("default", "api"), Duration::from_secs(60))
        .unwrap_err();
    assert!(matches!(err, IssueError::CaExpired { .. }), "{err}");
}

#[test]
fn short_lived_certificates_are_not_renewed_on_arrival() {
    // The e2e rotation scenario uses 30 s certificates: backdating must not
    // eat so much of their life that renewal is due at once.
    let ca = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
    let issued_at = clock::now();
    let (issued, _) = leaf_for(&ca, "default", "api", Duration::from_secs(30));
    assert!(issued.not_before >= issued_at - 3, "{issued:?}");
    let earliest = renewal_at(issued.not_before, issued.not_after, 0.0);
    let latest = renewal_at(issued.not_before, issued.not_after, 1.0);
    assert!(earliest >= issued_at + 10, "{earliest} vs {issued_at}");
    assert!(
        latest < issued.not_after,
        "{latest} vs {}",
        issued.not_after
    );
}

/// A directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("weft-pki-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes the agent's three identity files; returns their paths.
    fn identity(&self, chain: &str, key: &str, bundle: &str) -> [PathBuf; 3] {
        let paths = ["cert.pem", "key.pem", "bundle.pem"].map(|f| self.0.join(f));
        for (path, text) in paths.iter().zip([chain, key, bundle]) {
            std::fs::write(path, text).unwrap();
        }
        paths
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load(paths: &[PathBuf; 3]) -> Result<weft_agent::tls::Identity, weft_agent::tls::IdentityError> {
    weft_agent::tls::Identity::load(&paths[0], &paths[1], &paths[2])
}

#[test]
fn the_agent_loads_what_the_ca_issues() {
    let dir = TempDir::new("agent-load");
    let old = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
    let (issued, key) = leaf_for(&old, "payments", "api", DEFAULT_WORKLOAD_LIFETIME);
    let mut bundle = TrustBundle::new();
    bundle.add_ca(&old);

    let identity =
        load(&dir.identity(&issued.chain_pem, &key.key_pem(), &bundle.to_pem())).unwrap();
    assert_eq!(identity.id, id("payments", "api"));
    assert_eq!(identity.not_after, issued.not_after);
    identity.server_config().unwrap();
    identity.client_config(id("payments", "db")).unwrap();

    // During a rotation the bundle holds both CAs: certificates from
    // either load.
    let new = MeshCa::generate(TD, DEFAULT_CA_LIFETIME).unwrap();
    bundle.add_ca(&new);
    let (renewed, new_key) = leaf_for(&new, "payments", "api", DEFAULT_WORKLOAD_LIFETIME);
    load(&dir.identity(&issued.chain_pem, &key.key_pem(), &bundle.to_pem())).unwrap();
    load(&dir.identity(&renewed.chain_pem, &new_key.key_pem(), &bundle.to_pem())).unwrap();

    // Once the old CA is removed, its certificates no longer load...
    bundle.remove_ca(&old);
    let err = load(&dir.identity(&issued.chain_pem, &key.key_pem(), &bundle.to_pem()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("trust bundle"), "{err}");
    // ...and a chain with another key than the agent's is refused.
    let err = load(&dir.identity(&renewed.chain_pem, &key.key_pem(), &bundle.to_pem()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("identity.key"), "{err}");
    load(&dir.identity(&renewed.chain_pem, &new_key.key_pem(), &bundle.to_pem())).unwrap();
}
