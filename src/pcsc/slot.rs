//! The reader workers' slots on pcscd: a PC/SC context per worker, opened again after pcscd
//! went away.

use std::ffi::CString;
use std::time::Duration;

use super::{card_counter, connect, holds_unreported_card, read_reader, unreadable};
use crate::card::{Card, ReadErrorKind, ReadOptions, TransportError};
use crate::slots::{Slot, Slots};

/// How long pcscd is given to report a pulled card before a card still in the slot counts as
/// unreported. pcscd polls readers whose driver cannot signal (vpcd among them) every 400 ms.
const SWAP_SETTLE: Duration = Duration::from_millis(600);

/// Every reader pcscd knows.
pub struct PcscSlots;

impl Slots for PcscSlots {
    fn open(&self, reader: &str) -> Box<dyn Slot> {
        Box::new(PcscSlot {
            reader: reader.to_string(),
            name: CString::new(reader).ok(),
            ctx: None,
            counter_before_read: None,
        })
    }
}

struct PcscSlot {
    reader: String,
    /// `None` for a name PC/SC cannot carry (an inner NUL): every read of it fails.
    name: Option<CString>,
    ctx: Option<::pcsc::Context>,
    /// pcscd's insert/remove counter when the last read began: the card it was meant for.
    counter_before_read: Option<u32>,
}

impl PcscSlot {
    /// One read with the current context (opened first when there is none); a context pcscd
    /// no longer serves is dropped.
    fn read_once(&mut self, options: &ReadOptions) -> Card {
        if self.ctx.is_none() {
            self.ctx = connect().ok();
        }
        let card = match (&self.ctx, &self.name) {
            (Some(ctx), Some(name)) => {
                self.counter_before_read = card_counter(ctx, name);
                read_reader(ctx, name, options)
            }
            (None, _) => unreadable(
                &self.reader,
                &[],
                TransportError::ServiceUnavailable("cannot open a PC/SC context".into()),
            ),
            (_, None) => unreadable(
                &self.reader,
                &[],
                TransportError::Failed("the reader's name holds a NUL byte".into()),
            ),
        };
        if card
            .error
            .as_ref()
            .is_some_and(|e| e.kind == ReadErrorKind::PcscUnavailable)
        {
            self.ctx = None;
        }
        card
    }
}

impl Slot for PcscSlot {
    /// Opens a PC/SC context first when there is none. A context that died with pcscd (a
    /// restart answers an old context `NoService` forever) is replaced at once and the read made
    /// again, once: else the first card put in after every pcscd restart failed as
    /// `pcsc_unavailable` and stayed unread until pulled.
    fn read(&mut self, options: &ReadOptions) -> Card {
        let had_context = self.ctx.is_some();
        let card = self.read_once(options);
        if had_context && self.ctx.is_none() {
            return self.read_once(options);
        }
        card
    }

    fn holds_unreported_card(&mut self) -> bool {
        match (&self.ctx, &self.name) {
            (Some(ctx), Some(name)) => {
                holds_unreported_card(ctx, name, self.counter_before_read, SWAP_SETTLE)
            }
            _ => false,
        }
    }
}
