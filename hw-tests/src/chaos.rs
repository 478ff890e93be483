//! The end checks of the chaos and soak runs (`hw-tests/chaos`, `hw-tests/soak`), as plain
//! functions over what the run recorded: when each card went in and out of which reader, when
//! pcscd or the daemon was down, the events each stream client received, and the revocations.
//! Kept apart from the driver so that each rule has table tests.
//!
//! Times are seconds since the Unix epoch, from the one clock the driver and the daemon share.

use std::collections::BTreeMap;

use serde_json::Value;

/// One card in one reader, from the moment the driver started inserting it to the moment it
/// was out (so the real insertion lies inside).
#[derive(Debug, Clone, PartialEq)]
pub struct Insertion {
    pub reader: String,
    pub card_id: String,
    pub inserted: f64,
    /// When the reader first spoke to the card; `None` when it never noticed it (pulled before
    /// pcscd polled the slot).
    pub seen: Option<f64>,
    /// `None` while the card is still in.
    pub removed: Option<f64>,
}

/// A time pcscd or the daemon was down (from the kill to the moment it was back).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outage {
    pub from: f64,
    pub to: f64,
}

/// An event as a stream client received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub id: u64,
    pub name: String,
    pub data: Value,
}

/// One submitted revocation: the certificate's serial number and the status the daemon gives it
/// at the end (`succeeded`, `queued`…).
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    pub serial_number: String,
    pub status: String,
}

/// One end check: its name, whether it held, and what was seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub check: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// A card held at least this long, with no outage around it, must have been read exactly once.
pub const HELD_LONG_ENOUGH: f64 = 1.0;
/// pcscd polls a vpcd slot (as any polling reader driver) every 400 ms: a card put in less
/// than this after the previous one was pulled can replace it between two polls, and then no
/// PC/SC application ever sees the slot empty or the new card arrive.
pub const UNSEEN_SWAP: f64 = 0.45;
/// After an outage, the daemon takes this long to see pcscd's readers again.
pub const SETTLE: f64 = 3.0;

fn verdict(check: &'static str, problems: &[String], counted: String) -> Verdict {
    Verdict {
        check,
        passed: problems.is_empty(),
        detail: if problems.is_empty() {
            counted
        } else {
            let shown: Vec<&str> = problems.iter().take(5).map(String::as_str).collect();
            format!("{} problems: {}", problems.len(), shown.join("; "))
        },
    }
}

/// The successful reads among `events`: (reader, card id, `read_at`).
fn reads(events: &[Received]) -> Vec<(String, String, f64)> {
    events
        .iter()
        .filter(|e| e.name == "card.read" && e.data["error"].is_null())
        .filter_map(|e| {
            let reader = e.data["reader"].as_str()?.to_string();
            let card_id = e.data["card_id"].as_str()?.to_string();
            let at = seconds(e.data["read_at"].as_str()?)?;
            Some((reader, card_id, at))
        })
        .collect()
}

/// An RFC 3339 time as seconds since the epoch.
pub fn seconds(text: &str) -> Option<f64> {
    let at =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some(at.unix_timestamp_nanos() as f64 / 1e9)
}

/// Every `card.read` names a card that was in that reader when the read began.
pub fn reads_name_the_card_in_the_reader(insertions: &[Insertion], events: &[Received]) -> Verdict {
    let all = reads(events);
    let problems: Vec<String> = all
        .iter()
        .filter(|(reader, card_id, at)| {
            !insertions.iter().any(|i| {
                &i.reader == reader
                    && &i.card_id == card_id
                    && i.inserted <= *at
                    && i.removed.is_none_or(|r| *at <= r)
            })
        })
        .map(|(reader, card_id, at)| format!("{card_id} read in {reader} at {at:.3}"))
        .collect();
    verdict(
        "every card.read names the card in that reader",
        &problems,
        format!("{} reads", all.len()),
    )
}

/// Whether the insertion overlaps an outage or the [`SETTLE`] time after it.
fn near_outage(i: &Insertion, outages: &[Outage], end: f64) -> bool {
    let removed = i.removed.unwrap_or(end);
    outages
        .iter()
        .any(|o| i.inserted < o.to + SETTLE && o.from < removed)
}

/// Whether `i` followed the previous card in its reader too fast for pcscd to notice.
fn replaced_unseen(i: &Insertion, insertions: &[Insertion]) -> bool {
    insertions
        .iter()
        .filter(|p| p.reader == i.reader && p.inserted < i.inserted)
        .filter_map(|p| p.removed)
        .any(|removed| removed <= i.inserted && i.inserted - removed < UNSEEN_SWAP)
}

/// No insertion was read twice without an outage in between, however short it was held; one the
/// reader noticed and held long enough after that, [`SETTLE`] away from any outage and not
/// swapped in faster than pcscd polls ([`UNSEEN_SWAP`]), was read exactly once. A card left in
/// its reader while pcscd or the daemon restarts may be read again after each restart, once.
/// `end` closes insertions still open.
pub fn held_cards_read_once(
    insertions: &[Insertion],
    outages: &[Outage],
    events: &[Received],
    end: f64,
) -> Verdict {
    let all = reads(events);
    let mut problems = Vec::new();
    let mut held = 0;
    for i in insertions {
        let removed = i.removed.unwrap_or(end);
        let times: Vec<f64> = all
            .iter()
            .filter(|(reader, card_id, at)| {
                reader == &i.reader && card_id == &i.card_id && i.inserted <= *at && *at <= removed
            })
            .map(|(_, _, at)| *at)
            .collect();
        let judged = i
            .seen
            .is_some_and(|seen| removed - seen >= HELD_LONG_ENOUGH)
            && !near_outage(i, outages, end)
            && !replaced_unseen(i, insertions);
        held += usize::from(judged);
        let twice = read_twice_between_outages(i.inserted, &times, outages);
        if twice || (judged && times.len() != 1) {
            problems.push(describe(i, removed, &times, insertions, outages));
        }
    }
    verdict(
        "every card held long enough was read exactly once",
        &problems,
        format!("{held} held insertions, each read once; no insertion read twice"),
    )
}

/// One insertion that failed [`held_cards_read_once`], with what a reader of the CI log needs to
/// tell why: when each read came and when the previous card left, counted from the insertion,
/// and the outages around it.
fn describe(
    i: &Insertion,
    removed: f64,
    times: &[f64],
    insertions: &[Insertion],
    outages: &[Outage],
) -> String {
    let after = |t: f64| format!("{:+.2}", t - i.inserted);
    let reads: Vec<String> = times.iter().map(|&t| after(t)).collect();
    let previous = insertions
        .iter()
        .filter(|p| p.reader == i.reader && p.inserted < i.inserted)
        .filter_map(|p| p.removed)
        .reduce(f64::max)
        .map_or("none".to_string(), after);
    let seen = i.seen.map_or("never".to_string(), after);
    let near: Vec<String> = outages
        .iter()
        .filter(|o| o.from < removed + SETTLE && i.inserted - SETTLE < o.to)
        .map(|o| format!("{}..{}", after(o.from), after(o.to)))
        .collect();
    format!(
        "{} in {} from {:.3} for {:.2} s read {} times (reads at {} s; seen at {seen}; previous \
         card out at {previous}; outages near: {})",
        i.card_id,
        i.reader,
        i.inserted,
        removed - i.inserted,
        times.len(),
        or_none(&reads),
        or_none(&near),
    )
}

fn or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

/// Whether two of `times` fall between the same two outages (the insertion counting as the first
/// boundary). An outage begins a new stretch when the kill is sent: a restarted daemon can read
/// the card before its restart is known to be over.
fn read_twice_between_outages(inserted: f64, times: &[f64], outages: &[Outage]) -> bool {
    let segment = |at: f64| {
        outages
            .iter()
            .filter(|o| inserted < o.to && o.from <= at)
            .count()
    };
    let mut segments: Vec<usize> = times.iter().map(|&at| segment(at)).collect();
    segments.sort_unstable();
    segments.windows(2).any(|w| w[0] == w[1])
}

/// Each revocation was carried out by the server exactly once, or at most once while still
/// queued; nothing was revoked that nobody asked for.
pub fn revocations_delivered_once(submitted: &[Submitted], carried_out: &[String]) -> Verdict {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for serial in carried_out {
        *counts.entry(serial.to_ascii_uppercase()).or_default() += 1;
    }
    let mut problems = Vec::new();
    for s in submitted {
        let count = counts
            .remove(&s.serial_number.to_ascii_uppercase())
            .unwrap_or(0);
        let finished = s.status == "succeeded";
        let pending = matches!(s.status.as_str(), "queued" | "in_progress");
        if (finished && count != 1) || (pending && count > 1) || !(finished || pending) {
            problems.push(format!(
                "{} is {} and was carried out {count} times",
                s.serial_number, s.status
            ));
        }
    }
    problems.extend(
        counts
            .keys()
            .map(|serial| format!("{serial} was revoked without a request")),
    );
    let done = submitted.iter().filter(|s| s.status == "succeeded").count();
    verdict(
        "every revocation delivered once, or still queued",
        &problems,
        format!("{} submitted, {done} delivered", submitted.len()),
    )
}

/// The ids one stream client received run on without a gap.
pub fn no_event_id_gaps(streams: &[Vec<u64>]) -> Verdict {
    let mut problems = Vec::new();
    for (n, ids) in streams.iter().enumerate() {
        for pair in ids.windows(2) {
            if pair[1] != pair[0] + 1 {
                problems.push(format!("client {n}: {} then {}", pair[0], pair[1]));
            }
        }
    }
    let events: usize = streams.iter().map(Vec::len).sum();
    verdict(
        "no event-id gaps for a connected client",
        &problems,
        format!("{} clients, {events} events", streams.len()),
    )
}

/// What `/v1/cards` lists equals what is in the readers: (reader, card id) pairs.
pub fn cards_equal_readers(
    listed: &[(String, String)],
    in_readers: &[(String, String)],
) -> Verdict {
    let mut listed = listed.to_vec();
    let mut in_readers = in_readers.to_vec();
    listed.sort();
    in_readers.sort();
    let problems = if listed == in_readers {
        Vec::new()
    } else {
        vec![format!("listed {listed:?}, in the readers {in_readers:?}")]
    };
    verdict(
        "/v1/cards equals what is in the readers",
        &problems,
        format!("{} cards", listed.len()),
    )
}

/// No thread of the daemon panicked.
pub fn no_panic(log: &str) -> Verdict {
    let problems: Vec<String> = log
        .lines()
        .filter(|l| l.contains("panicked"))
        .map(str::to_string)
        .collect();
    verdict(
        "no panic in the logs",
        &problems,
        format!("{} log lines", log.lines().count()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(id: u64, reader: &str, card: &str, at: &str) -> Received {
        Received {
            id,
            name: "card.read".into(),
            data: json!({"reader": reader, "card_id": card, "read_at": at, "error": null}),
        }
    }

    fn ins(reader: &str, card: &str, from: f64, to: f64) -> Insertion {
        Insertion {
            reader: reader.into(),
            card_id: card.into(),
            inserted: from,
            seen: Some(from + 0.1),
            removed: Some(to),
        }
    }

    // 2026-12-06T06:00:00Z
    const T0: f64 = 1_796_536_800.0;

    #[test]
    fn a_read_must_name_the_card_that_was_in_that_reader() {
        let insertions = [ins("R0", "AA", T0, T0 + 2.0), ins("R1", "BB", T0, T0 + 2.0)];
        let right = [read(1, "R0", "AA", "2026-12-06T06:00:00.500Z")];
        assert!(reads_name_the_card_in_the_reader(&insertions, &right).passed);
        for wrong in [
            read(1, "R1", "AA", "2026-12-06T06:00:00.500Z"),
            read(1, "R0", "BB", "2026-12-06T06:00:00.500Z"),
            read(1, "R0", "AA", "2026-12-06T06:00:03Z"),
        ] {
            assert!(!reads_name_the_card_in_the_reader(&insertions, &[wrong]).passed);
        }
    }

    #[test]
    fn a_held_card_is_read_exactly_once_and_a_short_one_at_most_once() {
        let held = [ins("R0", "AA", T0, T0 + 1.5)];
        let once = [read(1, "R0", "AA", "2026-12-06T06:00:00.300Z")];
        let twice = [
            once[0].clone(),
            read(2, "R0", "AA", "2026-12-06T06:00:00.301Z"),
        ];
        assert!(held_cards_read_once(&held, &[], &once, T0 + 9.0).passed);
        assert!(!held_cards_read_once(&held, &[], &[], T0 + 9.0).passed);
        assert!(!held_cards_read_once(&held, &[], &twice, T0 + 9.0).passed);
        let unnoticed = [Insertion {
            seen: None,
            ..held[0].clone()
        }];
        assert!(held_cards_read_once(&unnoticed, &[], &[], T0 + 9.0).passed);
        assert!(!held_cards_read_once(&unnoticed, &[], &twice, T0 + 9.0).passed);
        let noticed_late = [Insertion {
            seen: Some(T0 + 0.6),
            ..held[0].clone()
        }];
        assert!(held_cards_read_once(&noticed_late, &[], &[], T0 + 9.0).passed);
        let swapped_fast = [ins("R0", "BB", T0 - 1.0, T0 - 0.2), held[0].clone()];
        assert!(held_cards_read_once(&swapped_fast, &[], &[], T0 + 9.0).passed);
        let swapped_slowly = [ins("R0", "BB", T0 - 1.0, T0 - 0.5), held[0].clone()];
        assert!(!held_cards_read_once(&swapped_slowly, &[], &[], T0 + 9.0).passed);
        let short = [ins("R0", "AA", T0, T0 + 0.4)];
        assert!(held_cards_read_once(&short, &[], &[], T0 + 9.0).passed);
        assert!(!held_cards_read_once(&short, &[], &twice, T0 + 9.0).passed);
    }

    #[test]
    fn a_card_read_twice_is_reported_with_when_each_read_came() {
        let insertions = [
            ins("R0", "BB", T0 - 1.0, T0 - 0.2),
            ins("R0", "AA", T0, T0 + 1.5),
        ];
        let twice = [
            read(1, "R0", "AA", "2026-12-06T06:00:00.300Z"),
            read(2, "R0", "AA", "2026-12-06T06:00:01.250Z"),
        ];
        let outage = Outage {
            from: T0 + 4.0,
            to: T0 + 4.5,
        };
        let verdict = held_cards_read_once(&insertions, &[outage], &twice, T0 + 9.0);
        assert_eq!(
            verdict.detail,
            "1 problems: AA in R0 from 1796536800.000 for 1.50 s read 2 times (reads at +0.30, \
             +1.25 s; seen at +0.10; previous card out at -0.20; outages near: +4.00..+4.50)"
        );
    }

    #[test]
    fn an_insertion_across_an_outage_may_be_read_once_after_it() {
        let held = [ins("R0", "AA", T0, T0 + 1.5)];
        let at = |ms: u32| format!("2026-12-06T06:00:00.{ms:03}Z");
        let reads = |ms: &[u32]| {
            ms.iter()
                .enumerate()
                .map(|(n, &m)| read(n as u64, "R0", "AA", &at(m)))
                .collect::<Vec<_>>()
        };
        let just_before = Outage {
            from: T0 - 2.0,
            to: T0 - 1.0,
        };
        assert!(held_cards_read_once(&held, &[just_before], &[], T0 + 9.0).passed);
        assert!(!held_cards_read_once(&held, &[just_before], &reads(&[300, 301]), T0 + 9.0).passed);
        let during = Outage {
            from: T0 + 0.5,
            to: T0 + 0.6,
        };
        assert!(held_cards_read_once(&held, &[during], &reads(&[300, 700]), T0 + 9.0).passed);
        assert!(!held_cards_read_once(&held, &[during], &reads(&[700, 701]), T0 + 9.0).passed);
        assert!(held_cards_read_once(&held, &[during], &reads(&[300, 550]), T0 + 9.0).passed);
        assert!(!held_cards_read_once(&held, &[during], &reads(&[300, 301]), T0 + 9.0).passed);
        let long_ago = Outage {
            from: T0 - 20.0,
            to: T0 - 10.0,
        };
        assert!(!held_cards_read_once(&held, &[long_ago], &[], T0 + 9.0).passed);
    }

    #[test]
    fn a_revocation_is_carried_out_once_or_waits() {
        let s = |serial: &str, status: &str| Submitted {
            serial_number: serial.into(),
            status: status.into(),
        };
        let carried = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let rows: &[(&[Submitted], Vec<String>, bool)] = &[
            (&[s("0A", "succeeded")], carried(&["0a"]), true),
            (&[s("0A", "succeeded")], carried(&[]), false),
            (&[s("0A", "succeeded")], carried(&["0A", "0A"]), false),
            (&[s("0A", "queued")], carried(&[]), true),
            (&[s("0A", "queued")], carried(&["0A"]), true),
            (&[s("0A", "failed")], carried(&[]), false),
            (&[], carried(&["0B"]), false),
        ];
        for (submitted, carried_out, passes) in rows {
            assert_eq!(
                revocations_delivered_once(submitted, carried_out).passed,
                *passes,
                "{submitted:?} {carried_out:?}"
            );
        }
    }

    #[test]
    fn event_ids_must_follow_on() {
        assert!(no_event_id_gaps(&[vec![4, 5, 6], vec![]]).passed);
        assert!(!no_event_id_gaps(&[vec![4, 6]]).passed);
        assert!(!no_event_id_gaps(&[vec![4, 4]]).passed);
    }

    #[test]
    fn the_listed_cards_must_be_those_in_the_readers() {
        let a = ("R0".to_string(), "AA".to_string());
        let b = ("R1".to_string(), "BB".to_string());
        assert!(cards_equal_readers(&[b.clone(), a.clone()], &[a.clone(), b.clone()]).passed);
        assert!(!cards_equal_readers(std::slice::from_ref(&a), &[a.clone(), b]).passed);
    }

    #[test]
    fn a_panic_line_fails() {
        assert!(no_panic("INFO card.read\n").passed);
        assert!(!no_panic("thread 'tokio-runtime-worker' panicked at src/x.rs:1:1\n").passed);
    }
}
