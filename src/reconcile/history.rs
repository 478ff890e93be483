//! What the station's own history adds to a reconciliation, as pure functions:
//!
//! - `last_known`: while a server is unreachable, the last successful comparison stays next to
//!   the `server_unavailable` state, so a kiosk can say "OK as of 10:42, server unreachable since
//!   10:50". The verdict rules do not use it.
//! - `earlier_card`: a YubiKey whose CHUID was regenerated (ykman writes a new one on every
//!   certificate import) presents a new card id. An earlier card of this station with the same
//!   serial number or a shared certificate, once matched on the server, is that card's earlier
//!   self.

use serde::{Deserialize, Serialize};

use super::{
    push, CertificateMatch, Finding, Reconciliation, ServerCard, Severity, State, Verdict,
};
use crate::card::Card;

/// The last successful comparison of a card, kept while the server is unreachable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastKnown {
    pub checked_at: String,
    pub state: State,
    pub verdict: Verdict,
    pub server_card: Option<ServerCard>,
    pub findings: Vec<Finding>,
    /// The certificates as compared then, SCEPman statuses included.
    pub certificates: Vec<CertificateMatch>,
}

/// An earlier card of this station that this card appears to be, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlierCard {
    pub card_id: String,
    /// The YubiKey serial number both cards report, when they do.
    pub serial_number: Option<String>,
    /// The certificates both cards hold.
    pub thumbprints: Vec<String>,
}

/// What the station's store knows about a card before it is reconciled.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// The card's previous reconciliation.
    pub previous: Option<Reconciliation>,
    /// Earlier cards that resemble it, most recently read first.
    pub earlier: Vec<Remembered>,
}

/// An earlier card as the station's store remembers it: its last read and its last matched
/// reconciliation.
#[derive(Debug, Clone)]
pub struct Remembered {
    pub card_id: String,
    pub serial_number: Option<String>,
    pub thumbprints: Vec<String>,
    pub reconciliation: Reconciliation,
}

impl Remembered {
    /// Whether `card` looks like an earlier card read under `card_id` with `serial_number` and
    /// `thumbprints`: the same YubiKey serial or a shared certificate, under another id (or
    /// none). Takes the parts, so the store can decide before it decodes a reconciliation.
    pub fn resembles(
        card: &Card,
        card_id: &str,
        serial_number: Option<&str>,
        thumbprints: &[String],
    ) -> bool {
        if card.card_id.as_deref() == Some(card_id) {
            return false;
        }
        let same_serial = serial_number.is_some() && serial_number == card.serial_number.as_deref();
        same_serial
            || card
                .certificates
                .iter()
                .any(|c| thumbprints.contains(&c.thumbprint))
    }

    fn shared_thumbprints(&self, card: &Card) -> Vec<String> {
        card.certificates
            .iter()
            .filter(|c| self.thumbprints.contains(&c.thumbprint))
            .map(|c| c.thumbprint.clone())
            .collect()
    }

    /// The evidence that `card` is this earlier card.
    pub fn evidence(&self, card: &Card) -> EarlierCard {
        EarlierCard {
            card_id: self.card_id.clone(),
            serial_number: card
                .serial_number
                .clone()
                .filter(|s| self.serial_number.as_ref() == Some(s)),
            thumbprints: self.shared_thumbprints(card),
        }
    }
}

/// Whether a reconciliation compared the card with the server (so it can be a `last_known`).
fn compared(r: &Reconciliation) -> bool {
    matches!(r.state, State::Matched | State::NotFound)
}

/// Gives an unreachable-server reconciliation the last successful comparison: `previous`
/// itself when it compared, else what `previous` carried forward.
pub fn carry_last_known(r: &mut Reconciliation, previous: Option<&Reconciliation>) {
    if r.state != State::ServerUnavailable {
        return;
    }
    r.last_known = previous.and_then(|p| {
        if compared(p) {
            Some(LastKnown {
                checked_at: p.checked_at.clone(),
                state: p.state,
                verdict: p.verdict,
                server_card: p.server_card.clone(),
                findings: p.findings.clone(),
                certificates: p.certificates.clone(),
            })
        } else {
            p.last_known.clone()
        }
    });
}

/// Records that the server knew the card only by its earlier id: `card_id_changed` (warning).
pub fn note_changed_id(r: &mut Reconciliation, earlier: EarlierCard) {
    let mut why = Vec::new();
    if let Some(serial) = &earlier.serial_number {
        why.push(format!("the same serial number {serial}"));
    }
    if !earlier.thumbprints.is_empty() {
        why.push(format!("{} shared certificates", earlier.thumbprints.len()));
    }
    push(
        &mut r.findings,
        "card_id_changed",
        Severity::Warning,
        format!(
            "the server knows this card by its earlier id {} ({}); its CHUID was rewritten, so \
             Windows and MIM CM will see a new card until the record is updated",
            earlier.card_id,
            why.join(" and ")
        ),
    );
    r.earlier_card = Some(earlier);
    r.verdict = super::verdict(r.state, &r.findings);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{reconcile, Lookup};
    use time::OffsetDateTime;

    fn with_state(state: State, at: &str) -> Reconciliation {
        let card = crate::card::Card::failed(
            "r",
            &[0x3B, 0x00],
            &crate::card::ReadError::Deadline,
            OffsetDateTime::now_utc(),
        );
        let mut r = reconcile(
            &card,
            &Lookup::NotFound,
            &Default::default(),
            OffsetDateTime::now_utc(),
        );
        r.state = state;
        r.checked_at = at.into();
        r
    }

    #[test]
    fn last_known_comes_from_the_last_comparison_and_is_carried_forward() {
        let matched = with_state(State::Matched, "10:42");
        let mut down = with_state(State::ServerUnavailable, "10:50");
        carry_last_known(&mut down, Some(&matched));
        assert_eq!(
            down.last_known.as_ref().map(|k| k.checked_at.as_str()),
            Some("10:42")
        );

        // Still down later: the same last comparison, not the previous outage.
        let mut later = with_state(State::ServerUnavailable, "11:00");
        carry_last_known(&mut later, Some(&down));
        assert_eq!(later.last_known, down.last_known);

        // Nothing compared yet: nothing to show.
        let mut first = with_state(State::ServerUnavailable, "09:00");
        carry_last_known(&mut first, None);
        assert_eq!(first.last_known, None);

        // A comparison that succeeds needs none.
        let mut back = with_state(State::Matched, "12:00");
        carry_last_known(&mut back, Some(&later));
        assert_eq!(back.last_known, None);
    }
}
