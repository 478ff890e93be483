//! The system clock. The card layer reads no clock of its own (see `cardbridge_card::Clock`),
//! so the PC/SC side hands it this one, and every timestamp cardbridge writes is formatted here.

use std::time::Instant;

use time::OffsetDateTime;

use crate::card;

/// The machine's monotonic and wall clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl card::Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn now_utc(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// The current time as cardbridge writes it in JSON and in the database (RFC 3339, UTC).
pub fn now_rfc3339() -> String {
    card::rfc3339(OffsetDateTime::now_utc())
}
