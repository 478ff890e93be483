//! What the station looks like now: its readers and the card in each, kept up to date from the
//! engine's events by the daemon, read by the API and by the systemd supervisor. It lives
//! outside `api` so that the supervisor does not reach into the HTTP layer.

use std::collections::BTreeMap;

use axum::body::Bytes;

use crate::card::Card;

/// Readers by name, with the card in each (a failed read keeps its error), and `GET /v1/cards`
/// as last sent: serialised at most once per change, when it is first asked for after it (a
/// kiosk that polls asks far more often than a station's cards change; a busy station's cards
/// change far more often than anyone asks).
#[derive(Debug, Default)]
pub struct Station {
    readers: BTreeMap<String, Option<Card>>,
    /// `None` when the cards changed since it was last made.
    cards_json: Option<Bytes>,
}

impl Station {
    pub fn add_reader(&mut self, reader: &str) {
        self.readers.entry(reader.to_string()).or_insert(None);
    }

    pub fn remove_reader(&mut self, reader: &str) {
        self.readers.remove(reader);
        self.cards_changed();
    }

    pub fn card_removed(&mut self, reader: &str) {
        if let Some(slot) = self.readers.get_mut(reader) {
            *slot = None;
        }
        self.cards_changed();
    }

    /// A card read (or failed to read) in its reader. A read that failed because its card was
    /// pulled (or replaced) leaves the reader empty: its failure can arrive after pcscd's report
    /// of the removal (both come within a millisecond, from two threads), and must not list a
    /// card that is no longer there. A card put in meanwhile is read and listed on its own.
    pub fn card_read(&mut self, card: Card) {
        let pulled = card
            .error
            .as_ref()
            .is_some_and(|e| e.kind == crate::card::ReadErrorKind::CardRemoved);
        let entry = (!pulled).then_some(card.clone());
        self.readers.insert(card.reader, entry);
        self.cards_changed();
    }

    /// Readers, and cards in them.
    pub fn counts(&self) -> (usize, usize) {
        (self.readers.len(), self.readers.values().flatten().count())
    }

    pub fn readers(&self) -> impl Iterator<Item = (&String, &Option<Card>)> {
        self.readers.iter()
    }

    /// The card list as `GET /v1/cards` sends it.
    pub fn cards_json(&mut self) -> Bytes {
        let readers = &self.readers;
        self.cards_json
            .get_or_insert_with(|| {
                let cards: Vec<&Card> = readers.values().flatten().collect();
                serde_json::to_vec(&cards)
                    .map(Bytes::from)
                    .unwrap_or_else(|_| Bytes::from_static(b"[]"))
            })
            .clone()
    }

    /// The card with this id (hex, any case) in a reader.
    pub fn find_card(&self, card_id: &str) -> Option<Card> {
        self.readers
            .values()
            .flatten()
            .find(|c| {
                c.card_id
                    .as_deref()
                    .is_some_and(|id| id.eq_ignore_ascii_case(card_id))
            })
            .cloned()
    }

    fn cards_changed(&mut self) {
        self.cards_json = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::{ReadError, TransportError};

    fn failed(reader: &str, error: TransportError) -> Card {
        Card::failed(
            reader,
            &[0x3B, 0x00],
            &ReadError::Transport(error),
            time::OffsetDateTime::UNIX_EPOCH,
        )
    }

    /// The order the chaos run saw: inserted, removed, then the read's failure (1 ms apart).
    #[test]
    fn a_read_failed_by_its_cards_removal_lists_no_card_in_either_order() {
        for removal_first in [true, false] {
            let mut station = Station::default();
            station.add_reader("r");
            let pulled = failed("r", TransportError::CardRemoved);
            if removal_first {
                station.card_removed("r");
                station.card_read(pulled);
            } else {
                station.card_read(pulled);
                station.card_removed("r");
            }
            assert_eq!(station.counts(), (1, 0), "removal first: {removal_first}");
            assert_eq!(&station.cards_json()[..], b"[]");
        }
        // Any other failure is a card in the reader that could not be read: it stays listed.
        let mut station = Station::default();
        station.card_read(failed("r", TransportError::Failed("reader error".into())));
        assert_eq!(station.counts(), (1, 1));
    }
}
