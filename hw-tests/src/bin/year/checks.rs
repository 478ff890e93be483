//! The end checks, on the station's database, the simulator's requests and the API.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use hw_tests::chaos::Verdict;
use hw_tests::sim::{smartcard_uuid, Simulator};
use hw_tests::station_client::{http, revocation_status, Sample};
use hw_tests::vcard::Truth;
use serde_json::Value;

use crate::TOKEN;

/// Rows in every table, read beside the running daemon.
pub fn row_counts(db: &Path) -> Result<Vec<(String, i64)>> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(cardbridge::store::row_counts(&conn)?)
}

/// Resident memory and state size over the reports of the last half: the largest at most 10 %
/// above the smallest.
pub fn flat_over_last_half(reports: &[(u64, Sample)]) -> Vec<Verdict> {
    let last = reports.last().map_or(0, |r| r.0);
    let half: Vec<&Sample> = reports
        .iter()
        .filter(|(n, _)| *n * 2 >= last && *n > 0)
        .map(|(_, s)| s)
        .collect();
    let flat = |check: &'static str, values: Vec<u64>| {
        let (min, max) = (values.iter().min(), values.iter().max());
        let passed = match (min, max) {
            (Some(&min), Some(&max)) => values.len() >= 2 && max as f64 <= min as f64 * 1.10,
            _ => false,
        };
        Verdict {
            check,
            passed,
            detail: format!("{values:?} KiB"),
        }
    };
    vec![
        flat(
            "resident memory flat over the last half (within 10 %)",
            half.iter().map(|s| s.rss_kib).collect(),
        ),
        flat(
            "state directory flat over the last half (within 10 %)",
            half.iter().map(|s| s.state_kib).collect(),
        ),
    ]
}

pub fn tables_within_bounds(db: &Path) -> Verdict {
    let rows = match row_counts(db) {
        Ok(rows) => rows,
        Err(e) => {
            return Verdict {
                check: "every table within its bound",
                passed: false,
                detail: e.to_string(),
            }
        }
    };
    let over: Vec<String> = cardbridge::store::ROW_BOUNDS
        .iter()
        .filter_map(|(table, bound)| {
            let n = rows.iter().find(|(t, _)| t == table).map_or(0, |r| r.1);
            (n > *bound).then(|| format!("{table} {n} > {bound}"))
        })
        .collect();
    Verdict {
        check: "every table within its bound",
        passed: over.is_empty(),
        detail: if over.is_empty() {
            let bounds: Vec<String> = cardbridge::store::ROW_BOUNDS
                .iter()
                .map(|(t, b)| format!("{t} ≤ {b}"))
                .collect();
            bounds.join(", ")
        } else {
            over.join("; ")
        },
    }
}

/// Waits (60 s at most) for every submitted revocation to end; returns them with their final
/// status and card id.
pub fn revocations_at_end(port: u16, state: &Path) -> Result<Vec<(String, String)>> {
    let db = state.join("state").join("cardbridge.db");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let ids: Vec<(u64, String)> = conn
        .prepare("SELECT id, card_id FROM revocations ORDER BY id")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let until = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    for (id, card) in ids {
        let status = loop {
            let status = revocation_status(port, TOKEN, id).unwrap_or_default();
            if status == "succeeded" || status == "failed" || Instant::now() > until {
                break status;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        out.push((card, status));
    }
    Ok(out)
}

/// Every revocation succeeded, and MIM CM got exactly one request per revocation (a card drawn
/// twice is revoked twice).
pub fn revocations_reached_cm_once(sim: &Simulator, revoked: &[(String, String)]) -> Verdict {
    let requests: Vec<String> = sim.requests().iter().map(Value::to_string).collect();
    let mut cards: Vec<&String> = revoked.iter().map(|(card, _)| card).collect();
    cards.sort();
    cards.dedup();
    let mut problems: Vec<String> = revoked
        .iter()
        .filter(|(_, status)| status != "succeeded")
        .map(|(card, status)| format!("{card}: {status}"))
        .collect();
    for card in cards {
        let truth = Truth {
            atr: String::new(),
            card_id: Some(card.clone()),
            serial_number: None,
            certificates: Vec::new(),
        };
        let uuid = smartcard_uuid(&truth);
        let sent = requests.iter().filter(|r| r.contains(&uuid)).count();
        let wanted = revoked.iter().filter(|(c, _)| c == card).count();
        if sent != wanted {
            problems.push(format!("{card}: {wanted} revocations, {sent} CM requests"));
        }
    }
    Verdict {
        check: "revocations carried out once",
        passed: problems.is_empty() && !revoked.is_empty(),
        detail: format!("{} revocations; {}", revoked.len(), problems.join("; ")),
    }
}

/// At the end every card is out: the API lists no card, and every reader.
pub fn cards_equal_readers(port: u16, readers: usize) -> Verdict {
    let cards = http(port, TOKEN, "GET", "/v1/cards", &[], "");
    let listed = http(port, TOKEN, "GET", "/v1/readers", &[], "");
    let count = |answer: &Result<(u16, String)>| match answer {
        Ok((200, body)) => serde_json::from_str::<Vec<Value>>(body)
            .ok()
            .map(|v| v.len()),
        _ => None,
    };
    let (cards, listed) = (count(&cards), count(&listed));
    Verdict {
        check: "cards listed equal cards in readers",
        passed: cards == Some(0) && listed == Some(readers),
        detail: format!("{cards:?} cards and {listed:?} readers listed; 0 and {readers} in place"),
    }
}
