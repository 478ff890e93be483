//! cardbridge: a smart-card bridge agent.
//!
//! It reads every attached smart card over PC/SC (ATR, card identity, certificates and their
//! SHA-1 thumbprints) so that kiosk and helpdesk applications can match a physical card to its
//! server-side profile. See `ARCHITECTURE.md` for where things live.
//!
//! - [`card`]: the card protocols (ATR, BER-TLV, PIV, GIDS, certificates), free of I/O.
//! - [`pcsc`]: the PC/SC side: the monitor thread, reading one reader, the APDU transport.
//! - [`http`]: what the server clients share (TLS, authentication, error classes, backoff).
//! - [`auth`]: Kerberos (Negotiate) and OAuth client credentials, and secret files.
//! - [`cm`]: the MIM CM REST client.
//! - [`scepman`]: the SCEPman Management API client (certificate revocation).
//! - [`revoke`]: revocation requests and their planning (pure).
//! - [`outbox`]: the worker that delivers stored revocations exactly once.
//! - [`reconcile`]: the rules that compare a card with the server's record, and the lookup.
//! - [`store`]: the SQLite state database.
//! - [`station`]: the readers and cards the station has now.
//! - [`state_dir`]: the state directory and its private files (modes, safe replacement).
//! - [`config`]: the TOML configuration.
//! - [`event`]: the station's events, typed, serialised once at the edge.
//! - [`slots`]: where the engine's reader workers get their cards (pcscd, or a script).
//! - [`engine`]: monitor, reader workers and reconciliation wired together, as the daemon runs them.
//! - [`api`]: the local REST + Server-Sent Events API and its security checks.
//! - [`daemon`]: `cardbridge run`, the engine behind the local API.
//! - [`service`]: the daemon as a systemd service (readiness, status, watchdog).
//! - [`clock`]: the system clock, handed to the card layer, and the timestamp format.
//! - [`crl_reason`]: RFC 5280 revocation reasons, by name and number.
//! - [`error_text`]: an error and its causes as one line.
//! - [`fuzz`]: every parser of untrusted bytes behind one `fn(&[u8])`, for the fuzz targets and
//!   the corpus replay test.
//! - [`metrics`]: the station's Prometheus metrics (prometheus-client).
//! - [`random`]: random tokens and keys from the system's source.
//! - [`logging`]: `tracing` output for a terminal or the journal.
//! - [`malloc`]: glibc's allocator for a long run: two arenas, free pages given back every 10 s.
//! - [`code_pages`]: the daemon's executable mapped in whole at start.
//! - [`scan`]: the `cardbridge scan` command.
//! - [`check`]: `cardbridge check-config --online`, an authenticated call to every server.
//! - [`client`]: `cardbridge cards`, `events`, `revoke` and `revocations`, clients of a running
//!   daemon.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod api;
pub mod auth;
pub mod check;
pub mod client;
pub mod clock;
pub mod cm;
pub mod code_pages;
pub mod config;
pub mod crl_reason;
pub mod daemon;
pub mod engine;
pub mod error_text;
pub mod event;
pub mod fuzz;
pub mod http;
pub mod logging;
pub mod malloc;
pub mod metrics;
pub mod outbox;
pub mod pcsc;
pub mod random;
pub mod reconcile;
pub mod revoke;
pub mod scan;
pub mod scepman;
pub mod serial;
pub mod service;
pub mod slots;
pub mod state_dir;
pub mod station;
pub mod store;

/// The card layer is its own crate so the compiler keeps it free of I/O; see its crate docs.
pub use cardbridge_card as card;
