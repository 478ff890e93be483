//! The station's engine: PC/SC monitor events in; card snapshots and reconciliations out.
//!
//! ```text
//! monitor thread ──MonitorEvent──> dispatcher thread ──"read now"──> one worker thread per reader
//!                                        │                                  │ Card
//!                                        v                                  v
//!                                  Event (reader/card/pcsc)      reconcile thread (tokio): lookup,
//!                                                                cache, store, retry with backoff
//! ```
//!
//! Readers are read in parallel, one read at a time per reader, each worker with its own slot
//! (on a station, its own PC/SC context; see [`Source`] for the scripted stand-in). Every
//! successful read triggers a reconciliation on a separate thread, so a slow or absent server
//! never delays card reading. A reconciliation that finds the server unavailable is retried
//! with backoff until it succeeds or a newer read of the same card replaces it.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::card::{Card, ReadOptions, TransportError};
use crate::pcsc::{self, Monitor, MonitorEvent, PcscSlots};
use crate::reconcile::history::History;
use crate::reconcile::recent::Recent;
use crate::reconcile::{Reconciler, Reconciliation, State};
use crate::slots::{Slot, Slots};
use crate::store::{Store, CARD_ID_FORM};

/// What the engine reports: the station's events (see [`crate::event`]).
pub use crate::event::StationEvent as Event;

/// How the engine reads and reconciles.
pub struct EngineConfig {
    pub read: ReadOptions,
    pub reconciler: Reconciler,
    pub store: Option<Store>,
    /// First retry after the server was unavailable; doubled up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

/// The last reconciliations of the cards reconciled most recently, shared with the local API
/// (which falls back to the store for older ones).
pub type Cache = Arc<Mutex<Recent>>;

/// What the dispatcher acts on: the monitor's events, and reads asked for by the API.
enum Input {
    Monitor(MonitorEvent),
    Read(String),
}

impl From<MonitorEvent> for Input {
    fn from(e: MonitorEvent) -> Self {
        Input::Monitor(e)
    }
}

/// Where the engine's monitor events and cards come from.
pub enum Source {
    /// pcscd: its monitor thread, and a PC/SC context per reader.
    Pcsc,
    /// A script standing in for pcscd and its readers: monitor events arrive on `monitor`,
    /// reads come from `slots`. The engine ends only once every sender of `monitor` is dropped.
    Scripted {
        monitor: Receiver<MonitorEvent>,
        slots: Arc<dyn Slots>,
    },
}

/// Asks the engine to read a reader again (and so to reconcile its card again).
#[derive(Clone)]
pub struct ReadRequester(Sender<Input>);

impl ReadRequester {
    /// False when the engine has stopped.
    pub fn read(&self, reader: &str) -> bool {
        self.0.send(Input::Read(reader.to_string())).is_ok()
    }
}

/// A running engine; stopping (or dropping) it stops every thread.
pub struct Engine {
    monitor: Option<Monitor>,
    threads: Vec<JoinHandle<()>>,
    cache: Cache,
    requests: Option<Sender<Input>>,
    jobs: Option<JobSender>,
}

impl Engine {
    /// The engine on pcscd.
    pub fn start(config: EngineConfig, events: Sender<Event>) -> std::io::Result<Engine> {
        Engine::start_on(Source::Pcsc, config, events)
    }

    /// The engine on any card source: a station's pcscd, or the simulated year's script.
    pub fn start_on(
        source: Source,
        config: EngineConfig,
        events: Sender<Event>,
    ) -> std::io::Result<Engine> {
        let cache: Cache = Arc::default();
        let (monitor_tx, monitor_rx) = channel();
        let (card_tx, card_rx) = tokio::sync::mpsc::unbounded_channel();
        let reconcile_thread = {
            let reconcile = ReconcileLoop {
                reconciler: Arc::new(config.reconciler),
                store: Arc::new(Mutex::new(config.store)),
                cache: cache.clone(),
                events: events.clone(),
                retry_initial: config.retry_initial,
                retry_max: config.retry_max,
                generations: Arc::default(),
                started: Arc::default(),
            };
            std::thread::Builder::new()
                .name("reconcile".into())
                .spawn(move || reconcile.run(card_rx))?
        };
        let (monitor, script, slots): (_, _, Arc<dyn Slots>) = match source {
            Source::Pcsc => (
                Some(Monitor::spawn(monitor_tx.clone())?),
                None,
                Arc::new(PcscSlots),
            ),
            Source::Scripted { monitor, slots } => {
                let tx = monitor_tx.clone();
                let forward = std::thread::Builder::new()
                    .name("monitor-script".into())
                    .spawn(move || {
                        for event in monitor {
                            if tx.send(Input::Monitor(event)).is_err() {
                                return;
                            }
                        }
                    })?;
                (None, Some(forward), slots)
            }
        };
        let dispatcher = Dispatcher {
            events,
            cards: card_tx.clone(),
            read: config.read,
            slots,
            workers: HashMap::new(),
        };
        let dispatch_thread = std::thread::Builder::new()
            .name("dispatch".into())
            .spawn(move || dispatcher.run(monitor_rx))?;
        Ok(Engine {
            monitor,
            threads: [Some(dispatch_thread), Some(reconcile_thread), script]
                .into_iter()
                .flatten()
                .collect(),
            cache,
            requests: Some(monitor_tx),
            jobs: Some(card_tx),
        })
    }

    /// The PC/SC monitor's state and heartbeat.
    pub fn monitor_health(&self) -> Option<Arc<crate::pcsc::monitor::Health>> {
        self.monitor.as_ref().map(|m| m.health())
    }

    /// A handle that asks for a fresh read of a reader.
    pub fn read_requester(&self) -> Option<ReadRequester> {
        self.requests.clone().map(ReadRequester)
    }

    /// A handle that asks for a card to be reconciled again (after a revocation).
    pub fn reconcile_requester(&self) -> Option<ReconcileRequester> {
        self.jobs.clone().map(ReconcileRequester)
    }

    /// The cache of last reconciliations, for readers such as the local API.
    pub fn cache(&self) -> Cache {
        self.cache.clone()
    }

    /// The last reconciliation of a card, if any.
    pub fn reconciliation(&self, card_id: &str) -> Option<Reconciliation> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(card_id)
            .cloned()
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Stopping the monitor closes its channel, which ends the dispatcher, whose end closes
        // the workers' and the reconcile thread's channels in turn.
        if let Some(monitor) = self.monitor.take() {
            monitor.stop();
        }
        // With the monitor's and our own senders gone (and the API's and the outbox's requesters
        // dropped by then), the dispatcher's and the reconcile thread's channels close.
        self.requests = None;
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A card to reconcile: `fresh` when SCEPman is to be asked again; its history when the store
/// call that recorded its read brought it along (a retry reads it again).
struct Work {
    card: Card,
    fresh: bool,
    history: Option<History>,
}

/// What the reconcile thread is asked to do.
enum Job {
    /// A card was read (a sighting). `fresh` when a sync asked for the read: SCEPman is asked
    /// again instead of its recent answers being reused.
    Read { card: Card, fresh: bool },
    /// Reconcile a card again without reading it, with fresh answers (after a revocation ended):
    /// the card as its reader has it now, else its last successful read from the store.
    Again { card_id: String, card: Option<Card> },
}

type JobSender = tokio::sync::mpsc::UnboundedSender<Job>;

/// Asks the engine to reconcile a card again, whether it is in a reader or known from its last
/// read.
#[derive(Clone)]
pub struct ReconcileRequester(JobSender);

impl ReconcileRequester {
    /// `card` is the card as a reader has it now, if it is in one. False when the engine has
    /// stopped.
    pub fn reconcile_again(&self, card_id: &str, card: Option<Card>) -> bool {
        let card_id = card_id.to_string();
        self.0.send(Job::Again { card_id, card }).is_ok()
    }
}

struct Dispatcher {
    events: Sender<Event>,
    cards: JobSender,
    read: ReadOptions,
    slots: Arc<dyn Slots>,
    /// One worker per reader; a message asks it to read the card now (`true`: for a sync).
    workers: HashMap<String, (Sender<Request>, JoinHandle<()>)>,
}

impl Dispatcher {
    fn run(mut self, inputs: Receiver<Input>) {
        for input in inputs {
            let event = match input {
                Input::Monitor(event) => event,
                Input::Read(reader) => {
                    self.request_read(&reader, Request::Sync);
                    continue;
                }
            };
            let out = match event {
                MonitorEvent::ReaderAdded { reader } => Event::ReaderAdded { reader },
                MonitorEvent::ReaderRemoved { reader } => {
                    // Dropping the sender ends the worker after its current read.
                    self.workers.remove(&reader);
                    Event::ReaderRemoved { reader }
                }
                MonitorEvent::CardInserted { reader, atr } => {
                    let atr = hex::encode_upper(atr);
                    let _ = self.events.send(Event::CardInserted {
                        reader: reader.clone(),
                        atr,
                    });
                    self.request_read(&reader, Request::Insertion);
                    continue;
                }
                MonitorEvent::CardChanged { reader, atr } => {
                    self.request_read(&reader, Request::Changed(hex::encode_upper(atr)));
                    continue;
                }
                MonitorEvent::CardRemoved { reader } => Event::CardRemoved { reader },
                MonitorEvent::Unavailable {
                    reason,
                    access_denied,
                } => Event::PcscUnavailable {
                    reason,
                    access_denied,
                },
                MonitorEvent::Restored => Event::PcscRestored,
            };
            let _ = self.events.send(out);
        }
        for (_, (tx, thread)) in self.workers.drain() {
            drop(tx);
            let _ = thread.join();
        }
    }

    fn request_read(&mut self, reader: &str, request: Request) {
        if let Some((tx, _)) = self.workers.get(reader) {
            if tx.send(request.clone()).is_ok() {
                return;
            }
        }
        let (tx, rx) = channel();
        let worker = ReaderWorker {
            reader: reader.to_string(),
            read: self.read.clone(),
            events: self.events.clone(),
            cards: self.cards.clone(),
        };
        let slot = self.slots.open(reader);
        match std::thread::Builder::new()
            .name(format!("reader-{reader}"))
            .spawn(move || worker.run(slot, rx))
        {
            Ok(thread) => {
                let _ = tx.send(request);
                self.workers.insert(reader.to_string(), (tx, thread));
            }
            Err(e) => {
                let error = TransportError::Failed(format!("cannot start a reader thread: {e}"));
                let _ = self
                    .events
                    .send(Event::CardReadFailed(Box::new(pcsc::unreadable(
                        reader,
                        &[],
                        error,
                    ))));
            }
        }
    }
}

struct ReaderWorker {
    reader: String,
    read: ReadOptions,
    events: Sender<Event>,
    cards: JobSender,
}

impl ReaderWorker {
    fn run(self, mut slot: Box<dyn Slot>, requests: Receiver<Request>) {
        // What the last successful read found, to tell a card that changed from one that did not.
        let mut last: Option<Identity> = None;
        while let Ok(first) = requests.recv() {
            // Requests that piled up during a read ask for the same thing: read once, fresh if
            // any of them was a sync, a mere check only if all of them were.
            let mut pending = Pending::from(first);
            while let Ok(more) = requests.try_recv() {
                pending.add(more);
            }
            for attempt in 1..=READS_PER_REQUEST {
                let card = slot.read(&self.read);
                // A card pulled in the middle of the read, and a card in the reader that pcscd
                // will not report: another card went in (or the same one back) before pcscd
                // noticed the pull. Read what is there now; the requests that came meanwhile
                // are answered by this read too.
                let pulled = card
                    .error
                    .as_ref()
                    .is_some_and(|e| e.kind == crate::card::ReadErrorKind::CardRemoved);
                let swapped = attempt < READS_PER_REQUEST && pulled && slot.holds_unreported_card();
                let identity = Identity::of(&card);
                let changed = pending.changed.take();
                if changed.is_some() && identity.is_some() && identity == last {
                    tracing::debug!(reader = %self.reader, "the event counter moved, the card is the same");
                } else {
                    // A card pcscd never announced (a change under the same ATR, or a card
                    // that replaced one pulled mid-read) is announced here, before its read.
                    let unannounced = attempt > 1;
                    if let Some(atr) = changed.or_else(|| unannounced.then(|| card.atr.clone())) {
                        self.announce_change(atr);
                    }
                    self.publish(card, pending.fresh);
                }
                if identity.is_some() {
                    last = identity;
                }
                if !swapped {
                    break;
                }
                while let Ok(more) = requests.try_recv() {
                    pending.add(more);
                }
                pending.changed = None;
            }
        }
    }

    /// A card pcscd did not announce is announced as the monitor announces a swap.
    fn announce_change(&self, atr: String) {
        let reader = self.reader.clone();
        let _ = self.events.send(Event::CardRemoved {
            reader: reader.clone(),
        });
        let _ = self.events.send(Event::CardInserted { reader, atr });
    }

    fn publish(&self, card: Card, fresh: bool) {
        let event = if card.error.is_none() {
            Event::CardRead(Box::new(card.clone()))
        } else {
            Event::CardReadFailed(Box::new(card.clone()))
        };
        let _ = self.events.send(event);
        let _ = self.cards.send(Job::Read { card, fresh });
    }
}

/// Why a reader worker is asked to read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    /// A card went in.
    Insertion,
    /// An API client asked for a sync: SCEPman is asked again too.
    Sync,
    /// pcscd's counter moved under the same ATR, or the ATR (its hex) changed under the same
    /// counter: the card is announced again only if the read finds another card (or none that
    /// reads).
    Changed(String),
}

/// The requests one read answers.
struct Pending {
    fresh: bool,
    /// Set while every request so far was a [`Request::Changed`].
    changed: Option<String>,
}

impl From<Request> for Pending {
    fn from(request: Request) -> Pending {
        let mut pending = Pending {
            fresh: false,
            changed: None,
        };
        if let Request::Changed(atr) = &request {
            pending.changed = Some(atr.clone());
        }
        pending.add(request);
        pending
    }
}

impl Pending {
    fn add(&mut self, request: Request) {
        match request {
            Request::Sync => {
                self.fresh = true;
                self.changed = None;
            }
            Request::Insertion => self.changed = None,
            Request::Changed(_) => {}
        }
    }
}

/// What tells two reads of a reader apart: the card id and the certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    card_id: Option<String>,
    thumbprints: Vec<String>,
}

impl Identity {
    /// `None` for a read that failed: it identifies nothing.
    fn of(card: &Card) -> Option<Identity> {
        card.error.is_none().then(|| Identity {
            card_id: card.card_id.clone(),
            thumbprints: card
                .certificates
                .iter()
                .map(|c| c.thumbprint.clone())
                .collect(),
        })
    }
}

/// Reads of one request at most: the first, and again while a card pulled mid-read has been
/// replaced by another that pcscd does not report.
const READS_PER_REQUEST: u32 = 3;

/// Threads the reconcile runtime runs blocking calls on (store calls, Kerberos tokens). Store
/// calls wait for one connection in turn, so more threads would only wait; without a bound the
/// pool grew by a thread whenever more calls than ever before came at once (the simulated
/// year: 37 threads after 100,000 insertions, 45 after 500,000).
const BLOCKING_THREADS: usize = 4;

struct ReconcileLoop {
    reconciler: Arc<Reconciler>,
    store: Arc<Mutex<Option<Store>>>,
    cache: Cache,
    events: Sender<Event>,
    retry_initial: Duration,
    retry_max: Duration,
    /// The reconciliation in flight per card id (or reader, for a card without one), by the
    /// number it was started with: a retry stops when a newer read of the card exists. Entries
    /// leave when their reconciliation ends, so the map holds only what is in flight.
    generations: Arc<Mutex<HashMap<String, u64>>>,
    /// Numbers reconciliations are started with; never reused, so an old one that outlived its
    /// entry cannot pass for the current one.
    started: Arc<std::sync::atomic::AtomicU64>,
}

impl ReconcileLoop {
    fn run(self, mut jobs: tokio::sync::mpsc::UnboundedReceiver<Job>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(BLOCKING_THREADS)
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = self.events.send(Event::PcscUnavailable {
                    access_denied: false,
                    reason: format!("cannot start the reconciliation runtime: {e}"),
                });
                return;
            }
        };
        let this = Arc::new(self);
        runtime.block_on(async {
            while let Some(job) = jobs.recv().await {
                let Some(work) = this.work_of(job).await else {
                    continue;
                };
                let generation = this.next_generation(&work.card);
                tokio::spawn(this.clone().reconcile_until_answered(work, generation));
            }
        });
    }

    /// What a job reconciles: a read is recorded as a sighting first (a failed read stops
    /// there), in the same store call that reads the card's history; a card reconciled again
    /// comes from its reader or from the store.
    async fn work_of(&self, job: Job) -> Option<Work> {
        match job {
            Job::Read { card, fresh } => {
                let sighting = card.clone();
                let history = self
                    .on_store(move |s| {
                        s.record_sighting(&sighting)?;
                        match sighting.error {
                            None => s.history(&sighting).map(Some),
                            Some(_) => Ok(None),
                        }
                    })
                    .await
                    .flatten();
                card.error.is_none().then_some(Work {
                    card,
                    fresh,
                    history,
                })
            }
            Job::Again {
                card: Some(card), ..
            } => Some(Work {
                card,
                fresh: true,
                history: None,
            }),
            Job::Again {
                card_id,
                card: None,
            } => self
                .on_store(move |s| s.last_card(&card_id))
                .await
                .flatten()
                .map(|card| Work {
                    card,
                    fresh: true,
                    history: None,
                }),
        }
    }

    async fn reconcile_until_answered(self: Arc<Self>, work: Work, generation: u64) {
        let Work {
            card,
            mut fresh,
            mut history,
        } = work;
        let mut delay = self.retry_initial;
        loop {
            let known = match history.take() {
                Some(known) => known,
                None => self.history(&card).await,
            };
            let r = self.reconciler.reconcile(&card, fresh, &known).await;
            fresh = false;
            if !self.is_current(&card, generation) {
                return;
            }
            let unavailable = r.state == State::ServerUnavailable;
            if let Some(id) = &r.card_id {
                self.cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remember(id, r.clone());
            }
            let saved = r.clone();
            // The id form the server answered to is kept for the next start.
            let form = self.reconciler.preferred_form().filter(|_| !unavailable);
            self.on_store(move |s| {
                s.save_reconciliation(&saved)?;
                match form {
                    Some(form) => s.set_setting(CARD_ID_FORM, form.as_str()),
                    None => Ok(()),
                }
            })
            .await;
            let _ = self.events.send(Event::CardReconciled(Box::new(r)));
            if !unavailable {
                self.finished(&card, generation);
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.retry_max);
            if !self.is_current(&card, generation) {
                return;
            }
        }
    }

    fn next_generation(&self, card: &Card) -> u64 {
        let key = card.card_id.clone().unwrap_or_else(|| card.reader.clone());
        let g = self
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut generations = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        generations.insert(key, g);
        g
    }

    /// A reconciliation ended: its entry goes, unless a newer one took its place.
    fn finished(&self, card: &Card, generation: u64) {
        let key = card.card_id.clone().unwrap_or_else(|| card.reader.clone());
        let mut generations = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        if generations.get(&key) == Some(&generation) {
            generations.remove(&key);
        }
    }

    fn is_current(&self, card: &Card, generation: u64) -> bool {
        let key = card.card_id.clone().unwrap_or_else(|| card.reader.clone());
        self.generations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .is_some_and(|g| *g == generation)
    }

    /// What the store knows about the card; nothing when there is no store or it fails.
    async fn history(&self, card: &Card) -> History {
        let card = card.clone();
        self.on_store(move |s| s.history(&card))
            .await
            .unwrap_or_default()
    }

    /// Runs `f` on the store on the blocking pool, `None` without a store or when it fails (the
    /// error is logged). A store call can wait for seconds (another connection's write lock,
    /// an fsync under `synchronous = FULL`); on this runtime's one thread that wait would
    /// stall every reconciliation in flight, whose timeouts then fire although the server had
    /// answered in time.
    async fn on_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Option<T> {
        let store = self.store.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let guard = store.lock().unwrap_or_else(|p| p.into_inner());
            guard.as_ref().map(f)
        })
        .await;
        match outcome {
            Ok(Some(Ok(value))) => Some(value),
            Ok(Some(Err(e))) => {
                tracing::error!("state database: {e}");
                None
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!("state database call ended abnormally: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_only_checked_when_every_pending_request_is_one() {
        let changed = || Request::Changed("3B".into());
        let cases: [(&[Request], bool, Option<&str>); 5] = [
            (&[changed()], false, Some("3B")),
            (&[changed(), changed()], false, Some("3B")),
            (&[changed(), Request::Insertion], false, None),
            (&[Request::Insertion, changed()], false, None),
            (&[changed(), Request::Sync], true, None),
        ];
        for (requests, fresh, checked) in cases {
            let mut pending = Pending::from(requests[0].clone());
            for r in &requests[1..] {
                pending.add(r.clone());
            }
            assert_eq!(pending.fresh, fresh, "{requests:?}");
            assert_eq!(pending.changed.as_deref(), checked, "{requests:?}");
        }
    }

    #[test]
    fn a_failed_read_identifies_no_card() {
        let mut card = Card::failed(
            "R",
            &[0x3B],
            &crate::card::ReadError::Deadline,
            time::OffsetDateTime::UNIX_EPOCH,
        );
        assert_eq!(Identity::of(&card), None);
        card.error = None;
        card.card_id = Some("AA".into());
        assert_eq!(
            Identity::of(&card),
            Some(Identity {
                card_id: Some("AA".into()),
                thumbprints: Vec::new()
            })
        );
    }
}
