//! Real X.509 certificates for the virtual card, generated at start with rcgen.
//!
//! Every run gets fresh keys, so tests compare against the truth file the card writes rather
//! than against fixed thumbprints.

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, KeyPair,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
};

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

    /// Issues a user certificate. `template` adds the Microsoft template-name extension
    /// (1.3.6.1.4.1.311.20.2, a BMPString), as a Windows CA does for v1 templates.
    /// `expired` puts the validity period in the past.
    pub fn issue(
        &self,
        common_name: &str,
        template: Option<&str>,
        expired: bool,
    ) -> Result<Vec<u8>> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
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
