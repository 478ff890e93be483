//! Serving the API's connections, with bounds: any local process can open connections, so
//! none may be held for free.
//!
//! - **A cap on open connections**, derived from the process's descriptor limit (three quarters
//!   of it, less a reserve for the database, pcscd and the servers; at most 8192), shared by all
//!   listeners. At the cap, a new connection closes the connection that has been idle longest
//!   (never sent a byte, stopped in the middle of its headers, or idle between requests), so a
//!   legitimate request is served during a flood of idle connections.
//! - **Idle connections are closed** after [`Limits::idle`], whichever way they are idle, and
//!   hyper closes one whose headers take longer than [`Limits::header_read`].
//! - **Event streams are exempt** from both while they stream, and have their own cap per client
//!   ([`Connections::open_stream`]).
//!
//! axum's `serve` offers none of this (no timer, so not even hyper's header timeout), hence this
//! accept loop on hyper's HTTP/1 connection builder.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tower::ServiceExt;

/// The bounds of [`Connections`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub streams_per_client: usize,
    pub idle: Duration,
    pub header_read: Duration,
}

impl Limits {
    /// From the process's soft descriptor limit.
    pub fn from_descriptor_limit(nofile: u64) -> Limits {
        let cap = (nofile.saturating_mul(3) / 4)
            .saturating_sub(64)
            .clamp(16, 8192) as usize;
        Limits {
            max_connections: cap,
            streams_per_client: (cap / 4).max(8),
            idle: Duration::from_secs(30),
            header_read: Duration::from_secs(10),
        }
    }

    /// From this process's `RLIMIT_NOFILE`.
    pub fn of_process() -> Limits {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        Limits::from_descriptor_limit(soft)
    }
}

/// Every open API connection, across listeners.
pub struct Connections {
    limits: Limits,
    next_id: AtomicU64,
    table: Mutex<HashMap<u64, Entry>>,
    /// Open event streams per client.
    streams: Mutex<HashMap<String, usize>>,
}

struct Entry {
    last_active: Instant,
    in_flight: usize,
    streams: usize,
    close: Arc<Notify>,
    /// Told to close; its task has not ended yet.
    closing: bool,
}

impl Entry {
    fn idle_since(&self) -> Option<Instant> {
        (self.in_flight == 0 && self.streams == 0 && !self.closing).then_some(self.last_active)
    }
}

/// One connection's place in the table; leaving it drops the connection from the table.
#[derive(Clone)]
pub struct Connection {
    id: u64,
    table: Arc<Connections>,
}

/// An open event stream, counted against its client and keeping its connection from being
/// closed as idle; dropping it (the stream ends) gives both back.
pub struct StreamGuard {
    connection: Connection,
    client: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let table = &self.connection.table;
        if let Some(e) = lock(&table.table).get_mut(&self.connection.id) {
            e.streams = e.streams.saturating_sub(1);
            e.last_active = Instant::now();
        }
        let mut streams = lock(&table.streams);
        if let Some(n) = streams.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                streams.remove(&self.client);
            }
        }
    }
}

impl Connection {
    fn update(&self, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = lock(&self.table.table).get_mut(&self.id) {
            f(e);
        }
    }

    /// Counts an event stream of `client` on this connection; `None` over the client's cap.
    pub fn open_stream(&self, client: &str) -> Option<StreamGuard> {
        {
            let mut streams = lock(&self.table.streams);
            let n = streams.entry(client.to_string()).or_default();
            if *n >= self.table.limits.streams_per_client {
                return None;
            }
            *n += 1;
        }
        self.update(|e| e.streams += 1);
        Some(StreamGuard {
            connection: self.clone(),
            client: client.to_string(),
        })
    }
}

impl Connections {
    pub fn new(limits: Limits) -> Arc<Connections> {
        Arc::new(Connections {
            limits,
            next_id: AtomicU64::new(0),
            table: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Makes room for one more connection: at the cap, closes the one idle longest. False when
    /// every connection is busy (the new one is then refused).
    fn admit(&self) -> bool {
        let mut table = lock(&self.table);
        // Connections told to close still count until their task ends; each admission beyond
        // the cap closes one more, so a burst cannot overshoot it.
        let open = table.values().filter(|e| !e.closing).count();
        if open < self.limits.max_connections {
            return true;
        }
        let oldest = table
            .iter()
            .filter_map(|(id, e)| e.idle_since().map(|since| (since, *id)))
            .min_by_key(|(since, _)| *since)
            .map(|(_, id)| id);
        match oldest.and_then(|id| table.get_mut(&id)) {
            Some(entry) => {
                entry.closing = true;
                entry.close.notify_one();
                true
            }
            None => false,
        }
    }

    fn register(self: &Arc<Self>) -> (Connection, Arc<Notify>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        lock(&self.table).insert(
            id,
            Entry {
                last_active: Instant::now(),
                in_flight: 0,
                streams: 0,
                close: close.clone(),
                closing: false,
            },
        );
        (
            Connection {
                id,
                table: self.clone(),
            },
            close,
        )
    }

    fn remove(&self, id: u64) {
        lock(&self.table).remove(&id);
    }

    /// Closes every connection idle for longer than [`Limits::idle`]; runs until stopping.
    pub async fn reap(self: Arc<Self>, stopping: tokio::sync::watch::Receiver<bool>) {
        let tick = async {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                let now = Instant::now();
                for e in lock(&self.table).values_mut() {
                    if e.idle_since().is_some_and(|since| {
                        now.saturating_duration_since(since) > self.limits.idle
                    }) {
                        e.closing = true;
                        e.close.notify_one();
                    }
                }
            }
        };
        tokio::select! {
            _ = tick => {}
            _ = stopped(stopping) => {}
        }
    }
}

/// Resolves once a stop was requested.
async fn stopped(mut stopping: tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Something that accepts connections: the TCP and the Unix listener.
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// What each request on a connection carries as an extension (the Unix peer's credentials).
    type Peer: Clone + Send + Sync + 'static;
    fn accept(&mut self) -> impl Future<Output = std::io::Result<(Self::Io, Self::Peer)>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Peer = ();
    async fn accept(&mut self) -> std::io::Result<(Self::Io, ())> {
        let (stream, _) = tokio::net::TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, ()))
    }
}

/// Serves `listener` until `stopped`, then lets every connection finish its request (event
/// streams end on their own) for at most `drain`.
pub async fn serve<L: Accept>(
    mut listener: L,
    app: Router,
    connections: Arc<Connections>,
    stopping: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped(stopping.clone()) => break,
        };
        match accepted {
            Ok((io, peer)) => {
                if !connections.admit() {
                    continue; // dropping `io` closes it
                }
                let (connection, close) = connections.register();
                let stop = stopped(stopping.clone());
                let conn = serve_one(io, peer, app.clone(), connection, close, stop);
                tasks.spawn(conn);
            }
            Err(e) => {
                // Out of descriptors (or a transient accept error): make room and slow down,
                // rather than spin.
                tracing::error!("accept error: {e}");
                connections.admit();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        while tasks.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
}

/// One connection: HTTP/1.1 with keep-alive and hyper's header timeout; closed when the table
/// says so (idle, or evicted at the cap), or gracefully at `stopped`.
async fn serve_one<Io, P>(
    io: Io,
    peer: P,
    app: Router,
    connection: Connection,
    close: Arc<Notify>,
    stopped: impl Future<Output = ()>,
) where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    P: Clone + Send + Sync + 'static,
{
    let id = connection.id;
    let table = connection.table.clone();
    let header_read = table.limits.header_read;
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        let connection = connection.clone();
        connection.update(|e| {
            e.in_flight += 1;
            e.last_active = Instant::now();
        });
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer.clone()));
        request.extensions_mut().insert(connection.clone());
        let answer = app.clone().oneshot(request.map(axum::body::Body::new));
        async move {
            let response = answer.await;
            connection.update(|e| {
                e.in_flight = e.in_flight.saturating_sub(1);
                e.last_active = Instant::now();
            });
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::pin!(stopped);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = close.notified() => {}
        _ = &mut stopped => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
    table.remove(id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_follows_the_descriptor_limit() {
        let l = Limits::from_descriptor_limit(1024);
        assert_eq!(l.max_connections, 704);
        assert_eq!(l.streams_per_client, 176);
        assert_eq!(Limits::from_descriptor_limit(8192).max_connections, 6080);
        assert_eq!(Limits::from_descriptor_limit(1 << 20).max_connections, 8192);
        assert_eq!(Limits::from_descriptor_limit(10).max_connections, 16);
    }

    #[test]
    fn at_the_cap_the_connection_idle_longest_is_closed() {
        let table = Connections::new(Limits {
            max_connections: 2,
            streams_per_client: 1,
            idle: Duration::from_secs(30),
            header_read: Duration::from_secs(10),
        });
        let (first, first_close) = table.register();
        let (second, _) = table.register();
        second.update(|e| e.in_flight = 1);
        assert!(table.admit(), "the idle one makes room");
        let closed = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(1), first_close.notified()).await
            });
        assert!(closed.is_ok(), "the idle connection was told to close");
        // A burst does not overshoot: the closing one is not closed twice, and with the
        // newcomer busy and `second` busy there is nothing left to close.
        let (third, _) = table.register();
        third.update(|e| e.in_flight = 1);
        assert!(
            !table.admit(),
            "all busy or closing: the new connection is refused"
        );
        // A streaming connection is never the one closed.
        third.update(|e| e.in_flight = 0);
        let stream = third.open_stream("kiosk").expect("a stream");
        assert!(
            third.open_stream("kiosk").is_none(),
            "one stream per client here"
        );
        assert!(!table.admit(), "the streaming connection stays");
        drop(stream);
        assert!(
            table.admit(),
            "once its stream ends it is idle, and goes first"
        );
        drop(first);
    }
}
