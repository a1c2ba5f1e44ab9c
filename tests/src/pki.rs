//! Certificates made on the fly with rcgen: a CA, workload leaves with a
//! SPIFFE URI SAN, an expired leaf, and (from a second CA) a foreign leaf.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// The trust domain of the test mesh.
pub const TRUST_DOMAIN: &str = "weft.test";

/// `spiffe://weft.test/ns/default/sa/<sa>`.
pub fn spiffe_id(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{sa}")
}

/// A certificate authority that signs workload leaves.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its private key, PEM encoded.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The SPIFFE ID in the URI SAN.
    pub id: String,
    /// The certificate (the chain is just the leaf: the CA is the root).
    pub cert_pem: String,
    /// The PKCS#8 private key.
    pub key_pem: String,
}

/// Paths of the three PEM files an agent's `identity` section names.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// CA certificates to trust.
    pub trust_bundle: PathBuf,
}

impl Ca {
    /// A new self-signed CA whose common name is `name`.
    pub fn new(name: &str) -> Result<Ca> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Weft e2e");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2100, 1, 1);
        let key = KeyPair::generate().context("generating a CA key")?;
        let issuer = CertifiedIssuer::self_signed(params, key).context("self-signing the CA")?;
        Ok(Ca { issuer })
    }

    /// The CA certificate, PEM encoded (what goes in a trust bundle).
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A valid leaf for the SPIFFE ID `id`.
    pub fn leaf(&self, id: &str) -> Result<Leaf> {
        self.issue(id, 2100)
    }

    /// A leaf for `id` whose validity ended in 2021.
    pub fn expired_leaf(&self, id: &str) -> Result<Leaf> {
        self.issue(id, 2021)
    }

    /// Issues a leaf valid from 2020 to the first of January of `until_year`.
    fn issue(&self, id: &str, until_year: i32) -> Result<Leaf> {
        id.parse::<weft_api::SpiffeId>()
            .with_context(|| format!("{id} is not a workload identity"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, id);
        params.subject_alt_names = vec![SanType::URI(id.try_into().context("URI SAN")?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(until_year, 1, 1);
        let key = KeyPair::generate().context("generating a leaf key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a leaf")?;
        Ok(Leaf {
            id: id.to_owned(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Leaf {
    /// Writes `<name>.crt`, `<name>.key` and `<name>-trust.pem` (holding the
    /// certificates of `trust`) into `dir`.
    pub fn write(&self, dir: &Path, name: &str, trust: &[&Ca]) -> Result<IdentityFiles> {
        let files = IdentityFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            trust_bundle: dir.join(format!("{name}-trust.pem")),
        };
        let bundle: String = trust.iter().map(|ca| ca.pem()).collect();
        for (path, text) in [
            (&files.cert, &self.cert_pem),
            (&files.key, &self.key_pem),
            (&files.trust_bundle, &bundle),
        ] {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600))?;
        Ok(files)
    }
}
