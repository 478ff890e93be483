//! Thales (Gemalto) IDPrime MD and IDPrime 9xx: the minidriver files as EFs of one applet.
//!
//! The index file (0101) lists every file with its FID and size, so a read is: SELECT the
//! applet, the CPLC (model and chip serial), the index, the cardid, the cmapfile as far as the
//! certificates need it, the token label when the index has one, each certificate file in
//! reads of exactly the bytes left, and the CPLC again (the same chip answered throughout). No file is probed for its size, and every command is a short
//! APDU: these are T=0 cards, whose answers come behind `61xx` (the [`Channel`] follows it) and
//! which ask for a re-issue with `6Cxx` (likewise).

use serde::{Deserialize, Serialize};

use super::apdu::Response;
use super::minidriver::{self, Container};
use super::{AppletData, Channel, ReadError};

/// The IDPrime applet (RID A000000018, Gemplus).
pub const AID: [u8; 11] = [
    0xA0, 0x00, 0x00, 0x00, 0x18, 0x80, 0x00, 0x00, 0x00, 0x06, 0x62,
];

const INDEX_FID: u16 = 0x0101;
const INDEX_ENTRY: usize = 21;
/// READ BINARY addresses at most 15 bits of offset in P1-P2 (the top bit selects a short EF).
const MAX_FILE_SIZE: usize = 0x7FFF;
/// The most one short READ BINARY returns.
const CHUNK: usize = 256;

/// IDPrime details of the Card JSON contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdprimeDetails {
    /// `IDPrime MD 840`…, from the ATR; else from the operating system level the CPLC gives.
    pub model: String,
    /// The operating system release level from the CPLC (1 for the 3810 … 4 for the 940).
    pub os_level: Option<u8>,
    /// The token label a PKCS#11 personalisation wrote (`p11/tinfo`), when there is one.
    pub token_label: Option<String>,
    pub containers: Vec<Container>,
}

/// The models cardbridge knows by ATR (contact, T=0), with their names.
const MODELS: [(&str, [u8; 20]); 5] = [
    ("IDPrime MD 3810", model_atr([0x84, 0x41, 0x3D, 0xF6], 0xFE)),
    ("IDPrime MD 830", model_atr([0x84, 0x56, 0x51, 0x10], 0xFE)),
    ("IDPrime MD 840", model_atr([0x85, 0x03, 0x00, 0xEF], 0xFE)),
    (
        "IDPrime 930/3930",
        model_atr([0x84, 0x61, 0x60, 0xFB], 0xFD),
    ),
    ("IDPrime 940", model_atr([0x85, 0x59, 0x56, 0xFB], 0xFE)),
];

/// `3B 7F 96 00 00 80 31 80 65 B0 <chip> 12 0F <f> 82 90 00`, the shape every IDPrime contact
/// ATR has.
const fn model_atr(chip: [u8; 4], f: u8) -> [u8; 20] {
    [
        0x3B, 0x7F, 0x96, 0x00, 0x00, 0x80, 0x31, 0x80, 0x65, 0xB0, chip[0], chip[1], chip[2],
        chip[3], 0x12, 0x0F, f, 0x82, 0x90, 0x00,
    ]
}

/// The historical bytes every IDPrime ATR starts with, contact and contactless alike.
const HISTORICAL_PREFIX: [u8; 5] = [0x80, 0x31, 0x80, 0x65, 0xB0];

/// The model an ATR names, if it is one of [`MODELS`].
pub fn model_from_atr(atr: &[u8]) -> Option<&'static str> {
    MODELS
        .iter()
        .find(|(_, known)| known[..] == *atr)
        .map(|(name, _)| *name)
}

/// The model's name: from the ATR, else from the operating system level.
fn model_name(atr: &[u8], os_level: Option<u8>) -> String {
    match (model_from_atr(atr), os_level) {
        (Some(name), _) => name.to_string(),
        (None, Some(level)) => format!("IDPrime (OS level {level})"),
        (None, None) => "IDPrime (model not known)".to_string(),
    }
}

/// Whether the ATR's historical bytes look like an IDPrime card's, so its applet is tried first.
pub fn atr_suggests_idprime(atr: &[u8], historical: &[u8]) -> bool {
    model_from_atr(atr).is_some() || historical.starts_with(&HISTORICAL_PREFIX)
}

/// One entry of the index file: `FID | size | name[8] | directory[8] | access byte`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub fid: u16,
    pub size: u16,
    pub name: String,
    pub directory: String,
}

/// How many bytes of the index file hold its entries, from its first byte (the entry count).
pub fn index_len(count: u8) -> usize {
    1 + usize::from(count) * INDEX_ENTRY
}

/// Parses the index file: an entry count, then 21-byte entries. Bytes past the entries (the
/// file is zero-padded) are ignored.
pub fn parse_index(data: &[u8]) -> Result<Vec<IndexEntry>, ReadError> {
    let Some((&count, rest)) = data.split_first() else {
        return Err(ReadError::Malformed(
            "the index file (0101) is empty".into(),
        ));
    };
    let needed = index_len(count) - 1;
    let Some(entries) = rest.get(..needed) else {
        return Err(ReadError::Malformed(format!(
            "the index file (0101) announces {count} entries but holds only {} bytes",
            data.len()
        )));
    };
    Ok(entries
        .chunks_exact(INDEX_ENTRY)
        .map(|e| IndexEntry {
            fid: u16::from_be_bytes([e[0], e[1]]),
            size: u16::from_be_bytes([e[2], e[3]]),
            name: minidriver::c_string(&e[4..12]),
            directory: minidriver::c_string(&e[12..20]),
        })
        .collect())
}

/// The token label in `p11/tinfo`: `01 | length | label`. `None` for anything else.
pub fn parse_token_info(data: &[u8]) -> Option<String> {
    let [0x01, len, rest @ ..] = data else {
        return None;
    };
    let label = rest.get(..usize::from(*len))?;
    let text = String::from_utf8_lossy(label);
    let text = text.trim_end_matches(['\0', ' ']);
    (!text.is_empty()).then(|| text.to_string())
}

/// What the CPLC (GET DATA 9F7F, 42 bytes) tells: the operating system release level (first
/// byte of bytes 8-9) and the chip's serial number (bytes 12-15, hex).
pub fn parse_cplc(answer: &[u8]) -> Option<(u8, String)> {
    let cplc = match answer {
        [0x9F, 0x7F, 0x2A, rest @ ..] => rest,
        other => other,
    };
    if cplc.len() < 42 {
        return None;
    }
    Some((cplc[8], hex::encode_upper(&cplc[12..16])))
}

/// SELECTs the IDPrime applet (no FCI asked: `P2 = 0C`); `false` when the card has none.
pub fn select(ch: &mut Channel<'_>) -> Result<bool, ReadError> {
    let mut apdu = vec![0x00, 0xA4, 0x04, 0x0C, AID.len() as u8];
    apdu.extend_from_slice(&AID);
    Ok(ch.send_raw(&apdu)?.is_ok())
}

/// Reads a selected IDPrime applet. The CPLC comes first and once more at the end: the chip's
/// serial tells, for one APDU, whether everything between reached the same card
/// ([`crate::end_of_read`]); a card without a CPLC is checked by its cardid file instead.
pub fn read(ch: &mut Channel<'_>, atr: &[u8]) -> Result<(IdprimeDetails, AppletData), ReadError> {
    let cplc = read_cplc(ch)?;
    let os_level = cplc.as_ref().map(|(level, _)| *level);
    let mut data = AppletData {
        serial_number: cplc.as_ref().map(|(_, serial)| serial.clone()),
        ..AppletData::default()
    };
    let mut details = IdprimeDetails {
        model: model_name(atr, os_level),
        os_level,
        token_label: None,
        containers: Vec::new(),
    };
    let mut cardid = None;
    let rest = read_files(ch, &mut details, &mut data, &mut cardid);
    match (&cplc, cardid) {
        (Some(_), _) => crate::end_of_read(rest, &cplc, || read_cplc(ch))?,
        (None, Some(entry)) if data.card_id.is_some() => {
            crate::end_of_read(rest, &data.card_id, || {
                minidriver::card_id(&read_file(ch, &entry)?)
            })?
        }
        _ => rest?,
    }
    Ok((details, data))
}

/// The index and the files it lists: cardid, cmapfile (as far as needed), token info,
/// certificates. `cardid` is set to the cardid file's entry when the index has one.
fn read_files(
    ch: &mut Channel<'_>,
    details: &mut IdprimeDetails,
    data: &mut AppletData,
    cardid: &mut Option<IndexEntry>,
) -> Result<(), ReadError> {
    let Some(index) = read_index(ch)? else {
        data.notes.push(
            "the IDPrime applet has no index file (0101): the card is not personalised, so it \
             holds no card id and no certificates"
                .into(),
        );
        return Ok(());
    };
    let find = |dir: &str, name: &str| index.iter().find(|e| e.directory == dir && e.name == name);

    *cardid = find("", "cardid").cloned();
    match cardid {
        Some(entry) => data.card_id = minidriver::card_id(&read_file(ch, entry)?)?,
        None => data
            .notes
            .push("the index lists no cardid file, so the card has no card id".into()),
    }

    let files = minidriver::certificate_files(
        index
            .iter()
            .map(|e| (e.directory.as_str(), e.name.as_str(), e)),
    );
    let last_container = files.iter().map(|(f, _)| f.container).max();
    details.containers = match (find("mscp", "cmapfile"), last_container) {
        (Some(entry), Some(last)) => read_containers(ch, entry, last)?,
        _ => Vec::new(),
    };
    details.token_label = match find("p11", "tinfo") {
        Some(entry) => parse_token_info(&read_file(ch, entry)?),
        None => None,
    };
    minidriver::read_certificates(&files, &details.containers, data, |_, entry| {
        read_file(ch, entry)
    })
}

/// The OS level and chip serial from the CPLC; `None` when the card gives none.
fn read_cplc(ch: &mut Channel<'_>) -> Result<Option<(u8, String)>, ReadError> {
    let answer = ch.send_raw(&[0x00, 0xCA, 0x9F, 0x7F, 0x2D])?;
    Ok(answer.is_ok().then(|| parse_cplc(&answer.data)).flatten())
}

/// The cmapfile's records up to the last container a certificate belongs to: a real card's
/// file holds 15 records (1290 bytes), three containers need 258 of them.
fn read_containers(
    ch: &mut Channel<'_>,
    cmapfile: &IndexEntry,
    last: u8,
) -> Result<Vec<Container>, ReadError> {
    let wanted = (usize::from(last) + 1) * minidriver::CMAP_RECORD;
    minidriver::parse_cmapfile(&read_prefix(ch, cmapfile, wanted)?)
}

/// The index: its first 256 bytes hold the count and twelve entries; a longer index is read on.
/// `None` when the applet has no index (a card never personalised).
fn read_index(ch: &mut Channel<'_>) -> Result<Option<Vec<IndexEntry>>, ReadError> {
    match select_file(ch, INDEX_FID)? {
        0x9000 => {}
        0x6A82 => return Ok(None),
        sw => {
            return Err(ReadError::Status {
                command: "IDPrime SELECT FILE (index)",
                sw,
            })
        }
    }
    let mut data = read_binary(ch, 0, CHUNK)?;
    let Some(&count) = data.first() else {
        return Err(ReadError::Malformed(
            "the index file (0101) is empty".into(),
        ));
    };
    let len = index_len(count);
    while data.len() < len {
        let chunk = read_binary(ch, data.len(), (len - data.len()).min(CHUNK))?;
        data.extend(chunk);
    }
    parse_index(&data).map(Some)
}

/// SELECT and read a whole file whose size the index gives.
fn read_file(ch: &mut Channel<'_>, entry: &IndexEntry) -> Result<Vec<u8>, ReadError> {
    read_prefix(ch, entry, usize::from(entry.size))
}

/// SELECT and read the first `wanted` bytes of a file (all of it if it is shorter).
fn read_prefix(
    ch: &mut Channel<'_>,
    entry: &IndexEntry,
    wanted: usize,
) -> Result<Vec<u8>, ReadError> {
    let size = usize::from(entry.size);
    if size > MAX_FILE_SIZE {
        return Err(ReadError::Malformed(format!(
            "the index gives file {}/{} a size of {size} bytes, more than a card can address",
            entry.directory, entry.name
        )));
    }
    match select_file(ch, entry.fid)? {
        0x9000 => {}
        0x6A82 => {
            return Err(ReadError::Malformed(format!(
                "the index lists file {}/{} ({:04X}), but the card has no such file",
                entry.directory, entry.name, entry.fid
            )))
        }
        sw => {
            return Err(ReadError::Status {
                command: "IDPrime SELECT FILE",
                sw,
            })
        }
    }
    let end = wanted.min(size);
    let mut data = Vec::with_capacity(end);
    while data.len() < end {
        let chunk = read_binary(ch, data.len(), (end - data.len()).min(CHUNK))?;
        data.extend(chunk);
    }
    data.truncate(end);
    Ok(data)
}

/// SELECTs an EF of the applet by FID without asking for its FCP, and returns the status word.
/// A card that refuses `P2 = 0C` (`6A86`) is asked again with `P2 = 00`; its FCP is ignored.
fn select_file(ch: &mut Channel<'_>, fid: u16) -> Result<u16, ReadError> {
    let [hi, lo] = fid.to_be_bytes();
    let response = ch.send_raw(&[0x00, 0xA4, 0x00, 0x0C, 0x02, hi, lo])?;
    if response.sw != 0x6A86 {
        return Ok(response.sw);
    }
    Ok(ch.send_raw(&[0x00, 0xA4, 0x00, 0x00, 0x02, hi, lo])?.sw)
}

/// One READ BINARY of `len` (1..=256) bytes at `offset`. An empty answer would never finish
/// the file, so it is an error rather than a loop.
fn read_binary(ch: &mut Channel<'_>, offset: usize, len: usize) -> Result<Vec<u8>, ReadError> {
    let [hi, lo] = (offset as u16).to_be_bytes();
    // Le 00 asks for 256 bytes.
    let Response { data, sw } = ch.send_raw(&[0x00, 0xB0, hi, lo, len as u8])?;
    if sw != 0x9000 {
        return Err(ReadError::Status {
            command: "IDPrime READ BINARY",
            sw,
        });
    }
    if data.is_empty() {
        return Err(ReadError::Malformed(format!(
            "the card answered no bytes to a read at offset {offset}"
        )));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fid: u16, size: u16, name: &str, dir: &str) -> Vec<u8> {
        let mut e = vec![0u8; INDEX_ENTRY];
        e[..2].copy_from_slice(&fid.to_be_bytes());
        e[2..4].copy_from_slice(&size.to_be_bytes());
        e[4..4 + name.len()].copy_from_slice(name.as_bytes());
        e[12..12 + dir.len()].copy_from_slice(dir.as_bytes());
        e[20] = 1;
        e
    }

    #[test]
    fn parses_the_index_and_ignores_the_padding() {
        let mut index = vec![2u8];
        index.extend(entry(0x0201, 16, "cardid", ""));
        index.extend(entry(0x0206, 779, "kxc01", "mscp"));
        index.extend([0u8; 40]);
        let entries = parse_index(&index).unwrap();
        assert_eq!(
            entries[1],
            IndexEntry {
                fid: 0x0206,
                size: 779,
                name: "kxc01".into(),
                directory: "mscp".into()
            }
        );
        let err = parse_index(&index[..30]).unwrap_err().to_string();
        assert!(
            err.contains("announces 2 entries but holds only 30 bytes"),
            "{err}"
        );
        assert!(parse_index(&[]).is_err());
        assert_eq!(parse_index(&[0]).unwrap(), []);
    }

    #[test]
    fn known_atrs_name_their_model_and_others_only_suggest_idprime() {
        let a840 = hex::decode("3B7F96000080318065B0850300EF120FFE829000").unwrap();
        assert_eq!(model_from_atr(&a840), Some("IDPrime MD 840"));
        // OpenSC 0.23 matches only `…12 0F FE…`; the 930 ends `FD`.
        let a930 = hex::decode("3B7F96000080318065B0846160FB120FFD829000").unwrap();
        assert_eq!(model_from_atr(&a930), Some("IDPrime 930/3930"));
        // A T=1 eToken: not in the table, but its historical bytes say IDPrime.
        let historical = hex::decode("80318065B0855956FB120FFE829000").unwrap();
        assert!(atr_suggests_idprime(&[0x3B, 0x8F], &historical));
        assert!(!atr_suggests_idprime(&[0x3B, 0x8F], b"\x80\x73\x00"));
    }

    #[test]
    fn token_info_and_cplc() {
        assert_eq!(
            parse_token_info(b"\x01\x07Contoso\0\0").as_deref(),
            Some("Contoso")
        );
        assert_eq!(parse_token_info(b"\x01\x09Contoso"), None);
        assert_eq!(parse_token_info(b"\x02\x01x"), None);
        let mut cplc = vec![0x9F, 0x7F, 0x2A];
        let mut body = [0u8; 42];
        body[8] = 3;
        body[12..16].copy_from_slice(&[0x12, 0x34, 0xAB, 0xCD]);
        cplc.extend(body);
        assert_eq!(parse_cplc(&cplc), Some((3, "1234ABCD".into())));
        assert_eq!(parse_cplc(&cplc[..20]), None);
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = parse_index(&data);
            let _ = parse_token_info(&data);
            let _ = parse_cplc(&data);
        }
    }
}
