//! The last reconciliation of the cards reconciled most recently, kept in memory so that the local
//! API answers for the cards in the readers without a store call. A year of a busy station brings
//! tens of thousands of distinct cards, so the map has a bound: the card remembered longest ago
//! goes. Finding it is a lookup in an ordered index, not a scan of every entry (the simulated year
//! found that scan, with a string comparison per entry, in every reconciliation).

use std::collections::{BTreeMap, HashMap};

use super::Reconciliation;

/// Reconciliations kept: far more cards than a station has readers, far fewer than the distinct
/// cards a year brings. Older ones come from the store.
pub const CAPACITY: usize = 1024;

#[derive(Debug, Default)]
pub struct Recent {
    /// Each card's last reconciliation and the number it was remembered with.
    by_card: HashMap<String, (u64, Reconciliation)>,
    /// Card ids by the number they were last remembered with, oldest first.
    order: BTreeMap<u64, String>,
    next: u64,
}

impl Recent {
    pub fn get(&self, card_id: &str) -> Option<&Reconciliation> {
        self.by_card.get(card_id).map(|(_, r)| r)
    }

    /// Keeps `r` as the last reconciliation of `card_id`; when full, forgets the card
    /// remembered longest ago.
    pub fn remember(&mut self, card_id: &str, r: Reconciliation) {
        let number = self.next;
        self.next += 1;
        match self.by_card.insert(card_id.to_string(), (number, r)) {
            Some((previous, _)) => {
                self.order.remove(&previous);
            }
            None if self.by_card.len() > CAPACITY => {
                if let Some((_, oldest)) = self.order.pop_first() {
                    self.by_card.remove(&oldest);
                }
            }
            None => {}
        }
        self.order.insert(number, card_id.to_string());
    }

    /// Every reconciliation kept, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &Reconciliation> {
        self.by_card.values().map(|(_, r)| r)
    }

    pub fn len(&self) -> usize {
        self.by_card.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_card.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{reconcile, Lookup};

    fn reconciliation() -> Reconciliation {
        let card = crate::card::Card::failed(
            "Reader",
            &[0x3B, 0x00],
            &crate::card::ReadError::Deadline,
            time::OffsetDateTime::UNIX_EPOCH,
        );
        reconcile(
            &card,
            &Lookup::NotFound,
            &Default::default(),
            time::OffsetDateTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn the_card_remembered_longest_ago_goes_when_full() {
        let mut recent = Recent::default();
        for n in 0..CAPACITY {
            recent.remember(&format!("{n:032X}"), reconciliation());
        }
        // Card 0 again: now the newest, so card 1 is the oldest.
        recent.remember(&format!("{:032X}", 0), reconciliation());
        recent.remember("NEW", reconciliation());
        assert_eq!(recent.len(), CAPACITY);
        assert!(recent.get(&format!("{:032X}", 0)).is_some());
        assert!(recent.get(&format!("{:032X}", 1)).is_none());
        assert!(recent.get("NEW").is_some());
    }

    #[test]
    fn remembering_a_card_again_keeps_one_entry() {
        let mut recent = Recent::default();
        recent.remember("A", reconciliation());
        recent.remember("A", reconciliation());
        assert_eq!(recent.len(), 1);
        assert_eq!(recent.order.len(), 1);
    }
}
