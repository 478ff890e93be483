//! What cardbridge reports about each certificate found on a card.
//!
//! The thumbprint is the SHA-1 of the DER in upper-case hex: that is how MIM CM names
//! certificates (`X509ClmCertificate.Thumbprint`), so it is the key for reconciliation.
//! Bytes that do not parse as X.509 are still reported, with their hashes and an `error`, so a
//! broken slot is visible instead of silently missing.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};
use sha2::Sha256;
use time::format_description::well_known::Rfc3339;
use x509_parser::der_parser::oid::Oid;
use x509_parser::error::X509Error;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use super::tlv;

/// `szOID_ENROLL_CERTTYPE_EXTENSION`: the template name as a string (v1 templates).
const OID_TEMPLATE_NAME: &str = "1.3.6.1.4.1.311.20.2";
/// `szOID_CERTIFICATE_TEMPLATE`: template OID and version (v2+ templates).
const OID_TEMPLATE_INFO: &str = "1.3.6.1.4.1.311.21.7";

/// One certificate as the Card JSON contract defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateInfo {
    /// PIV key reference (`9A`, `9C`, `9D`, `9E`, `82`…`95`) or GIDS container name.
    pub slot: String,
    pub label: String,
    /// SHA-1 of the DER, upper-case hex (the MIM CM thumbprint).
    pub thumbprint: String,
    pub sha256: String,
    pub serial_number: Option<String>,
    pub subject: Option<String>,
    pub issuer: Option<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    /// Microsoft template name, else the template OID, else null.
    pub template: Option<String>,
    /// e.g. `RSA 2048`, `EC P-256`, `Ed25519`.
    pub key_algorithm: Option<String>,
    /// Whether the card stored the certificate compressed.
    pub compressed: bool,
    /// Why the bytes could not be read as X.509; null for a good certificate.
    pub error: Option<String>,
    /// The DER itself, kept for callers that need it (not part of the JSON contract).
    #[serde(skip)]
    pub der: Vec<u8>,
}

impl CertificateInfo {
    /// Describes `der` found in `slot`. Never fails: unparsable bytes produce an entry with an
    /// `error` and only the hashes filled in.
    pub fn from_der(slot: String, label: String, der: Vec<u8>, compressed: bool) -> Self {
        let mut info = CertificateInfo {
            slot,
            label,
            thumbprint: hex::encode_upper(Sha1::digest(&der)),
            sha256: hex::encode_upper(Sha256::digest(&der)),
            serial_number: None,
            subject: None,
            issuer: None,
            not_before: None,
            not_after: None,
            template: None,
            key_algorithm: None,
            compressed,
            error: None,
            der: Vec::new(),
        };
        match X509Certificate::from_der(&der) {
            Ok((_, cert)) => {
                info.serial_number = Some(hex::encode_upper(cert.raw_serial()));
                info.subject = Some(cert.subject().to_string());
                info.issuer = Some(cert.issuer().to_string());
                info.not_before = cert
                    .validity()
                    .not_before
                    .to_datetime()
                    .format(&Rfc3339)
                    .ok();
                info.not_after = cert
                    .validity()
                    .not_after
                    .to_datetime()
                    .format(&Rfc3339)
                    .ok();
                info.template = template(&cert);
                info.key_algorithm = Some(key_algorithm(&cert));
            }
            Err(e) => info.error = Some(not_x509(&der, &e)),
        }
        info.der = der;
        info
    }

    /// An entry for a slot whose stored bytes could not even be turned into DER (a corrupt
    /// compressed certificate): the hashes are those of the bytes as stored, and `error` says
    /// why. The slot stays visible, with its own error, beside the card's good certificates.
    pub fn unreadable(
        slot: String,
        label: String,
        stored: Vec<u8>,
        compressed: bool,
        error: String,
    ) -> Self {
        let mut info = CertificateInfo::from_der(slot, label, Vec::new(), compressed);
        info.thumbprint = hex::encode_upper(Sha1::digest(&stored));
        info.sha256 = hex::encode_upper(Sha256::digest(&stored));
        info.error = Some(format!("the stored certificate cannot be read: {error}"));
        info.der = stored;
        info
    }
}

/// Why `der` is not an X.509 certificate, as a sentence: the parser's own error text
/// (`Parsing Error: NomError(Eof)`) means nothing to the person reading it.
fn not_x509(der: &[u8], error: &x509_parser::nom::Err<X509Error>) -> String {
    let why = match tlv::single(der) {
        Err(_) if der.is_empty() => "the slot is empty".to_string(),
        Err(_) => "the bytes are not a complete DER structure (cut short or mangled)".into(),
        Ok(outer) if outer.tag != 0x30 => {
            format!(
                "the bytes start with tag {:02X}, not a DER SEQUENCE",
                outer.tag
            )
        }
        Ok(_) => match error {
            x509_parser::nom::Err::Incomplete(_) => "the certificate is cut short".into(),
            x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => {
                part_in_error(e).into()
            }
        },
    };
    format!("not a valid X.509 certificate: {why}")
}

fn part_in_error(e: &X509Error) -> &'static str {
    match e {
        X509Error::InvalidVersion => "its version field is invalid",
        X509Error::InvalidSerial => "its serial number is invalid",
        X509Error::InvalidAlgorithmIdentifier => "an algorithm identifier is invalid",
        X509Error::InvalidX509Name => "its subject or issuer name is invalid",
        X509Error::InvalidDate => "its validity dates are invalid",
        X509Error::InvalidSPKI => "its public key is invalid",
        X509Error::InvalidExtensions | X509Error::DuplicateExtensions => {
            "its extensions are invalid"
        }
        X509Error::InvalidSignatureValue => "its signature value is invalid",
        _ => "its structure is not that of a certificate",
    }
}

fn template(cert: &X509Certificate<'_>) -> Option<String> {
    let mut oid_form = None;
    for ext in cert.extensions() {
        match ext.oid.to_id_string().as_str() {
            OID_TEMPLATE_NAME => {
                if let Some(name) = directory_string(ext.value) {
                    return Some(name);
                }
            }
            OID_TEMPLATE_INFO => {
                // CertificateTemplate ::= SEQUENCE { templateID OID, major INT, minor INT OPT }
                oid_form = tlv::single(ext.value)
                    .ok()
                    .filter(|seq| seq.tag == 0x30)
                    .and_then(|seq| tlv::single(seq.value).ok())
                    .filter(|oid| oid.tag == 0x06)
                    .map(|oid| Oid::new(Cow::Borrowed(oid.value)).to_id_string());
            }
            _ => {}
        }
    }
    oid_form
}

/// Decodes the string types Windows CAs use for the template name (BMPString in practice).
fn directory_string(der: &[u8]) -> Option<String> {
    let value = tlv::single(der).ok()?;
    let text = match value.tag {
        0x1E => {
            let units: Vec<u16> = value
                .value
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()?
        }
        0x0C | 0x13 | 0x16 => String::from_utf8(value.value.to_vec()).ok()?,
        _ => return None,
    };
    Some(text)
}

fn key_algorithm(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => format!("RSA {}", bit_length(rsa.modulus)),
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .map(|p| Oid::new(Cow::Borrowed(p.data)).to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => "EC P-256".into(),
                Some("1.3.132.0.34") => "EC P-384".into(),
                Some("1.3.132.0.35") => "EC P-521".into(),
                Some(other) => format!("EC {other}"),
                None => "EC".into(),
            }
        }
        _ => match spki.algorithm.algorithm.to_id_string().as_str() {
            "1.3.101.112" => "Ed25519".into(),
            "1.3.101.113" => "Ed448".into(),
            other => other.to_string(),
        },
    }
}

/// Bit length of an unsigned big-endian integer (DER integers may carry a leading zero byte).
fn bit_length(bytes: &[u8]) -> usize {
    let significant: &[u8] = match bytes.iter().position(|&b| b != 0) {
        Some(i) => &bytes[i..],
        None => return 0,
    };
    significant.len() * 8 - significant[0].leading_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_length_ignores_the_sign_byte() {
        assert_eq!(bit_length(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(bit_length(&[0x01, 0xFF]), 9);
        assert_eq!(bit_length(&[0, 0]), 0);
    }

    #[test]
    fn template_name_is_a_bmp_string() {
        let der = [0x1E, 0x08, 0x00, b'U', 0x00, b's', 0x00, b'e', 0x00, b'r'];
        assert_eq!(directory_string(&der).as_deref(), Some("User"));
        assert_eq!(
            directory_string(&[0x0C, 0x02, b'o', b'k']).as_deref(),
            Some("ok")
        );
        assert_eq!(directory_string(&[0x1E, 0x05, 0, 1]), None);
    }

    fn certificate_with(extensions: Vec<rcgen::CustomExtension>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Alice");
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x1B, 0x00, 0xB0, 0x10]));
        params.custom_extensions = extensions;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// CertificateTemplate { templateID 1.3.6.1.4.1.311.21.8.1234.5, major 100, minor 3 }.
    const TEMPLATE_INFO: [u8; 22] = [
        0x30, 0x14, 0x06, 0x0C, 0x2B, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x15, 0x08, 0x89, 0x52,
        0x05, 0x02, 0x01, 0x64, 0x02, 0x01, 0x03,
    ];
    const TEMPLATE_INFO_OID: [u64; 9] = [1, 3, 6, 1, 4, 1, 311, 21, 7];
    const TEMPLATE_NAME_OID: [u64; 9] = [1, 3, 6, 1, 4, 1, 311, 20, 2];

    #[test]
    fn reads_the_fields_of_a_real_certificate() {
        let der = certificate_with(vec![rcgen::CustomExtension::from_oid_content(
            &TEMPLATE_INFO_OID,
            TEMPLATE_INFO.to_vec(),
        )]);
        let info = CertificateInfo::from_der("9A".into(), "PIV Authentication".into(), der, false);
        assert_eq!(info.error, None);
        assert_eq!(info.subject.as_deref(), Some("CN=Alice"));
        assert_eq!(info.issuer.as_deref(), Some("CN=Alice"));
        assert_eq!(info.serial_number.as_deref(), Some("1B00B010"));
        assert_eq!(info.key_algorithm.as_deref(), Some("EC P-256"));
        assert_eq!(
            info.template.as_deref(),
            Some("1.3.6.1.4.1.311.21.8.1234.5")
        );
        let not_after = info.not_after.unwrap();
        assert!(
            time::OffsetDateTime::parse(&not_after, &Rfc3339).is_ok(),
            "{not_after}"
        );
        assert_eq!(info.thumbprint.len(), 40);
        assert_eq!(info.thumbprint, info.thumbprint.to_uppercase());
    }

    #[test]
    fn the_template_name_wins_over_the_template_oid() {
        let name: Vec<u8> = [0x1E, 0x08]
            .into_iter()
            .chain("User".encode_utf16().flat_map(u16::to_be_bytes))
            .collect();
        let der = certificate_with(vec![
            rcgen::CustomExtension::from_oid_content(&TEMPLATE_INFO_OID, TEMPLATE_INFO.to_vec()),
            rcgen::CustomExtension::from_oid_content(&TEMPLATE_NAME_OID, name),
        ]);
        let info = CertificateInfo::from_der("9C".into(), "x".into(), der, true);
        assert_eq!(info.template.as_deref(), Some("User"));
        assert!(info.compressed);
    }

    #[test]
    fn garbage_is_reported_with_hashes_and_an_error() {
        let info = CertificateInfo::from_der("9A".into(), "x".into(), b"garbage".to_vec(), false);
        assert_eq!(info.thumbprint, "78C67C126575C20C6B468447355E9BD20D221202");
        assert!(info.error.is_some());
        assert!(info.subject.is_none());
    }

    #[test]
    fn errors_are_sentences_without_parser_debug_text() {
        let der = certificate_with(Vec::new());
        let cases: [(&[u8], &str); 4] = [
            (&der[..der.len() - 10], "not a complete DER structure"),
            (b"\x04\x02ab", "tag 04, not a DER SEQUENCE"),
            (
                b"\x30\x03\x02\x01\x05",
                "structure is not that of a certificate",
            ),
            (b"", "the slot is empty"),
        ];
        for (bytes, expected) in cases {
            let info = CertificateInfo::from_der("9A".into(), "x".into(), bytes.to_vec(), false);
            let error = info.error.unwrap_or_default();
            assert!(error.contains(expected), "{error}");
            assert!(
                !error.contains("Error(") && !error.contains("Nom"),
                "{error}"
            );
        }
    }
}
