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
        self.card
            .transmit(command, &mut self.buffer)
            .map(<[u8]>::to_vec)
            .map_err(map_error)
    }
}

/// Maps a PC/SC error to what the card layer needs to know about it.
pub fn map_error(e: ::pcsc::Error) -> TransportError {
    use ::pcsc::Error::*;
    match e {
        RemovedCard | ResetCard | NoSmartcard | UnpoweredCard | UnresponsiveCard => {
            TransportError::CardRemoved
        }
        NoService | ServiceStopped | InvalidHandle => {
            TransportError::ServiceUnavailable(e.to_string())
        }
        other => TransportError::Failed(other.to_string()),
    }
}
