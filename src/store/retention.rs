//! The bounds of the state database. Every table that grows with use is cut back here, oldest
//! first; ARCHITECTURE.md ("Bounds") lists them with the in-memory ones. Freed pages are reused
//! by later inserts, so a database at its bounds stops growing; the WAL is truncated after each
//! checkpoint (`journal_size_limit`, set when the database is opened).

use rusqlite::params;

use super::{Store, StoreError};

/// Sightings kept: one row per read. About 36 MB at this bound (365 bytes a row with its index,
/// measured in the soak run): years of a busy kiosk.
pub(super) const MAX_SIGHTINGS: i64 = 100_000;
/// Audit rows kept: one per state-changing call (sync, revocation, console sign-in).
pub(super) const MAX_AUDIT: i64 = 100_000;
/// Cards remembered (their certificates, last read and last reconciliation), the most recently
/// seen first: a card not seen while this many others were can no longer be revoked by card id
/// from this station, and is reconciled afresh when it comes back.
pub(super) const MAX_CARDS: i64 = 50_000;
/// Finished revocations kept with their actions and attempts; unfinished ones are never cut.
pub(super) const MAX_FINISHED_REVOCATIONS: i64 = 10_000;
/// Delivery attempts kept per action: the first ones and the newest tell the story of an
/// action retried for weeks.
pub(super) const MAX_ATTEMPTS_PER_ACTION: i64 = 100;
/// How often (in rows of the table that triggers it) the cuts run.
pub(super) const PRUNE_EVERY: i64 = 1000;

/// The most rows each bounded table holds, as the simulated year checks them: the cuts run
/// every [`PRUNE_EVERY`] sightings, so up to that many rows (cards: new cards) come on top of a
/// bound between two cuts. The per-card tables hold a row per card remembered.
pub const ROW_BOUNDS: [(&str, i64); 5] = [
    ("sightings", MAX_SIGHTINGS + PRUNE_EVERY),
    ("audit", MAX_AUDIT + PRUNE_EVERY),
    ("cards", MAX_CARDS + PRUNE_EVERY),
    ("card_reads", MAX_CARDS + PRUNE_EVERY),
    ("reconciliations", MAX_CARDS + PRUNE_EVERY),
];

impl Store {
    /// Cuts every bounded table back to its bound. Run every [`PRUNE_EVERY`] sightings and at
    /// startup; each cut is one statement on an index, cheap when nothing is over.
    pub fn prune(&self) -> Result<(), StoreError> {
        self.prune_newest("sightings", MAX_SIGHTINGS)?;
        self.prune_newest("audit", MAX_AUDIT)?;
        self.prune_cards(MAX_CARDS)?;
        self.prune_revocations(MAX_FINISHED_REVOCATIONS)?;
        Ok(())
    }

    /// Keeps the newest `keep` rows of `table` (by id). `table` is one of this module's names.
    pub(super) fn prune_newest(&self, table: &'static str, keep: i64) -> Result<(), StoreError> {
        self.conn.execute(
            &format!("DELETE FROM {table} WHERE id <= (SELECT max(id) FROM {table}) - ?1"),
            [keep],
        )?;
        Ok(())
    }

    /// Forgets the cards seen longest ago beyond the newest `keep`, in every per-card table.
    fn prune_cards(&self, keep: i64) -> Result<(), StoreError> {
        let tx = self.write_transaction()?;
        tx.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS forgotten (card_id TEXT PRIMARY KEY);
             DELETE FROM forgotten;",
        )?;
        tx.execute(
            "INSERT INTO forgotten
             SELECT card_id FROM cards ORDER BY seen_at DESC LIMIT -1 OFFSET ?1",
            [keep],
        )?;
        for table in [
            "card_certificates",
            "card_reads",
            "reconciliations",
            "cards",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE card_id IN forgotten"),
                [],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes finished revocations (no action queued or sending) older than the newest `keep`,
    /// with their actions and attempts.
    fn prune_revocations(&self, keep: i64) -> Result<(), StoreError> {
        let tx = self.write_transaction()?;
        let cut: Option<i64> = tx
            .query_row(
                "SELECT id FROM revocations ORDER BY id DESC LIMIT 1 OFFSET ?1",
                [keep],
                |r| r.get(0),
            )
            .ok();
        if let Some(cut) = cut {
            let finished = "SELECT r.id FROM revocations r WHERE r.id <= ?1 AND NOT EXISTS
                 (SELECT 1 FROM revocation_actions a WHERE a.revocation_id = r.id
                  AND a.status IN ('queued', 'sending'))";
            tx.execute(
                &format!(
                    "DELETE FROM revocation_attempts WHERE action_id IN
                     (SELECT id FROM revocation_actions WHERE revocation_id IN ({finished}))"
                ),
                params![cut],
            )?;
            tx.execute(
                &format!("DELETE FROM revocation_actions WHERE revocation_id IN ({finished})"),
                params![cut],
            )?;
            tx.execute(
                &format!(
                    "DELETE FROM revocations WHERE id IN ({finished}) AND NOT EXISTS
                     (SELECT 1 FROM revocation_actions a WHERE a.revocation_id = revocations.id)"
                ),
                params![cut],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Keeps the first and the newest attempts of `action_id`, [`MAX_ATTEMPTS_PER_ACTION`] in
    /// all: called after each attempt is recorded.
    pub(super) fn prune_attempts(&self, action_id: i64) -> Result<(), StoreError> {
        let half = MAX_ATTEMPTS_PER_ACTION / 2;
        self.conn.execute(
            "DELETE FROM revocation_attempts WHERE action_id = ?1
             AND id NOT IN (SELECT id FROM revocation_attempts WHERE action_id = ?1 ORDER BY id LIMIT ?2)
             AND id NOT IN (SELECT id FROM revocation_attempts WHERE action_id = ?1 ORDER BY id DESC LIMIT ?2)",
            params![action_id, half],
        )?;
        Ok(())
    }

    /// Rows in every table.
    pub fn row_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(row_counts(&self.conn)?)
    }
}

/// Rows in every table of the database behind `conn`: also for a read-only connection beside a
/// running daemon (the simulated year's reports).
pub fn row_counts(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    tables
        .into_iter()
        .map(|t| {
            let n = conn.query_row(&format!("SELECT count(*) FROM \"{t}\""), [], |r| r.get(0))?;
            Ok((t, n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revoke::{ActionKind, Plan, Target};

    fn store(name: &str) -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "cardbridge-retention-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        (Store::open(&dir).unwrap(), dir)
    }

    fn count(store: &Store, table: &str) -> i64 {
        store
            .row_counts()
            .unwrap()
            .into_iter()
            .find(|(t, _)| t == table)
            .map_or(-1, |(_, n)| n)
    }

    /// A revocation of card `00` with these actions (none: it is finished at once).
    fn plan(actions: Vec<ActionKind>) -> Plan {
        Plan {
            card_id: "00".into(),
            target: Target::Certificates,
            reason: "superseded",
            reason_code: 4,
            operation: None,
            revoker: None,
            comment: None,
            actions,
        }
    }

    /// One SCEPman revocation, queued until delivered.
    fn one_revoke() -> ActionKind {
        ActionKind::ScepmanRevoke {
            serial_number: "01".into(),
            thumbprint: "AA".into(),
        }
    }

    #[test]
    fn the_oldest_cards_are_forgotten_in_every_per_card_table() {
        let (store, dir) = store("cards");
        for n in 0..5 {
            let id = format!("{n:032X}");
            store
                .save_card_certificates(&id, &[], &format!("2026-12-0{}T00:00:00Z", n + 1))
                .unwrap();
            store.conn.execute(
                "INSERT INTO card_reads (card_id, thumbprints, read_at, json) VALUES (?1, '', '', '{}')",
                [&id],
            ).unwrap();
        }
        store.prune_cards(3).unwrap();
        assert_eq!(count(&store, "cards"), 3);
        assert_eq!(count(&store, "card_reads"), 3);
        let oldest: Option<String> = store
            .conn
            .query_row("SELECT min(seen_at) FROM cards", [], |r| r.get(0))
            .unwrap();
        assert_eq!(oldest.as_deref(), Some("2026-12-03T00:00:00Z"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn finished_revocations_beyond_the_bound_go_and_unfinished_ones_stay() {
        let (store, dir) = store("revocations");
        // The oldest is unfinished (its action is queued), the next three are finished.
        store
            .insert_revocation("k", "0", "h", &plan(vec![one_revoke()]), &["m".into()])
            .unwrap();
        for n in 1..4 {
            store
                .insert_revocation("k", &n.to_string(), "h", &plan(Vec::new()), &[])
                .unwrap();
        }
        store.prune_revocations(1).unwrap();
        let ids: Vec<i64> = store
            .revocations_page(None, &[], 10)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, [4, 1]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_action_keeps_its_first_and_newest_attempts() {
        let (store, dir) = store("attempts");
        store
            .insert_revocation("k", "1", "h", &plan(vec![one_revoke()]), &["m".into()])
            .unwrap();
        let action: i64 = store
            .conn
            .query_row("SELECT id FROM revocation_actions", [], |r| r.get(0))
            .unwrap();
        for _ in 0..(MAX_ATTEMPTS_PER_ACTION + 30) {
            store
                .conn
                .execute(
                    "INSERT INTO revocation_attempts (action_id, at, call, code, message) VALUES (?1, '', '', '', '')",
                    [action],
                )
                .unwrap();
            store.prune_attempts(action).unwrap();
        }
        assert_eq!(
            count(&store, "revocation_attempts"),
            MAX_ATTEMPTS_PER_ACTION
        );
        let first: i64 = store
            .conn
            .query_row("SELECT min(id) FROM revocation_attempts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(first, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
