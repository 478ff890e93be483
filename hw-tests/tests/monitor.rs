//! End-to-end: the PC/SC monitor under a real pcscd, including pcscd being killed and restarted.

mod common;

use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use cardbridge::card::ReadOptions;
use cardbridge::pcsc::{read_reader, Monitor, MonitorEvent};
use common::wait_for_card;
use hw_tests::rig::Rig;
use hw_tests::vcard::{CardSpec, VirtualCard};
use hw_tests::vpcd::Inserted;

/// Waits for the first event that `want` accepts, skipping others; panics after 15 s.
fn expect(
    events: &Receiver<MonitorEvent>,
    what: &str,
    want: impl Fn(&MonitorEvent) -> bool,
) -> MonitorEvent {
    let until = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match events.recv_timeout(left) {
            Ok(e) if want(&e) => return e,
            Ok(e) => seen.push(e),
            Err(_) => break,
        }
    }
    panic!("no {what} event; saw {seen:?}");
}

fn read_now(reader: &str) -> cardbridge::card::Card {
    let ctx = cardbridge::pcsc::connect().expect("pcscd reachable");
    let name = std::ffi::CString::new(reader).expect("reader name");
    read_reader(&ctx, &name, &ReadOptions::default())
}

#[test]
fn monitor_reports_cards_and_survives_a_pcscd_restart() {
    let rig = Rig::get();
    let _exclusive = rig.exclusive();
    let slot = rig.slot();
    wait_for_card(&slot.reader, false);
    let (tx, events) = channel();
    let monitor = Monitor::spawn(tx).expect("start monitor");
    expect(
        &events,
        "reader.added",
        |e| matches!(e, MonitorEvent::ReaderAdded { reader } if *reader == slot.reader),
    );

    // Insert: the monitor reports the card with its ATR.
    let card = VirtualCard::new(CardSpec::piv_four_certs()).expect("card");
    let atr = card.atr.clone();
    let first = Inserted::insert(card, slot.port, true).expect("insert");
    let inserted = expect(
        &events,
        "card.inserted",
        |e| matches!(e, MonitorEvent::CardInserted { reader, .. } if *reader == slot.reader),
    );
    assert_eq!(
        inserted,
        MonitorEvent::CardInserted {
            reader: slot.reader.clone(),
            atr
        }
    );

    // pcscd dies and comes back: unavailable, then restored, with no spurious reader events.
    rig.kill_pcscd().expect("kill pcscd");
    expect(&events, "pcsc unavailable", |e| {
        matches!(e, MonitorEvent::Unavailable { .. })
    });
    rig.start_pcscd().expect("restart pcscd");
    expect(&events, "pcsc restored", |e| *e == MonitorEvent::Restored);
    wait_for_card(&slot.reader, true);

    // The card that reconnected by itself can be pulled...
    first.remove();
    wait_for_card(&slot.reader, false);
    expect(
        &events,
        "card.removed",
        |e| matches!(e, MonitorEvent::CardRemoved { reader } if *reader == slot.reader),
    );

    // ...and the next insert (another kind of card, to tell the events apart) is seen and read.
    let second = VirtualCard::new(CardSpec::gids_two_containers()).expect("card");
    let second_atr = second.atr.clone();
    let second = Inserted::insert(second, slot.port, false).expect("insert");
    let inserted = expect(
        &events,
        "card.inserted",
        |e| matches!(e, MonitorEvent::CardInserted { atr, .. } if *atr == second_atr),
    );
    assert_eq!(
        inserted,
        MonitorEvent::CardInserted {
            reader: slot.reader.clone(),
            atr: second_atr
        }
    );
    let read = read_now(&slot.reader);
    assert_eq!(read.error, None);
    assert_eq!(read.card_id, second.truth.card_id);
    assert_eq!(read.certificates.len(), 2);

    let started = Instant::now();
    monitor.stop();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "monitor took {:?} to stop",
        started.elapsed()
    );
}

/// A removal and a re-insertion in the same reader come out as two events, in order. (Swaps
/// faster than one wait, caught by pcsc-lite's event counter, are covered by the unit tests of
/// `monitor::diff`: vpcd cannot make a swap that pcscd itself does not see.)
#[test]
fn monitor_reports_removal_then_reinsertion() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    wait_for_card(&slot.reader, false);
    let (tx, events) = channel();
    let _monitor = Monitor::spawn(tx).expect("start monitor");
    let in_slot = |e: &MonitorEvent| match e {
        MonitorEvent::CardInserted { reader, .. } | MonitorEvent::CardRemoved { reader } => {
            *reader == slot.reader
        }
        _ => false,
    };
    let first = Inserted::insert(
        VirtualCard::new(CardSpec::piv_four_certs()).expect("card"),
        slot.port,
        false,
    )
    .expect("insert");
    let e1 = expect(&events, "card.inserted", in_slot);
    first.remove();
    wait_for_card(&slot.reader, false);
    let _second = Inserted::insert(
        VirtualCard::new(CardSpec::piv_four_certs()).expect("card"),
        slot.port,
        false,
    )
    .expect("insert");
    let e2 = expect(&events, "card.removed", in_slot);
    let e3 = expect(&events, "card.inserted", in_slot);
    assert!(matches!(e1, MonitorEvent::CardInserted { .. }), "{e1:?}");
    assert_eq!(
        e2,
        MonitorEvent::CardRemoved {
            reader: slot.reader.clone()
        }
    );
    assert!(matches!(e3, MonitorEvent::CardInserted { .. }), "{e3:?}");
}
