//! The PC/SC monitor: one thread that turns pcscd's reader and card state into typed events.
//!
//! It owns its own PC/SC context (pcsc-lite wants one context per thread) and waits in
//! `SCardGetStatusChange` on `\\?PnP?\Notification` plus every reader, with a short timeout so
//! that a stop request is honoured promptly. After every wait it builds a snapshot of all readers
//! and emits the difference from the previous one ([`diff`], a pure function).
//!
//! pcscd is unreliable by nature: it exits when idle, restarts on upgrade, and after a restart an
//! old context answers `NoService` forever while still looking valid. On NoService,
//! ServiceStopped or InvalidHandle (or any error other than a timeout or an unknown reader) the
//! monitor drops the context, emits [`MonitorEvent::Unavailable`] once, re-establishes with
//! backoff, re-lists the readers and emits [`MonitorEvent::Restored`] followed by only what
//! changed meanwhile, so a client's picture of the readers stays consistent.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ::pcsc::{Context, Error, ReaderState, Scope, State, PNP_NOTIFICATION};

/// How long one `SCardGetStatusChange` may block: the monitor's reaction time to a stop request.
const WAIT: Duration = Duration::from_millis(250);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where the monitor stands, for readiness and the watchdog: its state, and a heartbeat the
/// thread renews at least every [`WAIT`] while it is alive (also while it waits for pcscd).
#[derive(Debug)]
pub struct Health {
    state: AtomicU8,
    /// Milliseconds since `started` at the last beat.
    beat_ms: AtomicU64,
    started: Instant,
}

/// What the monitor is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorState {
    /// Not yet connected nor given up on a first attempt.
    Starting,
    /// Watching pcscd's readers.
    Connected,
    /// pcscd cannot be reached (or refused access); trying again with backoff.
    WaitingForPcscd,
}

impl Health {
    fn new() -> Health {
        Health {
            state: AtomicU8::new(0),
            beat_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    pub fn state(&self) -> MonitorState {
        match self.state.load(Ordering::Relaxed) {
            1 => MonitorState::Connected,
            2 => MonitorState::WaitingForPcscd,
            _ => MonitorState::Starting,
        }
    }

    fn set(&self, state: MonitorState) {
        let n = match state {
            MonitorState::Starting => 0,
            MonitorState::Connected => 1,
            MonitorState::WaitingForPcscd => 2,
        };
        self.state.store(n, Ordering::Relaxed);
        self.beat();
    }

    fn beat(&self) {
        self.beat_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long ago the monitor thread last showed it was alive.
    pub fn since_last_beat(&self) -> Duration {
        let last = Duration::from_millis(self.beat_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// Fault injection for the watchdog test, in builds with the `fault-injection` feature only
/// (the test rig turns it on; a release build has no such hook): with
/// `CARDBRIDGE_TEST_STALL_MONITOR_MS=N` in the environment, the monitor thread stops working
/// (and beating) N ms after it starts, as a monitor stuck in a driver call would.
#[cfg(feature = "fault-injection")]
fn injected_stall() -> Option<Instant> {
    std::env::var("CARDBRIDGE_TEST_STALL_MONITOR_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map(|ms| Instant::now() + Duration::from_millis(ms))
}

#[cfg(not(feature = "fault-injection"))]
fn injected_stall() -> Option<Instant> {
    None
}

/// What happened to the readers and cards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorEvent {
    ReaderAdded {
        reader: String,
    },
    ReaderRemoved {
        reader: String,
    },
    CardInserted {
        reader: String,
        atr: Vec<u8>,
    },
    CardRemoved {
        reader: String,
    },
    /// pcscd's event counter moved while a card with the same ATR stayed in the reader (another
    /// card of the same model went in between two waits, the same card was pulled and put
    /// back, or pcscd counted one insertion twice), or the ATR changed under an unmoved counter
    /// (a card pcscd never saw go in, powered by a read of it). Only a read can tell which.
    CardChanged {
        reader: String,
        atr: Vec<u8>,
    },
    /// pcscd cannot be reached; the monitor keeps trying.
    Unavailable {
        reason: String,
        /// pcscd refused this user (polkit), rather than not being there.
        access_denied: bool,
    },
    /// pcscd is back; the events that follow bring the picture up to date.
    Restored,
}

/// What the monitor knows about one reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderView {
    /// The ATR of the card in the reader, `None` when empty.
    pub card: Option<Vec<u8>>,
    /// pcsc-lite's insert/remove counter (upper 16 bits of the event state).
    pub event_count: u32,
}

/// All readers by name.
pub type Snapshot = BTreeMap<String, ReaderView>;

/// The events that turn `old` into `new`. Counters are only compared when both snapshots come
/// from the same pcscd instance (`same_service`): they restart at zero with pcscd.
pub fn diff(old: &Snapshot, new: &Snapshot, same_service: bool) -> Vec<MonitorEvent> {
    let mut events = Vec::new();
    for (reader, view) in old {
        if !new.contains_key(reader) {
            if view.card.is_some() {
                events.push(MonitorEvent::CardRemoved {
                    reader: reader.clone(),
                });
            }
            events.push(MonitorEvent::ReaderRemoved {
                reader: reader.clone(),
            });
        }
    }
    for (reader, view) in new {
        let before = old.get(reader);
        if before.is_none() {
            events.push(MonitorEvent::ReaderAdded {
                reader: reader.clone(),
            });
        }
        let had = before.and_then(|b| b.card.as_ref());
        let (swapped, changed) = match (before, had, &view.card) {
            (Some(before), Some(old_atr), Some(new_atr)) => {
                let counted = same_service && before.event_count != view.event_count;
                let other_atr = old_atr != new_atr;
                // pcscd saw a card go out and another in. After a pcscd restart the counters
                // say nothing, and another ATR is another card.
                let swapped = other_atr && (counted || !same_service);
                // The same ATR with the counter moved may be another card of the model or the
                // same one re-seated. Another ATR under an unmoved counter is a card pcscd never
                // saw go in, whose ATR it took when an application powered it: most often the
                // reader worker reading a swap pcscd missed, which it has announced already.
                // Both are for a read to judge.
                let changed = (counted && !other_atr) || (same_service && other_atr && !counted);
                (swapped, changed)
            }
            _ => (false, false),
        };
        if changed {
            events.push(MonitorEvent::CardChanged {
                reader: reader.clone(),
                atr: view.card.clone().unwrap_or_default(),
            });
        }
        if had.is_some() && (view.card.is_none() || swapped) {
            events.push(MonitorEvent::CardRemoved {
                reader: reader.clone(),
            });
        }
        if let Some(atr) = &view.card {
            if had.is_none() || swapped {
                events.push(MonitorEvent::CardInserted {
                    reader: reader.clone(),
                    atr: atr.clone(),
                });
            }
        }
    }
    events
}

/// A running monitor thread; stopping (or dropping) it joins the thread.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    health: Arc<Health>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Starts the monitor; events go to `events` (as any type made from them, so a consumer can
    /// merge them with its own inputs) until it is stopped or the receiver is dropped.
    pub fn spawn<T: From<MonitorEvent> + Send + 'static>(
        events: Sender<T>,
    ) -> std::io::Result<Monitor> {
        let stop = Arc::new(AtomicBool::new(false));
        let health = Arc::new(Health::new());
        let stall_at = injected_stall();
        let worker = Worker {
            events,
            stop: stop.clone(),
            health: health.clone(),
            stall_at,
            known: Snapshot::new(),
            unavailable: false,
        };
        let thread = std::thread::Builder::new()
            .name("pcsc-monitor".into())
            .spawn(move || worker.run())?;
        Ok(Monitor {
            stop,
            health,
            thread: Some(thread),
        })
    }

    /// The monitor's state and heartbeat.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // A panicking monitor has already reported itself on stderr.
            let _ = thread.join();
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Worker<T> {
    events: Sender<T>,
    stop: Arc<AtomicBool>,
    health: Arc<Health>,
    stall_at: Option<Instant>,
    known: Snapshot,
    unavailable: bool,
}

/// Why the watch loop ended.
enum Exit {
    Stopped,
    Lost(Error),
}

impl<T: From<MonitorEvent>> Worker<T> {
    fn run(mut self) {
        let mut backoff = BACKOFF_START;
        let mut same_service = true;
        while !self.stopped() {
            let exit = match Context::establish(Scope::User) {
                Ok(ctx) => {
                    let exit = self.watch(&ctx, same_service);
                    // Dropping the context releases it; after a pcscd restart it is useless.
                    drop(ctx);
                    exit
                }
                Err(e) => Exit::Lost(e),
            };
            match exit {
                Exit::Stopped => return,
                Exit::Lost(e) => {
                    same_service = false;
                    self.health.set(MonitorState::WaitingForPcscd);
                    if !self.unavailable {
                        self.unavailable = true;
                        if !self.emit(MonitorEvent::Unavailable {
                            reason: e.to_string(),
                            access_denied: e == Error::SecurityViolation,
                        }) {
                            return;
                        }
                    }
                    self.sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Watches with one context until stopped or the context is lost.
    fn watch(&mut self, ctx: &Context, mut same_service: bool) -> Exit {
        let mut states = vec![ReaderState::new(PNP_NOTIFICATION(), State::UNAWARE)];
        let mut relist = true;
        loop {
            if self.stopped() {
                return Exit::Stopped;
            }
            self.health.beat();
            if relist {
                match ctx.list_readers_owned() {
                    Ok(names) => sync_reader_states(&mut states, names),
                    Err(e) => return Exit::Lost(e),
                }
                relist = false;
                if self.health.state() != MonitorState::Connected {
                    self.health.set(MonitorState::Connected);
                }
                if self.unavailable {
                    self.unavailable = false;
                    if !self.emit(MonitorEvent::Restored) {
                        return Exit::Stopped;
                    }
                }
            }
            match ctx.get_status_change(WAIT, &mut states) {
                Ok(()) | Err(Error::Timeout) => {}
                Err(Error::UnknownReader) => {
                    relist = true;
                    continue;
                }
                Err(e) => return Exit::Lost(e),
            }
            if states[0].event_state().contains(State::CHANGED) {
                relist = true;
            }
            let mut snapshot = Snapshot::new();
            for state in &states[1..] {
                let event = state.event_state();
                if event.intersects(State::UNKNOWN | State::IGNORE) {
                    // The reader is gone; the next listing drops it.
                    relist = true;
                    continue;
                }
                let present = event.contains(State::PRESENT);
                snapshot.insert(
                    state.name().to_string_lossy().into_owned(),
                    ReaderView {
                        card: present.then(|| state.atr().to_vec()),
                        event_count: state.event_count(),
                    },
                );
            }
            for event in diff(&self.known, &snapshot, same_service) {
                if !self.emit(event) {
                    return Exit::Stopped;
                }
            }
            self.known = snapshot;
            same_service = true;
            for state in &mut states {
                state.sync_current_state();
            }
        }
    }

    fn emit(&self, event: MonitorEvent) -> bool {
        self.events.send(event.into()).is_ok()
    }

    fn stopped(&self) -> bool {
        if self.stall_at.is_some_and(|at| Instant::now() >= at) {
            // The injected stall: no more work and no more beats, until told to stop.
            while !self.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps for `d`, waking early when asked to stop, beating meanwhile.
    fn sleep(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopped() && Instant::now() < until {
            self.health.beat();
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
    }
}

/// Keeps the state of readers that are still there (their current state and counter), adds new
/// readers as UNAWARE and drops the ones that disappeared. Entry 0 is the PnP notification.
fn sync_reader_states(states: &mut Vec<ReaderState>, names: Vec<CString>) {
    states.retain(|s| {
        s.name() == PNP_NOTIFICATION() || names.iter().any(|n| n.as_c_str() == s.name())
    });
    for name in names {
        if !states.iter().any(|s| s.name() == name.as_c_str()) {
            states.push(ReaderState::new(name, State::UNAWARE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(entries: &[(&str, Option<&[u8]>, u32)]) -> Snapshot {
        entries
            .iter()
            .map(|(r, atr, count)| {
                (
                    r.to_string(),
                    ReaderView {
                        card: atr.map(<[u8]>::to_vec),
                        event_count: *count,
                    },
                )
            })
            .collect()
    }

    fn inserted(r: &str, atr: &[u8]) -> MonitorEvent {
        MonitorEvent::CardInserted {
            reader: r.into(),
            atr: atr.to_vec(),
        }
    }
    fn removed(r: &str) -> MonitorEvent {
        MonitorEvent::CardRemoved { reader: r.into() }
    }

    #[test]
    fn new_reader_with_card() {
        let events = diff(&snap(&[]), &snap(&[("A", Some(&[1]), 1)]), true);
        assert_eq!(
            events,
            [
                MonitorEvent::ReaderAdded { reader: "A".into() },
                inserted("A", &[1])
            ]
        );
    }

    #[test]
    fn reader_unplugged_with_card_removes_the_card_first() {
        let events = diff(&snap(&[("A", Some(&[1]), 1)]), &snap(&[]), true);
        assert_eq!(
            events,
            [
                removed("A"),
                MonitorEvent::ReaderRemoved { reader: "A".into() }
            ]
        );
    }

    #[test]
    fn a_counter_moved_under_the_same_atr_is_a_change_for_a_read_to_judge() {
        let events = diff(
            &snap(&[("A", Some(&[1]), 1)]),
            &snap(&[("A", Some(&[1]), 3)]),
            true,
        );
        assert_eq!(
            events,
            [MonitorEvent::CardChanged {
                reader: "A".into(),
                atr: vec![1]
            }]
        );
    }

    #[test]
    fn a_fast_swap_to_another_atr_is_a_removal_and_an_insertion() {
        let events = diff(
            &snap(&[("A", Some(&[1]), 1)]),
            &snap(&[("A", Some(&[2]), 3)]),
            true,
        );
        assert_eq!(events, [removed("A"), inserted("A", &[2])]);
    }

    #[test]
    fn another_atr_under_an_unmoved_counter_is_a_change_for_a_read_to_judge() {
        let events = diff(
            &snap(&[("A", Some(&[1]), 1)]),
            &snap(&[("A", Some(&[2]), 1)]),
            true,
        );
        assert_eq!(
            events,
            [MonitorEvent::CardChanged {
                reader: "A".into(),
                atr: vec![2]
            }]
        );
    }

    #[test]
    fn after_a_pcscd_restart_only_real_differences_are_emitted() {
        let before = snap(&[("A", Some(&[1]), 7), ("B", None, 2), ("C", Some(&[3]), 1)]);
        let after = snap(&[("A", Some(&[1]), 0), ("B", Some(&[2]), 0), ("D", None, 0)]);
        let events = diff(&before, &after, false);
        assert_eq!(
            events,
            [
                removed("C"),
                MonitorEvent::ReaderRemoved { reader: "C".into() },
                inserted("B", &[2]),
                MonitorEvent::ReaderAdded { reader: "D".into() },
            ]
        );
    }

    #[test]
    fn nothing_changed_nothing_emitted() {
        let s = snap(&[("A", Some(&[1]), 1), ("B", None, 0)]);
        assert!(diff(&s, &s, true).is_empty());
    }
}
