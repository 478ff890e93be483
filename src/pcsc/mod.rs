//! Everything that talks to pcscd: the monitor thread, the card reader, the APDU transport.
//!
//! The card protocols in [`crate::card`] never see PC/SC; this module hands them a
//! [`transport::PcscTransport`] and turns pcscd's state into [`monitor::MonitorEvent`]s.

pub mod monitor;
pub mod reader;
pub mod slot;
pub mod transport;

use std::ffi::CString;
use std::time::Duration;

use ::pcsc::{Context, ReaderState, Scope, State};
use thiserror::Error;

pub use monitor::{Monitor, MonitorEvent};
pub use reader::{read_reader, unreadable};
pub use slot::PcscSlots;

/// Failures to talk to pcscd at all.
#[derive(Debug, Error)]
pub enum PcscError {
    #[error(
        "cannot reach pcscd ({0}): start it with `sudo systemctl start pcscd.socket` \
         (or run `sudo pcscd`), then try again"
    )]
    Unavailable(::pcsc::Error),
    #[error(
        "pcscd refused access ({0}): the user running cardbridge needs the polkit rule for \
         org.debian.pcsc-lite.access_pcsc and access_card"
    )]
    AccessDenied(::pcsc::Error),
    #[error("PC/SC call failed: {0}")]
    Other(::pcsc::Error),
}

impl From<::pcsc::Error> for PcscError {
    fn from(e: ::pcsc::Error) -> Self {
        use ::pcsc::Error::*;
        match e {
            NoService | ServiceStopped | CommError => PcscError::Unavailable(e),
            // pcsc-lite answers a polkit refusal with SCARD_W_SECURITY_VIOLATION.
            SecurityViolation => PcscError::AccessDenied(e),
            other => PcscError::Other(other),
        }
    }
}

/// Opens a PC/SC context, mapping "pcscd not running" and "access denied" to clear errors.
pub fn connect() -> Result<Context, PcscError> {
    Ok(Context::establish(Scope::User)?)
}

/// One reader and whether a card is in it right now.
#[derive(Debug, Clone)]
pub struct ReaderPresence {
    pub name: CString,
    pub card_present: bool,
}

/// Lists the readers and which of them hold a card, without waiting.
pub fn readers(ctx: &Context) -> Result<Vec<ReaderPresence>, PcscError> {
    let names = ctx.list_readers_owned()?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut states: Vec<ReaderState> = names
        .iter()
        .map(|n| ReaderState::new(n.clone(), State::UNAWARE))
        .collect();
    match ctx.get_status_change(Duration::ZERO, &mut states) {
        Ok(()) | Err(::pcsc::Error::Timeout) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(states
        .iter()
        .map(|s| ReaderPresence {
            name: s.name().to_owned(),
            card_present: s.event_state().contains(State::PRESENT),
        })
        .collect())
}

/// pcscd's insert/remove counter for `reader` when it holds a card, without waiting.
pub fn card_counter(ctx: &Context, reader: &std::ffi::CStr) -> Option<u32> {
    let mut states = [ReaderState::new(reader.to_owned(), State::UNAWARE)];
    match ctx.get_status_change(Duration::ZERO, &mut states) {
        Ok(()) | Err(::pcsc::Error::Timeout) => {}
        Err(_) => return None,
    }
    let present = states[0].event_state().contains(State::PRESENT);
    present.then(|| states[0].event_count())
}

/// Whether `reader` holds a card pcscd will not report: after a read failed because its card was
/// pulled, pcscd shows the slot as it was until it next polls the reader. If the slot still
/// holds a card with the counter it had before the read (`before`) once `settle` has passed,
/// another card (or the same one) went in before pcscd noticed the pull, and no insertion will
/// ever be reported for it. A counter that moved, even before this is asked, is a change pcscd
/// saw and the monitor announces (perhaps later than this asks): reading it here as well would
/// read that card twice.
pub fn holds_unreported_card(
    ctx: &Context,
    reader: &std::ffi::CStr,
    before: Option<u32>,
    settle: Duration,
) -> bool {
    let mut states = [ReaderState::new(reader.to_owned(), State::UNAWARE)];
    if !matches!(
        ctx.get_status_change(Duration::ZERO, &mut states),
        Ok(()) | Err(::pcsc::Error::Timeout)
    ) || !states[0].event_state().contains(State::PRESENT)
        || Some(states[0].event_count()) != before
    {
        return false;
    }
    let counter = states[0].event_count();
    let until = std::time::Instant::now() + settle;
    loop {
        states[0].sync_current_state();
        let left = until.saturating_duration_since(std::time::Instant::now());
        match ctx.get_status_change(left, &mut states) {
            Err(::pcsc::Error::Timeout) => return true,
            Ok(()) => {
                let now = states[0].event_state();
                if !now.contains(State::PRESENT) || states[0].event_count() != counter {
                    return false;
                }
                // Another application's use of the card changes its state too; keep waiting.
                if left.is_zero() {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
}
