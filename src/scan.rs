//! `cardbridge scan`: read every card present now, print it, exit.
//!
//! Each reader is read on its own thread with its own PC/SC context (pcsc-lite wants one context
//! per thread), so one slow or broken card does not hold up the others.

use std::io::Write;

use serde::Serialize;

use crate::card::{Card, ReadOptions, TransportError};
use crate::config::Config;
use crate::http::ServerError;
use crate::pcsc::{self, PcscError};
use crate::reconcile::{Reconciler, Reconciliation};
use crate::store::{Store, StoreError, CARD_ID_FORM};

/// What `scan` found: the cards read, and the readers that held none.
#[derive(Debug)]
pub struct ScanResult {
    pub cards: Vec<Card>,
    pub empty_readers: Vec<String>,
}

/// Reads the card in every reader (or only in `only_reader`, matched exactly, else as a
/// case-insensitive substring). Cards come back in reader order.
pub fn scan(only_reader: Option<&str>, options: &ReadOptions) -> Result<ScanResult, ScanError> {
    let ctx = pcsc::connect()?;
    let mut readers = pcsc::readers(&ctx)?;
    if let Some(wanted) = only_reader {
        let exact: Vec<_> = readers
            .iter()
            .filter(|r| r.name.to_string_lossy() == wanted)
            .cloned()
            .collect();
        readers = if exact.is_empty() {
            let wanted = wanted.to_lowercase();
            readers
                .into_iter()
                .filter(|r| r.name.to_string_lossy().to_lowercase().contains(&wanted))
                .collect()
        } else {
            exact
        };
        if readers.is_empty() {
            return Err(ScanError::NoSuchReader(
                only_reader.unwrap_or_default().to_string(),
            ));
        }
    }
    let empty_readers = readers
        .iter()
        .filter(|r| !r.card_present)
        .map(|r| r.name.to_string_lossy().into_owned())
        .collect();
    let present: Vec<_> = readers.iter().filter(|r| r.card_present).collect();
    let cards = match present[..] {
        // One card (the usual case at a kiosk): read it with the context we have.
        [only] => vec![pcsc::read_reader(&ctx, &only.name, options)],
        _ => std::thread::scope(|s| {
            let handles: Vec<_> = present
                .iter()
                .map(|r| s.spawn(move || read_on_own_context(&r.name, options)))
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        }),
    };
    Ok(ScanResult {
        cards,
        empty_readers,
    })
}

/// Reads one reader from a thread of its own, which needs a PC/SC context of its own.
fn read_on_own_context(reader: &std::ffi::CStr, options: &ReadOptions) -> Card {
    match pcsc::connect() {
        Ok(ctx) => pcsc::read_reader(&ctx, reader, options),
        Err(e) => pcsc::unreadable(
            &reader.to_string_lossy(),
            &[],
            TransportError::ServiceUnavailable(e.to_string()),
        ),
    }
}

/// A card with its reconciliation, as `scan --reconcile --json` prints it.
#[derive(Debug, Serialize)]
pub struct Reconciled {
    #[serde(flatten)]
    pub card: Card,
    /// Null for a card that could not be read: a partial read is not compared with anything.
    pub reconciliation: Option<Reconciliation>,
}

/// Why `scan --reconcile` could not start comparing.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileSetupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cm(#[from] ServerError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Reconciles every successfully read card with the configured server, one after the other,
/// recording sightings and results in the state database. Card reading is already finished when
/// this runs, so a slow server never delays it.
pub fn reconcile_all(
    cards: Vec<Card>,
    config: &Config,
) -> Result<Vec<Reconciled>, ReconcileSetupError> {
    let store = Store::open(&config.state_dir())?;
    let reconciler = Reconciler::configured(config, store.setting(CARD_ID_FORM)?)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ReconcileSetupError::Runtime)?;
    let mut out = Vec::with_capacity(cards.len());
    for card in cards {
        store.record_sighting(&card)?;
        let reconciliation = if card.error.is_none() {
            let history = store.history(&card)?;
            let r = runtime.block_on(reconciler.reconcile(&card, true, &history));
            store.save_reconciliation(&r)?;
            Some(r)
        } else {
            None
        };
        out.push(Reconciled {
            card,
            reconciliation,
        });
    }
    if let Some(form) = reconciler.preferred_form() {
        store.set_setting(CARD_ID_FORM, form.as_str())?;
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Pcsc(#[from] PcscError),
    #[error("no reader matches {0:?}; `cardbridge scan` without --reader lists them all")]
    NoSuchReader(String),
}

/// Prints cards (with their reconciliation, when there is one) as a human-readable table.
pub fn print_table(
    cards: &[Reconciled],
    empty_readers: &[String],
    out: &mut dyn Write,
) -> std::io::Result<()> {
    for Reconciled {
        card,
        reconciliation,
    } in cards
    {
        writeln!(out, "Reader:   {}", card.reader)?;
        let name = card.atr_info.name.as_deref().map(|n| format!("  ({n})"));
        writeln!(out, "ATR:      {}{}", card.atr, name.unwrap_or_default())?;
        if let Some(e) = &card.error {
            writeln!(out, "Error:    {} ({})\n", e.message, e.code())?;
            continue;
        }
        let serial = card
            .serial_number
            .as_deref()
            .map(|s| format!("  serial {s}"));
        let model = card.idprime.as_ref().map(|d| format!("  ({})", d.model));
        writeln!(
            out,
            "Card:     {}{}  id {}{}",
            card.kind.as_str(),
            model.unwrap_or_default(),
            card.card_id.as_deref().unwrap_or("-"),
            serial.unwrap_or_default()
        )?;
        writeln!(
            out,
            "Read:     {} ms, {} APDUs, {} certificates",
            card.read_ms,
            card.apdu_count,
            card.certificates.len()
        )?;
        for note in &card.notes {
            writeln!(out, "Note:     {note}")?;
        }
        for c in &card.certificates {
            let column = slot_column(&c.slot, out)?;
            writeln!(
                out,
                "  {:<8} {}  {}  until {}{}",
                column,
                c.thumbprint,
                c.subject.as_deref().unwrap_or("?"),
                c.not_after.as_deref().unwrap_or("?"),
                c.error
                    .as_deref()
                    .map(|e| format!("  [{e}]"))
                    .unwrap_or_default()
            )?;
        }
        if let Some(r) = reconciliation {
            let reason = r.reason.as_deref().map(|x| format!("  ({x})"));
            writeln!(
                out,
                "Server:   {}  verdict {}{}",
                r.state.as_str(),
                r.verdict.as_str(),
                reason.unwrap_or_default()
            )?;
            for f in &r.findings {
                writeln!(out, "  [{}] {}: {}", f.severity.as_str(), f.code, f.message)?;
            }
        }
        writeln!(out)?;
    }
    for reader in empty_readers {
        writeln!(out, "Reader:   {reader}\n          (no card)\n")?;
    }
    Ok(())
}

/// The slot column of a certificate line. A PIV key reference fits; a container name (a
/// 38-character `{GUID}` from Windows) goes whole on a line of its own above, never cut.
fn slot_column(slot: &str, out: &mut dyn Write) -> std::io::Result<String> {
    if slot.chars().count() <= 8 {
        return Ok(slot.to_string());
    }
    writeln!(out, "  {slot}")?;
    Ok(String::new())
}
