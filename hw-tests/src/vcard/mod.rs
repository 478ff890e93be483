//! The virtual card: a PIV, GIDS or IDPrime applet as an APDU state machine, built from a
//! [`CardSpec`].
//!
//! It answers exactly what cardbridge (and OpenSC, for the cross-check) sends: SELECT, GET DATA,
//! GET RESPONSE, Yubico's GET VERSION / GET SERIAL, and for IDPrime SELECT FILE and READ BINARY
//! (see [`idprime`]). Answers longer than the command's Le are
//! chained with `61xx`; extended-length commands are accepted only when the spec says so (else
//! `6700`, as a card without extended length would answer). Faults are injected on demand.

use std::collections::HashMap;
use std::io::Write;

use anyhow::{Context as _, Result};
use cardbridge::card::tlv;
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use crate::certs::Issuer;

pub mod idprime;

/// Which applet the card carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Applet {
    Piv,
    Gids,
    Idprime,
}

/// How a certificate is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    None,
    Gzip,
    Zlib,
}

/// Faults the card can be told to commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faults {
    /// Close the connection when the first GET RESPONSE arrives: the card is pulled in the middle
    /// of a chained read.
    pub drop_mid_chain: bool,
    /// The CHUID's outer `53` length is larger than the data that follows.
    pub wrong_tlv_length: bool,
    /// The 9A certificate object claims a length of about two gigabytes.
    pub huge_length: bool,
    /// Slot 9A holds random bytes instead of a certificate.
    pub garbage_certificate: bool,
    /// Wait this long before every answer.
    pub slow_ms: u64,
    /// From the second SELECT of the PIV applet on, slots 9A and 9C answer with each other's
    /// certificate: a card whose content changed between two readers' reads.
    #[serde(default)]
    pub swap_certificates_after_first_read: bool,
    /// The first compressed certificate's checksum is broken, so it does not inflate.
    #[serde(default)]
    pub corrupt_compressed: bool,
    /// GIDS: the applet was never initialised (no masterfile: `6A82`).
    #[serde(default)]
    pub blank: bool,
    /// The status word every extended-length command gets (`6700` or `6D00`) although the ATR
    /// announces extended length.
    #[serde(default)]
    pub refuse_extended: Option<u16>,
    /// No applet answers its SELECT.
    #[serde(default)]
    pub no_applet: bool,
    /// From this many APDUs on, another card of the same kind answers (nothing selected, an id
    /// of its own): this card was pulled and that one put in between two APDUs, before pcscd
    /// polled the slot, as vpcd lets happen under load.
    #[serde(default)]
    pub replaced_after: Option<u64>,
}

/// What the card should contain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CardSpec {
    pub applet: Applet,
    /// PIV: active slots to fill (`9A`, `9C`, `9D`, `9E`) with their compression.
    pub slots: Vec<(u8, Compress)>,
    /// PIV: number of retired key-management certificates (slots 82 upward).
    pub retired: u8,
    /// PIV: whether the key-history object exists (announcing `retired`).
    pub key_history: bool,
    /// PIV: answer Yubico's GET VERSION (5.4.3) and GET SERIAL with this serial.
    pub yubikey_serial: Option<u32>,
    /// GIDS: number of containers, each with one key-exchange certificate.
    pub gids_containers: u8,
    /// Announce and accept extended-length APDUs.
    pub extended_length: bool,
    /// The 16-byte card id (PIV CHUID GUID or GIDS cardid); random when absent.
    pub card_id: Option<[u8; 16]>,
    /// Slots whose certificate is already expired (e.g. `9D`), to exercise validity checks.
    pub expired_slots: Vec<u8>,
    /// IDPrime: the model and its certificates.
    #[serde(default)]
    pub idprime: Option<idprime::Spec>,
    /// PIV: the holder's name in every certificate's CN (default `Contoso user, slot NN`).
    #[serde(default)]
    pub holder: Option<String>,
    pub faults: Faults,
}

impl CardSpec {
    /// A PIV card with 9A, 9C (gzip), 9D and one retired slot announced by the key history,
    /// YubiKey-style version and a serial of its own (two cards never share one, as two
    /// YubiKeys never do), extended length on: the benchmark card.
    pub fn piv_four_certs() -> CardSpec {
        CardSpec {
            applet: Applet::Piv,
            slots: vec![
                (0x9A, Compress::None),
                (0x9C, Compress::Gzip),
                (0x9D, Compress::None),
            ],
            retired: 1,
            key_history: true,
            yubikey_serial: Some(fastrand::u32(10_000_000..40_000_000)),
            gids_containers: 0,
            extended_length: true,
            card_id: None,
            expired_slots: Vec::new(),
            idprime: None,
            holder: None,
            faults: Faults::default(),
        }
    }

    /// An IDPrime card (T=0, short APDUs only).
    pub fn idprime(spec: idprime::Spec) -> CardSpec {
        CardSpec {
            applet: Applet::Idprime,
            idprime: Some(spec),
            ..CardSpec::gids_two_containers()
        }
    }

    /// A GIDS card with two containers.
    pub fn gids_two_containers() -> CardSpec {
        CardSpec {
            applet: Applet::Gids,
            slots: Vec::new(),
            retired: 0,
            key_history: false,
            yubikey_serial: None,
            gids_containers: 2,
            extended_length: false,
            card_id: None,
            expired_slots: Vec::new(),
            idprime: None,
            holder: None,
            faults: Faults::default(),
        }
    }
}

/// What the card holds, for tests to compare against (the truth file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Truth {
    pub atr: String,
    pub card_id: Option<String>,
    pub serial_number: Option<String>,
    pub certificates: Vec<TruthCert>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TruthCert {
    /// PIV key reference (`9A`…) or GIDS / IDPrime container name.
    pub slot: String,
    pub thumbprint: String,
    pub compressed: bool,
    pub der: String,
}

const PIV_AID_PREFIX: [u8; 5] = [0xA0, 0x00, 0x00, 0x03, 0x08];
const GIDS_AID: [u8; 9] = [0xA0, 0x00, 0x00, 0x03, 0x97, 0x42, 0x54, 0x46, 0x59];
const YUBICO_OTP_AID: [u8; 8] = [0xA0, 0x00, 0x00, 0x05, 0x27, 0x20, 0x01, 0x01];

/// Where a GET DATA finds its answer: PIV objects by tag, GIDS data objects by (EF, DO).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Piv(u32),
    Gids(u16, u16),
}

/// Yubico's GET METADATA (YubiKey 5.3+), as far as `ykman piv info` needs it: the PIN and PUK
/// (defaults, 3 tries), the management key (3DES, default); no key metadata for the slots
/// (6A88, as for an empty slot) and no biometrics.
fn yubikey_metadata(p2: u8) -> (Vec<u8>, u16) {
    match p2 {
        // Is-default 1, retries total 3 / remaining 3.
        0x80 | 0x81 => (vec![0x05, 0x01, 0x01, 0x06, 0x02, 0x03, 0x03], 0x9000),
        // Algorithm 3DES, policy (PIN never, touch never), is-default 1.
        0x9B => (
            vec![0x01, 0x01, 0x03, 0x02, 0x02, 0x00, 0x01, 0x05, 0x01, 0x01],
            0x9000,
        ),
        _ => (Vec::new(), 0x6A88),
    }
}

/// The card's content and its APDU state. A clone is the same card (the same id, keys and
/// certificates), to take out and put back.
#[derive(Clone)]
pub struct VirtualCard {
    pub atr: Vec<u8>,
    pub truth: Truth,
    spec: CardSpec,
    objects: HashMap<Key, Vec<u8>>,
    /// IDPrime: the EFs.
    files: Option<idprime::Files>,
    /// IDPrime: the EF the last SELECT FILE chose.
    current_ef: Option<u16>,
    selected: Option<Applet>,
    /// The rest of a chained answer, handed out by GET RESPONSE.
    pending: Vec<u8>,
    /// APDUs received, for benchmarks.
    pub apdus: u64,
    /// SELECTs of the PIV applet so far.
    piv_selects: u32,
    /// The card that answers after [`Faults::replaced_after`] APDUs.
    replacement: Option<Box<VirtualCard>>,
}

/// What the card does with one APDU.
pub enum Answer {
    Reply(Vec<u8>),
    /// Close the connection without answering (a pulled card).
    Drop,
}

impl VirtualCard {
    pub fn new(spec: CardSpec) -> Result<VirtualCard> {
        let card_id = match spec.card_id {
            Some(id) => id,
            None => random16()?,
        };
        let issuer = Issuer::new("Contoso Issuing CA 1")?;
        let mut objects = HashMap::new();
        let mut certs = Vec::new();
        let atr = atr_for(&spec);
        let mut files = None;
        match (spec.applet, &spec.idprime) {
            (Applet::Piv, _) => build_piv(&spec, &issuer, &card_id, &mut objects, &mut certs)?,
            (Applet::Gids, _) => build_gids(&spec, &issuer, &card_id, &mut objects, &mut certs)?,
            (Applet::Idprime, Some(card)) => {
                let built =
                    idprime::Files::build(card, &spec.faults, &issuer, &card_id, &mut certs)?;
                files = Some(built);
            }
            (Applet::Idprime, None) => anyhow::bail!("an IDPrime card spec needs `idprime`"),
        }
        let truth = Truth {
            atr: hex::encode_upper(&atr),
            card_id: Some(hex::encode_upper(card_id)),
            serial_number: match spec.applet {
                Applet::Piv => spec.yubikey_serial.map(|s| s.to_string()),
                Applet::Gids => None,
                Applet::Idprime => files.as_ref().map(|f| f.ic_serial.clone()),
            },
            certificates: certs,
        };
        let replacement = match spec.faults.replaced_after {
            Some(_) => {
                let mut other = spec.clone();
                other.card_id = None;
                other.yubikey_serial = other.yubikey_serial.map(|s| s.wrapping_add(1));
                other.faults.replaced_after = None;
                Some(Box::new(VirtualCard::new(other)?))
            }
            None => None,
        };
        Ok(VirtualCard {
            atr,
            truth,
            spec,
            objects,
            files,
            current_ef: None,
            selected: None,
            pending: Vec::new(),
            apdus: 0,
            piv_selects: 0,
            replacement,
        })
    }

    /// The same PIV card under another card id, fresh as if just made: the simulated year's
    /// tens of thousands of cards from a few, without a key pair each. Its certificates are
    /// the template's with the card id written into their serial numbers, and a YubiKey gets
    /// a serial number from the card id too, so that each card shares nothing with another,
    /// as real cards do (a shared one would make it another card's earlier self); the
    /// certificates' signatures no longer verify, which the card layer (it reports, it does
    /// not validate) never sees.
    pub fn with_card_id(&self, card_id: [u8; 16]) -> Result<VirtualCard> {
        if self.spec.applet != Applet::Piv || self.replacement.is_some() {
            anyhow::bail!("only a PIV card without a replacement takes another card id");
        }
        let mut card = self.clone();
        card.objects
            .insert(Key::Piv(0x5FC102), piv_chuid(&card.spec, &card_id)?);
        for cert in &mut card.truth.certificates {
            if cert.compressed {
                anyhow::bail!("a compressed certificate cannot be renumbered");
            }
            let der = hex::decode(&cert.der)?;
            let mut renumbered = der.clone();
            write_serial(&mut renumbered, &card_id)?;
            for object in card.objects.values_mut() {
                if let Some(at) = object.windows(der.len()).position(|w| w == der) {
                    object[at..at + der.len()].copy_from_slice(&renumbered);
                }
            }
            *cert = truth_cert(cert.slot.clone(), &renumbered, false);
        }
        card.truth.card_id = Some(hex::encode_upper(card_id));
        card.spec.card_id = Some(card_id);
        if card.spec.yubikey_serial.is_some() {
            let serial = u32::from_be_bytes([card_id[0], card_id[1], card_id[2], card_id[3]]);
            card.spec.yubikey_serial = Some(serial);
            card.truth.serial_number = Some(serial.to_string());
        }
        card.reset();
        card.apdus = 0;
        Ok(card)
    }

    /// What the card that replaces this one mid-read holds ([`Faults::replaced_after`]).
    pub fn replacement_truth(&self) -> Option<&Truth> {
        self.replacement.as_ref().map(|r| &r.truth)
    }

    pub fn slow_ms(&self) -> u64 {
        self.spec.faults.slow_ms
    }

    /// Power-on or reset: back to nothing selected.
    pub fn reset(&mut self) {
        if let Some(other) = self.replacement.as_mut() {
            other.reset();
        }
        self.selected = None;
        self.current_ef = None;
        self.pending.clear();
    }

    /// Processes one command APDU.
    pub fn process(&mut self, apdu: &[u8]) -> Answer {
        self.apdus += 1;
        if let (Some(after), Some(other)) = (self.spec.faults.replaced_after, &mut self.replacement)
        {
            if self.apdus > after {
                return other.process(apdu);
            }
        }
        let Some(cmd) = Command::parse(apdu) else {
            return Answer::Reply(vec![0x67, 0x00]);
        };
        if cmd.extended {
            match self.spec.faults.refuse_extended {
                Some(sw) => return Answer::Reply(sw.to_be_bytes().to_vec()),
                None if !self.spec.extended_length => return Answer::Reply(vec![0x67, 0x00]),
                None => {}
            }
        }
        if cmd.ins != 0xC0 {
            self.pending.clear();
        }
        let (body, sw) = match (cmd.ins, cmd.p1, cmd.p2) {
            (0xC0, 0, 0) => {
                if self.spec.faults.drop_mid_chain {
                    return Answer::Drop;
                }
                let rest = std::mem::take(&mut self.pending);
                return Answer::Reply(self.chunk(rest, cmd.ne));
            }
            (0xA4, 0x04, _) => self.select(&cmd.data),
            (0xA4, 0x00 | 0x02 | 0x08 | 0x09, p2) if self.selected == Some(Applet::Idprime) => {
                self.select_file(&cmd.data, p2)
            }
            (0xB0, p1, p2) if self.selected == Some(Applet::Idprime) => {
                self.read_binary(u16::from_be_bytes([p1, p2]), cmd.ne)
            }
            (0xCA, 0x9F, 0x7F) if self.files.is_some() => (
                self.files
                    .as_ref()
                    .map(idprime::Files::cplc)
                    .unwrap_or_default(),
                0x9000,
            ),
            (0xCB, p1, p2) => self.get_data(u16::from_be_bytes([p1, p2]), &cmd.data),
            (0xFD, 0, 0) if self.is_yubikey() => (vec![5, 4, 3], 0x9000),
            (0xF8, 0, 0) if self.is_yubikey() => (
                self.spec.yubikey_serial.unwrap_or(0).to_be_bytes().to_vec(),
                0x9000,
            ),
            (0xF7, 0, p2) if self.is_yubikey() => yubikey_metadata(p2),
            // VERIFY without data asks for the PIN tries left: 63Cx.
            (0x20, 0, 0x80) if cmd.data.is_empty() => (Vec::new(), 0x63C3),
            _ => (Vec::new(), 0x6D00),
        };
        if sw != 0x9000 {
            return Answer::Reply(sw.to_be_bytes().to_vec());
        }
        if cmd.ne == 0 && !body.is_empty() && self.spec.applet == Applet::Idprime {
            // T=0: a command sent without Le gets its answer behind 61xx.
            return Answer::Reply(self.chunk_behind_61(body));
        }
        Answer::Reply(self.chunk(body, cmd.ne))
    }

    /// IDPrime SELECT FILE by FID.
    fn select_file(&mut self, data: &[u8], p2: u8) -> (Vec<u8>, u16) {
        let Some(fid) = data.last_chunk::<2>().map(|b| u16::from_be_bytes(*b)) else {
            return (Vec::new(), 0x6A80);
        };
        match self.files.as_ref().and_then(|f| f.select(fid, p2)) {
            Some(fcp) => {
                self.current_ef = Some(fid);
                (fcp, 0x9000)
            }
            None => (Vec::new(), 0x6A82),
        }
    }

    /// IDPrime READ BINARY of the current EF (`P1` bit 8, a short EF id, is not supported).
    fn read_binary(&self, offset: u16, ne: usize) -> (Vec<u8>, u16) {
        match (self.current_ef, &self.files) {
            _ if offset & 0x8000 != 0 => (Vec::new(), 0x6A81),
            (Some(fid), Some(files)) => files.read(fid, usize::from(offset), ne),
            _ => (Vec::new(), 0x6986),
        }
    }

    /// The whole answer kept for GET RESPONSE, announced with `61xx`.
    fn chunk_behind_61(&mut self, body: Vec<u8>) -> Vec<u8> {
        let remaining = body.len().min(256) as u8; // 256 is written as 00
        self.pending = body;
        vec![0x61, remaining]
    }

    fn is_yubikey(&self) -> bool {
        self.selected == Some(Applet::Piv) && self.spec.yubikey_serial.is_some()
    }

    /// Sends at most `ne` bytes and keeps the rest for GET RESPONSE.
    fn chunk(&mut self, mut body: Vec<u8>, ne: usize) -> Vec<u8> {
        let ne = ne.max(1);
        if body.len() <= ne {
            body.extend([0x90, 0x00]);
            return body;
        }
        self.pending = body.split_off(ne);
        let remaining = self.pending.len().min(256) as u8; // 256 is written as 00
        body.extend([0x61, remaining]);
        body
    }

    fn select(&mut self, aid: &[u8]) -> (Vec<u8>, u16) {
        if self.spec.faults.no_applet {
            return (Vec::new(), 0x6A82);
        }
        match self.spec.applet {
            Applet::Piv if aid.len() >= 5 && aid.starts_with(&PIV_AID_PREFIX) => {
                self.selected = Some(Applet::Piv);
                self.piv_selects += 1;
                // Application property template: PIX + coexistent tag allocation authority.
                let mut apt = tlv::encode(0x4F, &[0x00, 0x00, 0x10, 0x00, 0x01, 0x00]);
                apt.extend(tlv::encode(0x79, &tlv::encode(0x4F, &PIV_AID_PREFIX)));
                (tlv::encode(0x61, &apt), 0x9000)
            }
            Applet::Gids if aid.starts_with(&GIDS_AID) => {
                self.selected = Some(Applet::Gids);
                let mut full = GIDS_AID.to_vec();
                full.extend([0x02, 0x01]);
                (tlv::encode(0x61, &tlv::encode(0x4F, &full)), 0x9000)
            }
            Applet::Idprime if aid == idprime::AID => {
                self.selected = Some(Applet::Idprime);
                self.current_ef = None;
                (Vec::new(), 0x9000)
            }
            Applet::Piv if aid == YUBICO_OTP_AID && self.spec.yubikey_serial.is_some() => {
                self.selected = None;
                (Vec::new(), 0x9000)
            }
            _ => (Vec::new(), 0x6A82),
        }
    }

    fn get_data(&self, p1p2: u16, data: &[u8]) -> (Vec<u8>, u16) {
        let Ok(Some(tag)) = tlv::find(data, 0x5C) else {
            return (Vec::new(), 0x6A80);
        };
        let key = match (self.selected, p1p2) {
            (Some(Applet::Piv), 0x3FFF) => {
                let object = tag.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b));
                let swapped =
                    self.spec.faults.swap_certificates_after_first_read && self.piv_selects > 1;
                Key::Piv(match object {
                    0x5FC105 if swapped => 0x5FC10A,
                    0x5FC10A if swapped => 0x5FC105,
                    other => other,
                })
            }
            (Some(Applet::Gids), ef) if tag.len() == 2 => {
                Key::Gids(ef, u16::from_be_bytes([tag[0], tag[1]]))
            }
            _ => return (Vec::new(), 0x6985),
        };
        match self.objects.get(&key) {
            Some(object) => (object.clone(), 0x9000),
            None => (Vec::new(), 0x6A82),
        }
    }
}

/// A parsed command APDU: header, data, and the number of response bytes it accepts.
struct Command {
    ins: u8,
    p1: u8,
    p2: u8,
    data: Vec<u8>,
    ne: usize,
    extended: bool,
}

impl Command {
    fn parse(apdu: &[u8]) -> Option<Command> {
        let [_cla, ins, p1, p2] = *apdu.first_chunk::<4>()?;
        let body = &apdu[4..];
        let short_ne = |b: u8| if b == 0 { 256 } else { usize::from(b) };
        let ext_ne = |hi: u8, lo: u8| match u16::from_be_bytes([hi, lo]) {
            0 => 65536,
            n => usize::from(n),
        };
        let (data, ne, extended) = match *body {
            [] => (Vec::new(), 0, false),
            [le] => (Vec::new(), short_ne(le), false),
            [0, hi, lo] => (Vec::new(), ext_ne(hi, lo), true),
            [0, hi, lo, ref rest @ ..] => {
                let lc = usize::from(u16::from_be_bytes([hi, lo]));
                match rest.len().checked_sub(lc)? {
                    0 => (rest.to_vec(), 0, true),
                    2 => (rest[..lc].to_vec(), ext_ne(rest[lc], rest[lc + 1]), true),
                    _ => return None,
                }
            }
            [lc, ref rest @ ..] => {
                let lc = usize::from(lc);
                match rest.len().checked_sub(lc)? {
                    0 => (rest.to_vec(), 0, false),
                    1 => (rest[..lc].to_vec(), short_ne(rest[lc]), false),
                    _ => return None,
                }
            }
        };
        Some(Command {
            ins,
            p1,
            p2,
            data,
            ne,
            extended,
        })
    }
}

fn atr_for(spec: &CardSpec) -> Vec<u8> {
    if let Some(card) = spec
        .idprime
        .as_ref()
        .filter(|_| spec.applet == Applet::Idprime)
    {
        return card.model.atr();
    }
    // 3B 8x 80 01 | 80 (COMPACT-TLV) 73 (card capabilities) 00 00 yy | 5x 'vcard…' | TCK
    let caps = if spec.extended_length { 0xC0 } else { 0x80 };
    let mut historical = vec![0x80, 0x73, 0x00, 0x00, caps];
    match spec.applet {
        Applet::Piv => historical.extend(b"\x55vcPIV"),
        // Its ATR is the model's (above); a spec without one is refused by `VirtualCard::new`.
        Applet::Idprime => {}
        Applet::Gids => {
            // Announce the GIDS AID in the historical bytes, as Microsoft's virtual cards do.
            historical.push(0xF0 | (GIDS_AID.len() as u8 + 2));
            historical.extend(GIDS_AID);
            historical.extend([0x02, 0x01]);
        }
    }
    let mut atr = vec![0x3B, 0x80 | historical.len() as u8, 0x80, 0x01];
    atr.extend(historical);
    let tck = atr[1..].iter().fold(0u8, |a, b| a ^ b);
    atr.push(tck);
    atr
}

/// The CHUID: FASC-N of a non-federal issuer (as yubico-piv-tool writes it), GUID, expiry.
fn piv_chuid(spec: &CardSpec, card_id: &[u8; 16]) -> Result<Vec<u8>> {
    let mut chuid = tlv::encode(
        0x30,
        &hex::decode("D4E739DA739CED39CE739D836858210842108421C84210C3EB")?,
    );
    chuid.extend(tlv::encode(0x34, card_id));
    chuid.extend(tlv::encode(0x35, b"20300101"));
    chuid.extend(tlv::encode(0x3E, &[]));
    chuid.extend(tlv::encode(0xFE, &[]));
    let mut chuid_object = tlv::encode(0x53, &chuid);
    if spec.faults.wrong_tlv_length {
        // Claim 40 bytes more than there are.
        let declared = chuid.len() + 40;
        chuid_object = vec![0x53, 0x82, (declared >> 8) as u8, declared as u8];
        chuid_object.extend(&chuid);
    }
    Ok(chuid_object)
}

fn build_piv(
    spec: &CardSpec,
    issuer: &Issuer,
    card_id: &[u8; 16],
    objects: &mut HashMap<Key, Vec<u8>>,
    truth: &mut Vec<TruthCert>,
) -> Result<()> {
    objects.insert(Key::Piv(0x5FC102), piv_chuid(spec, card_id)?);

    let slot_tag = |slot: u8| -> u32 {
        match slot {
            0x9A => 0x5FC105,
            0x9C => 0x5FC10A,
            0x9D => 0x5FC10B,
            0x9E => 0x5FC101,
            retired => 0x5FC10D + u32::from(retired - 0x82),
        }
    };
    let mut corrupted = false;
    let mut slots = spec.slots.clone();
    slots.extend((0..spec.retired.min(20)).map(|n| (0x82 + n, Compress::None)));
    for (slot, compress) in slots {
        let label = match &spec.holder {
            Some(holder) => holder.clone(),
            None => format!("Contoso user, slot {slot:02X}"),
        };
        let expired = spec.expired_slots.contains(&slot);
        let der = if spec.faults.garbage_certificate && slot == 0x9A {
            random_bytes(300)?
        } else {
            issuer.issue(&label, Some("ContosoSmartcardUser"), expired)?
        };
        let mut stored = compressed(&der, compress)?;
        if spec.faults.corrupt_compressed && compress != Compress::None && !corrupted {
            corrupt_checksum(&mut stored);
            corrupted = true;
        }
        let mut container = tlv::encode(0x70, &stored);
        let cert_info = if compress == Compress::None {
            0x00
        } else {
            0x01
        };
        container.extend(tlv::encode(0x71, &[cert_info]));
        container.extend(tlv::encode(0xFE, &[]));
        let object = if spec.faults.huge_length && slot == 0x9A {
            let mut o = vec![0x53, 0x84, 0x7F, 0xFF, 0xFF, 0xF0];
            o.extend(&container);
            o
        } else {
            tlv::encode(0x53, &container)
        };
        objects.insert(Key::Piv(slot_tag(slot)), object);
        truth.push(truth_cert(
            format!("{slot:02X}"),
            &der,
            compress != Compress::None,
        ));
    }
    if spec.key_history {
        let mut history = tlv::encode(0xC1, &[spec.retired]);
        history.extend(tlv::encode(0xC2, &[0]));
        history.extend(tlv::encode(0xFE, &[]));
        objects.insert(Key::Piv(0x5FC10C), tlv::encode(0x53, &history));
    }
    Ok(())
}

fn build_gids(
    spec: &CardSpec,
    issuer: &Issuer,
    card_id: &[u8; 16],
    objects: &mut HashMap<Key, Vec<u8>>,
    truth: &mut Vec<TruthCert>,
) -> Result<()> {
    const EF_MSCP: u16 = 0xA010;
    let mut masterfile = vec![0x01];
    let mut record = |dir: &str, name: &str, data_object: u16, ef: u16| {
        let mut r = [0u8; 28];
        r[..dir.len()].copy_from_slice(dir.as_bytes());
        r[9..9 + name.len()].copy_from_slice(name.as_bytes());
        r[20..24].copy_from_slice(&u32::from(data_object).to_le_bytes());
        r[24..28].copy_from_slice(&u32::from(ef).to_le_bytes());
        masterfile.extend(r);
    };
    record("mscp", "", 0, 0xA000);
    record("", "cardid", 0xDF20, 0xA012);
    record("", "cardapps", 0xDF21, EF_MSCP);
    record("", "cardcf", 0xDF22, EF_MSCP);
    record("mscp", "cmapfile", 0xDF23, EF_MSCP);

    let mut cmapfile = Vec::new();
    for n in 0..spec.gids_containers {
        let name = format!("{{{}}}", guid_text(&random16()?));
        let der = issuer.issue(
            &format!("Contoso user, container {n}"),
            Some("ContosoGidsUser"),
            false,
        )?;
        let mut stored = vec![0x01, 0x00];
        stored.extend((der.len() as u16).to_le_bytes());
        stored.extend(compressed(&der, Compress::Zlib)?);
        if spec.faults.corrupt_compressed && n == 0 {
            corrupt_checksum(&mut stored);
        }
        let data_object = 0xDF24 + u16::from(n);
        record("mscp", &format!("kxc{n:02x}"), data_object, EF_MSCP);
        objects.insert(
            Key::Gids(EF_MSCP, data_object),
            tlv::encode(u32::from(data_object), &stored),
        );

        let mut entry = [0u8; 86];
        for (i, unit) in name.encode_utf16().take(39).enumerate() {
            entry[i * 2..i * 2 + 2].copy_from_slice(&unit.to_le_bytes());
        }
        entry[80] = if n == 0 { 0x03 } else { 0x01 };
        entry[84..86].copy_from_slice(&256u16.to_le_bytes());
        cmapfile.extend(entry);
        truth.push(truth_cert(name, &der, true));
    }
    if !spec.faults.blank {
        objects.insert(Key::Gids(0xA000, 0xDF1F), tlv::encode(0xDF1F, &masterfile));
    }
    objects.insert(Key::Gids(EF_MSCP, 0xDF23), tlv::encode(0xDF23, &cmapfile));
    objects.insert(Key::Gids(0xA012, 0xDF20), tlv::encode(0xDF20, card_id));
    objects.insert(
        Key::Gids(EF_MSCP, 0xDF21),
        tlv::encode(0xDF21, b"mscp\0\0\0\0"),
    );
    Ok(())
}

/// Writes `bytes` over a certificate's serial number, after its first byte (which keeps the
/// number positive and its length unchanged).
fn write_serial(der: &mut [u8], bytes: &[u8]) -> Result<()> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serial INTEGER
    let (_, certificate) = der_header(der, 0)?;
    let (_, mut at) = der_header(der, certificate)?;
    if der.get(at) == Some(&0xA0) {
        let (len, content) = der_header(der, at)?;
        at = content + len;
    }
    if der.get(at) != Some(&0x02) {
        anyhow::bail!("no serial number where a certificate has it");
    }
    let (len, content) = der_header(der, at)?;
    let n = bytes.len().min(len.saturating_sub(1));
    der.get_mut(content + 1..content + 1 + n)
        .context("truncated DER")?
        .copy_from_slice(&bytes[..n]);
    Ok(())
}

/// The content length and content offset of the DER element at `at`.
fn der_header(der: &[u8], at: usize) -> Result<(usize, usize)> {
    let first = *der.get(at + 1).context("truncated DER")?;
    if first < 0x80 {
        return Ok((usize::from(first), at + 2));
    }
    let count = usize::from(first & 0x7F);
    let bytes = der.get(at + 2..at + 2 + count).context("truncated DER")?;
    let len = bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b));
    Ok((len, at + 2 + count))
}

/// Breaks the checksum at the end of a gzip or zlib stream, so it no longer inflates.
fn corrupt_checksum(stored: &mut [u8]) {
    let start = stored.len().saturating_sub(4);
    for b in &mut stored[start..] {
        *b ^= 0xFF;
    }
}

fn truth_cert(slot: String, der: &[u8], compressed: bool) -> TruthCert {
    TruthCert {
        slot,
        thumbprint: hex::encode_upper(Sha1::digest(der)),
        compressed,
        der: hex::encode_upper(der),
    }
}

fn compressed(der: &[u8], how: Compress) -> Result<Vec<u8>> {
    Ok(match how {
        Compress::None => der.to_vec(),
        Compress::Gzip => {
            let mut e = GzEncoder::new(Vec::new(), Compression::best());
            e.write_all(der)?;
            e.finish()?
        }
        Compress::Zlib => {
            let mut e = ZlibEncoder::new(Vec::new(), Compression::best());
            e.write_all(der)?;
            e.finish()?
        }
    })
}

fn guid_text(b: &[u8; 16]) -> String {
    cardbridge::card::guid_string(b).to_uppercase()
}

fn random16() -> Result<[u8; 16]> {
    let mut out = [0u8; 16];
    out.copy_from_slice(&random_bytes(16)?);
    Ok(out)
}

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}

/// Lets cardbridge's card reader talk to the virtual card directly, without pcscd: to check the
/// card model itself, and for the simulated year's scripted readers.
pub struct Direct<'a>(pub &'a mut VirtualCard);

impl cardbridge::card::Transport for Direct<'_> {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, cardbridge::card::TransportError> {
        match self.0.process(command) {
            Answer::Reply(r) => Ok(r),
            Answer::Drop => Err(cardbridge::card::TransportError::CardRemoved),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cardbridge::card::{read_card, CardKind, ReadOptions};

    fn read(spec: CardSpec) -> (cardbridge::card::Card, Truth) {
        read_virtual(VirtualCard::new(spec).unwrap())
    }

    fn read_virtual(mut card: VirtualCard) -> (cardbridge::card::Card, Truth) {
        let atr = card.atr.clone();
        let options = ReadOptions {
            smartcard_list: None,
            ..ReadOptions::default()
        };
        (
            read_card(
                &mut Direct(&mut card),
                "direct",
                &atr,
                &options,
                &cardbridge::clock::SystemClock,
            ),
            card.truth.clone(),
        )
    }

    #[test]
    fn model_piv_card_reads_back_its_truth() {
        let (card, truth) = read(CardSpec::piv_four_certs());
        assert_eq!(card.error, None);
        assert_eq!(card.kind, CardKind::Piv);
        assert_eq!(card.card_id, truth.card_id);
        let got: Vec<_> = card
            .certificates
            .iter()
            .map(|c| (c.slot.clone(), c.thumbprint.clone()))
            .collect();
        let want: Vec<_> = truth
            .certificates
            .iter()
            .map(|c| (c.slot.clone(), c.thumbprint.clone()))
            .collect();
        assert_eq!(got, want);
        assert!(card.apdu_count <= 12, "{} APDUs", card.apdu_count);
    }

    #[test]
    fn a_renumbered_card_reads_back_with_its_own_id_and_certificates() {
        let mut spec = CardSpec::piv_four_certs();
        spec.slots = vec![(0x9A, Compress::None), (0x9C, Compress::None)];
        let template = VirtualCard::new(spec).unwrap();
        let thumbprints = |card: &cardbridge::card::Card| -> Vec<String> {
            card.certificates
                .iter()
                .map(|c| c.thumbprint.clone())
                .collect()
        };
        let mut seen = Vec::new();
        for id in [[0x11; 16], [0x22; 16]] {
            let (card, truth) = read_virtual(template.with_card_id(id).unwrap());
            assert_eq!(card.error, None);
            assert_eq!(card.card_id, Some(hex::encode_upper(id)));
            let want: Vec<String> = truth
                .certificates
                .iter()
                .map(|c| c.thumbprint.clone())
                .collect();
            assert_eq!(thumbprints(&card), want);
            assert_eq!(card.serial_number, truth.serial_number);
            let serials: Vec<_> = card
                .certificates
                .iter()
                .map(|c| c.serial_number.clone())
                .collect();
            seen.push((thumbprints(&card), serials, card.serial_number));
        }
        let template_thumbprints: Vec<String> = template
            .truth
            .certificates
            .iter()
            .map(|c| c.thumbprint.clone())
            .collect();
        assert_ne!(seen[0].0, template_thumbprints);
        assert_ne!(seen[0].0, seen[1].0);
        assert_ne!(seen[0].1, seen[1].1);
        assert_ne!(seen[0].2, seen[1].2);
    }

    #[test]
    fn model_gids_card_reads_back_its_truth() {
        let (card, truth) = read(CardSpec::gids_two_containers());
        assert_eq!(card.error, None);
        assert_eq!(card.kind, CardKind::Gids);
        assert_eq!(card.card_id, truth.card_id);
        assert_eq!(card.certificates.len(), 2);
        assert_eq!(
            card.certificates[1].thumbprint,
            truth.certificates[1].thumbprint
        );
    }

    fn thumbprints(card: &cardbridge::card::Card) -> Vec<(String, String, bool)> {
        card.certificates
            .iter()
            .map(|c| (c.slot.clone(), c.thumbprint.clone(), c.compressed))
            .collect()
    }

    fn truth_thumbprints(truth: &Truth) -> Vec<(String, String, bool)> {
        truth
            .certificates
            .iter()
            .map(|c| (c.slot.clone(), c.thumbprint.clone(), c.compressed))
            .collect()
    }

    #[test]
    fn model_idprime_840_reads_back_its_truth_in_21_apdus() {
        let (card, truth) = read(CardSpec::idprime(idprime::Spec::md840()));
        assert_eq!(card.error, None);
        assert_eq!(card.kind, CardKind::Idprime);
        assert_eq!(card.card_id, truth.card_id);
        assert_eq!(card.serial_number, truth.serial_number);
        assert_eq!(thumbprints(&card), truth_thumbprints(&truth));
        let details = card.idprime.as_ref().unwrap();
        assert_eq!(details.model, "IDPrime MD 840");
        assert_eq!(details.os_level, Some(3));
        assert!(card.certificates.iter().all(|c| c.error.is_none()));
        // 20, and the CPLC once more at the end (the card was not replaced during the read).
        assert!(card.apdu_count <= 21, "{} APDUs", card.apdu_count);
    }

    #[test]
    fn model_idprime_940_with_a_plain_certificate_and_a_token_label() {
        let (card, truth) = read(CardSpec::idprime(idprime::Spec::idp940()));
        assert_eq!(card.error, None);
        assert_eq!(thumbprints(&card), truth_thumbprints(&truth));
        assert_eq!(
            card.certificates.iter().filter(|c| !c.compressed).count(),
            1
        );
        let details = card.idprime.as_ref().unwrap();
        assert_eq!(details.model, "IDPrime 940");
        assert_eq!(details.token_label.as_deref(), Some("Contoso Helpdesk"));
        assert_eq!(details.containers.len(), 6);
        assert!(card.notes.is_empty(), "{:?}", card.notes);
    }

    #[test]
    fn command_parsing_covers_all_cases() {
        let c = Command::parse(&[0, 0xCB, 0x3F, 0xFF, 0x03, 0x5C, 0x01, 0x7E, 0x00]).unwrap();
        assert_eq!((c.data.len(), c.ne, c.extended), (3, 256, false));
        let c = Command::parse(&[
            0, 0xCB, 0x3F, 0xFF, 0x00, 0x00, 0x03, 0x5C, 0x01, 0x7E, 0x00, 0x00,
        ])
        .unwrap();
        assert_eq!((c.data.len(), c.ne, c.extended), (3, 65536, true));
        let c = Command::parse(&[0, 0xFD, 0, 0, 0x00]).unwrap();
        assert_eq!((c.data.len(), c.ne), (0, 256));
        assert!(Command::parse(&[0, 0xCB, 0x3F]).is_none());
        assert!(Command::parse(&[0, 0xCB, 0x3F, 0xFF, 0x09, 0x01]).is_none());
    }
}
