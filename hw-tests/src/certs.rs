//! Real X.509 certificates for the virtual card, generated at start with rcgen.
//!
//! Every run gets fresh keys, so tests compare against the truth file the card writes rather
//! than against fixed thumbprints.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, KeyPair, SerialNumber,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
};
use serde::{Deserialize, Serialize};

/// The key of a user certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    EcP256,
    Rsa2048,
}

impl KeyKind {
    /// A fresh key pair. ring (rcgen's backend) cannot generate RSA keys, so an RSA key comes
    /// from `openssl genpkey` (installed by hw-tests/install-deps), as PKCS#8 PEM: its DER
    /// output is the older PKCS#1 form, which ring does not load.
    fn generate(self) -> Result<KeyPair> {
        match self {
            KeyKind::EcP256 => Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?),
            KeyKind::Rsa2048 => {
                let out = std::process::Command::new("openssl")
                    .args(["genpkey", "-algorithm", "RSA", "-pkeyopt"])
                    .arg("rsa_keygen_bits:2048")
                    .output()
                    .context("openssl is installed (hw-tests/install-deps)")?;
                anyhow::ensure!(
                    out.status.success(),
                    "openssl genpkey: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Ok(KeyPair::from_pem(&String::from_utf8_lossy(&out.stdout))?)
            }
        }
    }
}

/// An issuing CA, kept for signing the card's certificates.
pub struct Issuer {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Issuer {
    pub fn new(name: &str) -> Result<Issuer> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Contoso");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key)?;
        Ok(Issuer { cert, key })
    }

    /// Issues a user certificate for a P-256 key. `template` adds the Microsoft template-name
    /// extension (1.3.6.1.4.1.311.20.2, a BMPString), as a Windows CA does for v1 templates.
    /// `expired` puts the validity period in the past.
    pub fn issue(
        &self,
        common_name: &str,
        template: Option<&str>,
        expired: bool,
    ) -> Result<Vec<u8>> {
        self.issue_for(KeyKind::EcP256, common_name, template, expired)
    }

    /// Issues a user certificate for a fresh key of `kind`.
    pub fn issue_for(
        &self,
        kind: KeyKind,
        common_name: &str,
        template: Option<&str>,
        expired: bool,
    ) -> Result<Vec<u8>> {
        let key = kind.generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        // A serial whose top bit is set, so its DER form carries a 00 sign byte, as about half
        // of a real CA's serials do: servers may list it with or without that byte.
        let mut serial = [0u8; 16];
        fastrand::fill(&mut serial);
        serial[0] |= 0x80;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Contoso");
        let now = time::OffsetDateTime::now_utc();
        if expired {
            params.not_before = now - time::Duration::days(800);
            params.not_after = now - time::Duration::days(35);
        } else {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(365);
        }
        if let Some(name) = template {
            let units: Vec<u8> = name.encode_utf16().flat_map(u16::to_be_bytes).collect();
            let mut bmp = vec![0x1E, units.len() as u8];
            bmp.extend(units);
            params
                .custom_extensions
                .push(CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 4, 1, 311, 20, 2],
                    bmp,
                ));
        }
        Ok(params
            .signed_by(&key, &self.cert, &self.key)?
            .der()
            .to_vec())
    }
}
