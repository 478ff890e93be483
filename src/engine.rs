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
//! Readers are read in parallel, one read at a time per reader, each worker with its own PC/SC
//! context. Every successful read triggers a reconciliation on a separate thread, so a slow or
//! absent server never delays card reading. A reconciliation that finds the server unavailable
//! is retried with backoff until it succeeds or a newer read of the same card replaces it.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::card::{Card, ReadOptions, TransportError};
use crate::pcsc::{self, Monitor, MonitorEvent};
use crate::reconcile::{Reconciler, Reconciliation, State};
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

/// Last reconciliation per card id, with the time it was checked inside.
pub type Cache = Arc<Mutex<HashMap<String, Reconciliation>>>;

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
}

impl Engine {
    pub fn start(config: EngineConfig, events: Sender<Event>) -> std::io::Result<Engine> {
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
            };
            std::thread::Builder::new()
                .name("reconcile".into())
                .spawn(move || reconcile.run(card_rx))?
        };
        let dispatcher = Dispatcher {
            events,
            cards: card_tx,
            read: config.read,
            workers: HashMap::new(),
        };
        let dispatch_thread = std::thread::Builder::new()
            .name("dispatch".into())
            .spawn(move || dispatcher.run(monitor_rx))?;
        let monitor = Monitor::spawn(monitor_tx.clone())?;
        Ok(Engine {
            monitor: Some(monitor),
            threads: vec![dispatch_thread, reconcile_thread],
            cache,
            requests: Some(monitor_tx),
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
        // With the monitor's and our own sender gone (and the API's requesters dropped by then),
        // the dispatcher's channel closes.
        self.requests = None;
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

/// A card snapshot on its way to reconciliation.
type CardSender = tokio::sync::mpsc::UnboundedSender<Card>;

struct Dispatcher {
    events: Sender<Event>,
    cards: CardSender,
    read: ReadOptions,
    /// One worker per reader; a message asks it to read the card now.
    workers: HashMap<String, (Sender<()>, JoinHandle<()>)>,
}

impl Dispatcher {
    fn run(mut self, inputs: Receiver<Input>) {
        for input in inputs {
            let event = match input {
                Input::Monitor(event) => event,
                Input::Read(reader) => {
                    self.request_read(&reader);
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
                    self.request_read(&reader);
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

    fn request_read(&mut self, reader: &str) {
        if let Some((tx, _)) = self.workers.get(reader) {
            if tx.send(()).is_ok() {
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
        match std::thread::Builder::new()
            .name(format!("reader-{reader}"))
            .spawn(move || worker.run(rx))
        {
            Ok(thread) => {
                let _ = tx.send(());
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
    cards: CardSender,
}

impl ReaderWorker {
    fn run(self, requests: Receiver<()>) {
        let Ok(name) = std::ffi::CString::new(self.reader.clone()) else {
            return;
        };
        let mut ctx = None;
        while requests.recv().is_ok() {
            // Insert events that piled up during a read ask for the same thing: read once.
            while requests.try_recv().is_ok() {}
            if ctx.is_none() {
                ctx = pcsc::connect().ok();
            }
            let card = match &ctx {
                Some(c) => pcsc::read_reader(c, &name, &self.read),
                None => pcsc::unreadable(
                    &self.reader,
                    &[],
                    TransportError::ServiceUnavailable("cannot open a PC/SC context".into()),
                ),
            };
            if card
                .error
                .as_ref()
                .is_some_and(|e| e.kind == crate::card::ReadErrorKind::PcscUnavailable)
            {
                // The context died with pcscd: open a fresh one next time.
                ctx = None;
            }
            let event = if card.error.is_none() {
                Event::CardRead(Box::new(card.clone()))
            } else {
                Event::CardReadFailed(Box::new(card.clone()))
            };
            let _ = self.events.send(event);
            let _ = self.cards.send(card);
        }
    }
}

struct ReconcileLoop {
    reconciler: Arc<Reconciler>,
    store: Arc<Mutex<Option<Store>>>,
    cache: Cache,
    events: Sender<Event>,
    retry_initial: Duration,
    retry_max: Duration,
    /// Read counter per card id: a retry stops when a newer read of the card exists.
    generations: Arc<Mutex<HashMap<String, u64>>>,
}

impl ReconcileLoop {
    fn run(self, mut cards: tokio::sync::mpsc::UnboundedReceiver<Card>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
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
            while let Some(card) = cards.recv().await {
                this.with_store(|s| s.record_sighting(&card));
                if card.error.is_some() {
                    continue;
                }
                let generation = this.next_generation(&card);
                tokio::spawn(this.clone().reconcile_until_answered(card, generation));
            }
        });
    }

    async fn reconcile_until_answered(self: Arc<Self>, card: Card, generation: u64) {
        let mut delay = self.retry_initial;
        loop {
            let r = self.reconciler.reconcile(&card).await;
            if !self.is_current(&card, generation) {
                return;
            }
            let unavailable = r.state == State::ServerUnavailable;
            if let Some(id) = &r.card_id {
                self.cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.clone(), r.clone());
            }
            self.with_store(|s| s.save_reconciliation(&r));
            let _ = self.events.send(Event::CardReconciled(Box::new(r)));
            if !unavailable {
                if let Some(form) = self.reconciler.preferred_form() {
                    self.with_store(|s| s.set_setting(CARD_ID_FORM, form.as_str()));
                }
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
        let mut generations = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        let g = generations.entry(key).or_insert(0);
        *g += 1;
        *g
    }

    fn is_current(&self, card: &Card, generation: u64) -> bool {
        let key = card.card_id.clone().unwrap_or_else(|| card.reader.clone());
        self.generations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .is_some_and(|g| *g == generation)
    }

    /// Runs a store operation; a failing database is reported but never stops reconciling.
    fn with_store<T>(&self, f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError>) {
        let guard = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(store) = guard.as_ref() {
            if let Err(e) = f(store) {
                tracing::error!("state database: {e}");
            }
        }
    }
}
