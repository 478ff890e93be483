//! `cardbridge run`: the engine, the station state, the event bus and the local API, until
//! SIGINT or SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::api::events::Bus;
use crate::api::security::Clients;
use crate::api::serve::{serve, Connections, Limits};
use crate::api::{self, Shared};
use crate::card::ReadOptions;
use crate::cm::CmClient;
use crate::config::{ApiClient, Config, Scope};
use crate::engine::{Engine, EngineConfig, Event, Source};
use crate::http::ServerError;
use crate::outbox::{Pacing, Worker};
use crate::reconcile::Reconciler;
use crate::scepman::ScepmanClient;
use crate::store::{PageCache, Store, StoreError, CARD_ID_FORM};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cm(#[from] ServerError),
    #[error(transparent)]
    StateDir(#[from] crate::state_dir::StateDirError),
    #[error("cannot write the API token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up the API socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start: {0}")]
    Start(std::io::Error),
    #[error(transparent)]
    MetricsTls(#[from] api::tls::TlsError),
}

/// How long a stopping daemon lets requests in progress finish.
const DRAIN: Duration = Duration::from_secs(5);

/// Runs on pcscd until a stop signal: open what the daemon needs, start its parts, serve, shut
/// down.
pub fn run(config: &Config) -> Result<(), DaemonError> {
    crate::malloc::configure();
    crate::code_pages::map_in();
    crate::logging::init(config.log_level.as_deref());
    run_on(config, Source::Pcsc, stop_signal())
}

/// The daemon on any card source until `stop` completes; logging is the caller's. The simulated
/// year (`hw-tests/soak --simulated`) runs the daemon in its own process this way.
pub fn run_on(
    config: &Config,
    source: Source,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let opened = Opened::open(config)?;
    let mut running = Running::start(config, opened, source)?;
    running.serve(stop);
    running.shutdown(config);
    Ok(())
}

/// Everything opened before anything starts, so a bad configuration, database or port stops
/// the daemon before a thread exists.
struct Opened {
    runtime: tokio::runtime::Runtime,
    clients: Vec<ApiClient>,
    reconciler: Reconciler,
    /// Three connections: the engine's, the API's (audit, outbox inserts), the worker's.
    stores: [Store; 3],
    scepman: Option<ScepmanClient>,
    cm: Option<CmClient>,
    listeners: Vec<(tokio::net::TcpListener, std::net::SocketAddr)>,
    unix: Option<tokio::net::UnixListener>,
    /// The socket's device and inode, to remove only our own at the end.
    socket_id: Option<(u64, u64)>,
    /// The fleet's metrics listener (`[metrics] listen`).
    scrape: Option<Scrape>,
}

/// The fleet's metrics listener, opened: its socket, address, token hash and TLS configuration.
struct Scrape {
    listener: tokio::net::TcpListener,
    addr: std::net::SocketAddr,
    token: Option<[u8; 32]>,
    /// Names accepted in Host besides addresses and `localhost`.
    hosts: Vec<String>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl Opened {
    fn open(config: &Config) -> Result<Opened, DaemonError> {
        let state_dir = config.state_dir();
        let store = Store::open(&state_dir)?;
        let clients = if config.api.clients.is_empty() {
            vec![generated_client(&state_dir)?]
        } else {
            config.api.clients.clone()
        };
        let reconciler = Reconciler::configured(config, store.setting(CARD_ID_FORM)?)?;
        // The engine's, the API's and the outbox's connections (`Running::start`).
        let stores = [store, Store::open(&state_dir)?, Store::open(&state_dir)?];
        for reading in &stores[1..] {
            reading.set_page_cache(PageCache::Reading)?;
        }
        let (cm, scepman) = reconciler.clients();
        // Blocking calls (the API's and the outbox's store calls, the Unix peer's lookup) on
        // at most 8 threads more: a bound, as for the engine's.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(8)
            .enable_all()
            .build()
            .map_err(DaemonError::Start)?;
        let mut listeners = Vec::new();
        for addr in &config.api.listen {
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind(addr))
                .map_err(|source| DaemonError::Listen {
                    addr: *addr,
                    source,
                })?;
            let bound = listener.local_addr().map_err(DaemonError::Start)?;
            listeners.push((listener, bound));
        }
        let unix = match &config.api.unix_socket {
            Some(path) => {
                Some(runtime.block_on(async { bind_unix(path, config.api.unix_socket_gid) })?)
            }
            None => None,
        };
        let socket_id = config.api.unix_socket.as_deref().and_then(file_id);
        let scrape = match config.metrics.listen {
            Some(addr) => Some(open_scrape(&runtime, &config.metrics, addr)?),
            None => None,
        };
        if let Some(warning) = config.metrics.exposure() {
            tracing::warn!("{warning}");
        }
        Ok(Opened {
            runtime,
            clients,
            reconciler,
            stores,
            scepman,
            cm,
            listeners,
            unix,
            socket_id,
            scrape,
        })
    }
}

/// The started daemon: the engine, the event pump, the outbox worker, and what the API serves.
struct Running {
    runtime: tokio::runtime::Runtime,
    engine: Engine,
    shared: Arc<Shared>,
    pump: std::thread::JoinHandle<()>,
    worker: tokio::task::JoinHandle<()>,
    listeners: Vec<(tokio::net::TcpListener, std::net::SocketAddr)>,
    unix: Option<tokio::net::UnixListener>,
    socket_id: Option<(u64, u64)>,
    scrape: Option<Scrape>,
}

impl Running {
    fn start(config: &Config, opened: Opened, source: Source) -> Result<Running, DaemonError> {
        let [engine_store, api_store, outbox_store] = opened.stores;
        let (tx, events) = std::sync::mpsc::channel();
        let engine = Engine::start_on(
            source,
            EngineConfig {
                read: ReadOptions::default(),
                reconciler: opened.reconciler,
                store: Some(engine_store),
                retry_initial: Duration::from_secs(5),
                retry_max: Duration::from_secs(300),
            },
            tx,
        )
        .map_err(DaemonError::Start)?;
        let shared = Arc::new(Shared {
            clients: Clients::new(&opened.clients),
            bus: Bus::starting_at(crate::api::events::first_id(std::time::SystemTime::now())),
            station: Default::default(),
            reconciliations: engine.cache(),
            stopping: tokio::sync::watch::channel(false).0,
            reads: Mutex::new(engine.read_requester()),
            store: Mutex::new(Some(api_store)),
            outbox: Default::default(),
            scepman_configured: opened.scepman.is_some(),
            cm_configured: opened.cm.is_some(),
            failures: Default::default(),
            refusal_log: Default::default(),
            metrics: Default::default(),
            local_users: config.api.local_users.clone(),
            revocation_budget: api::RevocationBudget::new(
                config.api.revocation_burst,
                config.api.revocations_per_minute,
            ),
            route_limits: api::RouteLimits::of(&config.api),
        });
        let pump = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("events".into())
                .spawn(move || pump(events, &shared))
                .map_err(DaemonError::Start)?
        };
        let publisher = shared.clone();
        let again = engine.reconcile_requester();
        let worker = Worker::new(
            outbox_store,
            opened.scepman,
            opened.cm,
            Pacing::of(config),
            Box::new(move |r| {
                api::publish_revocation(&publisher.bus, r);
                // The kiosk then sees the card's new state (`card.reconciled`) after the
                // revocation's end (`revocation.updated`).
                if let (true, Some(again)) = (r.status.is_finished(), &again) {
                    let card = publisher.station_card(&r.card_id);
                    again.reconcile_again(&r.card_id, card);
                }
            }),
        );
        let worker = opened
            .runtime
            .spawn(worker.run(shared.outbox.clone(), shared.stopped()));
        Ok(Running {
            runtime: opened.runtime,
            engine,
            shared,
            pump,
            worker,
            listeners: opened.listeners,
            unix: opened.unix,
            socket_id: opened.socket_id,
            scrape: opened.scrape,
        })
    }

    /// Serves the API until `stop` (or a listener fails), with systemd supervision; returns
    /// once every server, the supervisor and the outbox worker have ended.
    fn serve(&mut self, stop: impl std::future::Future<Output = ()> + Send + 'static) {
        let listeners = std::mem::take(&mut self.listeners);
        let unix = self.unix.take();
        let scrape = self.scrape.take();
        let shared = self.shared.clone();
        let health = self.engine.monitor_health();
        let worker = &mut self.worker;
        self.runtime.block_on(async {
            let connections = Connections::new(Limits::of_process());
            let limits = connections.limits();
            tracing::debug!(
                "API connections: at most {}, {} event streams per client, idle ones closed after {:?}",
                limits.max_connections,
                limits.streams_per_client,
                limits.idle
            );
            tokio::spawn(connections.clone().reap(shared.stopping.subscribe()));
            tokio::spawn(crate::malloc::release_periodically(shared.stopping.subscribe()));
            let mut servers = tokio::task::JoinSet::new();
            for (listener, addr) in listeners {
                tracing::info!("API listening on http://{addr}/v1/");
                let app = api::router(shared.clone(), api::Kind::Tcp(addr));
                let stopping = shared.stopping.subscribe();
                servers.spawn(serve(listener, app, connections.clone(), stopping, DRAIN));
            }
            if let Some(unix) = unix {
                let app = api::router(shared.clone(), api::Kind::Unix);
                let stopping = shared.stopping.subscribe();
                servers.spawn(serve(unix, app, connections.clone(), stopping, DRAIN));
            }
            if let Some(s) = scrape {
                let access = api::metrics::Access {
                    token_sha256: s.token,
                    hosts: s.hosts,
                };
                let app =
                    api::metrics::scrape_router(shared.clone(), access, s.addr, s.tls.is_some());
                let stopping = shared.stopping.subscribe();
                let connections = connections.clone();
                match s.tls {
                    Some(tls) => {
                        let listener = api::tls::TlsListener::spawn(s.listener, tls);
                        servers.spawn(serve(listener, app, connections, stopping, DRAIN));
                    }
                    None => {
                        servers.spawn(serve(s.listener, app, connections, stopping, DRAIN));
                    }
                }
            }
            let stopper = shared.clone();
            tokio::spawn(async move {
                stop.await;
                stopper.stopping.send_replace(true);
            });
            let api_alive = Arc::new(AtomicBool::new(true));
            let supervisor = health.map(|health| {
                let watched = crate::service::Watched {
                    station: shared.station.clone(),
                    reconciliations: shared.reconciliations.clone(),
                    stopping: shared.stopping.subscribe(),
                };
                tokio::spawn(crate::service::supervise(
                    health,
                    watched,
                    api_alive.clone(),
                ))
            });
            while let Some(done) = servers.join_next().await {
                if !*shared.stopping.borrow() {
                    // A listener ended on its own: the service is no longer whole.
                    api_alive.store(false, Ordering::Relaxed);
                    tracing::error!("an API server stopped: {:?}", done.err());
                }
            }
            if let Some(supervisor) = supervisor {
                let _ = supervisor.await;
            }
            // The worker stops at once (an interrupted delivery is resumed at the next start).
            let _ = worker.await;
        });
    }

    /// The shutdown order, in one place: the API's read requests go before the engine can stop;
    /// stopping the engine closes the event channel, which ends the pump; the databases close
    /// with their owners; the socket is removed only if it is still ours (another daemon may
    /// have replaced a dead one meanwhile).
    fn shutdown(self, config: &Config) {
        self.shared
            .reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.engine.stop();
        let _ = self.pump.join();
        if let Some(path) = &config.api.unix_socket {
            if self.socket_id.is_some() && file_id(path) == self.socket_id {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Device and inode of a path (not following a symlink).
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Binds the API socket at `path` (mode 0660, group `gid` when configured).
///
/// A socket at the path that answers is another daemon's: refuse, never take it over. A dead
/// one is removed; anything else there (a regular file, a directory) is an error, never
/// deleted. The socket is made in a private directory beside the path, where nobody can swap
/// it for a symlink while its mode and group are set, then renamed into place.
fn bind_unix(path: &Path, gid: Option<u32>) -> Result<tokio::net::UnixListener, DaemonError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let err = |source| DaemonError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(std::io::Error::other(
                    "another cardbridge daemon is running and answers on it",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => {
            return Err(err(std::io::Error::other(
                "something other than a socket is there; move it away",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let parent = path.parent().unwrap_or(Path::new("."));
    let private = parent.join(format!(".cardbridge-socket-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(err)?;
    let staged = private.join("api.sock");
    let bound = (|| {
        let listener = tokio::net::UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&staged, None, Some(gid))?;
        }
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound.map_err(err)
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Engine events → station state and metrics, then the log and the event bus.
fn pump(events: Receiver<Event>, shared: &Shared) {
    for event in events {
        apply(&event, shared);
        api::announce(&shared.bus, &event);
    }
}

/// What an event changes in the station's state and the metrics.
fn apply(event: &Event, shared: &Shared) {
    let mut station = shared.station.lock().unwrap_or_else(|p| p.into_inner());
    match event {
        Event::ReaderAdded { reader } => station.add_reader(reader),
        Event::ReaderRemoved { reader } => station.remove_reader(reader),
        Event::CardRemoved { reader } => station.card_removed(reader),
        Event::CardRead(card) | Event::CardReadFailed(card) => {
            shared
                .metrics
                .read(card.read_ms, card.error.as_ref().map(|e| e.code()));
            station.card_read(card.as_ref().clone());
        }
        Event::CardReconciled(r) => shared.metrics.reconciled(r),
        Event::PcscUnavailable { .. } => shared.metrics.pcscd(false),
        Event::PcscRestored => shared.metrics.pcscd(true),
        Event::CardInserted { .. } | Event::RevocationUpdated(_) => {}
    }
}

/// Binds the metrics listener and loads its TLS configuration, so either problem stops the
/// daemon at startup with the key that causes it.
fn open_scrape(
    runtime: &tokio::runtime::Runtime,
    metrics: &crate::config::MetricsConfig,
    addr: std::net::SocketAddr,
) -> Result<Scrape, DaemonError> {
    let tls = match (&metrics.tls_certificate, &metrics.tls_key) {
        (Some(cert), Some(key)) => Some(api::tls::server_config(cert, key)?),
        _ => None,
    };
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|source| DaemonError::Listen { addr, source })?;
    let addr = listener.local_addr().map_err(DaemonError::Start)?;
    Ok(Scrape {
        listener,
        addr,
        token: metrics.token_hash(),
        hosts: metrics.hosts.clone(),
        tls,
    })
}

/// With no clients configured: a random token for local tools, written readable only by the
/// service user, with every scope and no browser origin.
fn generated_client(state_dir: &Path) -> Result<ApiClient, DaemonError> {
    let path = state_dir.join("api-token");
    let err = |source| DaemonError::Token {
        path: path.clone(),
        source,
    };
    let token =
        crate::random::random_hex::<32>().map_err(|e| err(std::io::Error::other(e.to_string())))?;
    crate::state_dir::write_private(state_dir, "api-token", format!("{token}\n").as_bytes())?;
    Ok(ApiClient {
        name: "local".into(),
        token_sha256: hex::encode(Sha256::digest(token.as_bytes())),
        scopes: vec![Scope::Read, Scope::Sync, Scope::Revoke],
        origins: Vec::new(),
    })
}
