//! The one place where APDUs meet PC/SC: a [`Transport`] over a card inside a transaction.

use crate::card::{Transport, TransportError};

/// Sends APDUs through an open PC/SC transaction. The transaction (and so the card handle) is
/// borrowed, which keeps every exchange of a read inside one `SCardBeginTransaction` /
/// `SCardEndTransaction(LeaveCard)` pair.
pub struct PcscTransport<'a> {
    card: &'a ::pcsc::Card,
    buffer: Vec<u8>,
}

impl<'a> PcscTransport<'a> {
    pub fn new(card: &'a ::pcsc::Card) -> Self {
        PcscTransport {
            card,
            buffer: vec![0; ::pcsc::MAX_BUFFER_SIZE_EXTENDED],
        }
    }
}

impl Transport for PcscTransport<'_> {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        match self.card.transmit(command, &mut self.buffer) {
            // vpcd (and some other drivers) report a card that vanished mid-exchange as an empty
            // answer rather than an error; no card answers a command with nothing at all.
            Ok([]) => Err(TransportError::CardRemoved),
            Ok(response) => Ok(response.to_vec()),
            Err(e) => Err(map_error(e)),
        }
    }
}

/// Maps a PC/SC error to what the card layer needs to know about it.
pub fn map_error(e: ::pcsc::Error) -> TransportError {
    use ::pcsc::Error::*;
    match e {
        ResetCard => TransportError::CardReset,
        // pcsc-lite answers NotTransacted when the card vanished under an open transaction.
        RemovedCard | NoSmartcard | UnpoweredCard | UnresponsiveCard | NotTransacted => {
            TransportError::CardRemoved
        }
        NoService | ServiceStopped | InvalidHandle => {
            TransportError::ServiceUnavailable(e.to_string())
        }
        other => TransportError::Failed(other.to_string()),
    }
}
