//! Reading the card in one reader: connect SHARED, one short transaction, leave the card as it
//! was.
//!
//! Other applications (the browser's PKCS#11 module, a minidriver) may be using the same card, so
//! cardbridge never takes it exclusively, never resets it, and holds the transaction only for the
//! duration of the read. Dropping a `pcsc::Card` would reset the card and wipe other
//! applications' PIN state, so the card is always disconnected explicitly with `LeaveCard`.

use std::ffi::CStr;
use std::time::Instant;

use ::pcsc::{Attribute, Context, Disposition, Protocols, ShareMode};

use super::transport::{map_error, PcscTransport};
use crate::card::{names, read_card, Card, Clock, ReadError, ReadOptions, TransportError};
use crate::clock::SystemClock;

/// Reads the card in `reader`. Never fails: a card that cannot be read comes back with `error`.
pub fn read_reader(ctx: &Context, reader: &CStr, options: &ReadOptions) -> Card {
    let started = Instant::now();
    let name = reader.to_string_lossy();
    let mut card = match ctx.connect(reader, ShareMode::Shared, Protocols::ANY) {
        Ok(card) => card,
        Err(e) => return unreadable(&name, &[], map_error(e)),
    };
    let atr = card_atr(&card);
    let options = ReadOptions {
        reader_extended_length: options.reader_extended_length && reader_takes_extended(&card),
        ..options.clone()
    };

    let mut result = read_in_transaction(&mut card, &name, &atr, &options);
    if was_reset(&result) {
        // pcscd or another application reset the card since we connected (pcscd does so right
        // after an insertion): reconnect without resetting it again, and read once more.
        result = card
            .reconnect(ShareMode::Shared, Protocols::ANY, Disposition::LeaveCard)
            .and_then(|()| read_in_transaction(&mut card, &name, &atr, &options));
    }
    let mut snapshot = match result {
        Ok(snapshot) => snapshot,
        Err(e) => unreadable(&name, &atr, map_error(e)),
    };
    // A failed disconnect leaves nothing to do: the handle is gone either way.
    if let Err((card, _)) = card.disconnect(Disposition::LeaveCard) {
        std::mem::forget(card);
    }
    snapshot.read_ms = started.elapsed().as_millis() as u64;
    if let Some(list) = &options.smartcard_list {
        snapshot.atr_info.name = card_name(list, &atr);
    }
    snapshot
}

/// The entry for a reader whose card could not be connected to or read at all, timed now.
pub fn unreadable(name: &str, atr: &[u8], error: TransportError) -> Card {
    Card::failed(
        name,
        atr,
        &ReadError::Transport(error),
        SystemClock.now_utc(),
    )
}

/// The card's name from the system's list; an absent list (pcsc-tools not installed) just
/// leaves it out. The file is opened here, on the PC/SC side: `card` only matches lines.
fn card_name(list: &std::path::Path, atr: &[u8]) -> Option<String> {
    let file = std::fs::File::open(list).ok()?;
    names::lookup_in(std::io::BufReader::new(file), atr)
}

fn was_reset(result: &Result<Card, ::pcsc::Error>) -> bool {
    match result {
        Err(e) => *e == ::pcsc::Error::ResetCard,
        Ok(card) => card
            .error
            .as_ref()
            .is_some_and(|e| e.kind == crate::card::ReadErrorKind::CardReset),
    }
}

fn read_in_transaction(
    card: &mut ::pcsc::Card,
    name: &str,
    atr: &[u8],
    options: &ReadOptions,
) -> Result<Card, ::pcsc::Error> {
    let tx = card.transaction()?;
    let snapshot = {
        let mut transport = PcscTransport::new(&tx);
        read_card(&mut transport, name, atr, options, &SystemClock)
    };
    // Ending can only fail when the card is already gone, which the snapshot reports.
    let _ = tx.end(Disposition::LeaveCard);
    Ok(snapshot)
}

/// The ATR from SCardStatus with fixed buffers: not every driver (vpcd, for one) implements the
/// ATR attribute, and pcsc-lite reports no ATR length when asked for the sizes first.
fn card_atr(card: &::pcsc::Card) -> Vec<u8> {
    let mut names = [0u8; 4096];
    let mut atr = [0u8; ::pcsc::MAX_ATR_SIZE];
    card.status2(&mut names, &mut atr)
        .map(|status| status.atr().to_vec())
        .unwrap_or_default()
}

/// Whether the reader accepts extended APDUs. Readers that report their maximum message size
/// (CCID) are asked; readers that do not (vpcd, some PC/SC drivers) are given the benefit of the
/// doubt, and the APDU channel falls back to short APDUs if the first extended one fails.
fn reader_takes_extended(card: &::pcsc::Card) -> bool {
    let mut buf = [0u8; 4];
    match card.get_attribute(Attribute::Maxinput, &mut buf) {
        Ok(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]) > 261,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_list_is_not_an_error() {
        let missing = std::path::Path::new("/nonexistent/smartcard_list.txt");
        assert_eq!(card_name(missing, &[0x3B]), None);
    }
}
