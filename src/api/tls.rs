//! TLS for the fleet's metrics listener (`[metrics] tls_certificate`, `tls_key`): rustls with
//! ring, as the server clients already use.
//!
//! Handshakes run in tasks of their own, not in the accept loop, so a client that opens a
//! connection and never finishes its handshake holds up nobody; each has a deadline, and only
//! so many run at once, and only a few per peer address. A new connection from an address that
//! has its few takes the place of that address's oldest handshake; when all places are taken,
//! of the oldest overall. So connections opened to never handshake (which need no token) cannot
//! keep Prometheus's scrape, whose handshake takes milliseconds, out: from one address they hold
//! a few places and evict only their own.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::serve::Accept;
use crate::auth::secret::{SecretError, SecretPath};

/// A handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; a connection beyond ends the oldest one.
const HANDSHAKES: usize = 64;
/// Handshakes in progress from one peer address; a connection beyond ends that address's oldest.
const HANDSHAKES_PER_PEER: usize = 8;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("metrics.tls_certificate: cannot read {path}: {detail}")]
    Certificate { path: String, detail: String },
    #[error(transparent)]
    Key(#[from] SecretError),
    #[error("metrics.tls_key: {0}")]
    BadKey(String),
    #[error("metrics.tls_certificate and tls_key do not make a TLS configuration: {0}")]
    Config(String),
}

/// The server configuration from a PEM certificate chain and a PEM private key (a secret: mode
/// 0600, or a systemd credential name).
pub fn server_config(certificate: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_err = |detail: String| TlsError::Certificate {
        path: certificate.display().to_string(),
        detail,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no PEM certificate in it".into()));
    }
    let secret = SecretPath::resolve("metrics.tls_key", key)?;
    let key = PrivateKeyDer::from_pem_slice(&secret.read()?)
        .map_err(|e| TlsError::BadKey(format!("no PEM private key ({e})")))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// A TCP listener whose connections come out with their TLS handshake done.
pub struct TlsListener {
    done: mpsc::Receiver<TlsStream<TcpStream>>,
}

impl TlsListener {
    /// Accepts on `listener` in a task of its own until the returned listener is dropped.
    pub fn spawn(listener: TcpListener, config: Arc<ServerConfig>) -> TlsListener {
        let (tx, done) = mpsc::channel(HANDSHAKES);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            let mut handshakes = JoinSet::new();
            // The handshakes in progress with their peer's address, oldest first.
            let mut oldest_first: VecDeque<(IpAddr, AbortHandle)> = VecDeque::new();
            loop {
                let (stream, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => (stream, peer.ip()),
                        Err(e) => {
                            tracing::warn!("metrics listener: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => return,
                };
                while handshakes.try_join_next().is_some() {}
                make_room(&mut oldest_first, peer);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                oldest_first.push_back((
                    peer,
                    handshakes.spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                        {
                            Ok(Ok(tls)) => {
                                let _ = tx.send(tls).await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!("metrics listener: TLS handshake failed: {e}")
                            }
                            Err(_) => tracing::debug!("metrics listener: TLS handshake timed out"),
                        }
                    }),
                ));
            }
        });
        TlsListener { done }
    }
}

/// Ends a handshake to make room for one from `peer`: the peer's oldest when it has its
/// [`HANDSHAKES_PER_PEER`], else the oldest overall when all [`HANDSHAKES`] places are taken.
fn make_room(oldest_first: &mut VecDeque<(IpAddr, AbortHandle)>, peer: IpAddr) {
    oldest_first.retain(|(_, h)| !h.is_finished());
    let own = oldest_first.iter().filter(|(ip, _)| *ip == peer).count();
    let victim = if own >= HANDSHAKES_PER_PEER {
        oldest_first.iter().position(|(ip, _)| *ip == peer)
    } else if oldest_first.len() >= HANDSHAKES {
        Some(0)
    } else {
        None
    };
    if let Some((_, handle)) = victim.and_then(|i| oldest_first.remove(i)) {
        handle.abort();
        tracing::debug!("metrics listener: a stalled TLS handshake made room");
    }
}

impl Accept for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Peer = ();

    async fn accept(&mut self) -> std::io::Result<(Self::Io, ())> {
        match self.done.recv().await {
            Some(tls) => Ok((tls, ())),
            None => Err(std::io::Error::other("the TLS acceptor stopped")),
        }
    }
}
