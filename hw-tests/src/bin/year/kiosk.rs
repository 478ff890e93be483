//! The kiosk: one loop per reader, driven by the daemon's event stream, with the checks that
//! are kept as the events come (a million insertions are not kept in memory).

use std::cell::Cell;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hw_tests::chaos::{Received, Verdict};
use hw_tests::station_client::{http, open_stream, read_frames, sample, Sample};
use serde_json::{json, Value};

use crate::checks::{flat_over_last_half, row_counts, tables_within_bounds};
use crate::world::StationProcess;
use crate::{card_id, reader_name, registered, Args, STALL, TOKEN};

/// Where one reader's kiosk loop is.
#[derive(Debug, Clone)]
enum Flow {
    Empty,
    /// Card `index` went in; its reads so far, and whether its reconciliation arrived.
    Holding {
        index: u64,
        card_id: String,
        reads: u32,
        reconciled: bool,
    },
    /// The card was pulled; waiting for `card.removed`.
    Pulling,
}

/// The kiosk: one loop per reader, driven by the event stream, with the streaming checks.
pub struct Kiosk<'a> {
    seed: u64,
    cards: u64,
    insertions: u64,
    every: u64,
    revoke_every: u64,
    port: u16,
    station: &'a mut StationProcess,
    state: &'a Path,
    flows: Vec<Flow>,
    /// Insertions started, and ended (card pulled and its removal seen).
    started: u64,
    ended: u64,
    last_id: Option<u64>,
    gaps: Vec<String>,
    wrong_reads: Vec<String>,
    read_twice: Vec<String>,
    /// Revocations submitted: id and card id.
    revoked: Vec<(u64, String)>,
    /// Cards pulled since the last revocation.
    since_revocation: u64,
    revocation_errors: Vec<String>,
    reports: Vec<(u64, Sample)>,
    clock: Instant,
}

impl<'a> Kiosk<'a> {
    pub fn run(
        args: &Args,
        seed: u64,
        port: u16,
        station: &'a mut StationProcess,
        state: &'a Path,
    ) -> Result<Vec<Verdict>> {
        let mut kiosk = Kiosk {
            seed,
            cards: args.cards,
            insertions: args.insertions,
            every: args.every,
            revoke_every: args.revoke_every,
            port,
            station,
            state,
            flows: vec![Flow::Empty; args.readers],
            started: 0,
            ended: 0,
            last_id: None,
            gaps: Vec::new(),
            wrong_reads: Vec::new(),
            read_twice: Vec::new(),
            revoked: Vec::new(),
            since_revocation: 0,
            revocation_errors: Vec::new(),
            reports: Vec::new(),
            clock: Instant::now(),
        };
        kiosk.report_header();
        kiosk.report(0)?;
        for reader in 0..kiosk.flows.len() {
            kiosk.insert_next(reader)?;
        }
        kiosk.drive()?;
        Ok(kiosk.verdicts())
    }

    /// Reads the stream (again after it ends, from the last id) until every insertion ended;
    /// fails when no event comes for [`STALL`] or a command cannot reach the station.
    fn drive(&mut self) -> Result<()> {
        let last_event = Cell::new(Instant::now());
        let finished = Cell::new(false);
        let mut failure = None;
        while !finished.get() && failure.is_none() {
            if last_event.get().elapsed() >= STALL {
                bail!(
                    "no event for {} s after {} insertions; readers: {:?}",
                    STALL.as_secs(),
                    self.ended,
                    self.flows
                );
            }
            // From the daemon's first event (0) at the start: the first insertions went in
            // before the stream was open.
            let after = Some(self.last_id.unwrap_or(0));
            let Ok(mut stream) = open_stream(self.port, TOKEN, after) else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let keep_going = || !finished.get() && last_event.get().elapsed() < STALL;
            read_frames(&mut stream, &keep_going, None, |event| {
                last_event.set(Instant::now());
                if failure.is_none() {
                    failure = self.on_event(event).err();
                }
                finished.set(self.ended >= self.insertions || failure.is_some());
            });
        }
        failure.map_or(Ok(()), Err)
    }

    fn on_event(&mut self, event: Received) -> Result<()> {
        if let Some(last) = self.last_id {
            if event.id != last + 1 {
                self.gaps.push(format!("{last} → {}", event.id));
            }
        }
        self.last_id = Some(event.id);
        let reader = event.data["reader"]
            .as_str()
            .and_then(|r| r.strip_prefix("Simulated Reader "))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n < self.flows.len());
        match (event.name.as_str(), reader) {
            ("card.read" | "card.read_failed", Some(r)) => self.on_read(r, &event),
            ("card.reconciled", _) => {
                let id = event.data["card_id"].as_str().unwrap_or_default();
                let holder = self.flows.iter().position(
                    |f| matches!(f, Flow::Holding { card_id, .. } if card_id.eq_ignore_ascii_case(id)),
                );
                let Some(r) = holder else {
                    return Ok(());
                };
                if let Flow::Holding { reconciled, .. } = &mut self.flows[r] {
                    *reconciled = true;
                }
                self.pull_when_done(r)
            }
            ("card.removed", Some(r)) if matches!(self.flows[r], Flow::Pulling) => {
                self.flows[r] = Flow::Empty;
                self.ended += 1;
                if self.ended % self.every == 0 {
                    self.report(self.ended)?;
                }
                self.insert_next(r)
            }
            _ => Ok(()),
        }
    }

    fn on_read(&mut self, r: usize, event: &Received) -> Result<()> {
        let Flow::Holding { card_id, reads, .. } = &mut self.flows[r] else {
            self.wrong_reads
                .push(format!("{} in an empty {}", event.name, reader_name(r)));
            return Ok(());
        };
        *reads += 1;
        let read = event.data["card_id"].as_str().unwrap_or_default();
        if event.name != "card.read" || !read.eq_ignore_ascii_case(card_id) {
            self.wrong_reads.push(format!(
                "{} of {read:?} while {card_id} was in {}: {}",
                event.name,
                reader_name(r),
                event.data["error"]
            ));
        }
        if *reads == 2 {
            self.read_twice.push(card_id.clone());
        }
        self.pull_when_done(r)
    }

    /// Pulls the card once it was read and reconciled, revoking it first when its turn came.
    fn pull_when_done(&mut self, r: usize) -> Result<()> {
        let Flow::Holding {
            index,
            card_id,
            reads,
            reconciled,
        } = &self.flows[r]
        else {
            return Ok(());
        };
        if *reads == 0 || !*reconciled {
            return Ok(());
        }
        let (index, card_id) = (*index, card_id.clone());
        self.since_revocation += 1;
        if registered(index) && self.since_revocation >= self.revoke_every {
            self.since_revocation = 0;
            self.revoke(&card_id);
        }
        self.flows[r] = Flow::Pulling;
        self.station.send(&format!("pull {r}"))
    }

    fn revoke(&mut self, card_id: &str) {
        let body = json!({"card_id": card_id, "target": "card", "operation": "revoke",
            "reason": "superseded", "revoker": "year@contoso.com"})
        .to_string();
        let key = format!("year-{}", self.revoked.len() + self.revocation_errors.len());
        let headers = [
            ("Content-Type", "application/json"),
            ("Idempotency-Key", key.as_str()),
        ];
        match http(self.port, TOKEN, "POST", "/v1/revocations", &headers, &body) {
            Ok((202, answer)) => {
                match serde_json::from_str::<Value>(&answer)
                    .ok()
                    .and_then(|v| v["id"].as_u64())
                {
                    Some(id) => self.revoked.push((id, card_id.to_string())),
                    None => self
                        .revocation_errors
                        .push(format!("202 without an id: {answer}")),
                }
            }
            Ok((status, answer)) => self
                .revocation_errors
                .push(format!("{card_id}: {status} {answer}")),
            Err(e) => self.revocation_errors.push(format!("{card_id}: {e}")),
        }
    }

    /// Puts the next card in reader `r`: one that is in no other reader.
    fn insert_next(&mut self, r: usize) -> Result<()> {
        if self.started >= self.insertions {
            return Ok(());
        }
        let index = loop {
            let index = fastrand::u64(..self.cards);
            let in_use = self
                .flows
                .iter()
                .any(|f| matches!(f, Flow::Holding { index: i, .. } if *i == index));
            if !in_use {
                break index;
            }
        };
        self.started += 1;
        self.flows[r] = Flow::Holding {
            index,
            card_id: hex::encode_upper(card_id(self.seed, index)),
            reads: 0,
            reconciled: false,
        };
        self.station.send(&format!("insert {r} {index}"))
    }

    fn report_header(&self) {
        println!(
            "{:>9} {:>6} {:>6} {:>8} {:>4} {:>7} {:>9}  rows",
            "insertions", "s", "per s", "rss_kib", "fds", "threads", "state_kib"
        );
    }

    fn report(&mut self, done: u64) -> Result<()> {
        let s = sample(self.station.child.id(), &self.state.join("state"));
        let seconds = self.clock.elapsed().as_secs_f64();
        let rows = row_counts(&self.state.join("state").join("cardbridge.db"))?;
        let rows: Vec<String> = rows.iter().map(|(t, n)| format!("{t} {n}")).collect();
        println!(
            "{done:>10} {:>6.0} {:>6.0} {:>8} {:>4} {:>7} {:>9}  {}",
            seconds,
            done as f64 / seconds.max(0.001),
            s.rss_kib,
            s.fds,
            s.threads,
            s.state_kib,
            rows.join(", ")
        );
        self.reports.push((done, s));
        Ok(())
    }

    fn verdicts(&self) -> Vec<Verdict> {
        let list = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
        let mut verdicts = vec![
            Verdict {
                check: "reads name the card in the reader",
                passed: self.wrong_reads.is_empty(),
                detail: format!(
                    "{} wrong: {}",
                    self.wrong_reads.len(),
                    list(&self.wrong_reads)
                ),
            },
            Verdict {
                check: "every insertion read once",
                passed: self.read_twice.is_empty() && self.ended == self.insertions,
                detail: format!(
                    "{} insertions ended, {} read twice: {}",
                    self.ended,
                    self.read_twice.len(),
                    list(&self.read_twice)
                ),
            },
            Verdict {
                check: "no event id gaps",
                passed: self.gaps.is_empty(),
                detail: format!("{} gaps: {}", self.gaps.len(), list(&self.gaps)),
            },
            Verdict {
                check: "revocations accepted",
                passed: self.revocation_errors.is_empty() && !self.revoked.is_empty(),
                detail: format!(
                    "{} submitted, {} refused: {}",
                    self.revoked.len(),
                    self.revocation_errors.len(),
                    list(&self.revocation_errors)
                ),
            },
        ];
        // The state grows until every table is at its bound (the sightings' is the last one
        // reached, an insertion a row): only a run whose last half starts past it can be flat.
        let filled = cardbridge::store::ROW_BOUNDS
            .iter()
            .map(|(_, bound)| *bound as u64)
            .max()
            .unwrap_or(0);
        if self.insertions >= 2 * filled {
            verdicts.extend(flat_over_last_half(&self.reports));
        } else {
            println!(
                "SKIP  memory and state flat over the last half: a run of {} insertions ends \
                 before its last half could start at the tables' bounds ({filled} rows)",
                self.insertions
            );
        }
        verdicts.push(tables_within_bounds(
            &self.state.join("state").join("cardbridge.db"),
        ));
        verdicts
    }
}
