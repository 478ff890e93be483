//! End-to-end: the engine (monitor → reader worker → reconciliation) with a virtual card and the
//! CM simulator. Every read triggers a reconciliation; an unavailable server is retried later
//! without holding up card reading.

mod common;

use std::sync::mpsc::{channel, Receiver};
use std::sync::RwLockWriteGuard;
use std::time::{Duration, Instant};

use cardbridge::card::ReadOptions;
use cardbridge::config::{CardIdOrder, Config};
use cardbridge::engine::{Engine, EngineConfig, Event};
use cardbridge::reconcile::{Reconciler, State};
use common::insert;
use hw_tests::rig::{Rig, Slot};
use hw_tests::sim::{matching_record, Fault, Fixture, Simulator};
use hw_tests::vcard::{CardSpec, VirtualCard};
use hw_tests::vpcd::Inserted;

fn next(events: &Receiver<Event>, what: &str, want: impl Fn(&Event) -> bool) -> (Event, Instant) {
    let until = Instant::now() + Duration::from_secs(20);
    let mut passed = Vec::new();
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match events.recv_timeout(left) {
            Ok(e) if want(&e) => return (e, Instant::now()),
            Ok(e) => passed.push(e),
            Err(_) => break,
        }
    }
    panic!("no {what} event; the engine emitted instead: {passed:#?}");
}

#[test]
fn reads_trigger_reconciliation_and_an_unavailable_server_is_retried() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    common::wait_for_card(&slot.reader, false);

    let sim = Simulator::start(Fixture::default(), 0).expect("simulator");
    // The server is down (500) and slow at first.
    sim.set_fault(
        "smartcards",
        Fault {
            error_500: true,
            latency_ms: 1500,
            ..Fault::default()
        },
    );
    let config = Config::parse(&format!(
        "[cm]\nbase_url = \"{}\"\nretries = 0\n",
        sim.cm_base_url()
    ))
    .expect("config");
    let client = cardbridge::cm::CmClient::new(config.cm.as_ref().expect("cm")).expect("client");
    let (tx, events) = channel();
    let engine = Engine::start(
        EngineConfig {
            read: ReadOptions::default(),
            reconciler: Reconciler::new(Some(client), CardIdOrder::Auto),
            store: None,
            retry_initial: Duration::from_millis(300),
            retry_max: Duration::from_secs(2),
        },
        tx,
    )
    .expect("engine");

    let card = insert(CardSpec::piv_four_certs(), &slot);
    let in_slot = |reader: &String| *reader == slot.reader;
    let (_, inserted_at) = next(
        &events,
        "card.inserted",
        |e| matches!(e, Event::CardInserted { reader, .. } if in_slot(reader)),
    );
    let (read, read_at) = next(
        &events,
        "card.read",
        |e| matches!(e, Event::CardRead(c) if in_slot(&c.reader)),
    );
    let Event::CardRead(read) = read else {
        unreachable!()
    };
    assert_eq!(read.card_id, card.truth.card_id);
    assert!(
        read_at - inserted_at < Duration::from_millis(1000),
        "reading waited for the server"
    );

    // The first reconciliation finds the server unavailable...
    let (first, _) = next(&events, "card.reconciled", |e| {
        matches!(e, Event::CardReconciled(_))
    });
    let Event::CardReconciled(first) = first else {
        unreachable!()
    };
    assert_eq!(first.state, State::ServerUnavailable);
    assert!(
        first
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("6f9619ff"),
        "{first:?}"
    );

    // ...and once the server has the card and answers, a retry matches it without a new read.
    let id = card.truth.card_id.clone().unwrap_or_default();
    sim.set_fault("smartcards", Fault::default());
    sim.replace_fixture(Fixture {
        smartcards: vec![matching_record(&card.truth, false)],
        ..Fixture::default()
    });
    let (matched, _) = next(
        &events,
        "matched card.reconciled",
        |e| matches!(e, Event::CardReconciled(r) if r.state == State::Matched),
    );
    let Event::CardReconciled(matched) = matched else {
        unreachable!()
    };
    assert_eq!(matched.card_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        engine.reconciliation(&id).map(|r| r.state),
        Some(State::Matched)
    );
    // No second card read happened: the retry used the snapshot.
    while let Ok(e) = events.try_recv() {
        assert!(!matches!(e, Event::CardRead(_)), "unexpected read {e:?}");
    }

    card.remove();
    next(
        &events,
        "card.removed",
        |e| matches!(e, Event::CardRemoved { reader } if in_slot(reader)),
    );
    let started = Instant::now();
    engine.stop();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "engine took {:?} to stop",
        started.elapsed()
    );
}

/// The rig to this test alone, an empty slot of it, and an engine with no server and no store:
/// reads only, and their events. Alone: an engine reads every reader, so another test's engine
/// would read this test's cards too, spending the APDUs that time a swap and holding the card in
/// its transactions. Bind the lease first, so it outlives the engine.
fn alone_with_an_engine() -> (RwLockWriteGuard<'static, ()>, Slot, Engine, Receiver<Event>) {
    let rig = Rig::get();
    let alone = rig.exclusive();
    let slot = rig.slot();
    common::wait_for_card(&slot.reader, false);
    let (tx, events) = channel();
    let engine = Engine::start(
        EngineConfig {
            read: ReadOptions::default(),
            reconciler: Reconciler::new(None, CardIdOrder::Auto),
            store: None,
            retry_initial: Duration::from_millis(300),
            retry_max: Duration::from_secs(2),
        },
        tx,
    )
    .expect("engine");
    (alone, slot, engine, events)
}

/// The same swap where pcscd also lets the rest of the read reach the second card (the fault
/// puts it there after the CHUID, deterministically): the read fails as a removal, the second
/// card is announced and read, and the first card's id is never reported as read.
#[test]
fn a_read_whose_apdus_reach_a_second_card_is_not_reported_and_the_second_card_is_read() {
    let (_alone, slot, _engine, events) = alone_with_an_engine();
    let mut spec = CardSpec::piv_four_certs();
    spec.faults.replaced_after = Some(3);
    let vcard = VirtualCard::new(spec).expect("virtual card");
    let first_id = vcard.truth.card_id.clone().expect("card id");
    let second_id = vcard
        .replacement_truth()
        .and_then(|t| t.card_id.clone())
        .expect("the replacement's id");
    let _card = hw_tests::rig::insert_virtual(vcard, &slot).expect("insert the card");
    let in_slot = |reader: &String| *reader == slot.reader;
    let (failed, _) = next(&events, "card.read_failed", |e| match e {
        Event::CardRead(c) => in_slot(&c.reader),
        Event::CardReadFailed(c) => in_slot(&c.reader),
        _ => false,
    });
    let Event::CardReadFailed(failed) = failed else {
        let id = match &failed {
            Event::CardRead(c) => c.card_id.clone(),
            _ => None,
        };
        panic!("the read that reached two cards was reported as {id:?} (first {first_id}, second {second_id})");
    };
    let error = failed
        .error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_default();
    assert!(error.contains("replaced during the read"), "{error}");
    let (read, _) = next(
        &events,
        "card.read of the second card",
        |e| matches!(e, Event::CardRead(c) if in_slot(&c.reader)),
    );
    let Event::CardRead(read) = read else {
        unreachable!()
    };
    assert_eq!(read.card_id.as_deref(), Some(second_id.as_str()));
    assert_ne!(read.card_id.as_deref(), Some(first_id.as_str()));
}

/// A card pulled in the middle of its read and another put in at once, before pcscd polls the
/// slot again (vpcd is polled every 400 ms): pcscd never shows the slot empty nor reports an
/// insertion, so only the failed read tells that something happened. The second card is read,
/// once. Found by the chaos run, where such a card stayed unread for as long as it was held.
#[test]
fn a_card_swapped_in_during_a_read_before_pcscd_notices_is_read_once() {
    swapped_in_during_a_read_is_read_once(CardSpec::piv_four_certs());
}

/// The same swap to a card of another model: the read of it powers it, pcscd takes its ATR, and
/// the monitor sees another ATR under an unmoved counter. That is the card already read, not
/// another insertion (the chaos run caught it announced and read twice).
#[test]
fn a_card_of_another_model_swapped_in_during_a_read_is_read_once() {
    swapped_in_during_a_read_is_read_once(CardSpec::gids_two_containers());
}

fn swapped_in_during_a_read_is_read_once(second: CardSpec) {
    let (_alone, slot, engine, events) = alone_with_an_engine();
    let mut slow = CardSpec::piv_four_certs();
    slow.faults.slow_ms = 100;
    let first = insert(slow, &slot);
    let in_slot = |reader: &String| *reader == slot.reader;
    next(
        &events,
        "card.inserted",
        |e| matches!(e, Event::CardInserted { reader, .. } if in_slot(reader)),
    );
    // The read is under way (10 APDUs of 100 ms each); pull the card and put another in.
    let until = Instant::now() + Duration::from_secs(5);
    while first.apdu_count() < 3 {
        assert!(Instant::now() < until, "the read did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    first.remove();
    let second = Inserted::insert(VirtualCard::new(second).expect("card"), slot.port, false)
        .expect("second card");
    let second_id = second.truth.card_id.clone().expect("card id");
    // The pulled card's read fails; the second card is announced (by pcscd's monitor or by the
    // reader worker), then read.
    next(
        &events,
        "card.read_failed",
        |e| matches!(e, Event::CardReadFailed(c) if in_slot(&c.reader)),
    );
    next(
        &events,
        "card.inserted of the second card",
        |e| matches!(e, Event::CardInserted { reader, .. } if in_slot(reader)),
    );
    let (read, _) = next(
        &events,
        "card.read of the second card",
        |e| matches!(e, Event::CardRead(c) if in_slot(&c.reader)),
    );
    let Event::CardRead(read) = read else {
        unreachable!()
    };
    assert_eq!(read.card_id.as_deref(), Some(second_id.as_str()));
    // Once the monitor has seen what pcscd shows of the second card, a sync's read is the next
    // thing the slot reports: the card was not announced again.
    let atr = hex::decode(&second.truth.atr).expect("ATR hex");
    wait_for_atr(&slot.reader, &atr);
    monitor_caught_up(&engine);
    assert!(engine
        .read_requester()
        .is_some_and(|r| r.read(&slot.reader)));
    let (after, _) = next(&events, "the sync's card.read", |e| match e {
        Event::CardRead(c) | Event::CardReadFailed(c) => in_slot(&c.reader),
        Event::CardInserted { reader, .. } | Event::CardRemoved { reader } => in_slot(reader),
        _ => false,
    });
    assert!(
        matches!(&after, Event::CardRead(c) if c.card_id.as_deref() == Some(second_id.as_str())),
        "announced twice: {after:?}"
    );
}

/// A reader worker's PC/SC context dies with pcscd. The first card put in after pcscd is back is
/// read, not failed as `pcsc_unavailable` (the chaos run saw such a card stay unread, and
/// unlisted, for as long as it was held).
#[test]
fn the_first_card_after_a_pcscd_restart_is_read() {
    let (_alone, slot, _engine, events) = alone_with_an_engine();
    let in_slot = |reader: &String| *reader == slot.reader;
    let read_in_slot = |e: &Event| match e {
        Event::CardRead(c) | Event::CardReadFailed(c) => in_slot(&c.reader),
        _ => false,
    };
    // A read gives the slot's worker its context.
    let first = insert(CardSpec::piv_four_certs(), &slot);
    next(&events, "the first card's read", read_in_slot);
    first.remove();
    common::wait_for_card(&slot.reader, false);
    Rig::get().kill_pcscd().expect("kill pcscd");
    next(&events, "pcsc.unavailable", |e| {
        matches!(e, Event::PcscUnavailable { .. })
    });
    Rig::get().start_pcscd().expect("start pcscd");
    next(&events, "pcsc.restored", |e| {
        matches!(e, Event::PcscRestored)
    });
    let second = insert(CardSpec::gids_two_containers(), &slot);
    let (read, _) = next(&events, "the second card's read", read_in_slot);
    assert!(
        matches!(&read, Event::CardRead(c) if c.card_id == second.truth.card_id),
        "{read:?}"
    );
}

/// Waits until pcscd shows `atr` for the card in `reader`.
fn wait_for_atr(reader: &str, atr: &[u8]) {
    let ctx = pcsc::Context::establish(pcsc::Scope::User).expect("pcscd");
    let name = std::ffi::CString::new(reader).expect("reader name");
    common::eventually(
        "pcscd to show the card's ATR",
        Duration::from_secs(5),
        || {
            let mut states = [pcsc::ReaderState::new(name.clone(), pcsc::State::UNAWARE)];
            let _ = ctx.get_status_change(Duration::ZERO, &mut states);
            (states[0].atr() == atr).then_some(())
        },
    );
}

/// Waits until the monitor has begun a wait on pcscd after this call and finished it: what
/// pcscd showed at the call has been turned into events by then. The monitor beats as it
/// begins each wait, so two beats after the call mean one whole wait after it.
fn monitor_caught_up(engine: &Engine) {
    let health = engine.monitor_health().expect("the engine watches pcscd");
    for _ in 0..2 {
        let since = Instant::now();
        common::eventually("a turn of the monitor", Duration::from_secs(5), || {
            (health.since_last_beat() < since.elapsed()).then_some(())
        });
    }
}

/// A store call that waits (another connection holds the database's write lock, as the
/// revocation outbox does while it records answers) must not stall a reconciliation whose
/// request is in flight: the server answers within the timeout, so the card is matched, not
/// `server_unavailable` because its timeout fired while the thread was held.
#[test]
fn a_waiting_store_call_does_not_time_out_a_reconciliation_in_flight() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let (a, b) = (rig.slot(), rig.slot());
    common::wait_for_card(&a.reader, false);
    common::wait_for_card(&b.reader, false);
    let first = VirtualCard::new(CardSpec::piv_four_certs()).expect("card");
    let second = VirtualCard::new(CardSpec::piv_four_certs()).expect("card");
    let sim = Simulator::start(
        Fixture {
            smartcards: vec![
                matching_record(&first.truth, false),
                matching_record(&second.truth, false),
            ],
            ..Fixture::default()
        },
        0,
    )
    .expect("simulator");
    // Answers come after 800 ms, well within the 2 s timeout.
    sim.set_fault(
        "smartcards",
        Fault {
            latency_ms: 800,
            ..Fault::default()
        },
    );
    let config = Config::parse(&format!(
        "[cm]\nbase_url = \"{}\"\nretries = 0\ntimeout_ms = 2000\n",
        sim.cm_base_url()
    ))
    .expect("config");
    let client = cardbridge::cm::CmClient::new(config.cm.as_ref().expect("cm")).expect("client");
    let dir = common::TempDir::new("engine-store-wait");
    let store = cardbridge::store::Store::open(&dir).expect("store");
    let (tx, events) = channel();
    let _engine = Engine::start(
        EngineConfig {
            read: ReadOptions::default(),
            reconciler: Reconciler::new(Some(client), CardIdOrder::Auto),
            store: Some(store),
            retry_initial: Duration::from_secs(30),
            retry_max: Duration::from_secs(30),
        },
        tx,
    )
    .expect("engine");

    let _first = Inserted::insert(first.clone(), a.port, true).expect("insert");
    // The first card's lookup is on its way to the server...
    common::eventually("the first card's lookup", Duration::from_secs(20), || {
        sim.log()
            .iter()
            .any(|l| l.route == "smartcards")
            .then_some(())
    });
    // ...when another connection takes the write lock for 3 s and the second card is read,
    // whose sighting must wait for that lock.
    let db = rusqlite::Connection::open(dir.join("cardbridge.db")).expect("second connection");
    db.execute_batch("BEGIN IMMEDIATE").expect("write lock");
    let _second = Inserted::insert(second.clone(), b.port, true).expect("insert");
    next(
        &events,
        "the second card's read",
        |e| matches!(e, Event::CardRead(c) if c.reader == b.reader),
    );
    std::thread::sleep(Duration::from_secs(3));
    db.execute_batch("COMMIT").expect("release");

    let first_id = first.truth.card_id.clone();
    let (reconciled, _) = next(
        &events,
        "the first card's reconciliation",
        |e| matches!(e, Event::CardReconciled(r) if r.card_id == first_id),
    );
    let Event::CardReconciled(r) = reconciled else {
        unreachable!()
    };
    assert_eq!(r.state, State::Matched, "{:?}", r.reason);
}
