//! GIDS (Microsoft Generic Identity Device Specification) as the Windows minidriver lays it out.
//!
//! GIDS has no ISO files for the minidriver data; each "file" is a data object inside an EF, and
//! the masterfile maps names (`cardid`, `mscp/cmapfile`, `mscp/kxc00`…) to (EF, DO) pairs. A
//! read is: SELECT, masterfile, cardid, cmapfile, one GET DATA per certificate file, and the
//! cardid again (the same card answered throughout).

use serde::{Deserialize, Serialize};

use super::minidriver::{self, Container};
use super::{tlv, AppletData, Channel, ReadError};

const GIDS_AID: [u8; 9] = [0xA0, 0x00, 0x00, 0x03, 0x97, 0x42, 0x54, 0x46, 0x59];
/// The AID as hex, to recognise GIDS from an ATR's application identifier.
pub const AID_HEX: &str = "A00000039742544659";

const MASTERFILE_EF: u16 = 0xA000;
const MASTERFILE_DO: u16 = 0xDF1F;
const MASTERFILE_RECORD: usize = 28;

/// GIDS details of the Card JSON contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GidsDetails {
    /// GIDS specification version from the SELECT answer (1 or 2), when the card gave it.
    pub version: Option<u8>,
    pub containers: Vec<Container>,
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

/// Reads a selected GIDS applet. A card whose applet was never initialised (no masterfile) is
/// an empty GIDS card with a note, not a failed read.
pub fn read(
    ch: &mut Channel<'_>,
    version: Option<u8>,
) -> Result<(GidsDetails, AppletData), ReadError> {
    let mut data = AppletData::default();
    let mut details = GidsDetails {
        version,
        containers: Vec::new(),
    };
    let masterfile = match get_do(ch, MASTERFILE_EF, MASTERFILE_DO, "masterfile") {
        Err(ReadError::Status { sw: 0x6A82, .. }) => {
            data.notes.push(
                "the GIDS applet is not initialised (it has no masterfile): the card holds no \
                 card id and no certificates yet"
                    .into(),
            );
            return Ok((details, data));
        }
        stored => parse_masterfile(&stored?)?,
    };
    let find = |dir: &str, name: &str| {
        masterfile
            .iter()
            .find(|f| f.directory == dir && f.name == name)
    };

    // The card id first, and once more at the end: everything between reached the same card
    // ([`crate::end_of_read`]).
    let cardid = find("", "cardid");
    if let Some(f) = cardid {
        data.card_id = minidriver::card_id(&get_do(ch, f.ef, f.data_object, "cardid")?)?;
    }
    let rest = read_containers_and_certificates(ch, &masterfile, &mut details, &mut data);
    match (cardid, data.card_id) {
        (Some(f), Some(_)) => crate::end_of_read(rest, &data.card_id, || {
            minidriver::card_id(&get_do(ch, f.ef, f.data_object, "cardid")?)
        })?,
        _ => rest?,
    }
    Ok((details, data))
}

/// The cmapfile and every certificate file the masterfile lists.
fn read_containers_and_certificates(
    ch: &mut Channel<'_>,
    masterfile: &[FileEntry],
    details: &mut GidsDetails,
    data: &mut AppletData,
) -> Result<(), ReadError> {
    let cmapfile = masterfile
        .iter()
        .find(|f| f.directory == "mscp" && f.name == "cmapfile");
    if let Some(f) = cmapfile {
        details.containers =
            minidriver::parse_cmapfile(&get_do(ch, f.ef, f.data_object, "cmapfile")?)?;
    }
    let files = minidriver::certificate_files(
        masterfile
            .iter()
            .map(|f| (f.directory.as_str(), f.name.as_str(), f)),
    );
    minidriver::read_certificates(&files, &details.containers, data, |file, entry| {
        get_do(ch, entry.ef, entry.data_object, &file.name)
    })
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
                directory: minidriver::c_string(&r[0..9]),
                name: minidriver::c_string(&r[9..18]),
                ef: to_u16(ef, "EF")?,
                data_object: to_u16(data_object, "DO")?,
            })
        })
        .collect()
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

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = parse_masterfile(&data);
        }
    }
}
