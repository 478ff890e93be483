//! PIV (NIST SP 800-73-4): CHUID, certificate slots, key history, YubiKey extensions.
//!
//! The read is shaped to need as few APDUs as possible, since every APDU is a round trip
//! through pcscd and the reader: one GET DATA per object, the retired slots only as far as the
//! key-history object announces them (all twenty are probed only when it is missing), and the
//! Discovery and CCC objects are not read because they carry nothing cardbridge reports.

use serde::{Deserialize, Serialize};

use super::apdu::Response;
use super::cert::CertificateInfo;
use super::{compress, guid_string, tlv, AppletData, Channel, ReadError};

/// The PIV AID, right-truncated as SP 800-73 allows (version bytes omitted).
pub const AID: [u8; 9] = [0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00];
/// Yubico's OTP applet, the only place older YubiKeys (firmware < 5) expose their serial.
const YUBICO_OTP_AID: [u8; 8] = [0xA0, 0x00, 0x00, 0x05, 0x27, 0x20, 0x01, 0x01];

const TAG_CHUID: u32 = 0x5FC102;
const TAG_KEY_HISTORY: u32 = 0x5FC10C;
/// Retired key `0x82 + n` lives in object `5FC10D + n`, n = 0..19.
const TAG_FIRST_RETIRED: u32 = 0x5FC10D;
const RETIRED_SLOTS: u8 = 20;

/// The four active certificate slots: key reference, object tag, label.
const ACTIVE_SLOTS: [(u8, u32, &str); 4] = [
    (0x9A, 0x5FC105, "PIV Authentication"),
    (0x9C, 0x5FC10A, "Digital Signature"),
    (0x9D, 0x5FC10B, "Key Management"),
    (0x9E, 0x5FC101, "Card Authentication"),
];

/// PIV details of the Card JSON contract.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PivDetails {
    /// FASC-N, hex of the 25 raw bytes.
    pub fascn: Option<String>,
    /// FASC-N decoded to its digits (`S` start, `F` field separator, `E` end sentinel).
    pub fascn_decoded: Option<String>,
    /// CHUID GUID (tag 34) in RFC 4122 order.
    pub guid: Option<String>,
    /// CHUID expiration date, `YYYY-MM-DD`.
    pub expiration: Option<String>,
    pub cardholder_uuid: Option<String>,
    /// Retired-key counts from the key-history object, when the card has one.
    pub key_history: Option<KeyHistory>,
    /// YubiKey firmware version, when the card answered Yubico's GET VERSION.
    pub yubikey_version: Option<String>,
    /// Slots the card refused to read (other than "empty"), with the status word.
    pub unreadable_slots: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHistory {
    pub keys_with_on_card_certs: u8,
    pub keys_with_off_card_certs: u8,
    pub off_card_cert_url: Option<String>,
}

/// The parsed CHUID.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Chuid {
    pub fascn: Option<Vec<u8>>,
    pub guid: Option<[u8; 16]>,
    pub expiration: Option<String>,
    pub cardholder_uuid: Option<[u8; 16]>,
}

/// SELECTs the PIV applet; `false` when the card has none.
pub fn select(ch: &mut Channel<'_>) -> Result<bool, ReadError> {
    Ok(ch.send([0x00, 0xA4, 0x04, 0x00], &AID)?.is_ok())
}

/// Reads a selected PIV applet.
pub fn read(ch: &mut Channel<'_>) -> Result<(PivDetails, AppletData), ReadError> {
    let mut details = PivDetails::default();
    let mut data = AppletData::default();

    if let Some(body) = get_object(ch, TAG_CHUID, "CHUID", &mut details)? {
        let chuid = parse_chuid(&body)?;
        details.fascn = chuid.fascn.as_deref().map(hex::encode_upper);
        details.fascn_decoded = chuid.fascn.as_deref().and_then(decode_fascn);
        details.guid = chuid.guid.as_ref().map(guid_string);
        details.expiration = chuid.expiration;
        details.cardholder_uuid = chuid.cardholder_uuid.as_ref().map(guid_string);
        data.card_id = chuid.guid.filter(|g| g.iter().any(|&b| b != 0));
    }
    let rest = read_slots(ch, &mut details, &mut data);
    match data.card_id {
        Some(_) => crate::end_of_read(rest, &data.card_id, || card_id(ch))?,
        None => rest?,
    }
    Ok((details, data))
}

/// Everything after the CHUID: the certificate slots, the key history, a YubiKey's version and
/// serial.
fn read_slots(
    ch: &mut Channel<'_>,
    details: &mut PivDetails,
    data: &mut AppletData,
) -> Result<(), ReadError> {
    for (key_ref, tag, label) in ACTIVE_SLOTS {
        read_certificate(ch, key_ref, tag, label.to_string(), details, data)?;
    }

    let retired = match get_object(ch, TAG_KEY_HISTORY, "key history", details)? {
        Some(body) => {
            let history = parse_key_history(&body)?;
            let count = history.keys_with_on_card_certs.min(RETIRED_SLOTS);
            details.key_history = Some(history);
            count
        }
        None => RETIRED_SLOTS,
    };
    for n in 0..retired {
        let label = format!("Retired Key Management {}", n + 1);
        read_certificate(
            ch,
            0x82 + n,
            TAG_FIRST_RETIRED + u32::from(n),
            label,
            details,
            data,
        )?;
    }
    read_yubikey(ch, details, data)
}

/// The card id from the CHUID alone (the end-of-read check).
fn card_id(ch: &mut Channel<'_>) -> Result<Option<[u8; 16]>, ReadError> {
    let mut scratch = PivDetails::default();
    Ok(match get_object(ch, TAG_CHUID, "CHUID", &mut scratch)? {
        Some(body) => parse_chuid(&body)?
            .guid
            .filter(|g| g.iter().any(|&b| b != 0)),
        None => None,
    })
}

/// GET DATA for one object; `None` when the card says it does not exist (6A82) or refuses it,
/// the latter noted in `unreadable_slots`. The `53` wrapper is removed.
fn get_object(
    ch: &mut Channel<'_>,
    tag: u32,
    what: &str,
    details: &mut PivDetails,
) -> Result<Option<Vec<u8>>, ReadError> {
    let tag_bytes = &tag.to_be_bytes()[1..];
    let mut tag_list = vec![0x5C, tag_bytes.len() as u8];
    tag_list.extend_from_slice(tag_bytes);
    let Response { data, sw } = ch.send([0x00, 0xCB, 0x3F, 0xFF], &tag_list)?;
    match sw {
        0x9000 => {}
        0x6A82 | 0x6A88 => return Ok(None),
        _ => {
            details.unreadable_slots.push(format!("{what}: {sw:04X}"));
            return Ok(None);
        }
    }
    if data.is_empty() {
        return Ok(None);
    }
    let outer = tlv::single(&data).map_err(|e| ReadError::Malformed(format!("{what}: {e}")))?;
    if outer.tag != 0x53 {
        return Err(ReadError::Malformed(format!(
            "{what}: expected tag 53, found {:X}",
            outer.tag
        )));
    }
    Ok(Some(outer.value.to_vec()))
}

fn read_certificate(
    ch: &mut Channel<'_>,
    key_ref: u8,
    tag: u32,
    label: String,
    details: &mut PivDetails,
    data: &mut AppletData,
) -> Result<(), ReadError> {
    let slot = format!("{key_ref:02X}");
    let Some(body) = get_object(ch, tag, &slot, details)? else {
        return Ok(());
    };
    // What is wrong inside one slot's container stays that slot's error.
    let info = match parse_cert_container(&body, &slot) {
        Ok(None) => return Ok(()),
        Ok(Some((der, compressed))) => CertificateInfo::from_der(slot, label, der, compressed),
        Err(e) => {
            let error = match e {
                ReadError::Malformed(why) => why,
                other => other.to_string(),
            };
            let compressed = compression_flagged(cert_info_byte(&body));
            CertificateInfo::unreadable(slot, label, body, compressed, error)
        }
    };
    data.certificates.push(info);
    Ok(())
}

/// Extracts the certificate from a certificate container (`70` cert, `71` CertInfo, optional
/// `72` MSCUID, `FE` LRC). `None` for an empty slot (`70 00`).
pub fn parse_cert_container(body: &[u8], slot: &str) -> Result<Option<(Vec<u8>, bool)>, ReadError> {
    let malformed = |e: tlv::TlvError| ReadError::Malformed(format!("certificate {slot}: {e}"));
    let mut cert = None;
    let mut cert_info = 0u8;
    for item in tlv::iter(body) {
        let item = item.map_err(malformed)?;
        match item.tag {
            0x70 => cert = Some(item.value),
            0x71 => cert_info = item.value.first().copied().unwrap_or(0),
            _ => {}
        }
    }
    let Some(cert) = cert.filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    if compression_flagged(cert_info) {
        Ok(Some((compress::inflate(cert)?, true)))
    } else {
        Ok(Some((cert.to_vec(), false)))
    }
}

/// Bit 1 is gzip per SP 800-73-4; 0x80 is how SP 800-73-1 cards flagged compression.
fn compression_flagged(cert_info: u8) -> bool {
    cert_info & 0x01 != 0 || cert_info & 0x80 != 0
}

/// The CertInfo byte (`71`) of a container whose TLV may be broken further on.
fn cert_info_byte(body: &[u8]) -> u8 {
    tlv::iter(body)
        .map_while(Result::ok)
        .find(|item| item.tag == 0x71)
        .and_then(|item| item.value.first().copied())
        .unwrap_or(0)
}

/// Parses the CHUID body (inside `53`). Deprecated tags (`EE`, `32`, `33`) are skipped.
pub fn parse_chuid(body: &[u8]) -> Result<Chuid, ReadError> {
    let mut chuid = Chuid::default();
    for item in tlv::iter(body) {
        let item = item.map_err(|e| ReadError::Malformed(format!("CHUID: {e}")))?;
        match item.tag {
            0x30 if !item.value.is_empty() => chuid.fascn = Some(item.value.to_vec()),
            0x34 => chuid.guid = fixed16(item.value, "GUID")?,
            0x35 => chuid.expiration = Some(date(item.value)),
            0x36 => chuid.cardholder_uuid = fixed16(item.value, "cardholder UUID")?,
            _ => {}
        }
    }
    Ok(chuid)
}

fn fixed16(value: &[u8], what: &str) -> Result<Option<[u8; 16]>, ReadError> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .try_into()
        .map(Some)
        .map_err(|_| ReadError::Malformed(format!("CHUID {what} is {} bytes, not 16", value.len())))
}

/// `YYYYMMDD` → `YYYY-MM-DD`; anything else is shown as it came (lossy UTF-8).
fn date(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    if value.len() == 8 && value.iter().all(u8::is_ascii_digit) {
        format!("{}-{}-{}", &text[0..4], &text[4..6], &text[6..8])
    } else {
        text.into_owned()
    }
}

/// Decodes a FASC-N: 40 characters of 5 bits (4 data bits, least significant first, and odd
/// parity). Digits stay digits; start sentinel `S`, field separator `F`, end sentinel `E`,
/// organisational separator `O`. `None` when the bytes are not a FASC-N.
pub fn decode_fascn(bytes: &[u8]) -> Option<String> {
    if bytes.len() != 25 || bytes.iter().all(|&b| b == 0) {
        return None;
    }
    let bit = |i: usize| (bytes[i / 8] >> (7 - i % 8)) & 1;
    let mut out = String::with_capacity(40);
    for c in 0..40 {
        let base = c * 5;
        let value = bit(base) | bit(base + 1) << 1 | bit(base + 2) << 2 | bit(base + 3) << 3;
        out.push(match value {
            0..=9 => char::from(b'0' + value),
            0xB => 'S',
            0xD => 'F',
            0xE => 'O',
            0xF => 'E',
            _ => return None,
        });
        if out.ends_with('E') {
            break;
        }
    }
    Some(out)
}

/// Parses the key-history object body (`C1`, `C2`, `F3`).
pub fn parse_key_history(body: &[u8]) -> Result<KeyHistory, ReadError> {
    let mut history = KeyHistory {
        keys_with_on_card_certs: 0,
        keys_with_off_card_certs: 0,
        off_card_cert_url: None,
    };
    for item in tlv::iter(body) {
        let item = item.map_err(|e| ReadError::Malformed(format!("key history: {e}")))?;
        match item.tag {
            0xC1 => history.keys_with_on_card_certs = item.value.first().copied().unwrap_or(0),
            0xC2 => history.keys_with_off_card_certs = item.value.first().copied().unwrap_or(0),
            0xF3 if !item.value.is_empty() => {
                history.off_card_cert_url = Some(String::from_utf8_lossy(item.value).into_owned())
            }
            _ => {}
        }
    }
    Ok(history)
}

/// Yubico's GET VERSION and GET SERIAL. Any other PIV card answers `6D00` (or another error)
/// to GET VERSION, which ends the attempt after one APDU.
fn read_yubikey(
    ch: &mut Channel<'_>,
    details: &mut PivDetails,
    data: &mut AppletData,
) -> Result<(), ReadError> {
    let version = ch.send([0x00, 0xFD, 0x00, 0x00], &[])?;
    let [major, minor, patch] = version.data[..] else {
        return Ok(());
    };
    if !version.is_ok() {
        return Ok(());
    }
    details.yubikey_version = Some(format!("{major}.{minor}.{patch}"));
    let serial = if major >= 5 {
        ch.send([0x00, 0xF8, 0x00, 0x00], &[])?
    } else {
        // Firmware 4 and older: the serial is only available from the OTP applet.
        if !ch.send([0x00, 0xA4, 0x04, 0x00], &YUBICO_OTP_AID)?.is_ok() {
            return Ok(());
        }
        let serial = ch.send_raw(&[0x00, 0x01, 0x10, 0x00])?;
        // Leave the card as we found it: with PIV selected.
        select(ch)?;
        serial
    };
    if let (true, &[a, b, c, d]) = (serial.is_ok(), &serial.data[..]) {
        data.serial_number = Some(u32::from_be_bytes([a, b, c, d]).to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::{Replay, SteppingClock};
    use crate::Clock;
    use std::time::Duration;

    const YKP_FASCN: &str = "D4E739DA739CED39CE739D836858210842108421C84210C3EB";

    fn chuid_body(guid: &[u8; 16]) -> Vec<u8> {
        let mut body = tlv::encode(0x30, &hex::decode(YKP_FASCN).unwrap());
        body.extend(tlv::encode(0x34, guid));
        body.extend(tlv::encode(0x35, b"20300101"));
        body.extend(tlv::encode(0x3E, &[]));
        body.extend(tlv::encode(0xFE, &[]));
        body
    }

    fn ok(body: Vec<u8>) -> Vec<u8> {
        let mut r = body;
        r.extend([0x90, 0x00]);
        r
    }

    fn object(tag_hex: &str, body: &[u8]) -> (String, Vec<u8>) {
        (
            format!("00CB3FFF055C03{tag_hex}00"),
            ok(tlv::encode(0x53, body)),
        )
    }

    #[test]
    fn decodes_the_yubico_default_fascn() {
        let fascn = hex::decode(YKP_FASCN).unwrap();
        assert_eq!(
            decode_fascn(&fascn).as_deref(),
            Some("S9999F9999F999999F0F1F0000000000300001E")
        );
        assert_eq!(decode_fascn(&[0; 25]), None);
        assert_eq!(decode_fascn(&[1, 2, 3]), None);
    }

    #[test]
    fn parses_chuid_with_legacy_tags() {
        let guid = [7u8; 16];
        let mut body = tlv::encode(0xEE, &[0x00, 0x3B]);
        body.extend(tlv::encode(0x32, &[1, 2, 3, 4]));
        body.extend(chuid_body(&guid));
        let chuid = parse_chuid(&body).unwrap();
        assert_eq!(chuid.guid, Some(guid));
        assert_eq!(chuid.expiration.as_deref(), Some("2030-01-01"));
        assert_eq!(chuid.fascn.unwrap().len(), 25);
    }

    #[test]
    fn a_guid_of_the_wrong_size_is_malformed() {
        let body = tlv::encode(0x34, &[1, 2, 3]);
        assert!(matches!(parse_chuid(&body), Err(ReadError::Malformed(_))));
    }

    #[test]
    fn empty_certificate_slot_is_none() {
        let mut body = tlv::encode(0x70, &[]);
        body.extend(tlv::encode(0x71, &[0]));
        assert_eq!(parse_cert_container(&body, "9A").unwrap(), None);
    }

    #[test]
    fn reads_a_recorded_card_guided_by_key_history() {
        let guid = [0x11u8; 16];
        let cert = b"not really a certificate".to_vec();
        let mut cert_obj = tlv::encode(0x70, &cert);
        cert_obj.extend(tlv::encode(0x71, &[0]));
        cert_obj.extend(tlv::encode(0xFE, &[]));
        let mut history = tlv::encode(0xC1, &[1]);
        history.extend(tlv::encode(0xC2, &[0]));
        let mut t = Replay::new(&[
            (
                "00A4040009A0000003080000100000".into(),
                ok(vec![0x61, 0x03, 0x4F, 0x01, 0x00]),
            ),
            object("5FC102", &chuid_body(&guid)),
            object("5FC105", &cert_obj),
            ("00CB3FFF055C035FC10A00".into(), vec![0x6A, 0x82]),
            ("00CB3FFF055C035FC10B00".into(), vec![0x6A, 0x82]),
            ("00CB3FFF055C035FC10100".into(), vec![0x69, 0x82]),
            object("5FC10C", &history),
            object("5FC10D", &cert_obj),
            ("00FD000000".into(), ok(vec![5, 4, 3])),
            ("00F8000000".into(), ok(vec![0x00, 0xAE, 0x17, 0xCB])),
        ]);
        let clock = SteppingClock::new(Duration::ZERO);
        let mut ch = Channel::new(&mut t, false, clock.now() + Duration::from_secs(5), &clock);
        assert!(select(&mut ch).unwrap());
        let (details, data) = read(&mut ch).unwrap();
        // SELECT, CHUID, 4 slots, key history, 1 retired, version, serial, the CHUID again.
        assert_eq!(ch.apdu_count(), 11);
        assert_eq!(data.card_id, Some(guid));
        assert_eq!(data.serial_number.as_deref(), Some("11409355"));
        assert_eq!(details.yubikey_version.as_deref(), Some("5.4.3"));
        assert_eq!(details.unreadable_slots, ["9E: 6982"]);
        let slots: Vec<_> = data.certificates.iter().map(|c| c.slot.as_str()).collect();
        assert_eq!(slots, ["9A", "82"]);
        // Only the one retired slot that the key history announces was read.
        assert!(!t
            .sent
            .iter()
            .any(|c| c.ends_with(&[0x5F, 0xC1, 0x0E, 0x00])));
    }

    #[test]
    fn without_key_history_all_retired_slots_are_probed_and_6d00_is_ignored() {
        let mut t = Replay::new(&[("00A4040009A0000003080000100000", ok(vec![]))]);
        // Every GET DATA gets the replay's default 6D00 except SELECT; switch to 6A82.
        for n in 0..=0x20u8 {
            t.answers.insert(
                hex::decode(format!("00CB3FFF055C035FC1{n:02X}00")).unwrap(),
                vec![0x6A, 0x82],
            );
        }
        let clock = SteppingClock::new(Duration::ZERO);
        let mut ch = Channel::new(&mut t, false, clock.now() + Duration::from_secs(5), &clock);
        assert!(select(&mut ch).unwrap());
        let (details, data) = read(&mut ch).unwrap();
        // SELECT, CHUID, 4 active, key history, 20 retired, GET VERSION.
        assert_eq!(ch.apdu_count(), 28);
        assert!(data.certificates.is_empty());
        assert_eq!(details.yubikey_version, None);
        assert_eq!(data.card_id, None);
    }

    #[test]
    fn an_older_yubikey_gives_its_serial_through_the_otp_applet() {
        let mut t = Replay::new(&[
            ("00FD000000", ok(vec![4, 3, 7])),
            ("00A4040008A00000052720010100", ok(vec![])),
            ("00011000", ok(vec![0x00, 0x12, 0xD6, 0x87])),
            ("00A4040009A0000003080000100000", ok(vec![])),
        ]);
        let clock = SteppingClock::new(Duration::ZERO);
        let mut ch = Channel::new(&mut t, false, clock.now() + Duration::from_secs(5), &clock);
        let mut details = PivDetails::default();
        let mut data = AppletData::default();
        read_yubikey(&mut ch, &mut details, &mut data).unwrap();
        assert_eq!(details.yubikey_version.as_deref(), Some("4.3.7"));
        assert_eq!(data.serial_number.as_deref(), Some("1234567"));
        // PIV is selected again afterwards; GET SERIAL (F8) is never sent to firmware 4.
        assert_eq!(t.sent.last().map(|c| c[1]), Some(0xA4));
        assert!(!t.sent.iter().any(|c| c[1] == 0xF8));
    }

    #[test]
    fn a_wrong_outer_tag_is_malformed() {
        let mut t = Replay::new(&[("00CB3FFF055C035FC10200", ok(tlv::encode(0x54, &[1])))]);
        let clock = SteppingClock::new(Duration::ZERO);
        let mut ch = Channel::new(&mut t, false, clock.now() + Duration::from_secs(5), &clock);
        let mut details = PivDetails::default();
        assert!(matches!(
            get_object(&mut ch, TAG_CHUID, "CHUID", &mut details),
            Err(ReadError::Malformed(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse_chuid(&data);
            let _ = parse_key_history(&data);
            let _ = parse_cert_container(&data, "9A");
            let _ = decode_fascn(&data);
        }
    }
}
