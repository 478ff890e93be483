//! The virtual IDPrime card: the minidriver files as EFs named by FID, listed by the index file
//! 0101, with the model's T=0 ATR and CPLC.
//!
//! It answers what cardbridge and OpenSC's idprime driver send: SELECT of the applet and of an
//! EF (`P2 = 0C` without FCP, `P2 = 00` with an FCP carrying the size in tag 80), READ BINARY
//! (a read past the end gets `6Cxx` with the bytes left, as a strict card answers), GET DATA of
//! the CPLC. A case-4 command without Le (OpenSC drops it under T=0) gets its answer behind
//! `61xx`.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::{compressed, random16, random_bytes, truth_cert, Compress, Faults, TruthCert};
use crate::certs::{Issuer, KeyKind};

pub const AID: [u8; 11] = [
    0xA0, 0x00, 0x00, 0x00, 0x18, 0x80, 0x00, 0x00, 0x00, 0x06, 0x62,
];
const INDEX_FID: u16 = 0x0101;
/// After cardid, cardcf, cardapps, cmapfile and tinfo (0201-0205).
const FIRST_CERT_FID: u16 = 0x0206;
/// Room for 16 entries, zero-padded as a real index is.
const INDEX_SIZE: usize = 1 + 21 * 16;
/// Records a real card's cmapfile holds (15 × 86 = 1290 bytes).
const CMAP_RECORDS: usize = 15;

/// Which model the card is: its ATR and its operating system level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Model {
    #[serde(rename = "840")]
    Md840,
    #[serde(rename = "940")]
    Idp940,
}

impl Model {
    pub fn atr(self) -> Vec<u8> {
        let chip: [u8; 4] = match self {
            Model::Md840 => [0x85, 0x03, 0x00, 0xEF],
            Model::Idp940 => [0x85, 0x59, 0x56, 0xFB],
        };
        let mut atr = vec![0x3B, 0x7F, 0x96, 0x00, 0x00, 0x80, 0x31, 0x80, 0x65, 0xB0];
        atr.extend(chip);
        atr.extend([0x12, 0x0F, 0xFE, 0x82, 0x90, 0x00]);
        atr
    }

    fn os_level(self) -> u8 {
        match self {
            Model::Md840 => 3,
            Model::Idp940 => 4,
        }
    }
}

/// One certificate in one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cert {
    pub container: u8,
    /// `kscNN` (signature) rather than `kxcNN` (key exchange).
    pub signature: bool,
    pub key: KeyKind,
    /// Stored `01 00` + length + zlib, else plain DER.
    pub compressed: bool,
}

/// What an IDPrime card holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub model: Model,
    pub certificates: Vec<Cert>,
    /// Written to `p11/tinfo`, as the vendor's PKCS#11 personalisation does.
    pub token_label: Option<String>,
}

impl Spec {
    /// An IDPrime MD 840 with three certificates, all compressed: RSA key exchange, EC, RSA
    /// signature-only.
    pub fn md840() -> Spec {
        let cert = |container, signature, key| Cert {
            container,
            signature,
            key,
            compressed: true,
        };
        Spec {
            model: Model::Md840,
            certificates: vec![
                cert(0, false, KeyKind::Rsa2048),
                cert(1, true, KeyKind::EcP256),
                cert(2, true, KeyKind::Rsa2048),
            ],
            token_label: None,
        }
    }

    /// An IDPrime 940 with six certificates, the third stored plain, and a token label.
    pub fn idp940() -> Spec {
        let keys = [
            (false, KeyKind::Rsa2048),
            (true, KeyKind::EcP256),
            (false, KeyKind::Rsa2048),
            (true, KeyKind::Rsa2048),
            (false, KeyKind::EcP256),
            (true, KeyKind::Rsa2048),
        ];
        Spec {
            model: Model::Idp940,
            certificates: keys
                .iter()
                .zip(0u8..)
                .map(|(&(signature, key), container)| Cert {
                    container,
                    signature,
                    key,
                    compressed: container != 2,
                })
                .collect(),
            token_label: Some("Contoso Helpdesk".into()),
        }
    }
}

/// The card's files by FID, and what it answers to GET DATA CPLC.
#[derive(Clone)]
pub struct Files {
    files: BTreeMap<u16, Vec<u8>>,
    cplc: Vec<u8>,
    /// The chip's serial in the CPLC, hex: what cardbridge reports as the serial number.
    pub ic_serial: String,
}

/// One index entry to write: FID, name, directory, access byte.
struct Entry {
    fid: u16,
    name: String,
    directory: &'static str,
    data: Vec<u8>,
}

impl Files {
    pub fn build(
        spec: &Spec,
        faults: &Faults,
        issuer: &Issuer,
        card_id: &[u8; 16],
        truth: &mut Vec<TruthCert>,
    ) -> Result<Files> {
        let mut entries = vec![
            entry(0x0201, "cardid", "", card_id.to_vec()),
            entry(0x0202, "cardcf", "", vec![0, 0, 0, 0, 0, 0]),
            entry(0x0203, "cardapps", "", b"mscp\0\0\0\0".to_vec()),
        ];
        let mut cmapfile = vec![0u8; CMAP_RECORDS * 86];
        let mut certs = Vec::new();
        let mut corrupted = false;
        for c in &spec.certificates {
            let name = format!("{{{}}}", super::guid_text(&random16()?));
            let common_name = format!("Contoso user, container {}", c.container);
            let der = issuer.issue_for(c.key, &common_name, Some("ContosoIdPrimeUser"), false)?;
            let mut stored = der.clone();
            if c.compressed {
                stored = vec![0x01, 0x00];
                stored.extend((der.len() as u16).to_le_bytes());
                stored.extend(compressed(&der, Compress::Zlib)?);
                if faults.corrupt_compressed && !corrupted {
                    super::corrupt_checksum(&mut stored);
                    corrupted = true;
                }
            }
            let prefix = if c.signature { "ksc" } else { "kxc" };
            certs.push((format!("{prefix}{:02x}", c.container), stored));
            write_record(&mut cmapfile, c, &name)?;
            truth.push(truth_cert(name, &der, c.compressed));
        }
        entries.push(entry(0x0204, "cmapfile", "mscp", cmapfile));
        if let Some(label) = &spec.token_label {
            let mut tinfo = vec![0x01, label.len() as u8];
            tinfo.extend(label.as_bytes());
            entries.push(entry(0x0205, "tinfo", "p11", tinfo));
        }
        // FIDs are handed out in creation order, not container order: swap each pair, so a
        // reader that guesses FIDs from container numbers reads the wrong certificates.
        let n = certs.len();
        for (i, (name, data)) in certs.into_iter().enumerate() {
            let position = if i ^ 1 < n { i ^ 1 } else { i };
            entries.push(entry(FIRST_CERT_FID + position as u16, &name, "mscp", data));
        }
        let serial = random_bytes(4)?;
        Ok(Files {
            files: index(entries)?,
            cplc: cplc(spec.model.os_level(), &serial),
            ic_serial: hex::encode_upper(&serial),
        })
    }

    /// SELECT EF: the file's FCP when asked (`P2 = 00`), nothing with `P2 = 0C`; `None` when
    /// there is no such file.
    pub fn select(&self, fid: u16, p2: u8) -> Option<Vec<u8>> {
        let size = self.files.get(&fid)?.len() as u16;
        if p2 == 0x0C {
            return Some(Vec::new());
        }
        let mut fcp = vec![0x80, 0x02];
        fcp.extend(size.to_be_bytes());
        fcp.extend([0x82, 0x01, 0x01, 0x83, 0x02]);
        fcp.extend(fid.to_be_bytes());
        Some(cardbridge::card::tlv::encode(0x62, &fcp))
    }

    /// READ BINARY of `ne` bytes at `offset` of file `fid`.
    pub fn read(&self, fid: u16, offset: usize, ne: usize) -> (Vec<u8>, u16) {
        let Some(file) = self.files.get(&fid) else {
            return (Vec::new(), 0x6986);
        };
        let left = file.len().saturating_sub(offset);
        if left == 0 {
            return (Vec::new(), 0x6B00);
        }
        if ne > left {
            // A strict card: "wrong length, xx bytes are there".
            return (Vec::new(), 0x6C00 | left.min(255) as u16);
        }
        (file[offset..offset + ne].to_vec(), 0x9000)
    }

    pub fn cplc(&self) -> Vec<u8> {
        self.cplc.clone()
    }
}

fn entry(fid: u16, name: &str, directory: &'static str, data: Vec<u8>) -> Entry {
    Entry {
        fid,
        name: name.to_string(),
        directory,
        data,
    }
}

/// A `CONTAINER_MAP_RECORD` for the certificate's container: valid (default for container 0),
/// with the key size in the signature or key-exchange field.
fn write_record(cmapfile: &mut [u8], c: &Cert, name: &str) -> Result<()> {
    let start = usize::from(c.container) * 86;
    let record = cmapfile
        .get_mut(start..start + 86)
        .ok_or_else(|| anyhow::anyhow!("container {} is past the cmapfile", c.container))?;
    for (i, unit) in name.encode_utf16().take(39).enumerate() {
        record[i * 2..i * 2 + 2].copy_from_slice(&unit.to_le_bytes());
    }
    record[80] = if c.container == 0 { 0x03 } else { 0x01 };
    let bits: u16 = match c.key {
        KeyKind::Rsa2048 => 2048,
        KeyKind::EcP256 => 256,
    };
    let field = if c.signature { 82 } else { 84 };
    record[field..field + 2].copy_from_slice(&bits.to_le_bytes());
    Ok(())
}

/// The files with the index 0101 that lists them.
fn index(entries: Vec<Entry>) -> Result<BTreeMap<u16, Vec<u8>>> {
    anyhow::ensure!(entries.len() <= 16, "an index of {} entries", entries.len());
    let mut index = vec![entries.len() as u8];
    let mut files = BTreeMap::new();
    for e in entries {
        index.extend(e.fid.to_be_bytes());
        index.extend((e.data.len() as u16).to_be_bytes());
        let mut name = [0u8; 8];
        name[..e.name.len()].copy_from_slice(e.name.as_bytes());
        let mut directory = [0u8; 8];
        directory[..e.directory.len()].copy_from_slice(e.directory.as_bytes());
        index.extend(name);
        index.extend(directory);
        // The access byte: everyone reads; cardid only the admin writes.
        index.push(if e.name == "cardid" { 0x03 } else { 0x01 });
        files.insert(e.fid, e.data);
    }
    index.resize(INDEX_SIZE, 0);
    files.insert(INDEX_FID, index);
    Ok(files)
}

/// CPLC (GlobalPlatform card production life cycle data), 42 bytes behind `9F 7F 2A`: the OS
/// release level at byte 8, the IC serial at bytes 12-15, the rest as a Thales chip shows it.
fn cplc(os_level: u8, serial: &[u8]) -> Vec<u8> {
    let mut data = [0u8; 42];
    data[0..8].copy_from_slice(&[0x40, 0x90, 0xB1, 0x69, 0x10, 0x87, 0x42, 0x52]);
    data[8] = os_level;
    data[12..16].copy_from_slice(serial);
    let mut out = vec![0x9F, 0x7F, 0x2A];
    out.extend(data);
    out
}
