//! Reading PEM text whose blocks must all be of an expected kind, so that a
//! private key pasted into a bundle or a certificate pasted as a CSR is
//! refused rather than silently skipped.

use rustls_pki_types::pem::{PemObject, SectionKind};

/// Every recognised PEM block in `text`, in order. Text outside blocks is
/// ignored (comments are common in bundles); a malformed block is an error.
pub(crate) fn sections(text: &str) -> Result<Vec<(SectionKind, Vec<u8>)>, String> {
    <(SectionKind, Vec<u8>)>::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("malformed PEM: {e}"))
}

/// The label a PEM block of this kind carries, for error messages.
pub(crate) fn label(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "CERTIFICATE",
        SectionKind::PublicKey => "PUBLIC KEY",
        SectionKind::RsaPrivateKey => "RSA PRIVATE KEY",
        SectionKind::PrivateKey => "PRIVATE KEY",
        SectionKind::EcPrivateKey => "EC PRIVATE KEY",
        SectionKind::Crl => "X509 CRL",
        SectionKind::Csr => "CERTIFICATE REQUEST",
        SectionKind::EchConfigList => "ECHCONFIG",
        _ => "unrecognised block",
    }
}

/// Whether a block of this kind holds private key material.
pub(crate) fn is_private_key(kind: SectionKind) -> bool {
    matches!(
        kind,
        SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey
    )
}

/// One PEM block of `wanted` kind, and nothing else.
pub(crate) fn single(text: &str, wanted: SectionKind) -> Result<Vec<u8>, String> {
    let mut blocks = sections(text)?;
    match blocks.len() {
        0 => Err(format!("no PEM {} block found", label(wanted))),
        1 => {
            let (kind, der) = blocks.remove(0);
            if kind == wanted {
                Ok(der)
            } else {
                Err(format!(
                    "expected a PEM {} block, found {}",
                    label(wanted),
                    label(kind)
                ))
            }
        }
        n => Err(format!(
            "expected exactly one PEM {} block, found {n} blocks",
            label(wanted)
        )),
    }
}

/// Encodes DER as a PEM block of the given kind, with LF line endings.
pub(crate) fn encode(kind: SectionKind, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label(kind), der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_reads_back() {
        for len in 0..200 {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let text = encode(SectionKind::Certificate, &der);
            assert_eq!(single(&text, SectionKind::Certificate), Ok(der));
        }
    }

    #[test]
    fn refuses_wrong_or_extra_blocks() {
        let cert = encode(SectionKind::Certificate, b"x");
        let err = single(&cert, SectionKind::Csr).unwrap_err();
        assert!(err.contains("found CERTIFICATE"), "{err}");
        let err = single(&format!("{cert}{cert}"), SectionKind::Certificate).unwrap_err();
        assert!(err.contains("found 2 blocks"), "{err}");
        let err = single("garbage", SectionKind::Certificate).unwrap_err();
        assert!(err.contains("no PEM CERTIFICATE block"), "{err}");
        let err = single(
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            SectionKind::Certificate,
        )
        .unwrap_err();
        assert!(err.contains("malformed PEM"), "{err}");
    }
}
