//! Answer-To-Reset parsing (ISO/IEC 7816-3 §8, historical bytes per ISO/IEC 7816-4 §8).
//!
//! The parser never fails on a strange ATR: it reports what it could decode and says what was
//! wrong in `problems`, because an odd ATR is still worth showing to an administrator.

use serde::{Deserialize, Serialize};

/// What the ATR says about the card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtrInfo {
    /// `direct` (TS = 3B) or `inverse` (TS = 3F); null when TS is neither.
    pub convention: Option<Convention>,
    /// Protocols offered, e.g. `["T=0", "T=1"]` (T=0 when no TD byte names one).
    pub protocols: Vec<String>,
    /// Clock rate conversion factor and baud rate adjustment from TA1 (defaults 372/1).
    pub fi: Option<u16>,
    pub di: Option<u16>,
    /// T=1 maximum information field size of the card (first TA after a TD announcing T=1).
    pub ifsc: Option<u8>,
    pub historical_bytes: String,
    /// How the historical bytes are laid out.
    pub historical_format: HistoricalFormat,
    /// The COMPACT-TLV objects of the historical bytes, when they are in that format.
    pub compact_tlv: Vec<CompactTlv>,
    /// Card capabilities (COMPACT-TLV tag 7, third byte): the card accepts extended Lc/Le.
    pub extended_length: bool,
    /// Card capabilities: the card accepts command chaining.
    pub command_chaining: bool,
    /// Application identifier announced in the historical bytes (COMPACT-TLV tag F).
    pub application_id: Option<String>,
    /// Whether the check byte was present and correct; null when the ATR needs none (T=0 only).
    pub tck_valid: Option<bool>,
    /// First description of the card in the system's `smartcard_list.txt`, when found.
    pub name: Option<String>,
    /// Everything that did not follow ISO 7816-3.
    pub problems: Vec<String>,
}

/// The bit convention the TS byte announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Convention {
    Direct,
    Inverse,
}

/// The layout of the historical bytes (ISO/IEC 7816-4 §8.1.1, category indicator byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HistoricalFormat {
    CompactTlv,
    CompactTlvWithStatus,
    DirReference,
    Proprietary,
    None,
}

/// One COMPACT-TLV object of the historical bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactTlv {
    pub tag: u8,
    pub value: String,
}

const FI: [Option<u16>; 16] = [
    Some(372),
    Some(372),
    Some(558),
    Some(744),
    Some(1116),
    Some(1488),
    Some(1860),
    None,
    None,
    Some(512),
    Some(768),
    Some(1024),
    Some(1536),
    Some(2048),
    None,
    None,
];
const DI: [Option<u16>; 16] = [
    None,
    Some(1),
    Some(2),
    Some(4),
    Some(8),
    Some(16),
    Some(32),
    Some(64),
    Some(12),
    Some(20),
    None,
    None,
    None,
    None,
    None,
    None,
];

/// Parses an ATR. `name` is left empty; see [`crate::names`].
pub fn parse(atr: &[u8]) -> AtrInfo {
    let mut info = AtrInfo {
        convention: None,
        protocols: Vec::new(),
        fi: Some(372),
        di: Some(1),
        ifsc: None,
        historical_bytes: String::new(),
        historical_format: HistoricalFormat::None,
        compact_tlv: Vec::new(),
        extended_length: false,
        command_chaining: false,
        application_id: None,
        tck_valid: None,
        name: None,
        problems: Vec::new(),
    };
    if atr.len() > 33 {
        info.problems.push(format!(
            "ATR is {} bytes, more than the 33 ISO 7816-3 allows",
            atr.len()
        ));
    }
    let Some((&ts, rest)) = atr.split_first() else {
        info.problems.push("ATR is empty".into());
        return info;
    };
    info.convention = match ts {
        0x3B => Some(Convention::Direct),
        0x3F => Some(Convention::Inverse),
        _ => {
            info.problems
                .push(format!("TS byte {ts:02X} is neither 3B nor 3F"));
            None
        }
    };
    let Some((&t0, rest)) = rest.split_first() else {
        info.problems.push("ATR ends before T0".into());
        return info;
    };
    let Some((protocols, rest)) = interface_bytes(t0, rest, &mut info) else {
        return info;
    };
    // T=15 carries global bytes, not a transmission protocol.
    info.protocols = protocols
        .iter()
        .filter(|&&p| p != 15)
        .map(|p| format!("T={p}"))
        .collect();
    let k = usize::from(t0 & 0x0F);
    if rest.len() < k {
        info.problems.push(format!(
            "ATR announces {k} historical bytes but only {} remain",
            rest.len()
        ));
        return info;
    }
    let (historical, tail) = rest.split_at(k);
    info.historical_bytes = hex::encode_upper(historical);
    parse_historical(historical, &mut info);
    let needs_tck = protocols.iter().any(|&p| p != 0);
    check_tck(atr, needs_tck, tail, &mut info);
    info
}

/// Walks the interface-byte groups after T0: Fi/Di from TA1, IFSC from the first TA of a T=1
/// group from group 3 on, and the protocols the TD bytes name (T=0 when none does). Returns
/// the protocols and the bytes after the groups, or `None` (with a problem noted) when the ATR
/// ends inside a group.
fn interface_bytes<'a>(
    t0: u8,
    mut rest: &'a [u8],
    info: &mut AtrInfo,
) -> Option<(Vec<u8>, &'a [u8])> {
    let mut presence = t0 >> 4;
    let mut protocols: Vec<u8> = Vec::new();
    let mut group = 1;
    // The protocol that the TA/TB/TC bytes of the current group (from group 3 on) refer to.
    let mut last_protocol: Option<u8> = None;
    loop {
        let take = |bit: u8, rest: &mut &[u8]| -> Result<Option<u8>, ()> {
            if presence & bit == 0 {
                return Ok(None);
            }
            match rest.split_first() {
                Some((&b, tail)) => {
                    *rest = tail;
                    Ok(Some(b))
                }
                None => Err(()),
            }
        };
        let (Ok(ta), Ok(_tb), Ok(_tc), Ok(td)) = (
            take(0x1, &mut rest),
            take(0x2, &mut rest),
            take(0x4, &mut rest),
            take(0x8, &mut rest),
        ) else {
            info.problems
                .push(format!("ATR ends inside interface bytes of group {group}"));
            return None;
        };
        if group == 1 {
            if let Some(ta1) = ta {
                info.fi = FI[usize::from(ta1 >> 4)];
                info.di = DI[usize::from(ta1 & 0x0F)];
            }
        } else if group >= 3 && last_protocol == Some(1) && info.ifsc.is_none() {
            info.ifsc = ta;
        }
        let Some(td) = td else { break };
        let protocol = td & 0x0F;
        if !protocols.contains(&protocol) {
            protocols.push(protocol);
        }
        last_protocol = Some(protocol);
        presence = td >> 4;
        group += 1;
    }
    if protocols.is_empty() {
        protocols.push(0);
    }
    Some((protocols, rest))
}

/// The check byte: absent for T=0 only; present, the XOR of T0..TCK must be zero.
fn check_tck(atr: &[u8], needs_tck: bool, tail: &[u8], info: &mut AtrInfo) {
    match (needs_tck, tail) {
        (false, []) => {}
        (false, extra) => info.problems.push(format!(
            "{} unexpected bytes after the historical bytes",
            extra.len()
        )),
        (true, []) => {
            info.tck_valid = Some(false);
            info.problems.push("TCK is missing".into());
        }
        (true, [_tck]) => {
            let xor = atr.iter().skip(1).fold(0u8, |acc, b| acc ^ b);
            info.tck_valid = Some(xor == 0);
            if xor != 0 {
                info.problems.push("TCK does not match".into());
            }
        }
        (true, extra) => {
            info.tck_valid = Some(false);
            info.problems.push(format!(
                "{} unexpected bytes after the historical bytes",
                extra.len() - 1
            ));
        }
    }
}

fn parse_historical(historical: &[u8], info: &mut AtrInfo) {
    let Some((&category, body)) = historical.split_first() else {
        return;
    };
    let objects = match category {
        0x80 => {
            info.historical_format = HistoricalFormat::CompactTlv;
            body
        }
        0x00 if body.len() >= 3 => {
            // The last three bytes are the status indicator (LCS, SW1, SW2).
            info.historical_format = HistoricalFormat::CompactTlvWithStatus;
            &body[..body.len() - 3]
        }
        0x10 => {
            info.historical_format = HistoricalFormat::DirReference;
            return;
        }
        _ => {
            info.historical_format = HistoricalFormat::Proprietary;
            return;
        }
    };
    let mut rest = objects;
    while let Some((&tl, tail)) = rest.split_first() {
        let (tag, len) = (tl >> 4, usize::from(tl & 0x0F));
        if tail.len() < len {
            info.problems.push(format!(
                "COMPACT-TLV object {tag:X} claims {len} bytes, {} remain",
                tail.len()
            ));
            break;
        }
        let (value, next) = tail.split_at(len);
        rest = next;
        match tag {
            0x7 if value.len() >= 3 => {
                // Third software function table byte: b8 command chaining, b7 extended Lc/Le.
                info.command_chaining = value[2] & 0x80 != 0;
                info.extended_length = value[2] & 0x40 != 0;
            }
            0xF => info.application_id = Some(hex::encode_upper(value)),
            _ => {}
        }
        info.compact_tlv.push(CompactTlv {
            tag,
            value: hex::encode_upper(value),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn atr(hex: &str) -> Vec<u8> {
        hex::decode(hex.replace(' ', "")).unwrap()
    }

    #[test]
    fn yubikey_5() {
        let info = parse(&atr(
            "3B FD 13 00 00 81 31 FE 15 80 73 C0 21 C0 57 59 75 62 69 4B 65 79 40",
        ));
        assert_eq!(info.convention, Some(Convention::Direct));
        assert_eq!(info.protocols, ["T=1"]);
        assert_eq!(info.fi, Some(372));
        assert_eq!(info.di, Some(4));
        assert_eq!(info.ifsc, Some(0xFE));
        assert_eq!(info.historical_bytes, "8073C021C057597562694B6579");
        assert_eq!(info.historical_format, HistoricalFormat::CompactTlv);
        assert!(info.extended_length);
        assert!(info.command_chaining);
        assert_eq!(info.tck_valid, Some(true));
        assert!(info.problems.is_empty(), "{:?}", info.problems);
    }

    #[test]
    fn microsoft_virtual_smart_card_announces_the_gids_aid() {
        let info = parse(&atr("3B 8D 01 80 FB A0 00 00 03 97 42 54 46 59 03 01 C8"));
        assert_eq!(info.protocols, ["T=1"]);
        assert_eq!(
            info.application_id.as_deref(),
            Some("A000000397425446590301")
        );
        assert!(!info.extended_length);
        assert_eq!(info.tck_valid, Some(true));
    }

    #[test]
    fn proprietary_historical_bytes_and_t0_t1() {
        let info = parse(&atr(
            "3B FA 18 00 00 81 31 FE 45 4A 43 4F 50 33 31 56 32 33 32 98",
        ));
        assert_eq!(info.historical_format, HistoricalFormat::Proprietary);
        assert_eq!(info.tck_valid, Some(true));
        let info = parse(&atr("3B 80 80 01 01"));
        assert_eq!(info.protocols, ["T=0", "T=1"]);
        assert_eq!(info.tck_valid, Some(true));
    }

    #[test]
    fn t0_only_has_no_tck() {
        let info = parse(&atr("3B 02 14 50"));
        assert_eq!(info.protocols, ["T=0"]);
        assert_eq!(info.tck_valid, None);
        assert!(info.problems.is_empty());
    }

    #[test]
    fn broken_atrs_are_reported_not_rejected() {
        let bad_tck = parse(&atr("3B 80 80 01 02"));
        assert_eq!(bad_tck.tck_valid, Some(false));
        let short = parse(&atr("3B FD 13"));
        assert!(!short.problems.is_empty());
        let ts = parse(&atr("12 00"));
        assert_eq!(ts.convention, None);
        assert!(parse(&[]).problems.iter().any(|p| p.contains("empty")));
        let hist = parse(&atr("3B 05 80 7F 01"));
        assert!(hist.problems.iter().any(|p| p.contains("historical")));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            let _ = parse(&data);
        }
    }
}
