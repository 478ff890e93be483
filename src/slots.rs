//! Where the engine's reader workers get their cards: pcscd on a station
//! ([`crate::pcsc::PcscSlots`]), or a script standing in for readers and cards (the simulated
//! year of `hw-tests/soak --simulated`), so that both run the same engine.

use crate::card::{Card, ReadOptions};

/// Opens a reader's slot for the worker thread that reads it.
pub trait Slots: Send + Sync {
    fn open(&self, reader: &str) -> Box<dyn Slot>;
}

/// One reader, as its worker sees it. A slot may hold a connection between reads (a PC/SC
/// context), so each worker has its own.
pub trait Slot: Send {
    /// One read of the card in the slot; never fails (a card that cannot be read comes back
    /// with `error`).
    fn read(&mut self, options: &ReadOptions) -> Card;

    /// Asked after a read failed because its card was pulled: whether the slot now holds a
    /// card that will never be announced (another card went in before the pull was noticed).
    fn holds_unreported_card(&mut self) -> bool;
}
