//! Command/response exchange with a card, independent of how the bytes travel.
//!
//! [`Transport`] is the only thing that touches I/O: it sends one command APDU and returns the raw
//! response. [`Channel`] adds what ISO 7816-4 leaves to the caller and what a card can get wrong:
//! `61xx` GET RESPONSE chaining, `6Cxx` wrong-Le retries, extended or short length encoding, a
//! hard bound on the size of any object, a deadline for the whole read, and an APDU counter.

use std::time::Instant;

use thiserror::Error;

use super::{Clock, ReadError};

/// No object read from a card may be larger than this (after chaining). PIV guarantees 1857 to
/// 2881 bytes per container and real certificates stay well under 8 KiB; 64 KiB leaves room for
/// odd cards while keeping a hostile one from making us allocate without limit.
pub const MAX_OBJECT_SIZE: usize = 64 * 1024;

/// A chain of GET RESPONSE steps longer than this is treated as a broken card: even one-byte
/// steps cannot legitimately need more to reach [`MAX_OBJECT_SIZE`] in short chunks of 256.
const MAX_CHAIN_STEPS: usize = MAX_OBJECT_SIZE / 256 + 8;

/// Sends one command APDU to a card and returns the full response including SW1 SW2.
pub trait Transport {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError>;
}

/// Why a command did not reach the card or its answer did not come back.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TransportError {
    /// The card was pulled or powered down mid-read.
    #[error("the card was removed during the read")]
    CardRemoved,
    /// Another application (or pcscd) reset the card since it was connected; a reconnect without
    /// reset and a fresh read usually succeed.
    #[error("the card was reset by another application during the read")]
    CardReset,
    /// The PC/SC service went away (pcscd stopped or restarted).
    #[error("the PC/SC service is unavailable: {0}")]
    ServiceUnavailable(String),
    /// Any other failure reported by the reader stack.
    #[error("reader communication failed: {0}")]
    Failed(String),
}

/// A response with its status word; `data` holds the whole chained body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub data: Vec<u8>,
    pub sw: u16,
}

impl Response {
    pub fn is_ok(&self) -> bool {
        self.sw == 0x9000
    }
}

/// Status words with a name worth printing in errors.
pub fn describe_sw(sw: u16) -> &'static str {
    match sw {
        0x9000 => "success",
        0x6282 => "end of file reached before Le",
        0x6700 => "wrong length",
        0x6982 => "security status not satisfied",
        0x6983 => "authentication method blocked",
        0x6985 => "conditions of use not satisfied",
        0x6A80 => "incorrect data field",
        0x6A81 => "function not supported",
        0x6A82 => "file or application not found",
        0x6A86 => "incorrect P1-P2",
        0x6A88 => "referenced data not found",
        0x6B00 => "wrong P1-P2",
        0x6D00 => "instruction not supported",
        0x6E00 => "class not supported",
        0x6F00 => "no precise diagnosis",
        _ => "unexpected status",
    }
}

/// A transport wrapped with the ISO 7816-4 exchange rules and the read's limits.
pub struct Channel<'t> {
    transport: &'t mut dyn Transport,
    extended: bool,
    deadline: Instant,
    clock: &'t dyn Clock,
    apdus: u32,
}

impl<'t> Channel<'t> {
    /// `extended` asks for extended-length APDUs (the ATR and the reader allow them); the
    /// channel falls back to short APDUs on its own if the card rejects the encoding. No
    /// command goes out once `clock` has passed `deadline`.
    pub fn new(
        transport: &'t mut dyn Transport,
        extended: bool,
        deadline: Instant,
        clock: &'t dyn Clock,
    ) -> Self {
        Channel {
            transport,
            extended,
            deadline,
            clock,
            apdus: 0,
        }
    }

    /// Number of APDUs sent so far, GET RESPONSE steps and retries included.
    pub fn apdu_count(&self) -> u32 {
        self.apdus
    }

    /// Whether commands currently go out with extended length fields.
    pub fn uses_extended_length(&self) -> bool {
        self.extended
    }

    /// Sends a command that expects a response body (case 2 without data, case 4 with data),
    /// asking for as much as the length encoding allows, and collects the whole answer.
    pub fn send(&mut self, header: [u8; 4], data: &[u8]) -> Result<Response, ReadError> {
        if self.extended {
            match self.exchange(&encode(header, data, true)) {
                Ok(response) if !matches!(response.sw, 0x6700 | 0x6D00) => return Ok(response),
                // Wrong length or "instruction not supported": some cards say either when
                // they mean the extended length fields, whatever their ATR announced. The
                // short form decides: a different answer means the card refused the encoding
                // (stay short from now on); the same refusal means it refused the command.
                Ok(refused) => {
                    let short = self.exchange(&encode(header, data, false))?;
                    if short.sw != refused.sw {
                        self.extended = false;
                    }
                    return Ok(short);
                }
                // The reader refuses extended fields (a transmit failure): short from now on.
                Err(ReadError::Transport(TransportError::Failed(_))) => self.extended = false,
                Err(e) => return Err(e),
            }
        }
        self.exchange(&encode(header, data, false))
    }

    /// Sends a command exactly as given (no Le added), following chaining in the answer.
    pub fn send_raw(&mut self, command: &[u8]) -> Result<Response, ReadError> {
        self.exchange(command)
    }

    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, ReadError> {
        if self.clock.now() > self.deadline {
            return Err(ReadError::Deadline);
        }
        self.apdus += 1;
        let response = self.transport.transmit(command)?;
        if response.len() < 2 {
            return Err(ReadError::Malformed(format!(
                "response of {} bytes has no status word",
                response.len()
            )));
        }
        if response.len() > MAX_OBJECT_SIZE + 2 {
            return Err(ReadError::TooLarge {
                limit: MAX_OBJECT_SIZE,
            });
        }
        Ok(response)
    }

    fn exchange(&mut self, command: &[u8]) -> Result<Response, ReadError> {
        let mut raw = self.transmit(command)?;
        // 6Cxx: the card wants the same command again with Le = xx. Retried once, short form.
        if let [.., 0x6C, le] = raw[..] {
            raw = self.transmit(&with_short_le(command, le))?;
        }
        let mut data = Vec::new();
        let mut chained = false;
        for _ in 0..MAX_CHAIN_STEPS {
            let (body, sw) = split_sw(&raw);
            if data.len() + body.len() > MAX_OBJECT_SIZE {
                return Err(ReadError::TooLarge {
                    limit: MAX_OBJECT_SIZE,
                });
            }
            data.extend_from_slice(body);
            match sw {
                [0x61, remaining] => {
                    chained = true;
                    raw = self.transmit(&[0x00, 0xC0, 0x00, 0x00, remaining])?;
                }
                // End of file during GET RESPONSE: the object is complete.
                [0x62, 0x82] if chained => return Ok(Response { data, sw: 0x9000 }),
                [sw1, sw2] => {
                    return Ok(Response {
                        data,
                        sw: u16::from_be_bytes([sw1, sw2]),
                    })
                }
            }
        }
        Err(ReadError::Malformed(
            "response chaining did not end".to_string(),
        ))
    }
}

fn split_sw(raw: &[u8]) -> (&[u8], [u8; 2]) {
    // `transmit` guarantees at least two bytes.
    let (body, sw) = raw.split_at(raw.len() - 2);
    (body, [sw[0], sw[1]])
}

/// Encodes a command with a maximal Le: short (`Le = 00`, 256 bytes) or extended (`Le = 0000`,
/// 65536 bytes).
pub fn encode(header: [u8; 4], data: &[u8], extended: bool) -> Vec<u8> {
    let mut apdu = Vec::with_capacity(data.len() + 9);
    apdu.extend_from_slice(&header);
    if extended {
        apdu.push(0x00);
        if !data.is_empty() {
            apdu.extend_from_slice(&(data.len() as u16).to_be_bytes());
            apdu.extend_from_slice(data);
        }
        apdu.extend_from_slice(&[0x00, 0x00]);
    } else {
        if !data.is_empty() {
            apdu.push(data.len() as u8);
            apdu.extend_from_slice(data);
        }
        apdu.push(0x00);
    }
    apdu
}

/// Rewrites the Le of a command to a short `le`, for the 6Cxx retry.
fn with_short_le(command: &[u8], le: u8) -> Vec<u8> {
    let mut apdu = command[..4.min(command.len())].to_vec();
    match command.get(4) {
        // Extended form: `00 Lc1 Lc2 data Le1 Le2` or `00 Le1 Le2`.
        Some(0x00) if command.len() > 7 => {
            let lc = usize::from(u16::from_be_bytes([command[5], command[6]]));
            if let Some(data) = command.get(7..7 + lc) {
                apdu.push(lc as u8);
                apdu.extend_from_slice(data);
            }
        }
        Some(&lc) if command.len() > 5 => {
            let lc = usize::from(lc);
            if let Some(data) = command.get(5..5 + lc) {
                apdu.push(lc as u8);
                apdu.extend_from_slice(data);
            }
        }
        _ => {}
    }
    apdu.push(le);
    apdu
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::SteppingClock;
    use std::collections::VecDeque;
    use std::time::Duration;

    /// Replays recorded responses and records the commands it was sent.
    struct Script {
        responses: VecDeque<Vec<u8>>,
        sent: Vec<Vec<u8>>,
    }

    impl Script {
        fn new(responses: &[&[u8]]) -> Self {
            Script {
                responses: responses.iter().map(|r| r.to_vec()).collect(),
                sent: Vec::new(),
            }
        }
    }

    impl Transport for Script {
        fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
            self.sent.push(command.to_vec());
            self.responses
                .pop_front()
                .ok_or(TransportError::CardRemoved)
        }
    }

    /// A clock that never reaches the channel's deadline.
    fn still() -> SteppingClock {
        SteppingClock::new(Duration::ZERO)
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    const GET_CHUID: [u8; 4] = [0x00, 0xCB, 0x3F, 0xFF];

    #[test]
    fn follows_61xx_chaining() {
        let mut script = Script::new(&[
            &[1, 2, 0x61, 0x03],
            &[3, 4, 5, 0x61, 0x00],
            &[6, 0x90, 0x00],
        ]);
        let clock = still();
        let mut ch = Channel::new(&mut script, false, later(), &clock);
        let r = ch.send(GET_CHUID, &[0x5C, 0x03, 0x5F, 0xC1, 0x02]).unwrap();
        assert_eq!(
            r,
            Response {
                data: vec![1, 2, 3, 4, 5, 6],
                sw: 0x9000
            }
        );
        assert_eq!(ch.apdu_count(), 3);
        assert_eq!(script.sent[1], [0x00, 0xC0, 0x00, 0x00, 0x03]);
        assert_eq!(script.sent[2], [0x00, 0xC0, 0x00, 0x00, 0x00]);
    }

    #[test]
    fn retries_6cxx_with_the_right_le() {
        let mut script = Script::new(&[&[0x6C, 0x04], &[9, 9, 9, 9, 0x90, 0x00]]);
        let clock = still();
        let mut ch = Channel::new(&mut script, false, later(), &clock);
        let r = ch.send([0x00, 0xFD, 0x00, 0x00], &[]).unwrap();
        assert_eq!(r.data, [9, 9, 9, 9]);
        assert_eq!(script.sent[1], [0x00, 0xFD, 0x00, 0x00, 0x04]);
    }

    #[test]
    fn retries_6cxx_of_an_extended_case_4_command_in_short_form() {
        let command = encode(GET_CHUID, &[0x5C, 0x01, 0x7E], true);
        assert_eq!(
            command,
            [0x00, 0xCB, 0x3F, 0xFF, 0x00, 0x00, 0x03, 0x5C, 0x01, 0x7E, 0x00, 0x00]
        );
        assert_eq!(
            with_short_le(&command, 0x10),
            [0x00, 0xCB, 0x3F, 0xFF, 0x03, 0x5C, 0x01, 0x7E, 0x10]
        );
    }

    #[test]
    fn falls_back_to_short_apdus_on_6700() {
        let mut script = Script::new(&[&[0x67, 0x00], &[7, 0x90, 0x00]]);
        let clock = still();
        let mut ch = Channel::new(&mut script, true, later(), &clock);
        let r = ch.send(GET_CHUID, &[0x5C, 0x01, 0x7E]).unwrap();
        assert_eq!(r.data, [7]);
        assert!(!ch.uses_extended_length());
        assert_eq!(
            script.sent[1],
            [0x00, 0xCB, 0x3F, 0xFF, 0x03, 0x5C, 0x01, 0x7E, 0x00]
        );
    }

    #[test]
    fn falls_back_to_short_apdus_on_6d00_to_an_extended_command() {
        let mut script = Script::new(&[&[0x6D, 0x00], &[7, 0x90, 0x00], &[8, 0x90, 0x00]]);
        let clock = still();
        let mut ch = Channel::new(&mut script, true, later(), &clock);
        assert_eq!(ch.send(GET_CHUID, &[0x5C, 0x01, 0x7E]).unwrap().data, [7]);
        assert!(!ch.uses_extended_length());
        assert_eq!(ch.send(GET_CHUID, &[0x5C, 0x01, 0x7E]).unwrap().data, [8]);
        assert_eq!(script.sent[2].len(), 9, "short from then on");
    }

    #[test]
    fn an_instruction_refused_in_both_forms_keeps_extended_length() {
        let mut script = Script::new(&[&[0x6D, 0x00], &[0x6D, 0x00]]);
        let clock = still();
        let mut ch = Channel::new(&mut script, true, later(), &clock);
        assert_eq!(ch.send([0x00, 0xFD, 0x00, 0x00], &[]).unwrap().sw, 0x6D00);
        assert!(ch.uses_extended_length());
        assert_eq!(ch.apdu_count(), 2);
    }

    #[test]
    fn bounds_the_size_of_a_chained_object() {
        let chunk: Vec<u8> = std::iter::repeat_n(0xAA, 256).chain([0x61, 0x00]).collect();
        let responses: Vec<&[u8]> = std::iter::repeat_n(&chunk[..], 400).collect();
        let mut script = Script::new(&responses);
        let clock = still();
        let mut ch = Channel::new(&mut script, false, later(), &clock);
        let err = ch.send(GET_CHUID, &[]).unwrap_err();
        assert!(matches!(err, ReadError::TooLarge { .. }), "{err:?}");
        assert!(ch.apdu_count() <= (MAX_OBJECT_SIZE / 256 + 2) as u32);
    }

    #[test]
    fn an_endless_chain_of_empty_steps_ends() {
        let responses: Vec<&[u8]> = std::iter::repeat_n(&[0x61u8, 0x01][..], 10_000).collect();
        let mut script = Script::new(&responses);
        let clock = still();
        let mut ch = Channel::new(&mut script, false, later(), &clock);
        assert!(matches!(
            ch.send(GET_CHUID, &[]),
            Err(ReadError::Malformed(_))
        ));
    }

    #[test]
    fn a_response_without_status_word_is_malformed() {
        let mut script = Script::new(&[&[0x90]]);
        let clock = still();
        let mut ch = Channel::new(&mut script, false, later(), &clock);
        assert!(matches!(
            ch.send(GET_CHUID, &[]),
            Err(ReadError::Malformed(_))
        ));
    }

    #[test]
    fn a_passed_deadline_stops_the_read() {
        let mut script = Script::new(&[&[0x90, 0x00]]);
        let clock = still();
        let mut ch = Channel::new(
            &mut script,
            false,
            clock.now() - Duration::from_millis(1),
            &clock,
        );
        assert!(matches!(ch.send(GET_CHUID, &[]), Err(ReadError::Deadline)));
        assert!(script.sent.is_empty());
    }

    #[test]
    fn a_removed_card_is_a_transport_error() {
        let mut script = Script::new(&[&[1, 0x61, 0x10]]);
        let clock = still();
        let mut ch = Channel::new(&mut script, false, later(), &clock);
        let err = ch.send(GET_CHUID, &[]).unwrap_err();
        assert_eq!(err, ReadError::Transport(TransportError::CardRemoved));
    }
}
