//! Everything that talks to pcscd: the monitor thread, the card reader, the APDU transport.
//!
//! The card protocols in [`crate::card`] never see PC/SC; this module hands them a
//! [`transport::PcscTransport`] and turns pcscd's state into [`monitor::MonitorEvent`]s.

pub mod monitor;
pub mod reader;
pub mod transport;

use std::ffi::CString;
use std::time::Duration;

use ::pcsc::{Context, ReaderState, Scope, State};
use thiserror::Error;

pub use monitor::{Monitor, MonitorEvent};
pub use reader::{read_reader, unreadable};

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

/// Whether `reader` holds a card right now, as pcscd sees it (no wait); false when it cannot
/// tell.
pub fn card_present(ctx: &Context, reader: &std::ffi::CStr) -> bool {
    let mut states = [ReaderState::new(reader.to_owned(), State::UNAWARE)];
    match ctx.get_status_change(Duration::ZERO, &mut states) {
        Ok(()) | Err(::pcsc::Error::Timeout) => states[0].event_state().contains(State::PRESENT),
        Err(_) => false,
    }
}
