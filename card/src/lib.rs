//! The card side of cardbridge, free of I/O: ATR parsing, BER-TLV, the PIV, GIDS and IDPrime
//! applets, certificate details, and [`read_card`], which turns a [`Transport`] into a [`Card`] snapshot.
//!
//! A card is untrusted input. Everything here works on bounded byte slices and returns a typed
//! [`ReadError`] for anything unexpected; nothing panics on card bytes.
//!
//! This crate does no I/O of its own, and the compiler holds it to that: it does not depend on
//! PC/SC, it opens no file, and it reads no clock. The card arrives through a [`Transport`],
//! time through a [`Clock`], and the card-name list as text (see [`names`]).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod apdu;
pub mod atr;
pub mod cert;
pub mod compress;
pub mod gids;
pub mod idprime;
pub mod minidriver;
pub mod names;
pub mod piv;
pub mod tlv;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Where a read takes its time from. The caller passes the system clock; tests pass one that
/// moves when they say, so the deadline rules are checked without waiting.
pub trait Clock {
    /// Monotonic time, for the read deadline and `read_ms`.
    fn now(&self) -> Instant;
    /// Wall-clock time, for `read_at`.
    fn now_utc(&self) -> OffsetDateTime;
}

pub use apdu::{Channel, Transport, TransportError};
pub use atr::AtrInfo;
pub use cert::CertificateInfo;

/// Why a card could not be read. Each variant has a stable [`code`](ReadError::code) for the
/// JSON output and for metrics.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReadError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the card answered {sw:04X} ({}) to {command}", apdu::describe_sw(*sw))]
    Status { command: &'static str, sw: u16 },
    #[error("malformed card data: {0}")]
    Malformed(String),
    #[error("an object on the card is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("the card did not finish answering before the read deadline")]
    Deadline,
    /// The card's identity read again at the end of the read is not the one read at its start:
    /// the card was pulled and another put in between two APDUs, before pcscd noticed, so the
    /// rest of the read reached the other card. Nothing of such a read may pass for either card.
    #[error("the card was replaced during the read (its identity at the end is not the one at the start)")]
    CardReplaced,
}

/// What kind of failure a [`ReadError`] is, for code that acts on it (the engine, the reader
/// loop) without comparing strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadErrorKind {
    CardRemoved,
    CardReset,
    PcscUnavailable,
    ReaderError,
    UnexpectedStatus,
    Malformed,
    TooLarge,
    Timeout,
}

impl ReadErrorKind {
    /// The stable code of the JSON output and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadErrorKind::CardRemoved => "card_removed",
            ReadErrorKind::CardReset => "card_reset",
            ReadErrorKind::PcscUnavailable => "pcsc_unavailable",
            ReadErrorKind::ReaderError => "reader_error",
            ReadErrorKind::UnexpectedStatus => "unexpected_status",
            ReadErrorKind::Malformed => "malformed",
            ReadErrorKind::TooLarge => "too_large",
            ReadErrorKind::Timeout => "timeout",
        }
    }
}

impl ReadError {
    pub fn kind(&self) -> ReadErrorKind {
        match self {
            ReadError::Transport(TransportError::CardRemoved) => ReadErrorKind::CardRemoved,
            ReadError::Transport(TransportError::CardReset) => ReadErrorKind::CardReset,
            ReadError::Transport(TransportError::ServiceUnavailable(_)) => {
                ReadErrorKind::PcscUnavailable
            }
            ReadError::Transport(TransportError::Failed(_)) => ReadErrorKind::ReaderError,
            ReadError::Status { .. } => ReadErrorKind::UnexpectedStatus,
            ReadError::Malformed(_) => ReadErrorKind::Malformed,
            ReadError::TooLarge { .. } => ReadErrorKind::TooLarge,
            ReadError::Deadline => ReadErrorKind::Timeout,
            // The card that was read is gone: what acts on removals (the reader worker reads
            // the slot again) is what a replacement needs.
            ReadError::CardReplaced => ReadErrorKind::CardRemoved,
        }
    }

    pub fn code(&self) -> &'static str {
        self.kind().as_str()
    }

    /// Whether the read cannot go on (the card is gone, pcscd is, or time is up), as opposed to
    /// one object that is refused or malformed, which the rest of the card can be read past.
    pub fn ends_the_read(&self) -> bool {
        matches!(self, ReadError::Transport(_) | ReadError::Deadline)
    }
}

/// The error part of a [`Card`] that failed to read: its code and message in the JSON, its
/// kind for the code that acts on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardError {
    /// Written as the stable code (`timeout`, `card_removed`…).
    #[serde(rename = "code")]
    pub kind: ReadErrorKind,
    pub message: String,
}

impl CardError {
    /// The stable code of the JSON output and the metrics.
    pub fn code(&self) -> &'static str {
        self.kind.as_str()
    }
}

impl From<&ReadError> for CardError {
    fn from(e: &ReadError) -> Self {
        CardError {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// Which applet answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CardKind {
    Piv,
    Gids,
    Idprime,
    Unknown,
}

impl CardKind {
    /// The family's name in sentences.
    fn display_name(self) -> &'static str {
        match self {
            CardKind::Piv => "PIV",
            CardKind::Gids => "GIDS",
            CardKind::Idprime => "IDPrime",
            CardKind::Unknown => "unknown",
        }
    }

    /// The AID its SELECT names, in hex.
    fn aid_hex(self) -> String {
        match self {
            CardKind::Piv => hex::encode_upper(piv::AID),
            CardKind::Gids => gids::AID_HEX.to_string(),
            CardKind::Idprime => hex::encode_upper(idprime::AID),
            CardKind::Unknown => String::new(),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CardKind::Piv => "piv",
            CardKind::Gids => "gids",
            CardKind::Idprime => "idprime",
            CardKind::Unknown => "unknown",
        }
    }
}

/// A snapshot of one card, exactly as `scan --json`, the API and events show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Card {
    pub reader: String,
    pub atr: String,
    pub atr_info: AtrInfo,
    pub kind: CardKind,
    /// Hex of the 16-byte minidriver card identifier (PIV CHUID GUID, GIDS and IDPrime
    /// `cardid`).
    pub card_id: Option<String>,
    /// The same 16 bytes as a GUID string, in RFC 4122 byte order.
    pub card_guid: Option<String>,
    /// Vendor serial number when the card exposes one: a YubiKey's (decimal), an IDPrime chip's
    /// (CPLC IC serial, hex).
    pub serial_number: Option<String>,
    pub piv: Option<piv::PivDetails>,
    pub gids: Option<gids::GidsDetails>,
    #[serde(default)]
    pub idprime: Option<idprime::IdprimeDetails>,
    pub certificates: Vec<CertificateInfo>,
    /// What a person should know about a card that read but is odd: a blank applet, a file
    /// that could not be read, the applets tried on a card none of them answered.
    #[serde(default)]
    pub notes: Vec<String>,
    pub read_at: String,
    pub read_ms: u64,
    pub apdu_count: u32,
    /// Set when the read failed; the applet details and certificates are then left empty,
    /// because a partial read must never pass for the card's content.
    pub error: Option<CardError>,
}

impl Card {
    /// A card entry for a reader whose card could not even be connected to, at `read_at`.
    pub fn failed(reader: &str, atr: &[u8], error: &ReadError, read_at: OffsetDateTime) -> Card {
        let mut card = Card::empty(reader, atr, read_at);
        card.error = Some(error.into());
        card
    }

    fn empty(reader: &str, atr: &[u8], read_at: OffsetDateTime) -> Card {
        Card {
            reader: reader.to_string(),
            atr: hex::encode_upper(atr),
            atr_info: atr::parse(atr),
            kind: CardKind::Unknown,
            card_id: None,
            card_guid: None,
            serial_number: None,
            piv: None,
            gids: None,
            idprime: None,
            certificates: Vec::new(),
            notes: Vec::new(),
            read_at: rfc3339(read_at),
            read_ms: 0,
            apdu_count: 0,
            error: None,
        }
    }
}

/// How to read a card.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// The whole read must finish within this time, or it fails with `timeout`.
    pub timeout: Duration,
    /// Whether the reader accepts extended-length APDUs; they are used only when the ATR
    /// announces them too.
    pub reader_extended_length: bool,
    /// Where to look up card names (see [`names`]); `None` disables the lookup. The lookup reads
    /// a local file, so the PC/SC layer does it after releasing the card.
    pub smartcard_list: Option<PathBuf>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            timeout: Duration::from_secs(10),
            reader_extended_length: true,
            smartcard_list: Some(PathBuf::from(names::SYSTEM_LIST)),
        }
    }
}

/// What an applet reader found: the parts of [`Card`] that depend on the applet.
#[derive(Debug, Default)]
pub struct AppletData {
    pub card_id: Option<[u8; 16]>,
    pub serial_number: Option<String>,
    pub certificates: Vec<CertificateInfo>,
    pub notes: Vec<String>,
}

/// Reads the card behind `transport`: identifies the applet (PIV, GIDS, then IDPrime; the
/// family the ATR points to first) and reads its identity and certificates. Never fails: errors
/// are recorded in the returned card.
pub fn read_card(
    transport: &mut dyn Transport,
    reader: &str,
    atr: &[u8],
    options: &ReadOptions,
    clock: &dyn Clock,
) -> Card {
    let started = clock.now();
    let mut card = Card::empty(reader, atr, clock.now_utc());
    let extended = card.atr_info.extended_length && options.reader_extended_length;
    let mut channel = Channel::new(transport, extended, started + options.timeout, clock);
    let order = applet_order(atr, &card.atr_info);

    let result = identify_and_read(&mut channel, &mut card, atr, order);
    card.apdu_count = channel.apdu_count();
    match result {
        Ok(data) => {
            card.card_id = data.card_id.map(hex::encode_upper);
            card.card_guid = data.card_id.map(|id| guid_string(&id));
            card.serial_number = data.serial_number;
            card.certificates = data.certificates;
            card.notes = data.notes;
            card.notes.extend(hidden_character_notes(&card));
        }
        Err(e) => {
            card.piv = None;
            card.gids = None;
            card.idprime = None;
            card.error = Some((&e).into());
        }
    }
    card.read_ms = clock.now().saturating_duration_since(started).as_millis() as u64;
    card
}

/// Ends a read: `rest` is how the read after the identity went, `again` reads the identity once
/// more. A different identity, or a refused or malformed answer to the same command that worked
/// at the start, means another card answered: [`ReadError::CardReplaced`], whatever `rest` was.
/// Checked after a failed `rest` too, so that a read cut short by the other card's refusals is
/// reported as the replacement it is (and the new card read) rather than as a broken card.
pub(crate) fn end_of_read<T: PartialEq>(
    rest: Result<(), ReadError>,
    before: &T,
    again: impl FnOnce() -> Result<T, ReadError>,
) -> Result<(), ReadError> {
    if rest.as_ref().is_err_and(ReadError::ends_the_read) {
        return rest;
    }
    match again() {
        Ok(now) if now == *before => rest,
        Err(e) if e.ends_the_read() => Err(e),
        _ => Err(ReadError::CardReplaced),
    }
}

/// Characters that change the direction of the text around them or are not drawn at all: bidi
/// controls and marks, zero-width characters, the soft hyphen, the byte-order mark. Text from a
/// card that holds one can be made to read differently from what it is (U+202E turns
/// `Mallory 3A2B1C` around), so each field holding one gets a note naming it.
pub fn hidden_characters(text: &str) -> Vec<char> {
    let mut found: Vec<char> = text
        .chars()
        .filter(|c| {
            matches!(*c as u32, 0xAD | 0x61C | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E
                | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF)
        })
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// One note for each text field of `card` a person reads that holds [`hidden_characters`].
fn hidden_character_notes(card: &Card) -> Vec<String> {
    let mut fields: Vec<(String, &str)> = Vec::new();
    for c in &card.certificates {
        let named = |what: &str| format!("the {what} of the certificate in {}", c.slot);
        fields.push((named("label"), &c.label));
        for (what, value) in [
            ("subject", &c.subject),
            ("issuer", &c.issuer),
            ("template", &c.template),
        ] {
            if let Some(value) = value {
                fields.push((named(what), value));
            }
        }
    }
    if let Some(label) = card.idprime.as_ref().and_then(|d| d.token_label.as_deref()) {
        fields.push(("the token label".to_string(), label));
    }
    fields
        .into_iter()
        .filter_map(|(field, text)| hidden_characters_note(&field, text))
        .collect()
}

/// What a person reading `field` should know when it holds [`hidden_characters`] (a card's
/// note, a reconciliation's finding about a server's text); `None` when it holds none.
pub fn hidden_characters_note(field: &str, text: &str) -> Option<String> {
    let found = hidden_characters(text);
    (!found.is_empty()).then(|| {
        let codes: Vec<String> = found
            .iter()
            .map(|c| format!("U+{:04X}", *c as u32))
            .collect();
        format!(
            "{field} holds characters that reverse or hide text ({}): show it isolated, with them visible",
            codes.join(", ")
        )
    })
}

/// The order the applets are tried in: the family the ATR points to (GIDS AID in the
/// historical bytes, an IDPrime ATR) first, then PIV, GIDS, IDPrime. Each miss costs one SELECT.
fn applet_order(atr: &[u8], info: &AtrInfo) -> [CardKind; 3] {
    let gids_aid = info
        .application_id
        .as_deref()
        .is_some_and(|aid| aid.starts_with(gids::AID_HEX));
    let historical = hex::decode(&info.historical_bytes).unwrap_or_default();
    if gids_aid {
        [CardKind::Gids, CardKind::Piv, CardKind::Idprime]
    } else if idprime::atr_suggests_idprime(atr, &historical) {
        [CardKind::Idprime, CardKind::Piv, CardKind::Gids]
    } else {
        [CardKind::Piv, CardKind::Gids, CardKind::Idprime]
    }
}

fn identify_and_read(
    channel: &mut Channel<'_>,
    card: &mut Card,
    atr: &[u8],
    order: [CardKind; 3],
) -> Result<AppletData, ReadError> {
    for kind in order {
        match kind {
            CardKind::Piv if piv::select(channel)? => {
                card.kind = CardKind::Piv;
                let (details, data) = piv::read(channel)?;
                card.piv = Some(details);
                return Ok(data);
            }
            CardKind::Gids => {
                if let Some(version) = gids::select(channel)? {
                    card.kind = CardKind::Gids;
                    let (details, data) = gids::read(channel, version)?;
                    card.gids = Some(details);
                    return Ok(data);
                }
            }
            CardKind::Idprime if idprime::select(channel)? => {
                card.kind = CardKind::Idprime;
                let (details, data) = idprime::read(channel, atr)?;
                card.idprime = Some(details);
                return Ok(data);
            }
            _ => {}
        }
    }
    let tried: Vec<String> = order
        .iter()
        .map(|kind| format!("{} ({})", kind.display_name(), kind.aid_hex()))
        .collect();
    Ok(AppletData {
        notes: vec![format!(
            "no applet cardbridge reads answered; tried {}",
            tried.join(", ")
        )],
        ..AppletData::default()
    })
}

/// Formats 16 bytes as a GUID string in RFC 4122 (big-endian) order, lower case like MIM CM.
pub fn guid_string(bytes: &[u8; 16]) -> String {
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Formats a time the way every timestamp in cardbridge's JSON is written (RFC 3339, UTC).
pub fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

/// A [`Transport`] that replays recorded responses and a [`Clock`] that moves when read, for
/// the protocol unit tests.
#[cfg(test)]
pub(crate) mod replay {
    use super::{Clock, Transport, TransportError};
    use std::cell::Cell;
    use std::collections::HashMap;
    use std::time::{Duration, Instant};
    use time::OffsetDateTime;

    /// Moves `step` forward every time it is read; its wall clock is a fixed instant.
    pub struct SteppingClock {
        at: Cell<Instant>,
        step: Duration,
    }

    impl SteppingClock {
        pub fn new(step: Duration) -> Self {
            SteppingClock {
                at: Cell::new(Instant::now()),
                step,
            }
        }

        /// The wall-clock time every read with this clock reports.
        pub fn wall() -> OffsetDateTime {
            OffsetDateTime::from_unix_timestamp(1_795_000_000).unwrap()
        }
    }

    impl Clock for SteppingClock {
        fn now(&self) -> Instant {
            let now = self.at.get();
            self.at.set(now + self.step);
            now
        }

        fn now_utc(&self) -> OffsetDateTime {
            Self::wall()
        }
    }

    /// Answers each command from a table (command hex → response hex); unknown commands get
    /// `6D00`. Records what was sent.
    pub struct Replay {
        pub answers: HashMap<Vec<u8>, Vec<u8>>,
        pub sent: Vec<Vec<u8>>,
    }

    impl Replay {
        pub fn new<S: AsRef<str>>(pairs: &[(S, Vec<u8>)]) -> Self {
            Replay {
                answers: pairs
                    .iter()
                    .map(|(c, r)| (hex::decode(c.as_ref().replace(' ', "")).unwrap(), r.clone()))
                    .collect(),
                sent: Vec::new(),
            }
        }
    }

    impl Transport for Replay {
        fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
            self.sent.push(command.to_vec());
            Ok(self
                .answers
                .get(command)
                .cloned()
                .unwrap_or_else(|| vec![0x6D, 0x00]))
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn hidden_characters_are_named_once_each() {
        assert_eq!(
            hidden_characters("Mallory \u{202E}3A2B1C\u{200B}\u{202E}"),
            ['\u{200B}', '\u{202E}']
        );
        assert!(hidden_characters("Jürgen Müller, עברית, 漢字").is_empty());
    }
    use super::*;

    #[test]
    fn guid_string_is_rfc4122_order() {
        let bytes = [
            0xd1, 0xef, 0x68, 0x69, 0x55, 0x17, 0x42, 0xa0, 0x8f, 0x05, 0x16, 0xca, 0x1a, 0x0b,
            0x83, 0x4d,
        ];
        assert_eq!(guid_string(&bytes), "d1ef6869-5517-42a0-8f05-16ca1a0b834d");
    }

    #[test]
    fn a_card_with_no_known_applet_is_unknown_and_says_what_was_tried() {
        let mut t = replay::Replay::new::<&str>(&[]);
        let options = ReadOptions {
            smartcard_list: None,
            ..ReadOptions::default()
        };
        let clock = replay::SteppingClock::new(Duration::from_millis(7));
        let card = read_card(&mut t, "r", &[0x3B, 0x02, 0x14, 0x50], &options, &clock);
        assert_eq!(card.kind, CardKind::Unknown);
        assert_eq!(card.error, None);
        assert_eq!(card.apdu_count, 3, "one SELECT per family");
        assert_eq!(card.read_at, "2026-11-18T11:06:40Z");
        // Read at the start, before each of the three commands, and at the end.
        assert_eq!(card.read_ms, 28);
        assert_eq!(
            card.notes,
            [
                "no applet cardbridge reads answered; tried PIV (A00000030800001000), GIDS \
              (A00000039742544659), IDPrime (A000000018800000000662)"
            ]
        );
    }

    #[test]
    fn a_read_that_runs_past_its_timeout_fails_with_timeout_and_no_content() {
        let mut t = replay::Replay::new::<&str>(&[]);
        let options = ReadOptions {
            timeout: Duration::from_secs(1),
            smartcard_list: None,
            ..ReadOptions::default()
        };
        let clock = replay::SteppingClock::new(Duration::from_millis(600));
        let card = read_card(&mut t, "r", &[0x3B, 0x02, 0x14, 0x50], &options, &clock);
        let error = card.error.expect("the read must fail");
        assert_eq!(error.kind, ReadErrorKind::Timeout);
        assert_eq!(
            card.apdu_count, 1,
            "the second command is past the deadline"
        );
        assert!(card.piv.is_none() && card.certificates.is_empty());
    }
}
