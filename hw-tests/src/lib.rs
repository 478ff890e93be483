//! cardbridge's hardware rig.
//!
//! - [`vcard`]: a virtual PIV or GIDS card (real X.509 certificates from rcgen, faults on demand);
//! - [`vpcd`]: puts a virtual card into a vpcd reader slot of a real pcscd;
//! - [`rig`]: starts and shares that pcscd and hands out reader slots to tests;
//! - [`certs`]: the certificates' issuing CA;
//! - [`sim`]: the MIM CM / SCEPman simulator, a real HTTP server on loopback;
//! - [`sim_auth`]: its Negotiate acceptor and OAuth token endpoints;
//! - [`kdc`]: a real MIT Kerberos KDC for the Negotiate tests;
//! - [`chaos`]: the end checks of the chaos and soak runs;
//! - [`station_client`]: requests, event streams and `/proc` samples of a running daemon, for
//!   the load drivers;
//! - [`report`]: the figures of `hw-tests/report`, recorded by the benchmarks, as one table;
//! - [`qualify`]: the comparisons of `hw-tests/qualify` (cardbridge against OpenSC and ykman).
//!
//! The end-to-end tests in `tests/` and the benchmark in `src/bin/bench.rs` are built on these.

pub mod certs;
pub mod chaos;
pub mod kdc;
pub mod qualify;
pub mod report;
pub mod rig;
pub mod sim;
pub mod sim_auth;
pub mod station_client;
pub mod vcard;
pub mod vpcd;
