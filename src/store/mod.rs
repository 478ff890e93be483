//! The state database (SQLite in the state directory): the last reconciliation per card, the
//! history of card sightings, small learnt settings such as the card-id byte order the server
//! answers to, the audit trail of the local API, and the revocation outbox ([`revocations`]).
//!
//! Migrations are numbered and recorded in `PRAGMA user_version`; each runs in a transaction, so
//! a crash mid-migration leaves the previous version intact. A file that is not a SQLite database,
//! fails its integrity check, or comes from a newer cardbridge is a clear startup error rather
//! than something to overwrite.

mod retention;

pub use retention::{row_counts, ROW_BOUNDS};
pub mod revocations;

pub use revocations::{ActionUpdate, DueAction, Schedule};

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;

use crate::card::Card;
use crate::reconcile::history::{History, Remembered};
use crate::reconcile::Reconciliation;

/// The settings key of the card-id form (`rfc4122` or `windows`) the CM server answered to.
pub const CARD_ID_FORM: &str = "cm.card_id_form";

/// Schema migrations; entry `n` brings the database from version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE reconciliations (
        card_id     TEXT PRIMARY KEY,
        verdict     TEXT NOT NULL,
        state       TEXT NOT NULL,
        checked_at  TEXT NOT NULL,
        json        TEXT NOT NULL
     );
     CREATE TABLE sightings (
        id          INTEGER PRIMARY KEY,
        card_id     TEXT,
        reader      TEXT NOT NULL,
        atr         TEXT NOT NULL,
        thumbprints TEXT NOT NULL,
        seen_at     TEXT NOT NULL
     );
     CREATE INDEX sightings_card ON sightings (card_id, seen_at);
     CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
     );",
    "CREATE TABLE audit (
        id      INTEGER PRIMARY KEY,
        at      TEXT NOT NULL,
        client  TEXT NOT NULL,
        origin  TEXT,
        route   TEXT NOT NULL,
        outcome INTEGER NOT NULL
     );",
    revocations::MIGRATION,
    // The last successful read of each card, so a card can be reconciled again when it is no
    // longer in a reader, and a card whose id changed can be linked to its earlier self.
    "CREATE TABLE card_reads (
        card_id       TEXT PRIMARY KEY,
        serial_number TEXT,
        thumbprints   TEXT NOT NULL,
        read_at       TEXT NOT NULL,
        json          TEXT NOT NULL
     );
     CREATE INDEX card_reads_serial ON card_reads (serial_number);",
    // `$filter` on revocations searches the whole trail: by card and by time through these.
    "CREATE INDEX cards_seen ON cards (seen_at);
     CREATE INDEX revocations_card ON revocations (card_id);
     CREATE INDEX revocations_created ON revocations (substr(created_at, 1, 19));",
    // A card whose id changed is looked for by what it shares with its earlier self (the
    // YubiKey serial, a certificate) through indexes, not by a scan of the most recently read
    // cards at each reconciliation (the simulated year's 50,000 cards made that scan most of a
    // reconciliation's time).
    "CREATE INDEX card_certificates_thumbprint ON card_certificates (thumbprint);",
];

/// Most earlier selves a card whose id changed is compared with: the most recently read first.
const HISTORY_LIMIT: i64 = 1000;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(transparent)]
    StateDir(#[from] crate::state_dir::StateDirError),
    #[error("cannot open the state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the state database {path} is corrupt or not a cardbridge database ({detail}); move it aside to start afresh")]
    Corrupt { path: PathBuf, detail: String },
    #[error("the state database {path} has schema version {found}, newer than this cardbridge understands ({known})")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("state database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("cannot encode a reconciliation: {0}")]
    Json(#[from] serde_json::Error),
}

/// One state-changing API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub at: String,
    pub client: String,
    pub origin: Option<String>,
    pub route: String,
    /// The HTTP status of the answer.
    pub outcome: u16,
}

pub struct Store {
    conn: Connection,
}

/// How much of the database a connection keeps in memory (SQLite's page cache). The kernel
/// caches the file anyway; what a cache costs is memory the daemon grows into as its connection
/// touches new pages. The bundled SQLite pools the caches of a process
/// (`SQLITE_ENABLE_MEMORY_MANAGEMENT`: a page may be recycled from any connection), so the sum of
/// the connections' sizes bounds the pool (ARCHITECTURE.md, "Bounds").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCache {
    /// 256 KiB (SQLite's default is 2 MiB): for the connection that appends a sighting at every
    /// read and rewrites a card's rows (the engine's).
    Appending,
    /// 20 pages: for connections that read and write a few rows per call (the API's and the
    /// outbox's). With the caches pooled, SQLite allocates each page on its own when a cache
    /// first needs it (no first allocation of 20 pages at once, which it makes only for caches
    /// of their own), so a cache grows to its size over the first minutes. At 256 KiB these two
    /// were still filling ten minutes into the soak, under its revocations.
    Reading,
}

impl PageCache {
    /// The value of `PRAGMA cache_size`: negative in KiB, positive in pages.
    fn pragma_value(self) -> i64 {
        match self {
            PageCache::Appending => -256,
            PageCache::Reading => 20,
        }
    }
}

/// Runs a store call from async code without stalling the other tasks of its thread: on a
/// multi-threaded runtime (the daemon's), tokio first hands this thread's other tasks to
/// another worker (`block_in_place`), so an fsync under `synchronous = FULL` holds up nothing
/// else; elsewhere (the engine's own single-threaded runtime, tests) it simply runs.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl Store {
    /// Opens (creating if needed) `cardbridge.db` in `state_dir` and brings its schema up to date.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        crate::state_dir::prepare(state_dir)?;
        let path = state_dir.join("cardbridge.db");
        let store = Store::open_file(&path)?;
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.clone().into_os_string();
            name.push(suffix);
            crate::state_dir::make_private(Path::new(&name))?;
        }
        Ok(store)
    }

    pub fn open_file(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |e: rusqlite::Error| StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        // The first real read tells a non-database file apart.
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(corrupt)?;
        if check != "ok" {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: check,
            });
        }
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;
             PRAGMA journal_size_limit = 4194304;",
        )
        .map_err(open_err)?;
        conn.pragma_update(None, "cache_size", PageCache::Appending.pragma_value())
            .map_err(open_err)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        for (n, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql).map_err(open_err)?;
            tx.pragma_update(None, "user_version", n as i64 + 1)?;
            tx.commit()?;
        }
        let store = Store { conn };
        store.prune()?;
        Ok(store)
    }

    /// A transaction that takes the write lock at its start, waiting for it under the busy
    /// timeout. A deferred one that reads before it writes fails at once ("database is
    /// locked", no waiting) when another connection wrote in between: the simulated year saw
    /// two cuts of the tables fail so.
    fn write_transaction(&self) -> Result<rusqlite::Transaction<'_>, StoreError> {
        Ok(rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )?)
    }

    /// Records that `card` was seen (a sighting), whatever its read outcome, and remembers the
    /// certificates and the JSON of a successful read, all in one transaction.
    pub fn record_sighting(&self, card: &Card) -> Result<(), StoreError> {
        let thumbprints: Vec<&str> = card
            .certificates
            .iter()
            .map(|c| c.thumbprint.as_str())
            .collect();
        let thumbprints = thumbprints.join(",");
        let tx = self.write_transaction()?;
        if let (None, Some(card_id)) = (&card.error, &card.card_id) {
            let certificates = crate::revoke::KnownCertificate::of(card);
            revocations::replace_card_certificates(&tx, card_id, &certificates, &card.read_at)?;
            tx.prepare_cached(
                "INSERT INTO card_reads (card_id, serial_number, thumbprints, read_at, json) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (card_id) DO UPDATE SET serial_number = ?2, thumbprints = ?3, read_at = ?4, json = ?5",
            )?
            .execute(params![card_id, card.serial_number, thumbprints, card.read_at, serde_json::to_string(card)?])?;
        }
        tx.prepare_cached(
            "INSERT INTO sightings (card_id, reader, atr, thumbprints, seen_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![card.card_id, card.reader, card.atr, thumbprints, card.read_at])?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        if id % retention::PRUNE_EVERY == 0 {
            self.prune()?;
        }
        Ok(())
    }

    /// Keeps `r` as the card's last reconciliation.
    pub fn save_reconciliation(&self, r: &Reconciliation) -> Result<(), StoreError> {
        let Some(card_id) = &r.card_id else {
            return Ok(());
        };
        let json = serde_json::to_string(r)?;
        self.conn.prepare_cached(
            "INSERT INTO reconciliations (card_id, verdict, state, checked_at, json) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (card_id) DO UPDATE SET verdict = ?2, state = ?3, checked_at = ?4, json = ?5",
        )?
        .execute(params![
            card_id,
            r.verdict.as_str(),
            r.state.as_str(),
            r.checked_at,
            json
        ])?;
        Ok(())
    }

    /// The last successful read of a card, as its JSON shows it (without the certificates'
    /// DER bytes, which the reconciliation rules do not use).
    pub fn last_card(&self, card_id: &str) -> Result<Option<Card>, StoreError> {
        let json: Option<String> = self
            .conn
            .query_row(
                "SELECT json FROM card_reads WHERE card_id = ?1",
                [card_id],
                |row| row.get(0),
            )
            .optional()?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    /// What the store knows about `card` before it is reconciled.
    pub fn history(&self, card: &Card) -> Result<History, StoreError> {
        let previous = match &card.card_id {
            Some(id) => self.last_reconciliation(id)?,
            None => None,
        };
        Ok(History {
            previous,
            earlier: self.earlier_selves(card)?,
        })
    }

    /// Earlier cards of this station that share the YubiKey serial number or a certificate
    /// with `card` under another id, and that a server once matched, most recently read first.
    pub fn earlier_selves(&self, card: &Card) -> Result<Vec<Remembered>, StoreError> {
        // Candidates come through the serial number's and the thumbprint's indexes; a
        // reconciliation's JSON (kilobytes, on overflow pages) is read for a resembling card
        // alone.
        let mut statement = self.conn.prepare_cached(
            "WITH candidates (card_id) AS (
                 SELECT card_id FROM card_reads WHERE serial_number = ?2
                 UNION
                 SELECT card_id FROM card_certificates
                 WHERE thumbprint IN (SELECT value FROM json_each(?3))
             )
             SELECT c.card_id, c.serial_number, c.thumbprints FROM candidates k
             JOIN card_reads c ON c.card_id = k.card_id
             JOIN reconciliations r ON r.card_id = c.card_id
             WHERE r.state = 'matched' AND c.card_id IS NOT ?1
             ORDER BY c.read_at DESC LIMIT ?4",
        )?;
        let thumbprints: Vec<&str> = card
            .certificates
            .iter()
            .map(|c| c.thumbprint.as_str())
            .collect();
        let thumbprints = serde_json::to_string(&thumbprints)?;
        let args = params![card.card_id, card.serial_number, thumbprints, HISTORY_LIMIT];
        let rows = statement.query_map(args, |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Option<String>>(1)?,
                row.get::<_, String>(2)?,
            ))
        })?;
        let mut found = Vec::new();
        for row in rows {
            let (card_id, serial_number, thumbprints) = row?;
            let thumbprints: Vec<String> = thumbprints
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect();
            if !Remembered::resembles(card, &card_id, serial_number.as_deref(), &thumbprints) {
                continue;
            }
            if let Some(reconciliation) = self.last_reconciliation(&card_id)? {
                found.push(Remembered {
                    card_id,
                    serial_number,
                    thumbprints,
                    reconciliation,
                });
            }
        }
        Ok(found)
    }

    pub fn last_reconciliation(&self, card_id: &str) -> Result<Option<Reconciliation>, StoreError> {
        let json: Option<String> = self
            .conn
            .prepare_cached("SELECT json FROM reconciliations WHERE card_id = ?1")?
            .query_row([card_id], |row| row.get(0))
            .optional()?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    pub fn sighting_count(&self, card_id: &str) -> Result<i64, StoreError> {
        Ok(self.conn.query_row(
            "SELECT count(*) FROM sightings WHERE card_id = ?1",
            [card_id],
            |row| row.get(0),
        )?)
    }

    /// Records a state-changing API call: which client, from which browser origin (if any),
    /// which route, and the HTTP status it got.
    pub fn record_audit(
        &self,
        client: &str,
        origin: Option<&str>,
        route: &str,
        outcome: u16,
    ) -> Result<(), StoreError> {
        let at = crate::clock::now_rfc3339();
        self.conn.execute(
            "INSERT INTO audit (at, client, origin, route, outcome) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![at, client, origin, route, outcome],
        )?;
        if self.conn.last_insert_rowid() % retention::PRUNE_EVERY == 0 {
            self.prune_newest("audit", retention::MAX_AUDIT)?;
        }
        Ok(())
    }

    /// The audit trail, oldest first.
    pub fn audit(&self) -> Result<Vec<AuditEntry>, StoreError> {
        let mut statement = self
            .conn
            .prepare("SELECT at, client, origin, route, outcome FROM audit ORDER BY id")?;
        let rows = statement.query_map([], |r| {
            Ok(AuditEntry {
                at: r.get(0)?,
                client: r.get(1)?,
                origin: r.get(2)?,
                route: r.get(3)?,
                outcome: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets this connection's page cache (a new connection has [`PageCache::Appending`]).
    pub fn set_page_cache(&self, cache: PageCache) -> Result<(), StoreError> {
        self.conn
            .pragma_update(None, "cache_size", cache.pragma_value())?;
        Ok(())
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()?)
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
            params![key, value],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{reconcile, Lookup};

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cardbridge-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn sample_card() -> Card {
        Card::failed(
            "reader",
            &[0x3B, 0x80, 0x80, 0x01, 0x01],
            &crate::card::ReadError::Deadline,
            time::OffsetDateTime::now_utc(),
        )
    }

    #[test]
    fn a_connection_set_to_read_asks_for_twenty_pages() {
        let dir = temp_dir("page-cache");
        let store = Store::open(&dir).unwrap();
        let cache_size = |s: &Store| -> i64 {
            s.conn
                .query_row("PRAGMA cache_size", [], |row| row.get(0))
                .unwrap()
        };
        assert_eq!(cache_size(&store), -256);
        store.set_page_cache(PageCache::Reading).unwrap();
        assert_eq!(cache_size(&store), 20);
    }

    #[test]
    fn only_the_newest_sightings_are_kept() {
        let dir = temp_dir("prune");
        let mut card = sample_card();
        card.card_id = Some("00112233445566778899AABBCCDDEEFF".into());
        let store = Store::open(&dir).unwrap();
        for _ in 0..10 {
            store.record_sighting(&card).unwrap();
        }
        store.prune_newest("sightings", 3).unwrap();
        assert_eq!(
            store
                .sighting_count("00112233445566778899AABBCCDDEEFF")
                .unwrap(),
            3
        );
    }

    #[test]
    fn keeps_reconciliations_sightings_and_settings_across_opens() {
        let dir = temp_dir("roundtrip");
        let mut card = sample_card();
        card.card_id = Some("00112233445566778899AABBCCDDEEFF".into());
        let r = reconcile(
            &card,
            &Lookup::NotFound,
            &Default::default(),
            time::OffsetDateTime::now_utc(),
        );
        {
            let store = Store::open(&dir).unwrap();
            store.record_sighting(&card).unwrap();
            store.record_sighting(&card).unwrap();
            store.save_reconciliation(&r).unwrap();
            store.save_reconciliation(&r).unwrap();
            store.set_setting("cm.card_id_form", "windows").unwrap();
            store
                .record_audit(
                    "kiosk",
                    Some("https://kiosk.contoso.com"),
                    "/v1/cards/X/sync",
                    202,
                )
                .unwrap();
        }
        let store = Store::open(&dir).unwrap();
        assert_eq!(
            store
                .sighting_count("00112233445566778899AABBCCDDEEFF")
                .unwrap(),
            2
        );
        assert_eq!(
            store
                .last_reconciliation("00112233445566778899AABBCCDDEEFF")
                .unwrap(),
            Some(r)
        );
        assert_eq!(
            store.setting("cm.card_id_form").unwrap().as_deref(),
            Some("windows")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A successfully read card with an id, a YubiKey serial and one certificate.
    fn read_card(card_id: &str, serial: &str, thumbprint: &str) -> Card {
        let mut card = sample_card();
        card.error = None;
        card.card_id = Some(card_id.into());
        card.serial_number = Some(serial.into());
        card.certificates = vec![crate::card::CertificateInfo::from_der(
            "9A".into(),
            String::new(),
            vec![0x30, 0x00],
            false,
        )];
        card.certificates[0].thumbprint = thumbprint.into();
        card
    }

    #[test]
    fn the_last_read_of_a_card_is_kept_whole() {
        let dir = temp_dir("last-card");
        let store = Store::open(&dir).unwrap();
        let mut card = read_card("00112233445566778899AABBCCDDEEFF", "123", "AA");
        store.record_sighting(&card).unwrap();
        // As the Card JSON shows it: the certificates' DER bytes are not part of it.
        card.certificates[0].der.clear();
        assert_eq!(
            store.last_card("00112233445566778899AABBCCDDEEFF").unwrap(),
            Some(card)
        );
        assert_eq!(store.last_card("FF").unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn earlier_selves_share_a_serial_or_a_certificate_and_were_matched() {
        let dir = temp_dir("earlier");
        let store = Store::open(&dir).unwrap();
        let now = time::OffsetDateTime::now_utc();
        for (id, serial, thumbprint) in [
            ("01", "111", "AA"),
            ("02", "222", "BB"),
            ("03", "333", "CC"),
        ] {
            let card = read_card(id, serial, thumbprint);
            store.record_sighting(&card).unwrap();
            let mut r = reconcile(&card, &Lookup::NotFound, &Default::default(), now);
            // 03 was never matched on a server.
            if id != "03" {
                r.state = crate::reconcile::State::Matched;
            }
            store.save_reconciliation(&r).unwrap();
        }
        let ids = |card: &Card| -> Vec<String> {
            store
                .earlier_selves(card)
                .unwrap()
                .into_iter()
                .map(|e| e.card_id)
                .collect()
        };
        assert_eq!(ids(&read_card("09", "111", "ZZ")), ["01"], "same serial");
        assert_eq!(
            ids(&read_card("09", "999", "BB")),
            ["02"],
            "shared certificate"
        );
        assert!(
            ids(&read_card("09", "333", "CC")).is_empty(),
            "never matched"
        );
        assert!(
            ids(&read_card("01", "111", "AA")).is_empty(),
            "not its own earlier self"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error() {
        let dir = temp_dir("corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cardbridge.db"), vec![0x42; 8192]).unwrap();
        let err = Store::open(&dir).err().expect("must fail");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("move it aside"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = temp_dir("newer");
        std::fs::create_dir_all(&dir).unwrap();
        let conn = Connection::open(dir.join("cardbridge.db")).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(&dir),
            Err(StoreError::TooNew { found: 99, .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_directory_is_a_clear_error() {
        let err = Store::open(Path::new("/proc/cardbridge-state"))
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("/proc/cardbridge-state"), "{err}");
    }
}
