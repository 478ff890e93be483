//! GIDS (Microsoft Generic Identity Device Specification) as the Windows minidriver lays it out.
//!
//! GIDS has no ISO files for the minidriver data; each "file" is a data object inside an EF, and
//! the masterfile maps names (`cardid`, `mscp/cmapfile`, `mscp/kxc00`…) to (EF, DO) pairs. A
//! read is: SELECT, masterfile, cmapfile, cardid, then one GET DATA per certificate file.

use serde::{Deserialize, Serialize};

use super::cert::CertificateInfo;
use super::{compress, tlv, AppletData, Channel, ReadError};

const GIDS_AID: [u8; 9] = [0xA0, 0x00, 0x00, 0x03, 0x97, 0x42, 0x54, 0x46, 0x59];
/// The AID as hex, to recognise GIDS from an ATR's application identifier.
pub const AID_HEX: &str = "A00000039742544659";

const MASTERFILE_EF: u16 = 0xA000;
const MASTERFILE_DO: u16 = 0xDF1F;
const MASTERFILE_RECORD: usize = 28;
const CMAP_RECORD: usize = 86;
/// A card claiming more containers than this is broken (the minidriver allows 256 at most).
const MAX_CONTAINERS: usize = 256;

/// GIDS details of the Card JSON contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GidsDetails {
    /// GIDS specification version from the SELECT answer (1 or 2), when the card gave it.
    pub version: Option<u8>,
    pub containers: Vec<Container>,
}

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

/// One masterfile entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub directory: String,
    pub name: String,
    pub ef: u16,
    pub data_object: u16,
}

/// SELECTs the GIDS applet; the version byte of the answered AID, or `None` without GIDS.
pub fn select(ch: &mut Channel<'_>) -> Result<Option<Option<u8>>, ReadError> {
    let response = ch.send([0x00, 0xA4, 0x04, 0x00], &GIDS_AID)?;
    if !response.is_ok() {
        return Ok(None);
    }
    // FCI `61 { 4F <full AID> }`: byte 10 of the full AID is the specification version.
    let version = tlv::find(&response.data, 0x61)
        .ok()
        .flatten()
        .and_then(|fci| tlv::find(fci, 0x4F).ok().flatten())
        .and_then(|aid| aid.get(GIDS_AID.len()).copied());
    Ok(Some(version))
}

/// Reads a selected GIDS applet.
pub fn read(
    ch: &mut Channel<'_>,
    version: Option<u8>,
) -> Result<(GidsDetails, AppletData), ReadError> {
    let masterfile = parse_masterfile(&get_do(ch, MASTERFILE_EF, MASTERFILE_DO, "masterfile")?)?;
    let find = |dir: &str, name: &str| {
        masterfile
            .iter()
            .find(|f| f.directory == dir && f.name == name)
    };

    let containers = match find("mscp", "cmapfile") {
        Some(f) => parse_cmapfile(&get_do(ch, f.ef, f.data_object, "cmapfile")?)?,
        None => Vec::new(),
    };
    let mut data = AppletData::default();
    if let Some(f) = find("", "cardid") {
        let id = get_do(ch, f.ef, f.data_object, "cardid")?;
        let id: [u8; 16] = id
            .as_slice()
            .try_into()
            .map_err(|_| ReadError::Malformed(format!("cardid is {} bytes, not 16", id.len())))?;
        data.card_id = Some(id).filter(|id| id.iter().any(|&b| b != 0));
    }

    for c in &containers {
        let files = [
            ("ksc", c.signature_key_bits, "Signature"),
            ("kxc", c.key_exchange_key_bits, "Key exchange"),
        ];
        for (prefix, bits, purpose) in files {
            let file_name = format!("{prefix}{:02x}", c.index);
            let Some(f) = find("mscp", &file_name).filter(|_| bits > 0) else {
                continue;
            };
            let stored = get_do(ch, f.ef, f.data_object, &file_name)?;
            let (der, compressed) = decode_certificate(&stored, &file_name)?;
            let label = format!("{purpose} certificate {file_name}");
            data.certificates.push(CertificateInfo::from_der(
                c.name.clone(),
                label,
                der,
                compressed,
            ));
        }
    }
    Ok((
        GidsDetails {
            version,
            containers,
        },
        data,
    ))
}

/// GET DATA of one data object; the answer is the DO itself as a TLV, whose value is returned.
fn get_do(
    ch: &mut Channel<'_>,
    ef: u16,
    data_object: u16,
    what: &str,
) -> Result<Vec<u8>, ReadError> {
    let [ef_hi, ef_lo] = ef.to_be_bytes();
    let [do_hi, do_lo] = data_object.to_be_bytes();
    let response = ch.send([0x00, 0xCB, ef_hi, ef_lo], &[0x5C, 0x02, do_hi, do_lo])?;
    if !response.is_ok() {
        return Err(ReadError::Status {
            command: "GIDS GET DATA",
            sw: response.sw,
        });
    }
    let item =
        tlv::single(&response.data).map_err(|e| ReadError::Malformed(format!("{what}: {e}")))?;
    if item.tag != u32::from(data_object) {
        return Err(ReadError::Malformed(format!(
            "{what}: expected data object {data_object:X}, found {:X}",
            item.tag
        )));
    }
    Ok(item.value.to_vec())
}

/// Parses the masterfile: version byte `01`, then 28-byte records `{ dir[9], name[9], pad[2],
/// DO u32 LE, EF u32 LE }`.
pub fn parse_masterfile(data: &[u8]) -> Result<Vec<FileEntry>, ReadError> {
    let Some((&1, records)) = data.split_first() else {
        return Err(ReadError::Malformed(
            "masterfile does not start with version 01".into(),
        ));
    };
    if records.len() % MASTERFILE_RECORD != 0 {
        return Err(ReadError::Malformed(format!(
            "masterfile has {} bytes of records, not a multiple of {MASTERFILE_RECORD}",
            records.len()
        )));
    }
    records
        .chunks_exact(MASTERFILE_RECORD)
        .map(|r| {
            let u32_at = |i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
            let (data_object, ef) = (u32_at(20), u32_at(24));
            let to_u16 = |v: u32, what: &str| {
                u16::try_from(v).map_err(|_| {
                    ReadError::Malformed(format!("masterfile {what} {v:X} out of range"))
                })
            };
            Ok(FileEntry {
                directory: c_string(&r[0..9]),
                name: c_string(&r[9..18]),
                ef: to_u16(ef, "EF")?,
                data_object: to_u16(data_object, "DO")?,
            })
        })
        .collect()
}

/// Parses the cmapfile: 86-byte `CONTAINER_MAP_RECORD`s; only records flagged valid are kept.
pub fn parse_cmapfile(data: &[u8]) -> Result<Vec<Container>, ReadError> {
    if data.len() % CMAP_RECORD != 0 || data.len() / CMAP_RECORD > MAX_CONTAINERS {
        return Err(ReadError::Malformed(format!(
            "cmapfile of {} bytes is not a list of {CMAP_RECORD}-byte records",
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

/// Decodes a stored certificate: `01 00` + uncompressed length (LE) + zlib, or plain DER.
pub fn decode_certificate(stored: &[u8], what: &str) -> Result<(Vec<u8>, bool), ReadError> {
    match stored {
        [0x01, 0x00, lo, hi, compressed @ ..] => {
            let der = compress::inflate(compressed)?;
            let expected = usize::from(u16::from_le_bytes([*lo, *hi]));
            if der.len() != expected {
                return Err(ReadError::Malformed(format!(
                    "{what}: inflated to {} bytes, header says {expected}",
                    der.len()
                )));
            }
            Ok((der, true))
        }
        [0x30, ..] => Ok((stored.to_vec(), false)),
        _ => Err(ReadError::Malformed(format!(
            "{what}: neither a compressed nor a DER certificate"
        ))),
    }
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &str, name: &str, data_object: u32, ef: u32) -> Vec<u8> {
        let mut r = vec![0u8; MASTERFILE_RECORD];
        r[..dir.len()].copy_from_slice(dir.as_bytes());
        r[9..9 + name.len()].copy_from_slice(name.as_bytes());
        r[20..24].copy_from_slice(&data_object.to_le_bytes());
        r[24..28].copy_from_slice(&ef.to_le_bytes());
        r
    }

    #[test]
    fn parses_masterfile_records() {
        let mut mf = vec![1u8];
        mf.extend(record("", "cardid", 0xDF20, 0xA012));
        mf.extend(record("mscp", "cmapfile", 0xDF23, 0xA010));
        let files = parse_masterfile(&mf).unwrap();
        assert_eq!(
            files[1],
            FileEntry {
                directory: "mscp".into(),
                name: "cmapfile".into(),
                ef: 0xA010,
                data_object: 0xDF23
            }
        );
        assert!(parse_masterfile(&mf[..20]).is_err());
        assert!(parse_masterfile(&[2]).is_err());
        let mut huge = vec![1u8];
        huge.extend(record("", "x", 0x0010_0000, 0xA010));
        assert!(parse_masterfile(&huge).is_err());
    }

    #[test]
    fn parses_cmapfile_and_skips_invalid_records() {
        let mut cmap = vec![0u8; CMAP_RECORD * 2];
        for (i, u) in "{ab}".encode_utf16().enumerate() {
            cmap[i * 2..i * 2 + 2].copy_from_slice(&u.to_le_bytes());
        }
        cmap[80] = 0x03;
        cmap[84..86].copy_from_slice(&2048u16.to_le_bytes());
        let containers = parse_cmapfile(&cmap).unwrap();
        assert_eq!(containers.len(), 1);
        assert_eq!(containers[0].name, "{ab}");
        assert!(containers[0].default);
        assert_eq!(containers[0].key_exchange_key_bits, 2048);
        assert!(parse_cmapfile(&cmap[..85]).is_err());
    }

    #[test]
    fn decodes_compressed_certificates_and_checks_the_length() {
        use flate2::write::ZlibEncoder;
        use std::io::Write;
        let der = b"\x30\x03\x02\x01\x05".to_vec();
        let mut e = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&der).unwrap();
        let z = e.finish().unwrap();
        let mut stored = vec![1, 0, der.len() as u8, 0];
        stored.extend(&z);
        assert_eq!(
            decode_certificate(&stored, "kxc00").unwrap(),
            (der.clone(), true)
        );
        stored[2] = 99;
        assert!(decode_certificate(&stored, "kxc00").is_err());
        assert_eq!(decode_certificate(&der, "kxc00").unwrap(), (der, false));
        assert!(decode_certificate(b"junk", "kxc00").is_err());
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = parse_masterfile(&data);
            let _ = parse_cmapfile(&data);
            let _ = decode_certificate(&data, "x");
        }
    }
}
