//! What GIDS and IDPrime cards share: the Windows smart card minidriver's file system.
//!
//! Both families store the files the minidriver specification defines (`cardid`,
//! `mscp/cmapfile`, `mscp/kscNN` and `mscp/kxcNN`); they differ only in how a file is found and
//! read (GIDS: data objects named by the masterfile; IDPrime: EFs named by the index file). The
//! rules for the files' contents live here once, so the two families cannot drift apart.

use serde::{Deserialize, Serialize};

use super::cert::CertificateInfo;
use super::{compress, AppletData, ReadError};

/// One `CONTAINER_MAP_RECORD`: `WCHAR name[40]`, flags, reserved, signature and key-exchange
/// key sizes in bits.
pub const CMAP_RECORD: usize = 86;
/// A card claiming more containers than this is broken (the minidriver allows 256 at most).
pub const MAX_CONTAINERS: usize = 256;

/// One valid record of the cmapfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub index: u8,
    /// The container name (usually a `{GUID}`), a label rather than an identifier.
    pub name: String,
    pub default: bool,
    pub signature_key_bits: u16,
    pub key_exchange_key_bits: u16,
}

/// Parses the cmapfile: 86-byte `CONTAINER_MAP_RECORD`s; only records flagged valid are kept.
pub fn parse_cmapfile(data: &[u8]) -> Result<Vec<Container>, ReadError> {
    if data.len() % CMAP_RECORD != 0 || data.len() / CMAP_RECORD > MAX_CONTAINERS {
        return Err(ReadError::Malformed(format!(
            "the container map (cmapfile) has {} bytes, which is not a whole number of \
             {CMAP_RECORD}-byte records",
            data.len()
        )));
    }
    Ok(data
        .chunks_exact(CMAP_RECORD)
        .enumerate()
        .filter(|(_, r)| r[80] & 0x01 != 0)
        .map(|(i, r)| {
            let units: Vec<u16> = r[..80]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            Container {
                // At most MAX_CONTAINERS (256) records, so the index fits.
                index: i as u8,
                name: String::from_utf16_lossy(&units),
                default: r[80] & 0x02 != 0,
                signature_key_bits: u16::from_le_bytes([r[82], r[83]]),
                key_exchange_key_bits: u16::from_le_bytes([r[84], r[85]]),
            }
        })
        .collect())
}

/// The card id from the `cardid` file: 16 bytes; all zeros means the card has none.
pub fn card_id(data: &[u8]) -> Result<Option<[u8; 16]>, ReadError> {
    let id: [u8; 16] = data.try_into().map_err(|_| {
        ReadError::Malformed(format!(
            "the card id file (cardid) has {} bytes instead of 16",
            data.len()
        ))
    })?;
    Ok(Some(id).filter(|id| id.iter().any(|&b| b != 0)))
}

/// What a certificate file's key is for, from its name (`ksc` signature, `kxc` key exchange).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyUse {
    Signature,
    KeyExchange,
}

impl KeyUse {
    fn label(self) -> &'static str {
        match self {
            KeyUse::Signature => "Signature",
            KeyUse::KeyExchange => "Key exchange",
        }
    }
}

/// A certificate file of the `mscp` directory: `kscNN` or `kxcNN`, NN the container index in
/// two hex digits, as the minidriver specification names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFile {
    pub name: String,
    pub container: u8,
    pub key_use: KeyUse,
}

impl CertFile {
    /// The certificate file `name` (in directory `mscp`), or `None` for any other file.
    pub fn parse(name: &str) -> Option<CertFile> {
        let (key_use, digits) = if let Some(d) = name.strip_prefix("ksc") {
            (KeyUse::Signature, d)
        } else {
            (KeyUse::KeyExchange, name.strip_prefix("kxc")?)
        };
        if digits.len() != 2 {
            return None;
        }
        Some(CertFile {
            name: name.to_string(),
            container: u8::from_str_radix(digits, 16).ok()?,
            key_use,
        })
    }

    /// Describes the certificate this file holds. The slot is the container's name from the
    /// cmapfile (the file name when no valid record names it). Stored bytes that do not decode
    /// give an entry with this slot's own error and the hashes of the bytes as stored, so one
    /// bad file never hides the card's other certificates.
    pub fn certificate(&self, containers: &[Container], stored: Vec<u8>) -> CertificateInfo {
        let slot = containers
            .iter()
            .find(|c| c.index == self.container)
            .map_or_else(|| self.name.clone(), |c| c.name.clone());
        let label = format!("{} certificate {}", self.key_use.label(), self.name);
        match decode_certificate(&stored) {
            Ok((der, compressed)) => CertificateInfo::from_der(slot, label, der, compressed),
            Err(e) => {
                let compressed = stored.starts_with(&[0x01, 0x00]);
                CertificateInfo::unreadable(slot, label, stored, compressed, e.to_string())
            }
        }
    }
}

/// The certificate files among a card's files (`(directory, name, handle)`, the handle being
/// how the family finds the file), in the order they are reported: by container, the signature
/// certificate before the key-exchange one.
pub fn certificate_files<'a, H>(
    files: impl IntoIterator<Item = (&'a str, &'a str, H)>,
) -> Vec<(CertFile, H)> {
    let mut found: Vec<(CertFile, H)> = files
        .into_iter()
        .filter(|(directory, _, _)| *directory == "mscp")
        .filter_map(|(_, name, handle)| CertFile::parse(name).map(|f| (f, handle)))
        .collect();
    found.sort_by_key(|(f, _)| (f.container, f.key_use));
    found
}

/// Reads every certificate file with `read` into `data`. A file the card refuses or that is
/// malformed becomes a note and the others are still read; only an error that ends the read
/// (the card pulled, the deadline) stops it.
pub fn read_certificates<H>(
    files: &[(CertFile, H)],
    containers: &[Container],
    data: &mut AppletData,
    mut read: impl FnMut(&CertFile, &H) -> Result<Vec<u8>, ReadError>,
) -> Result<(), ReadError> {
    for (file, handle) in files {
        match read(file, handle) {
            Ok(stored) => data.certificates.push(file.certificate(containers, stored)),
            Err(e) if e.ends_the_read() => return Err(e),
            Err(e) => data.notes.push(format!(
                "certificate file mscp/{} cannot be read: {e}",
                file.name
            )),
        }
    }
    Ok(())
}

/// Why a stored certificate file could not be turned into DER.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("its compressed data does not inflate: {0}")]
    Corrupt(String),
    #[error("it inflates to {actual} bytes, but its header announces {announced}")]
    WrongLength { announced: usize, actual: usize },
    #[error("it is neither a compressed (01 00) nor a plain DER certificate")]
    UnknownFormat,
}

/// Decodes a stored certificate: `01 00` + uncompressed length (LE) + zlib, or plain DER.
/// Returns the DER and whether it was stored compressed.
pub fn decode_certificate(stored: &[u8]) -> Result<(Vec<u8>, bool), DecodeError> {
    match stored {
        [0x01, 0x00, lo, hi, compressed @ ..] => {
            let der =
                compress::inflate(compressed).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
            let announced = usize::from(u16::from_le_bytes([*lo, *hi]));
            if der.len() != announced {
                return Err(DecodeError::WrongLength {
                    announced,
                    actual: der.len(),
                });
            }
            Ok((der, true))
        }
        [0x30, ..] => Ok((stored.to_vec(), false)),
        _ => Err(DecodeError::UnknownFormat),
    }
}

/// A file's name from a fixed-size NUL-padded field (masterfile and index entries).
pub fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmap_record(name: &str, flags: u8, kx_bits: u16) -> Vec<u8> {
        let mut r = vec![0u8; CMAP_RECORD];
        for (i, u) in name.encode_utf16().enumerate() {
            r[i * 2..i * 2 + 2].copy_from_slice(&u.to_le_bytes());
        }
        r[80] = flags;
        r[84..86].copy_from_slice(&kx_bits.to_le_bytes());
        r
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        use flate2::write::ZlibEncoder;
        use std::io::Write;
        let mut e = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn parses_cmapfile_and_skips_invalid_records() {
        let mut cmap = cmap_record("{ab}", 0x03, 2048);
        cmap.extend(vec![0u8; CMAP_RECORD]);
        let containers = parse_cmapfile(&cmap).unwrap();
        assert_eq!(containers.len(), 1);
        assert_eq!(containers[0].name, "{ab}");
        assert!(containers[0].default);
        assert_eq!(containers[0].key_exchange_key_bits, 2048);
        let err = parse_cmapfile(&cmap[..85]).unwrap_err().to_string();
        assert!(err.contains("not a whole number"), "{err}");
    }

    #[test]
    fn card_ids_are_16_bytes_and_zero_is_none() {
        assert_eq!(card_id(&[7; 16]).unwrap(), Some([7; 16]));
        assert_eq!(card_id(&[0; 16]).unwrap(), None);
        assert!(card_id(&[1; 15]).is_err());
    }

    #[test]
    fn certificate_file_names() {
        let f = CertFile::parse("kxc0a").unwrap();
        assert_eq!((f.container, f.key_use), (10, KeyUse::KeyExchange));
        assert_eq!(
            CertFile::parse("ksc01").map(|f| f.key_use),
            Some(KeyUse::Signature)
        );
        for other in ["cmapfile", "kxc", "kxc1", "kxc001", "kxczz", "ksc-1"] {
            assert_eq!(CertFile::parse(other), None, "{other}");
        }
        let listed = [
            ("mscp", "kxc02", 1),
            ("mscp", "kxc00", 2),
            ("", "kxc01", 3),
            ("mscp", "cmapfile", 4),
            ("mscp", "ksc02", 5),
            ("mscp", "ksc00", 6),
        ];
        let files = certificate_files(listed);
        let names: Vec<_> = files.iter().map(|(f, h)| (f.name.as_str(), *h)).collect();
        assert_eq!(
            names,
            [("ksc00", 6), ("kxc00", 2), ("ksc02", 5), ("kxc02", 1)]
        );
    }

    #[test]
    fn decodes_compressed_certificates_and_checks_the_length() {
        let der = b"\x30\x03\x02\x01\x05".to_vec();
        let mut stored = vec![1, 0, der.len() as u8, 0];
        stored.extend(zlib(&der));
        assert_eq!(decode_certificate(&stored).unwrap(), (der.clone(), true));
        stored[2] = 99;
        assert_eq!(
            decode_certificate(&stored),
            Err(DecodeError::WrongLength {
                announced: 99,
                actual: 5
            })
        );
        assert_eq!(decode_certificate(&der).unwrap(), (der, false));
        assert_eq!(decode_certificate(b"junk"), Err(DecodeError::UnknownFormat));
    }

    #[test]
    fn a_corrupt_file_is_its_own_slot_with_an_error_and_the_stored_hashes() {
        let containers = parse_cmapfile(&cmap_record("{c0}", 0x01, 2048)).unwrap();
        let mut stored = vec![1, 0, 0x10, 0x03];
        stored.extend(zlib(&[0x30; 784]));
        let cut = stored.len() - 6;
        stored[cut..].fill(0xEE);
        let file = CertFile::parse("kxc00").unwrap();
        let info = file.certificate(&containers, stored.clone());
        assert_eq!(info.slot, "{c0}");
        assert_eq!(info.label, "Key exchange certificate kxc00");
        assert!(info.compressed);
        let error = info.error.expect("an error of its own");
        assert!(error.contains("does not inflate"), "{error}");
        use sha1::Digest;
        assert_eq!(
            info.thumbprint,
            hex::encode_upper(sha1::Sha1::digest(&stored))
        );
        // A file whose container has no valid record is named by the file.
        let orphan = CertFile::parse("ksc05").unwrap();
        assert_eq!(
            orphan.certificate(&containers, b"junk".to_vec()).slot,
            "ksc05"
        );
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = parse_cmapfile(&data);
            let _ = decode_certificate(&data);
            let _ = card_id(&data);
        }
    }
}
